"""The Namespace against every metadata engine (one suite, every backend), plus a stateful model test."""

from __future__ import annotations

import errno
import stat
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvfs import protocol as P
from kvfs.meta.engine_memory import MemoryEngine
from kvfs.meta.engine_rocksdb import RocksEngine
from kvfs.meta.namespace import ROOT_INO, Namespace

CS = 1 << 20


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    """One real etcd member for the module; every test gets its own key prefix."""
    from etcd import EtcdCluster, etcd_binary

    if etcd_binary() is None:
        pytest.fail("etcd is not installed (apt-get install etcd-server; ./dev.sh test does it)")
    cluster = EtcdCluster(str(tmp_path_factory.mktemp("etcd")), size=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _engine_maker(kind: str, request, tmp_path):
    """``etcd`` reads every key from etcd and writes each batch at once; ``etcd-cached`` is what the meta
    leader runs (reads from its copy, writes queued until ``sync``/``close``).
    Each call of ``make`` opens the same store again (a restart)."""
    if kind.startswith("etcd"):
        from kvfs.meta.engine_etcd import EtcdEngine

        etcd = request.getfixturevalue("etcd_server")
        prefix = f"/t{abs(hash(request.node.nodeid))}-{time.monotonic_ns()}"

    def make():
        if kind == "memory":
            return MemoryEngine()
        if kind.startswith("etcd"):
            cached = kind == "etcd-cached"
            return EtcdEngine.from_url(etcd.url(prefix), cache=cached, pipelined=cached)
        return RocksEngine(str(tmp_path / "db"))

    return make


@pytest.fixture(params=["memory", "rocksdb", "etcd", "etcd-cached"])
def engine_factory(request, tmp_path):
    return _engine_maker(request.param, request, tmp_path)


@pytest.fixture(params=["rocksdb", "etcd", "etcd-cached"])
def durable_engine_factory(request, tmp_path):
    """The engines whose state outlives the process (restart tests)."""
    return _engine_maker(request.param, request, tmp_path)


@pytest.fixture
def ns(engine_factory):
    n = Namespace(engine_factory(), chunk_size=CS)
    yield n
    n.engine.close()


def mkfile(ns, parent, name):
    return ns.mknode(parent, name, stat.S_IFREG | 0o644, 0, 0)


def mkdir(ns, parent, name):
    return ns.mknode(parent, name, stat.S_IFDIR | 0o755, 0, 0)


def pend(ns, chunk_id, ino=0, client_id=""):
    """What alloc_chunk / alloc_pending_chunk record (without placing it on chunkservers)."""
    batch = []
    ns.pending.add(batch, chunk_id, ino, client_id)
    ns.engine.write(batch)


def errno_of(fn, *args):
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def test_create_lookup_and_errors(ns):
    d = mkdir(ns, ROOT_INO, "d")
    f = mkfile(ns, d.ino, "f")
    assert ns.lookup(d.ino, "f").ino == f.ino
    assert ns.resolve("/d/f").ino == f.ino
    assert ns.inode(ROOT_INO).nlink == 3
    assert errno_of(mkfile, ns, d.ino, "f") == errno.EEXIST
    assert errno_of(ns.lookup, d.ino, "missing") == errno.ENOENT
    assert errno_of(ns.lookup, f.ino, "x") == errno.ENOTDIR
    assert errno_of(mkfile, ns, d.ino, "x" * 256) == errno.ENAMETOOLONG
    assert errno_of(ns.rmdir, ROOT_INO, "d") == errno.ENOTEMPTY
    assert errno_of(ns.unlink, ROOT_INO, "d") == errno.EISDIR
    assert errno_of(ns.rmdir, d.ino, "f") == errno.ENOTDIR


def test_rename_rules(ns):
    a = mkdir(ns, ROOT_INO, "a")
    b = mkdir(ns, a.ino, "b")
    f = mkfile(ns, ROOT_INO, "f")
    g = mkfile(ns, ROOT_INO, "g")
    assert errno_of(ns.rename, ROOT_INO, "a", b.ino, "a2", 0) == errno.EINVAL  # into own subtree
    assert errno_of(ns.rename, ROOT_INO, "f", ROOT_INO, "a", 0) == errno.EISDIR
    assert errno_of(ns.rename, ROOT_INO, "a", ROOT_INO, "f", 0) == errno.ENOTDIR
    assert errno_of(ns.rename, ROOT_INO, "f", ROOT_INO, "g", 1) == errno.EEXIST  # RENAME_NOREPLACE
    reply = ns.rename(ROOT_INO, "f", ROOT_INO, "g", 0)
    assert reply.replaced_ino == g.ino
    assert ns.lookup(ROOT_INO, "g").ino == f.ino
    ns.rename(ROOT_INO, "g", ROOT_INO, "h", 0)
    e = mkdir(ns, ROOT_INO, "e")
    ns.rename(a.ino, "b", ROOT_INO, "e", 0)  # over an empty directory
    assert ns.lookup(ROOT_INO, "e").ino == b.ino
    assert ns.inode(a.ino).nlink == 2 and ns.inode(ROOT_INO).nlink == 4
    assert e.ino != b.ino


def test_rename_exchange(ns):
    d = mkdir(ns, ROOT_INO, "d")
    f = mkfile(ns, ROOT_INO, "f")
    ns.rename(ROOT_INO, "d", ROOT_INO, "f", 2)
    assert ns.lookup(ROOT_INO, "d").ino == f.ino
    assert ns.lookup(ROOT_INO, "f").ino == d.ino


def test_links_orphans_and_purge(ns):
    f = mkfile(ns, ROOT_INO, "f")
    ns.link(f.ino, ROOT_INO, "g")
    assert ns.inode(f.ino).nlink == 2
    ns.unlink(ROOT_INO, "f")
    assert ns.lookup(ROOT_INO, "g").nlink == 1
    attr = ns.unlink(ROOT_INO, "g")
    assert attr.nlink == 0
    assert ns.attr(f.ino).nlink == 0  # orphan: still readable by open handles
    ns.purge(f.ino)
    assert errno_of(ns.attr, f.ino) == errno.ENOENT


def test_commit_truncate_and_chunk_garbage(ns):
    f = mkfile(ns, ROOT_INO, "f")
    ns.open_write(f.ino, "c1")
    refs = [P.ChunkRef(i, 100 + i, CS, []) for i in range(3)]
    for r in refs:
        pend(ns, r.chunk_id, f.ino, "c1")
    assert ns.commit(P.Commit(f.ino, "c1", 3 * CS, refs)).size == 3 * CS
    assert ns.used_bytes == 3 * CS
    attr = ns.commit(P.Commit(f.ino, "c1", CS + 10, []))
    chunks = ns.chunks(f.ino, 0, 10).chunks
    assert attr.size == CS + 10
    assert [(c.index, c.chunk_id, c.length) for c in chunks] == [(0, 100, CS), (1, 101, 10)]
    assert not ns.is_live_chunk(102)
    assert ns.used_bytes == CS + 10
    # A second writer is refused while the lease is held.
    assert errno_of(ns.open_write, f.ino, "c2") == errno.EBUSY
    ns.release_write(f.ino, "c1")
    ns.open_write(f.ino, "c2")


def test_restart_keeps_state(durable_engine_factory):
    engine_factory = durable_engine_factory
    engine = engine_factory()
    ns = Namespace(engine, chunk_size=CS)
    d = mkdir(ns, ROOT_INO, "d")
    f = mkfile(ns, d.ino, "f")
    ns.setxattr(f.ino, "user.k", b"v", 0)
    engine.close()
    ns2 = Namespace(engine_factory(), chunk_size=CS)
    assert ns2.resolve("/d/f").ino == f.ino
    assert ns2.getxattr(f.ino, "user.k") == b"v"
    g = mkfile(ns2, d.ino, "g")
    assert g.ino > f.ino  # ids are never reused after a restart
    ns2.engine.close()


def test_readdir_pages_cover_every_entry_once(ns):
    d = mkdir(ns, ROOT_INO, "big")
    names = {f"n{i:05d}" for i in range(2500)}
    for n in names:
        mkfile(ns, d.ino, n)
    seen, after = [], ""
    while True:
        reply = ns.readdir(d.ino, after, 700)
        seen += [e.name for e in reply.entries]
        if not reply.more:
            break
        after = reply.entries[-1].name
    assert sorted(seen) == sorted(names) and len(seen) == len(names)


NAMES = st.sampled_from(["a", "b", "c", "d"])


class NamespaceModel(RuleBasedStateMachine):
    """Random namespace operations against a dict-of-paths model."""

    def __init__(self):
        super().__init__()
        self.ns = Namespace(MemoryEngine(), chunk_size=CS)
        self.model: dict[str, str] = {"": "dir"}  # path -> "dir" | "file"

    def _ino(self, path):
        return self.ns.resolve("/" + path).ino

    def _dirs(self):
        return sorted(p for p, k in self.model.items() if k == "dir")

    @rule(data=st.data(), name=NAMES, is_dir=st.booleans())
    def create(self, data, name, is_dir):
        parent = data.draw(st.sampled_from(self._dirs()))
        path = f"{parent}/{name}".lstrip("/")
        mode = (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644)
        if path in self.model:
            assert errno_of(self.ns.mknode, self._ino(parent), name, mode, 0, 0) == errno.EEXIST
        else:
            self.ns.mknode(self._ino(parent), name, mode, 0, 0)
            self.model[path] = "dir" if is_dir else "file"

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data())
    def remove(self, data):
        path = data.draw(st.sampled_from(sorted(p for p in self.model if p)))
        parent, _, name = path.rpartition("/")
        children = [p for p in self.model if p.startswith(path + "/")]
        if self.model[path] == "dir":
            if children:
                assert errno_of(self.ns.rmdir, self._ino(parent), name) == errno.ENOTEMPTY
                return
            self.ns.rmdir(self._ino(parent), name)
        else:
            attr = self.ns.unlink(self._ino(parent), name)
            self.ns.purge(attr.ino)
        del self.model[path]

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data(), name=NAMES)
    def rename(self, data, name):
        src = data.draw(st.sampled_from(sorted(p for p in self.model if p)))
        dst_parent = data.draw(st.sampled_from(self._dirs()))
        dst = f"{dst_parent}/{name}".lstrip("/")
        sp, _, sn = src.rpartition("/")
        args = (self._ino(sp), sn, self._ino(dst_parent), name, 0)
        kind = self.model[src]
        if dst == src:
            self.ns.rename(*args)
            return
        if kind == "dir" and (dst_parent + "/").startswith(src + "/"):
            assert errno_of(self.ns.rename, *args) == errno.EINVAL
            return
        if dst in self.model:
            dkind = self.model[dst]
            if dkind == "dir" and kind != "dir":
                assert errno_of(self.ns.rename, *args) == errno.EISDIR
                return
            if dkind != "dir" and kind == "dir":
                assert errno_of(self.ns.rename, *args) == errno.ENOTDIR
                return
            if dkind == "dir" and any(p.startswith(dst + "/") for p in self.model):
                assert errno_of(self.ns.rename, *args) == errno.ENOTEMPTY
                return
        self.ns.rename(*args)
        moved = {p: k for p, k in self.model.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.model[p]
        self.model.pop(dst, None)
        for p, k in moved.items():
            self.model[dst + p[len(src):]] = k

    @invariant()
    def listing_matches(self):
        for d in self._dirs():
            want = sorted(p.rpartition("/")[2] for p in self.model if p and p.rpartition("/")[0] == d)
            got = sorted(e.name for e in self.ns.readdir(self._ino(d), "", 4096).entries)
            assert got == want, d
            subdirs = sum(1 for p in want if self.model[f"{d}/{p}".lstrip("/")] == "dir")
            assert self.ns.inode(self._ino(d)).nlink == 2 + subdirs


TestNamespaceModel = NamespaceModel.TestCase
TestNamespaceModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_kv_lookup_follows_directory_changes(ns):
    """KVCache.exists_under caches path -> directory; rmdir and rename must invalidate it."""
    from kvfs.meta.eviction import KVCache

    kv = KVCache(ns)
    base = mkdir(ns, ROOT_INO, "kv").ino
    sub = mkdir(ns, base, "ab").ino
    mkfile(ns, sub, "ab01")
    mkfile(ns, sub, "ab02")
    names = ["ab/ab01", "ab/ab02", "cd/cd01"]
    r = kv.exists_under("/kv", names)
    assert (r.exists, r.leading) == ([True, True, False], 2)
    # A directory appearing after a lookup that missed it is seen at once (misses are not cached).
    mkfile(ns, mkdir(ns, base, "cd").ino, "cd01")
    assert kv.exists_under("/kv", names).exists == [True, True, True]
    # Replace "ab" by another directory holding only ab02: the old directory's inode must not be used.
    ns.rename(base, "ab", base, "old", 0)
    new = mkdir(ns, base, "ab").ino
    mkfile(ns, new, "ab02")
    r = kv.exists_under("/kv", names)
    assert (r.exists, r.leading) == ([False, True, True], 0)
    # The subdirectory removed: nothing leads any more.
    ns.unlink(new, "ab02")
    ns.rmdir(base, "ab")
    assert kv.exists_under("/kv", names, leading_only=True).leading == 0
    # leading_only stops at the first miss across the lookup's internal slices.
    many = mkdir(ns, base, "ef").ino
    for i in range(600):
        mkfile(ns, many, f"ef{i:04d}")
    ns.unlink(many, "ef0300")
    probe = [f"ef/ef{i:04d}" for i in range(600)]
    r = kv.exists_under("/kv", probe, leading_only=True)
    assert r.leading == 300 and all(r.exists[:300]) and not any(r.exists[300:])
    r = kv.exists_under("/kv", probe)
    assert r.leading == 300 and r.exists.count(False) == 1


def test_publish_creates_whole_files_from_pending_chunks_only(ns):
    """META_KV_PUBLISH: a file born whole, never replacing one, only from fresh unpublished chunks."""
    d = mkdir(ns, ROOT_INO, "kv").ino
    for chunk_id in (7, 8, 9):
        pend(ns, chunk_id)
    size = CS + 100
    refs = [P.ChunkRef(0, 7, CS, []), P.ChunkRef(1, 8, 100, [])]
    r = ns.publish(P.KVPublish(d, "blk", 0o644, 0, 0, size, refs))
    assert r.created and r.attr.size == size and stat.S_ISREG(r.attr.mode)
    assert ns.lookup(d, "blk").ino == r.attr.ino
    assert [(c.index, c.chunk_id, c.length) for c in ns.chunks(r.attr.ino, 0, 10).chunks] == [(0, 7, CS), (1, 8, 100)]
    assert ns.used_bytes == size and 7 not in ns.pending and ns.is_live_chunk(7)
    # The same chunks again (already published: no longer pending), a gap, a wrong length: EINVAL.
    for bad in ([P.ChunkRef(0, 9, CS, []), P.ChunkRef(1, 8, 100, [])],
                [P.ChunkRef(1, 9, 100, [])],
                [P.ChunkRef(0, 9, CS - 1, []), P.ChunkRef(1, 8, 100, [])]):
        assert errno_of(ns.publish, P.KVPublish(d, "other", 0o644, 0, 0, size, bad)) == errno.EINVAL
    assert errno_of(ns.lookup, d, "other") == errno.ENOENT
    # A second writer of the same name: not replaced, its chunk dropped.
    r2 = ns.publish(P.KVPublish(d, "blk", 0o644, 0, 0, 50, [P.ChunkRef(0, 9, 50, [])]))
    assert not r2.created and r2.attr.ino == r.attr.ino and r2.attr.size == size
    assert 9 not in ns.pending and not ns.is_live_chunk(9)
    assert errno_of(ns.publish, P.KVPublish(12345, "x", 0o644, 0, 0, 0, [])) == errno.ENOENT
    # Handed out once but no longer pending (dropped as garbage: maybe gone from the chunkservers), or
    # never handed out: refused, never a file with a hole.
    ns.counters.next_chunk_id = max(ns.counters.next_chunk_id, 50)
    assert errno_of(ns.publish, P.KVPublish(d, "dropped", 0o644, 0, 0, 10, [P.ChunkRef(0, 40, 10, [])])) == errno.EINVAL
    never = ns.counters.next_chunk_id + 1000
    assert errno_of(ns.publish, P.KVPublish(d, "bogus", 0o644, 0, 0, 10, [P.ChunkRef(0, never, 10, [])])) == errno.EINVAL


def test_unlink_purges_in_the_same_call_unless_kept_open(ns):
    a, b, c = (mkfile(ns, ROOT_INO, n).ino for n in ("a", "b", "c"))
    ns.link(c, ROOT_INO, "c2")
    ns.unlink(ROOT_INO, "a", keep_open=[])  # closed everywhere the caller knows of: gone at once
    assert errno_of(ns.inode, a) == errno.ENOENT
    ns.unlink(ROOT_INO, "b", keep_open=[b])  # open by the caller: an orphan until it purges
    assert ns.inode(b).nlink == 0
    ns.purge(b)
    assert errno_of(ns.inode, b) == errno.ENOENT
    ns.unlink(ROOT_INO, "c", keep_open=[])  # another name left: nothing purged
    assert ns.inode(c).nlink == 1 and ns.lookup(ROOT_INO, "c2").ino == c


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_uncommitted_chunks_live_as_long_as_the_writers_lease(engine_factory):
    """A slow writer keeps its uploaded chunks while it renews its lease, however long it takes; one
    that lost its lease gets EIO at commit instead of a file with holes."""
    clock = FakeClock()
    ns = Namespace(engine_factory(), chunk_size=CS, lease_seconds=60, pending_grace=120, clock=clock)
    f = mkfile(ns, ROOT_INO, "ckpt")
    ns.open_write(f.ino, "w")
    for i in range(6):  # one chunk every 100 s: far past the pending grace, lease renewed meanwhile
        pend(ns, 100 + i, f.ino, "w")
        for _ in range(5):
            clock.now += 20
            assert ns.renew_leases("w", [f.ino]).lost == []
            ns.expire_pending()
    assert all(ns.is_live_chunk(100 + i) for i in range(6))
    refs = [P.ChunkRef(i, 100 + i, CS, []) for i in range(6)]
    assert ns.commit(P.Commit(f.ino, "w", 6 * CS, refs)).size == 6 * CS
    assert len(ns.pending) == 0 and all(ns.is_live_chunk(100 + i) for i in range(6))
    # A retried commit of the same chunks is accepted (they are this file's already).
    assert ns.commit(P.Commit(f.ino, "w", 6 * CS, refs)).size == 6 * CS

    # The writer stops renewing: after the lease runs out its chunk is garbage, and its commit fails.
    pend(ns, 200, f.ino, "w")
    clock.now += 61
    assert ns.expire_pending() == 1
    assert not ns.is_live_chunk(200)
    assert errno_of(ns.commit, P.Commit(f.ino, "w", 7 * CS, [P.ChunkRef(6, 200, CS, [])])) == errno.EIO
    assert ns.inode(f.ino).size == 6 * CS  # the failed commit changed nothing
    # Another client's chunk can never be committed into this file.
    pend(ns, 201, f.ino, "other")
    assert errno_of(ns.commit, P.Commit(f.ino, "w", 7 * CS, [P.ChunkRef(6, 201, CS, [])])) == errno.EIO
    # A chunk for a file that does not exist yet lives for the grace period.
    pend(ns, 300)
    clock.now += 100
    ns.expire_pending()
    assert ns.is_live_chunk(300)
    clock.now += 21
    ns.expire_pending()
    assert not ns.is_live_chunk(300)
    # Another client took the lease: renewing reports it lost.
    ns.release_write(f.ino, "w")
    ns.open_write(f.ino, "other")
    assert ns.renew_leases("w", [f.ino]).lost == [f.ino]
    ns.engine.close()


def test_uncommitted_chunks_and_their_leases_survive_a_restart(durable_engine_factory):
    engine_factory = durable_engine_factory
    clock = FakeClock()
    ns = Namespace(engine_factory(), chunk_size=CS, lease_seconds=60, clock=clock)
    f = mkfile(ns, ROOT_INO, "f")
    ns.open_write(f.ino, "w")
    pend(ns, 100, f.ino, "w")
    pend(ns, 101)
    ns.engine.close()
    ns = Namespace(engine_factory(), chunk_size=CS, lease_seconds=60, clock=clock)
    assert ns.is_live_chunk(100) and ns.is_live_chunk(101)
    assert errno_of(ns.open_write, f.ino, "other") == errno.EBUSY  # the writer's lease was rebuilt
    clock.now += 59
    ns.expire_pending()
    assert ns.commit(P.Commit(f.ino, "w", 10, [P.ChunkRef(0, 100, 10, [])])).size == 10
    ns.engine.close()
    ns = Namespace(engine_factory(), chunk_size=CS, lease_seconds=60, clock=clock)
    assert 100 not in ns.pending and ns.is_live_chunk(100) and 101 in ns.pending
    ns.engine.close()
