"""The mount's leased lookups of KV files and shared lookups (kvfs/leased_lookups.py, issue 11).

Against a real cluster with two mounts: a KV-named file looked up through a mount is opened without a
META_GET_CHUNKS (its map came with the lookup, under a KV map lease), an ordinary file still asks meta
at every open (close-to-open), and an in-place rewrite of a leased file is read as the new bytes once
acknowledged, even by a mount whose kernel keeps the old entry (the cached map is dropped when its
lease ends). Meta's requests are counted from its metrics endpoint; nothing asserts a duration. The
helpers' bookkeeping (lease ends, one request for concurrent lookups) is checked in-process with trio.
KV layout and fan-out directories keep their kernel entries for ``--kv-timeout`` (mount/fs.py): a lookup
under them skips their round trips, and one removed or replaced by another client answers ESTALE, so
the kernel looks the path up again instead of failing on the stale name.
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from cluster import free_port, mount_requests
from test_posix import read, write

from kvfs import protocol as P
from kvfs.leased_lookups import BatchedKVLookups, LeasedMaps, SharedLookups, is_kv_file_name

RUN_NAME = "0123456789abcdef0123456789abcdef-8"  # a KV run file's name shape (kvfs/kv/run.py)


def kv_lookups(rpcs: dict[str, float]) -> float:
    return rpcs.get("kv_lookup", 0.0) + rpcs.get("kv_lookup_many", 0.0)


def served(cluster, method: str) -> float:
    rpcs = cluster.meta_rpcs()
    if method == "kv_lookup":  # lone or batched (META_KV_LOOKUP_MANY): requests, not names
        return rpcs.get("kv_lookup", 0.0) + rpcs.get("kv_lookup_many", 0.0)
    return rpcs.get(method, 0.0)


@pytest.fixture
def two_mounts(make_cluster, tmp_path):
    """A cluster, a writer mount and a reader mount whose kernel keeps entries and attributes for 30 s
    (so its reads of a file it looked up once never look it up again: only the daemon's map is in play)."""
    cluster = make_cluster(chunkservers=1, replication=1, meta_metrics_port=free_port())
    writer = cluster.mount(str(tmp_path / "w"))
    reader = cluster.mount(str(tmp_path / "r"), "--attr-timeout", "30")
    return cluster, writer, reader


def test_kv_file_open_needs_no_get_chunks_after_its_lookup(two_mounts):
    cluster, writer, reader = two_mounts
    os.makedirs(os.path.join(writer, "kv", "ab"))
    data = os.urandom(3 << 20)
    write(os.path.join(writer, "kv", "ab", RUN_NAME), data)
    write(os.path.join(writer, "kv", "ab", "plain"), data)

    kv_path, plain_path = os.path.join(reader, "kv", "ab", RUN_NAME), os.path.join(reader, "kv", "ab", "plain")
    before = cluster.meta_rpcs()
    os.stat(kv_path)  # the reader's first lookup of it: META_KV_LOOKUP
    assert served(cluster, "kv_lookup") == kv_lookups(before) + 1
    chunks_before = served(cluster, "get_chunks")
    assert read(kv_path) == data
    assert served(cluster, "get_chunks") == chunks_before  # the open used the lookup's leased map

    assert read(plain_path) == data  # an ordinary name: a plain lookup, and a GET_CHUNKS per open
    assert served(cluster, "get_chunks") == chunks_before + 1
    assert served(cluster, "kv_lookup") == kv_lookups(before) + 1


def test_kv_file_read_over_tcp_uses_the_lookups_chunk_tokens(make_cluster, tmp_path):
    """A mount on another host (no short-circuit reads) reads a KV file's chunks from the chunkserver with
    the capability tokens of its leased lookup's map: no refused read, no META_CHUNK_LOCATIONS to renew."""
    cluster = make_cluster(chunkservers=1, replication=1, meta_metrics_port=free_port())
    writer = cluster.mount(str(tmp_path / "w"))
    reader = cluster.mount(str(tmp_path / "r"), "--no-local-reads")
    os.makedirs(os.path.join(writer, "kv", "ab"))
    data = os.urandom(3 << 20)
    write(os.path.join(writer, "kv", "ab", RUN_NAME), data)
    before = cluster.meta_rpcs()
    assert read(os.path.join(reader, "kv", "ab", RUN_NAME)) == data
    assert served(cluster, "kv_lookup") == kv_lookups(before) + 1
    assert served(cluster, "chunk_locations") == before.get("chunk_locations", 0.0)
    assert served(cluster, "get_chunks") == before.get("get_chunks", 0.0)


def test_concurrent_kv_lookups_share_meta_requests(two_mounts):
    """8 threads stat 16 run files and 2 missing names at once (a prefix lookup's pattern): the reader's
    daemon sends them in META_KV_LOOKUP_MANY batches, fewer requests than names, and each stat gets its
    own answer (sizes right, ENOENT only for the missing ones); the reads that follow ask meta nothing."""
    cluster, writer, reader = two_mounts
    names = [f"{i:02x}{RUN_NAME[2:]}" for i in range(16)]
    for i, name in enumerate(names):
        os.makedirs(os.path.join(writer, "kv", name[:2]))
        write(os.path.join(writer, "kv", name[:2], name), bytes([i]) * (4096 + i))
    paths = [os.path.join(reader, "kv", n[:2], n) for n in names]
    paths.insert(5, os.path.join(reader, "kv", "05", "f" * 32 + "-8"))
    paths.append(os.path.join(reader, "kv", "0f", "e" * 32 + "-8"))
    for path in paths:
        os.stat(os.path.dirname(path))  # the directories are not what is counted
    before = cluster.meta_rpcs()

    def size(path: str) -> int | None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(size, paths))
    expect = [4096 + i for i in range(16)]
    expect.insert(5, None)
    assert sizes == expect + [None]
    requests = served(cluster, "kv_lookup") - kv_lookups(before)
    assert served(cluster, "kv_lookup_many") > before.get("kv_lookup_many", 0.0)
    assert 1 <= requests < len(paths)
    chunks = served(cluster, "get_chunks")
    assert [read(p) for p in paths if size(p) is not None] == [bytes([i]) * (4096 + i) for i in range(16)]
    assert served(cluster, "get_chunks") == chunks  # the batched lookups brought leased maps


