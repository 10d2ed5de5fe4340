"""Tenants (issue 13): isolation, uid/gid from the credential, quotas, usage in status and across restarts.

Real processes on a TLS cluster: every tenant client holds a certificate whose O= names its tenant.
Tenant A's files and KV blocks are attacked from tenant B through the native client, a FUSE mount,
and raw RPCs sent straight to meta naming A's inode numbers, paths and chunk ids.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest
import trio

from kvfs import certs, tls
from kvfs import protocol as P
from kvfs.kv.native import NativeBackend
from kvfs.meta.engine_memory import MemoryEngine
from kvfs.meta.namespace import ROOT_INO, Namespace
from kvfs.rpc import RpcClient

UID = 4321  # tenant a's configured owner
PAYLOAD = b"secret of tenant a " * 1000


def kvfs_cli(tls_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfs.cli", "--tls-dir", tls_dir, *args], check=False,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def tc(tmp_path_factory):
    """A TLS cluster with tenants a (uid 4321) and b, q (small quotas) and certificates for each, plus
    one for a tenant that was never added."""
    from cluster import Cluster

    c = Cluster(str(tmp_path_factory.mktemp("tenants")), chunkservers=1, replication=1, tls=True).start()
    try:
        admin = c.tls_dirs["admin"]
        for args in (("a", "--uid", str(UID), "--gid", str(UID)), ("b",),
                     ("q", "--quota-files", "5", "--quota-bytes", "2M", "--quota-kv-blocks", "2")):
            out = kvfs_cli(admin, "tenant", "add", *args, "--meta", c.meta_address)
            assert out.returncode == 0, out.stderr
        c.tenant_dirs = {}
        for tenant in ("a", "b", "q", "ghost"):
            d = c.tenant_dirs[tenant] = os.path.join(c.root, "tls", f"tenant-{tenant}")
            certs.issue(os.path.join(c.root, "tls", "ca"), d, role="client", name=f"app-{tenant}", tenant=tenant)
        yield c
    finally:
        c.stop()


def as_tenant(c, tenant: str):
    return c.client(tls_dir=c.tenant_dirs[tenant])


def raw(c, tenant: str, method: int, request: P.Struct):
    """One request straight to meta over tenant ``tenant``'s TLS connection (no client library)."""

    async def go():
        client = RpcClient("meta", c.meta_address, P.META_METHODS, timeout=10,
                           ssl_context=tls.load(c.tenant_dirs[tenant]).client)
        try:
            return await client.request(method, request)
        finally:
            client.close()

    return trio.run(go)


def raises_errno(code: int, fn, *args, **kwargs):
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"{info.value!r}: expected {errno.errorcode[code]}"


@pytest.fixture(scope="module")
def a_files(tc):
    """Tenant a's file /docs/secret.txt and KV block /kv/m/blk0, written by tenant a; their inodes as
    admin sees them."""
    with as_tenant(tc, "a") as a:
        a.mkdir("/docs")
        a.write_file("/docs/secret.txt", PAYLOAD)
        assert NativeBackend(a).put("/kv/m", "blk0", b"hdr", [memoryview(PAYLOAD)], False)
    with tc.client(tls_dir=tc.tls_dirs["admin"]) as admin:
        return {"root": admin.resolve("/tenants/a").ino, "docs": admin.resolve("/tenants/a/docs").ino,
                "file": admin.resolve("/tenants/a/docs/secret.txt").ino,
                "kvdir": admin.resolve("/tenants/a/kv/m").ino, "blk": admin.resolve("/tenants/a/kv/m/blk0").ino,
                "chunk": admin.chunk_map(admin.resolve("/tenants/a/docs/secret.txt").ino).chunks[0].chunk_id}


def test_tenant_sees_its_root_as_slash(tc, a_files):
    with as_tenant(tc, "a") as a:
        assert a.client.root_ino == a_files["root"]
        assert sorted(a.listdir("/")) == ["docs", "kv"]
        assert a.read_file("/docs/secret.txt") == PAYLOAD
        assert a.resolve("/..").ino == a_files["root"]  # ".." at the root stays there
        assert a.resolve("/docs/../..").ino == a_files["root"]
    with tc.client(tls_dir=tc.tls_dirs["admin"]) as admin:  # admins see the whole namespace
        assert admin.client.root_ino == ROOT_INO
        assert {"a", "b", "q"} <= set(admin.listdir("/tenants"))
        assert admin.read_file("/tenants/a/docs/secret.txt") == PAYLOAD