def test_prefix_lookup_walks_the_directories_above_its_layout_once(make_cluster, tmp_path):
    """A KV prefix lookup after the kernel's 1 s entries have expired (a request seconds after the last):
    one thread walks down to the layout directory first, so the kernel asks the mount once for the
    root's attributes and once for "kv", not once per checking thread; the 16 run files' stats are
    sent at once and reach meta in a few META_KV_LOOKUP_MANY batches; the fan-out directories the runs
    were just saved in cost meta nothing. FUSE requests are counted from the mount's metrics endpoint
    (``kvfs mount --metrics-port``), meta's from its own."""
    import torch

    from kvfs.kv import KVLayout, KVStore, block_hashes
    from kvfs.kv.run import run_spans

    cluster = make_cluster(chunkservers=1, replication=1, meta_metrics_port=free_port())
    port = free_port()
    mnt = cluster.mount(str(tmp_path / "m"), "--metrics-port", str(port))
    layout = KVLayout("bf16", 16, 2, 2, 16)
    hashes = block_hashes(list(range(2048)), 16)  # 128 blocks: 16 runs of 8
    g = torch.Generator().manual_seed(3)
    with KVStore(os.path.join(mnt, "kv"), layout, touch_interval=-1) as store:
        assert all(store.put_runs([(hashes[s:s + n], torch.randn((n, *layout.block_shape), generator=g).to(
            layout.torch_dtype())) for s, n in run_spans(len(hashes), 8)]))
        time.sleep(1.2)
        # The kernel dropped the attributes of every fan-out directory the runs were created in: the
        # mount answers their GETATTRs itself (kv_timeout), so meta sees the root's at most.
        meta_before = cluster.meta_rpcs()
        assert store.runs_prefix(hashes, 8).blocks == 128
        assert served(cluster, "getattr") - meta_before.get("getattr", 0.0) <= 2
        time.sleep(1.2)  # the root's, "kv"'s and the runs' kernel entries and attributes expire
        before, meta_before = mount_requests(port), cluster.meta_rpcs()
        assert store.runs_prefix(hashes, 8).blocks == 128
        after = mount_requests(port)
    ops = {key: n - before.get(key, 0.0) for key, n in after.items() if n != before.get(key, 0.0)}
    assert ops.get(("getattr", "ok"), 0) <= 2, ops  # the root (and at most "kv"): once, not per thread
    assert 16 <= ops.get(("lookup", "ok"), 0) <= 17, ops  # "kv" and the 16 runs
    assert 1 <= served(cluster, "kv_lookup") - kv_lookups(meta_before) < 16  # batched: fewer requests than runs


def test_kv_lookup_many_answers_each_name_and_refuses_bad_lists(two_mounts):
    """Meta's side, raw: each name answered on its own (map with chunk tokens, or its errno); lists of
    different lengths or over the limit are EINVAL, not a crash or a partial answer."""
    from kvfs.rpc import RpcClient

    cluster, writer, _ = two_mounts
    os.makedirs(os.path.join(writer, "kv", "12"))
    write(os.path.join(writer, "kv", "12", RUN_NAME), b"z" * 5000)
    parent = os.stat(os.path.join(writer, "kv", "12")).st_ino

    async def go(request):
        client = RpcClient("meta", cluster.meta_address, P.META_METHODS, timeout=10.0, connect_timeout=5.0)
        try:
            return await client.request(P.META_KV_LOOKUP_MANY, request)
        finally:
            client.close()

    reply = trio.run(go, P.KVLookupMany([parent, parent, 999_999_999], [RUN_NAME, "0" * 32, RUN_NAME], lease=True))
    assert reply.errors == [0, errno.ENOENT, errno.ENOENT]
    assert reply.replies[0].attr.size == 5000 and reply.replies[1:] == [None, None]
    assert reply.replies[0].file.chunks and all(c.token for c in reply.replies[0].file.chunks)
    for bad in (P.KVLookupMany([parent], [RUN_NAME, RUN_NAME]),
                P.KVLookupMany([parent] * (P.KV_LOOKUP_MANY_MAX + 1), [RUN_NAME] * (P.KV_LOOKUP_MANY_MAX + 1))):
        with pytest.raises(OSError) as info:
            trio.run(go, bad)
        assert info.value.errno == errno.EINVAL


def test_rewrite_of_a_leased_file_is_read_once_acknowledged(two_mounts):
    """The reader's daemon holds the old map under a lease; the writer's in-place rewrite (COMMIT of the
    leased inode) is acknowledged only after that lease, and the reader's next open, which its kernel
    sends without a new lookup, must not use the expired map: it reads the new bytes."""
    cluster, writer, reader = two_mounts
    os.makedirs(os.path.join(writer, "kv", "cd"))
    old, new = os.urandom(1 << 20), os.urandom(1 << 20)
    write(os.path.join(writer, "kv", "cd", RUN_NAME), old)
    path = os.path.join(reader, "kv", "cd", RUN_NAME)
    assert read(path) == old  # looked up (leased map) and read by the reader
    lookups = served(cluster, "kv_lookup") + served(cluster, "lookup")

    fd = os.open(os.path.join(writer, "kv", "cd", RUN_NAME), os.O_WRONLY)
    try:
        assert os.pwrite(fd, new, 0) == len(new)
    finally:
        os.close(fd)  # the commit: held by meta until the reader's lease has ended

    before = cluster.meta_rpcs()
    assert read(path) == new
    # The open asked meta for the new map: the expired one was not used. (Had it been, the old chunk,
    # deleted by the commit, would have failed the read, and the client would have looked its
    # replacement up with CHUNK_LOCATIONS: the bytes alone cannot tell.)
    assert served(cluster, "get_chunks") == before.get("get_chunks", 0.0) + 1
    assert served(cluster, "chunk_locations") == before.get("chunk_locations", 0.0)
    assert served(cluster, "kv_lookup") + served(cluster, "lookup") == lookups  # no new lookup by the reader


def test_deleted_kv_file_is_not_found_once_its_lease_ends(two_mounts):
    """Deletes are not held by leases: the reader may read the deleted bytes within its lease, but once
    the map's lease ends its open (sent by its kernel without a new lookup) asks meta and fails ENOENT."""
    cluster, writer, reader = two_mounts
    os.makedirs(os.path.join(writer, "kv", "ef"))
    write(os.path.join(writer, "kv", "ef", RUN_NAME), b"x" * 4096)
    path = os.path.join(reader, "kv", "ef", RUN_NAME)
    assert read(path) == b"x" * 4096
    os.unlink(os.path.join(writer, "kv", "ef", RUN_NAME))
    deadline = time.monotonic() + 20  # a bound on the wait, not a timing check (leases are 2 s here)
    outcome: object = None
    while time.monotonic() < deadline:
        try:
            outcome = read(path)
        except OSError as exc:
            outcome = exc.errno
            break
        assert outcome == b"x" * 4096  # within the lease: the bytes the name held
        time.sleep(0.2)
    assert outcome == errno.ENOENT