def test_native_client_cannot_reach_another_tenant(tc, a_files):
    with as_tenant(tc, "a") as a:  # meta caches a lookup's directories: a's must not answer b's
        assert NativeBackend(a).exists_many("/kv/m", ["blk0"], False) == ([True], 1)
    with as_tenant(tc, "b") as b:
        assert b.listdir("/") == []
        for path in ("/docs/secret.txt", "/tenants/a/docs/secret.txt", "/../a/docs/secret.txt",
                     "/../../tenants/a/docs"):
            raises_errno(errno.ENOENT, b.resolve, path)
            raises_errno(errno.ENOENT, b.read_file, path)
        kv = NativeBackend(b)
        assert kv.exists_many("/kv/m", ["blk0"], False) == ([False], 0)
        assert kv.exists_many("/tenants/a/kv/m", ["blk0"], False) == ([False], 0)
        assert b.exists_many(["/tenants/a/kv/m/blk0", "/../a/kv/m/blk0"]).exists == [False, False]
        # b's own tree of the same names is b's: writing it leaves a's untouched.
        b.mkdir("/docs")
        b.write_file("/docs/secret.txt", b"b's own")
    with as_tenant(tc, "a") as a:
        assert a.read_file("/docs/secret.txt") == PAYLOAD


def test_raw_rpcs_naming_another_tenants_inodes_fail(tc, a_files):
    f, docs, root, blk, kvdir = a_files["file"], a_files["docs"], a_files["root"], a_files["blk"], a_files["kvdir"]
    b_root = raw(tc, "b", P.META_HELLO, P.Hello(P.PROTOCOL_VERSION)).root_ino
    b_file = raw(tc, "b", P.META_MKNODE, P.MkNode(b_root, "mine", stat.S_IFREG | 0o644)).ino
    enoent = [
        (P.META_GETATTR, P.GetAttr(f)), (P.META_GETATTR, P.GetAttr(ROOT_INO)),
        (P.META_LOOKUP, P.Lookup(docs, "secret.txt")), (P.META_LOOKUP, P.Lookup(ROOT_INO, "tenants")),
        (P.META_READDIR, P.ReadDir(root)), (P.META_READDIR, P.ReadDir(ROOT_INO)),
        (P.META_GET_CHUNKS, P.GetChunks(f)), (P.META_OPEN_WRITE, P.OpenWrite(f, "evil")),
        (P.META_ALLOC_CHUNK, P.AllocChunk(f, "evil")),
        (P.META_COMMIT, P.Commit(f, "evil", 0, [])),
        (P.META_SETATTR, P.SetAttr(f, mode=0o777)), (P.META_SETXATTR, P.SetXattr(f, "user.x", b"1")),
        (P.META_GETXATTR, P.GetXattr(f, "user.x")), (P.META_LISTXATTR, P.GetAttr(f)),
        (P.META_UNLINK, P.Unlink(docs, "secret.txt")), (P.META_RMDIR, P.Unlink(root, "docs")),
        (P.META_RENAME, P.Rename(docs, "secret.txt", b_root, "stolen")),
        (P.META_RENAME, P.Rename(b_root, "mine", docs, "planted")),  # rename into a's directory
        (P.META_LINK, P.Link(f, b_root, "hardlink")), (P.META_LINK, P.Link(b_file, docs, "planted")),
        (P.META_MKNODE, P.MkNode(docs, "planted", stat.S_IFREG | 0o644)),
        (P.META_SYMLINK, P.Symlink(docs, "planted", "/x")),
        (P.META_PURGE, P.Purge(f)), (P.META_RENEW_LEASES, P.RenewLeases("evil", [f])),
        (P.META_RESOLVE, P.ResolvePath("/tenants/a/docs/secret.txt")),
        (P.META_GETATTR, P.GetAttr(blk)), (P.META_GET_CHUNKS, P.GetChunks(blk)),
        (P.META_KV_PUBLISH, P.KVPublish(kvdir, "planted", 0o644, 0, 0, 0, [])),
        (P.META_REMOTE_INFO, P.RemoteInfo(f)),
    ]
    for method, request in enoent:
        raises_errno(errno.ENOENT, raw, tc, "b", method, request)
    assert raw(tc, "b", P.META_KV_CHUNKS, P.KVChunks(["/tenants/a/kv/m/blk0", "/kv/m/blk0"])).files == [None, None]
    assert raw(tc, "b", P.META_KV_EXISTS, P.KVExists("/kv/m", ["blk0"])).exists == [False]
    assert raw(tc, "b", P.META_EXISTS_MANY, P.ExistsMany(["/tenants/a/docs"])).exists == [False]
    # Admin-only and cluster-wide methods are refused to a tenant outright.
    for method, request in ((P.META_REMOTE_ATTACH, P.RemoteAttach("/r", "file:///etc/cron.d", "writeback")),
                            (P.META_TENANT_ADD, P.TenantSpec("evil")), (P.META_TENANT_REMOVE, P.TenantName("a")),
                            (P.META_KV_EVICT, P.Empty())):
        raises_errno(errno.EACCES, raw, tc, "b", method, request)
    # a's committed chunk cannot be adopted into a file of b's (it is not a fresh, unpublished chunk) ...
    raises_errno(errno.EINVAL, raw, tc, "b", P.META_KV_PUBLISH,
                 P.KVPublish(b_root, "grab", 0o644, 0, 0, 10, [P.ChunkRef(0, a_files["chunk"], 10, [])]))
    # ... and neither can a block a allocated but has not published yet.
    pending = raw(tc, "a", P.META_KV_ALLOC, P.KVAlloc(3))
    raises_errno(errno.EINVAL, raw, tc, "b", P.META_KV_PUBLISH,
                 P.KVPublish(b_root, "grab", 0o644, 0, 0, 3, [P.ChunkRef(0, pending.chunk_id, 3, [])]))
    # Nothing of a's changed.
    with as_tenant(tc, "a") as a:
        assert a.read_file("/docs/secret.txt") == PAYLOAD
        assert sorted(a.listdir("/docs")) == ["secret.txt"]
        assert NativeBackend(a).exists_many("/kv/m", ["blk0"], False) == ([True], 1)
    assert raw(tc, "b", P.META_TENANT_LIST, P.Empty()).tenants[0].name == "b"  # its own row only