LAYOUT = "bf16-t32-l8-h4-d64-tp0of1"  # a KV layout directory's name shape (kvfs/kv/layout.py)


def test_kv_directories_are_kept_and_revalidated_when_another_client_replaces_them(make_cluster, tmp_path):
    cluster = make_cluster(chunkservers=1, replication=1, meta_metrics_port=free_port())
    here = cluster.mount(str(tmp_path / "a"))  # default --kv-timeout (300 s); --attr-timeout 1 s
    other = cluster.mount(str(tmp_path / "b"))
    for top in (LAYOUT, "plain"):
        os.makedirs(os.path.join(here, "kv", top, "ab"))
    time.sleep(1.5)  # past the 1 s entry timeout of ordinary names
    before = served(cluster, "lookup")
    os.stat(os.path.join(here, "kv", LAYOUT, "ab"))  # "kv" is looked up again; the KV directories are not
    kv_lookups = served(cluster, "lookup") - before
    os.stat(os.path.join(here, "kv", "plain", "ab"))  # "plain" and its "ab" are
    assert kv_lookups <= 1
    assert served(cluster, "lookup") - before - kv_lookups >= 2

    # Another client removes the fan-out directory: this kernel still trusts the name (up to --kv-timeout) ...
    os.rmdir(os.path.join(other, "kv", LAYOUT, "ab"))
    os.rmdir(os.path.join(other, "kv", "plain", "ab"))
    time.sleep(1.5)
    assert os.path.isdir(os.path.join(here, "kv", LAYOUT, "ab"))
    assert not os.path.isdir(os.path.join(here, "kv", "plain", "ab"))
    # ... but a create in it is answered ESTALE, the kernel walks the path again and finds it gone.
    with pytest.raises(FileNotFoundError):
        os.open(os.path.join(here, "kv", LAYOUT, "ab", RUN_NAME), os.O_WRONLY | os.O_CREAT, 0o644)
    assert not os.path.isdir(os.path.join(here, "kv", LAYOUT, "ab"))

    # Replaced by a new directory of the same name: the create lands in the new one, with no error.
    os.makedirs(os.path.join(here, "kv", LAYOUT, "cd"))
    os.rmdir(os.path.join(other, "kv", LAYOUT, "cd"))
    os.mkdir(os.path.join(other, "kv", LAYOUT, "cd"))
    write(os.path.join(here, "kv", LAYOUT, "cd", RUN_NAME), b"y" * 4096)
    assert read(os.path.join(other, "kv", LAYOUT, "cd", RUN_NAME)) == b"y" * 4096


# ---------------------------------------------------------------------- the helpers, in-process


def test_kv_file_names():
    assert is_kv_file_name("0123456789abcdef")  # a block (16-128 hex)
    assert is_kv_file_name(RUN_NAME)
    assert is_kv_file_name("f" * 128 + "-1")
    for name in ("plain", "0123456789ABCDEF", "0123456789abcde", "f" * 129, RUN_NAME + ".tmp",
                 "." + RUN_NAME + ".1a2b3c4d5e6f.tmp", "0123456789abcdef-0", "0123456789abcdef-", "ab"):
        assert not is_kv_file_name(name), name


def _reply(ino: int) -> P.GetChunksReply:
    return P.GetChunksReply(P.Attr(ino=ino, mode=0o100644, nlink=1, uid=0, gid=0, rdev=0, size=1, atime_ns=0,
                                   mtime_ns=0, ctime_ns=0, generation=0), 4 << 20, [])


def test_leased_maps_end_with_their_lease():
    now = [100.0]
    maps = LeasedMaps(clock=lambda: now[0], limit=2)
    maps.store(1, 101.0, _reply(1))
    assert maps.get(1) is not None
    now[0] = 101.0
    assert maps.get(1) is None and len(maps) == 0  # at its end: gone
    maps.store(2, 105.0, _reply(2))
    maps.drop(2)
    assert maps.get(2) is None
    for ino in (3, 4, 5):
        maps.store(ino, 105.0, _reply(ino))
    assert len(maps) == 2 and maps.get(3) is None and maps.get(5) is not None  # bounded, oldest first


def test_shared_lookups_send_one_request_for_concurrent_lookups_and_getattrs():
    """Concurrent lookups of one name, and getattrs of one directory (every thread walking a path whose
    entries expired sends the kernel's), cost meta one request while the first is in flight."""
    calls: list[int] = []
    answers: list[P.Attr] = []

    async def main() -> None:
        shared = SharedLookups()
        release = trio.Event()

        async def fetch() -> P.Attr:
            calls.append(1)
            await release.wait()
            return _reply(7).attr

        async def one(seq: int) -> None:
            answers.append(await shared.lookup(1, "d", seq, fetch))

        async def attr(ino: int) -> None:
            answers.append(await shared.getattr(ino, 0, fetch))

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(one, 0)
            for ino in (1,) * 8 + (2,):  # directory 1's getattrs are not its lookups; inode 2 asks itself
                n.start_soon(attr, ino)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(one, 1)  # this client changed the namespace since: asks meta itself
            await trio.testing.wait_all_tasks_blocked()
            release.set()

        async def fail() -> P.Attr:
            calls.append(1)
            raise FileNotFoundError(errno.ENOENT, "gone")

        with pytest.raises(FileNotFoundError):
            await shared.lookup(1, "d", 0, fail)

    import trio.testing  # wait_all_tasks_blocked

    trio.run(main)
    # 4 concurrent lookups -> 1 request; the later-seq one -> 1; 8 getattrs of inode 1 -> 1, of inode 2 -> 1;
    # the failing lookup -> 1
    assert len(calls) == 5
    assert len(answers) == 14 and all(a.ino == 7 for a in answers)
    assert len({id(a) for a in answers}) == 14  # copies: callers overlay their own sizes


def _lookup_reply(ino: int) -> P.KVLookupReply:
    return P.KVLookupReply(_reply(ino).attr, _reply(ino), 2.0)


def test_batched_kv_lookups_group_what_arrives_while_one_is_in_flight():
    sent: list[list[str]] = []
    outcomes: dict[str, object] = {}

    async def main() -> None:
        gate = trio.Event()

        async def send(req: P.KVLookupMany) -> P.KVLookupManyReply:
            sent.append(list(req.names))
            await gate.wait()
            return P.KVLookupManyReply([None if n.startswith("x") else _lookup_reply(int(n)) for n in req.names],
                                       [errno.ENOENT if n.startswith("x") else 0 for n in req.names])

        batched = BatchedKVLookups(send, limit=4)

        async def one(name: str) -> None:
            try:
                outcomes[name] = (await batched.lookup(1, name))[0].attr.ino
            except OSError as exc:
                outcomes[name] = exc.errno

        async with trio.open_nursery() as n:
            n.start_soon(one, "1")
            await trio.testing.wait_all_tasks_blocked()  # "1" is in flight alone
            for name in ("2", "x3", "4", "5", "6", "7"):
                n.start_soon(one, name)
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as scope:  # a waiter cancelled in the queue leaves no hole
                scope.cancel()
                await batched.lookup(1, "8")
            gate.set()
        assert batched.batches == 3  # the counter the class keeps for callers matches what was sent

        async def down(req: P.KVLookupMany) -> P.KVLookupManyReply:
            raise OSError(errno.EIO, "meta 127.0.0.1:1: connection failed")

        failing = BatchedKVLookups(down)
        with pytest.raises(OSError) as info:
            await failing.lookup(1, "9")
        assert info.value.errno == errno.EIO

    import trio.testing  # noqa: F401  (wait_all_tasks_blocked)

    trio.run(main)
    # "1" alone, then what queued meanwhile, at most ``limit`` per batch (trio starts tasks in any order)
    assert sent[0] == ["1"] and [len(b) for b in sent] == [1, 4, 2]
    assert sorted(n for batch in sent for n in batch) == ["1", "2", "4", "5", "6", "7", "x3"]
    assert outcomes == {"1": 1, "2": 2, "x3": errno.ENOENT, "4": 4, "5": 5, "6": 6, "7": 7}