def test_a_tenants_false_bad_chunk_report_drops_nothing(tc, a_files):
    """Reports are honoured from tenants too, but only once the chunkserver confirms the copy is bad
    (meta/bad_chunks.py): tenant b naming tenant a's only replica changes nothing."""
    from cluster import wait_for

    with tc.client(tls_dir=tc.tls_dirs["admin"]) as admin:
        ref = admin.chunk_map(a_files["file"]).chunks[0]
    assert raw(tc, "b", P.META_REPORT_BAD_CHUNK, P.ReportBadChunk(ref.chunk_id, ref.replicas[0], "lies")) == P.Empty()
    wait_for(lambda: f"chunk {ref.chunk_id:x} on {ref.replicas[0]} checked out fine" in tc.meta.log(), 20,
             "meta to verify the reported copy")
    assert "app-b (client, tenant b): lies" in tc.meta.log()
    with as_tenant(tc, "a") as a:
        assert a.read_file("/docs/secret.txt") == PAYLOAD
        assert a.chunk_map(a.stat("/docs/secret.txt").ino).chunks[0].replicas == ref.replicas


def test_unknown_tenant_is_refused(tc):
    for method, request in ((P.META_HELLO, P.Hello(P.PROTOCOL_VERSION)), (P.META_GETATTR, P.GetAttr(ROOT_INO)),
                            (P.META_RESOLVE, P.ResolvePath("/")), (P.META_LIST_CHUNKSERVERS, P.Empty())):
        raises_errno(errno.EACCES, raw, tc, "ghost", method, request)


def test_uid_gid_follow_the_credential(tc):
    a_root = raw(tc, "a", P.META_HELLO, P.Hello(P.PROTOCOL_VERSION)).root_ino
    attr = raw(tc, "a", P.META_MKNODE, P.MkNode(a_root, "claims-root", stat.S_IFREG | 0o644, uid=0, gid=0))
    assert (attr.uid, attr.gid) == (UID, UID)
    raises_errno(errno.EPERM, raw, tc, "a", P.META_SETATTR, P.SetAttr(attr.ino, uid=0))
    raises_errno(errno.EPERM, raw, tc, "a", P.META_SETATTR, P.SetAttr(attr.ino, gid=0))
    assert raw(tc, "a", P.META_SETATTR, P.SetAttr(attr.ino, uid=UID, mode=0o600)).uid == UID
    with as_tenant(tc, "a") as a:
        assert a.mkdir("/made-by-client").uid == UID
        raises_errno(errno.EPERM, a.setattr, attr.ino, uid=0)


def test_mount_shows_only_the_tenants_tree(tc, a_files, tmp_path):
    mp_a, mp_b = str(tmp_path / "a"), str(tmp_path / "b")
    tc.mount(mp_a, "--tls-dir", tc.tenant_dirs["a"])
    try:
        tc.mount(mp_b, "--tls-dir", tc.tenant_dirs["b"])
        try:
            assert {"docs", "kv"} <= set(os.listdir(mp_a))
            with open(os.path.join(mp_a, "docs", "secret.txt"), "rb") as f:
                assert f.read() == PAYLOAD
            assert os.stat(mp_a).st_ino == 1 == os.stat(os.path.join(mp_a, "docs", "..")).st_ino
            with open(os.path.join(mp_a, "docs", "new.txt"), "wb") as f:
                f.write(b"via mount")
            assert os.stat(os.path.join(mp_a, "docs", "new.txt")).st_uid == UID
            # b's mount: a's names do not exist, and whatever b does stays in b's tree.
            assert "kv" not in os.listdir(mp_b)
            for path in ("kv/m/blk0", "tenants/a/docs/secret.txt"):
                assert not os.path.exists(os.path.join(mp_b, path))
            with open(os.path.join(mp_b, "docs", "secret.txt"), "rb") as f:
                assert f.read() == b"b's own"
            os.rename(os.path.join(mp_b, "docs", "secret.txt"), os.path.join(mp_b, "moved"))
            with open(os.path.join(mp_a, "docs", "secret.txt"), "rb") as f:
                assert f.read() == PAYLOAD
            assert not os.path.exists(os.path.join(mp_a, "moved"))
            os.unlink(os.path.join(mp_b, "moved"))
            with open(os.path.join(mp_a, "docs", "secret.txt"), "rb") as f:
                assert f.read() == PAYLOAD
        finally:
            tc.unmount(mp_b)
    finally:
        tc.unmount(mp_a)


def test_quotas_give_edquot_and_keep_what_was_written(tc):
    # Quotas of q: 5 inodes (its root is one), 2 MiB, 2 KV blocks.
    with as_tenant(tc, "q") as q:
        q.write_file("/f1", b"x" * (1 << 20))  # 2 inodes, 1 MiB
        with pytest.raises(OSError) as info:
            q.write_file("/f2", b"y" * (2 << 20))  # created (3 inodes), but its data would pass 2 MiB
        assert info.value.errno == errno.EDQUOT
        assert q.read_file("/f1") == b"x" * (1 << 20)
        assert q.resolve("/f2").size == 0
        kv = NativeBackend(q)
        assert kv.put("/kv", "b1", b"h", [memoryview(b"1" * 10)], False)  # /kv and b1: 5 inodes
        with pytest.raises(OSError) as info:
            kv.put("/kv", "b2", b"h", [memoryview(b"2" * 10)], False)  # a 6th inode
        assert info.value.errno == errno.EDQUOT
        with pytest.raises(OSError) as info:
            q.mkdir("/d")
        assert info.value.errno == errno.EDQUOT
        assert kv.exists_many("/kv", ["b1", "b2"], False) == ([True, False], 1)
        st = q.statfs()  # df in a tenant's mount: its quota and its own inodes
        assert st.total_bytes == 2 << 20 and st.files == 5
        q.unlink("/f2")  # made before the byte quota refused its data: frees a file
        assert kv.put("/kv", "b2", b"h", [memoryview(b"2" * 10)], False)
    admin = tc.tls_dirs["admin"]
    assert kvfs_cli(admin, "tenant", "set", "q", "--quota-files", "0", "--meta", tc.meta_address).returncode == 0
    with as_tenant(tc, "q") as q:
        with pytest.raises(OSError) as info:
            NativeBackend(q).put("/kv", "b3", b"h", [memoryview(b"3" * 10)], False)  # a 3rd block: quota 2
        assert info.value.errno == errno.EDQUOT


def test_status_shows_usage_and_it_survives_a_restart(tc, a_files):
    admin = tc.tls_dirs["admin"]

    def usage():
        with tc.client(tls_dir=admin) as c:
            return {t.name: (t.used_bytes, t.files, t.kv_blocks) for t in
                    c.call(c.client.meta.request, P.META_TENANT_LIST, P.Empty()).tenants}

    before = usage()
    assert before["a"][0] >= 2 * len(PAYLOAD) and before["a"][2] >= 1
    out = kvfs_cli(admin, "status", "--meta", tc.meta_address)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("a "))
    assert "/tenants/a" in row and f"{UID}:{UID}" in row and f"{before['a'][1]} / -" in row
    assert "TENANT" in out.stdout
    tc.restart_meta()
    tc.wait_servers(1)
    assert usage() == before
    # A tenant's own status shows its own row only.
    out = kvfs_cli(tc.tenant_dirs["b"], "status", "--meta", tc.meta_address)
    assert out.returncode == 0, out.stderr
    assert "/tenants/b" in out.stdout and "/tenants/a" not in out.stdout


# --------------------------------------------------------------------------- the plain classes


def test_namespace_tags_charges_and_refuses_cross_tenant_moves():
    ns = Namespace(MemoryEngine(), chunk_size=1 << 20)
    a = ns.tenants.add(P.TenantSpec("a", uid=7, gid=7))
    b = ns.tenants.add(P.TenantSpec("b"))
    d = ns.mknode(a.root_ino, "d", stat.S_IFDIR | 0o755, 0, 0)
    f = ns.mknode(d.ino, "f", stat.S_IFREG | 0o644, 0, 0)
    assert ns.inode(f.ino).tenant == "a" and ns.tenants.of("a").files == 3  # root, d, f
    # Even an admin cannot move or link an inode into another tenant (its tag would lie).
    raises_errno(errno.EXDEV, ns.rename, d.ino, "f", b.root_ino, "f", 0)
    raises_errno(errno.EXDEV, ns.link, f.ino, b.root_ino, "f")
    raises_errno(errno.EXDEV, ns.rename, a.root_ino, "d", ROOT_INO, "d", 0)
    raises_errno(errno.EBUSY, ns.rmdir, ns.lookup(ROOT_INO, "tenants").ino, "b")
    raises_errno(errno.ENOTEMPTY, ns.tenants.remove, "a")
    ns.tenants.remove("b")
    raises_errno(errno.ENOENT, ns.lookup, ns.lookup(ROOT_INO, "tenants").ino, "b")
    ns.unlink(d.ino, "f")
    ns.purge(f.ino)
    assert ns.tenants.of("a").files == 2


def test_usage_is_rebuilt_from_the_records(tmp_path):
    from kvfs.meta.engine_rocksdb import RocksEngine

    engine = RocksEngine(str(tmp_path / "db"))
    ns = Namespace(engine, chunk_size=1 << 20)
    a = ns.tenants.add(P.TenantSpec("a", quota_files=10))
    for i in range(3):
        batch: list = []
        chunk_id = ns.alloc_chunk_id(batch)
        ns.pending.add(batch, chunk_id)  # as KV_ALLOC does (no chunkservers here to place it on)
        engine.write(batch)
        ns.publish(P.KVPublish(a.root_ino, f"blk{i}", 0o644, 0, 0, 100, [P.ChunkRef(0, chunk_id, 100, [])]))
    want = (ns.tenants.of("a").files, ns.tenants.of("a").bytes, ns.tenants.of("a").kv_blocks)
    assert want == (4, 300, 3)
    engine.close()
    engine = RocksEngine(str(tmp_path / "db"))
    try:
        again = Namespace(engine, chunk_size=1 << 20)
        u = again.tenants.of("a")
        assert (u.files, u.bytes, u.kv_blocks) == want
        assert again.tenants.get("a").quota_files == 10
    finally:
        engine.close()
