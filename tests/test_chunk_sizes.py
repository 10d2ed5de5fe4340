"""Per-file chunk sizes (kvfs/layout.py, meta/layouts.py) against a real cluster: files with different
chunk sizes side by side (native client, TCP reads, the mount), a directory's policy inherited by new
files, an explicit size on create, bad sizes refused with EINVAL, persistence across a meta restart,
the remote tier (moto S3) with a non-default size, the CLI, model puts and KV blocks."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random

import pytest
import torch
from cluster import Cluster

from kvfs import protocol as P
from kvfs.layout import CHUNK_SIZE_XATTR

KiB = 1 << 10
MiB = 1 << 20
CLUSTER_CHUNK = MiB  # the cluster's --chunk-size below


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("sizes")), chunkservers=2, replication=1, chunk_size="1M").start()
    mountpoint = str(tmp_path_factory.mktemp("sizes-mnt"))
    c.mount(mountpoint)
    c.mountpoint = mountpoint
    try:
        yield c
    finally:
        c.stop()


def chunk_map(c, path: str) -> P.GetChunksReply:
    return c.chunk_map(c.resolve(path).ino)


def assert_split(reply: P.GetChunksReply, size: int, chunk_size: int) -> None:
    """The committed map is ``size`` bytes cut at multiples of ``chunk_size`` (every chunk present)."""
    assert reply.chunk_size == chunk_size and reply.attr.chunk_size == chunk_size
    count = (size + chunk_size - 1) // chunk_size
    assert [ch.index for ch in reply.chunks] == list(range(count))
    assert [ch.length for ch in reply.chunks] == [min(chunk_size, size - i * chunk_size) for i in range(count)]


def walk(c, top: str) -> list[str]:
    out = []
    for name in c.listdir(top):
        path = f"{top}/{name}"
        out.extend(walk(c, path) if c.resolve(path).mode & 0o40000 else [path])
    return out


def random_reads(c, path: str, data: bytes, chunk_size: int, seed: int) -> None:
    """Reads at random offsets, and ranges straddling chunk boundaries, equal the written bytes."""
    rnd = random.Random(seed)
    ino = c.resolve(path).ino
    c.open(ino)
    try:
        assert c.read(ino, 0, len(data)) == data
        spans = [(rnd.randrange(len(data)), rnd.randrange(1, 3 * chunk_size)) for _ in range(12)]
        spans += [(b - 3, 7) for b in range(chunk_size, len(data), chunk_size)]  # across each boundary
        for off, n in spans:
            assert c.read(ino, off, n) == data[off:off + n], (path, off, n)
    finally:
        c.release(ino)


@pytest.mark.parametrize("chunk_size", [0, 256 * KiB, 4 * MiB], ids=["cluster-1M", "256K", "4M"])
def test_files_of_different_chunk_sizes_in_one_cluster(cl, chunk_size):
    data = os.urandom(9 * MiB + 12345)
    path = f"/mixed-{chunk_size}"
    expect = chunk_size or CLUSTER_CHUNK
    with cl.client() as c:
        c.write_file(path, data, chunk_size=chunk_size)
        assert_split(chunk_map(c, path), len(data), expect)
        assert c.getxattr(c.resolve(path).ino, CHUNK_SIZE_XATTR) == str(expect).encode()
        random_reads(c, path, data, expect, seed=expect)
    with cl.client(local_reads=False) as tcp:
        random_reads(tcp, path, data, expect, seed=expect + 1)
    with cl.client(local_reads=False, thread_read_min=0) as tcp:  # the event-loop receive path too
        random_reads(tcp, path, data, expect, seed=expect + 2)
    # Overwrite across a chunk boundary, append, truncate: the file keeps its chunk size throughout.
    with cl.client() as c:
        ino = c.resolve(path).ino
        c.open(ino, write=True)
        try:
            at = 2 * expect - 1000
            patch = os.urandom(5000)
            c.write(ino, at, patch)
            tail = os.urandom(expect + 77)
            c.write(ino, len(data), tail)
            c.flush(ino)
        finally:
            c.release(ino)
        data = data[:at] + patch + data[at + len(patch):] + tail
        assert_split(chunk_map(c, path), len(data), expect)
        random_reads(c, path, data, expect, seed=3)
        cut = 3 * expect + 5
        c.truncate(ino, cut)
        assert_split(chunk_map(c, path), cut, expect)
        assert c.read_file(path) == data[:cut]
    # The mount reads and writes it at its own chunk size too.
    local = cl.mountpoint + path
    with open(local, "rb") as f:
        assert f.read() == data[:cut]
        f.seek(expect - 10)
        assert f.read(20) == data[expect - 10: expect + 10]
    with open(local, "ab") as f:
        f.write(b"z" * (expect + 1))
    with cl.client() as c:
        assert_split(chunk_map(c, path), cut + expect + 1, expect)
        assert c.read_file(path) == data[:cut] + b"z" * (expect + 1)


def test_directory_policy_is_inherited_nearest_first(cl):
    with cl.client() as c:
        c.mkdir("/pol/a/b", parents=True)
        c.write_file("/pol/before", b"x" * 10)
        top, mid = c.resolve("/pol").ino, c.resolve("/pol/a").ino
        c.setxattr(top, CHUNK_SIZE_XATTR, b"2M")
        assert c.getxattr(top, CHUNK_SIZE_XATTR) == str(2 * MiB).encode()
        data = os.urandom(5 * MiB + 3)
        c.write_file("/pol/a/b/deep", data)  # two levels below the policy
        assert_split(chunk_map(c, "/pol/a/b/deep"), len(data), 2 * MiB)
        c.setxattr(mid, CHUNK_SIZE_XATTR, str(512 * KiB).encode())  # a nearer policy wins
        c.write_file("/pol/a/b/nearer", data)
        assert_split(chunk_map(c, "/pol/a/b/nearer"), len(data), 512 * KiB)
        c.write_file("/pol/a/b/explicit", data, chunk_size=128 * KiB)  # an explicit size beats both
        assert_split(chunk_map(c, "/pol/a/b/explicit"), len(data), 128 * KiB)
        # Files keep the size they were created with; clearing a policy only changes new files.
        assert chunk_map(c, "/pol/before").chunk_size == CLUSTER_CHUNK
        assert_split(chunk_map(c, "/pol/a/b/deep"), len(data), 2 * MiB)
        c.removexattr(mid, CHUNK_SIZE_XATTR)
        c.removexattr(top, CHUNK_SIZE_XATTR)
        with pytest.raises(OSError) as exc:
            c.getxattr(top, CHUNK_SIZE_XATTR)
        assert exc.value.errno == errno.ENODATA
        c.write_file("/pol/a/b/after", data)
        assert_split(chunk_map(c, "/pol/a/b/after"), len(data), CLUSTER_CHUNK)
        for name in ("deep", "nearer", "explicit", "after"):
            assert c.read_file(f"/pol/a/b/{name}") == data
        # Rewriting a file with another explicit size makes a new file of that size.
        c.write_file("/pol/a/b/deep", data[:100], chunk_size=64 * KiB)
        assert_split(chunk_map(c, "/pol/a/b/deep"), 100, 64 * KiB)


def test_policy_through_the_mount(cl):
    d = os.path.join(cl.mountpoint, "mpol")
    os.mkdir(d)
    os.setxattr(d, "user." + CHUNK_SIZE_XATTR, b"256K")
    assert os.getxattr(d, "user." + CHUNK_SIZE_XATTR) == str(256 * KiB).encode()
    data = os.urandom(3 * MiB + 999)
    with open(os.path.join(d, "f"), "wb") as f:
        f.write(data)
    assert os.getxattr(os.path.join(d, "f"), "user." + CHUNK_SIZE_XATTR) == str(256 * KiB).encode()
    with cl.client() as c:
        assert_split(chunk_map(c, "/mpol/f"), len(data), 256 * KiB)
    rnd = random.Random(7)
    with open(os.path.join(d, "f"), "rb") as f:
        for _ in range(20):
            off, n = rnd.randrange(len(data)), rnd.randrange(1, MiB)
            f.seek(off)
            assert f.read(n) == data[off:off + n]
    os.truncate(os.path.join(d, "f"), 300 * KiB)
    with open(os.path.join(d, "f"), "rb") as f:
        assert f.read() == data[:300 * KiB]
    # An empty file's chunk size may still change; one with data refuses (ENOTEMPTY). Right after close():
    # the close drops the create's write lease (not the kernel's later, asynchronous RELEASE: EBUSY then).
    for k in range(20):
        open(os.path.join(d, f"empty{k}"), "wb").close()
        os.setxattr(os.path.join(d, f"empty{k}"), "user." + CHUNK_SIZE_XATTR, b"128K")
    open(os.path.join(d, "empty"), "wb").close()
    os.setxattr(os.path.join(d, "empty"), "user." + CHUNK_SIZE_XATTR, b"128K")
    with open(os.path.join(d, "empty"), "wb") as f:
        f.write(data[:MiB])
    with cl.client() as c:
        assert_split(chunk_map(c, "/mpol/empty"), MiB, 128 * KiB)
    with pytest.raises(OSError) as exc:
        os.setxattr(os.path.join(d, "f"), "user." + CHUNK_SIZE_XATTR, b"1M")
    assert exc.value.errno == errno.ENOTEMPTY
    for bad in (b"3M", b"32K", b"512M", b"lots"):
        with pytest.raises(OSError) as exc:
            os.setxattr(d, "user." + CHUNK_SIZE_XATTR, bad)
        assert exc.value.errno == errno.EINVAL, bad
    assert os.getxattr(d, "user." + CHUNK_SIZE_XATTR) == str(256 * KiB).encode()  # unchanged by the refusals


def test_invalid_sizes_are_einval(cl):
    with cl.client() as c:
        for bad in (3 * MiB, 32 * KiB, 512 * MiB, 100_000):
            with pytest.raises(OSError) as exc:
                c.write_file(f"/bad-{bad}", b"data", chunk_size=bad)
            assert exc.value.errno == errno.EINVAL, bad
            with pytest.raises(FileNotFoundError):
                c.resolve(f"/bad-{bad}")  # nothing was created
        c.write_file("/has-data", b"abc")
        with pytest.raises(OSError) as exc:
            c.setxattr(c.resolve("/has-data").ino, CHUNK_SIZE_XATTR, b"2M")
        assert exc.value.errno == errno.ENOTEMPTY
        # A commit split by another chunk size than the file's (an old client) is refused.
        c.write_file("/sized", b"", chunk_size=256 * KiB)
        ino = c.resolve("/sized").ino
        c.open(ino, write=True)
        try:
            c.write(ino, 0, b"q" * 1000)
            with pytest.raises(OSError) as exc:
                c.call(c.client.meta.request, P.META_COMMIT, P.Commit(ino, c.client.client_id, 1000, []))
            assert exc.value.errno == errno.EINVAL
            c.flush(ino)
        finally:
            c.release(ino)
        assert c.read_file("/sized") == b"q" * 1000


def test_cli_cp_layout_and_models_put(cl, tmp_path):
    from kvfs.cli import main

    def kvfs(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = main([*args, "--meta", cl.meta_address])
        return rc, out.getvalue()

    src = tmp_path / "m"
    (src / "sub").mkdir(parents=True)
    weights = os.urandom(17 * MiB + 5)
    (src / "model.safetensors").write_bytes(weights)
    (src / "sub" / "config.json").write_bytes(b"{}")
    rc, out = kvfs("cp", str(src / "model.safetensors"), "/cp/one", "--chunk-size", "3M", "--quiet")
    assert rc == 1 and out.count("\n") == 1 and "power of two" in out
    rc, out = kvfs("cp", str(src), "/cp/", "--chunk-size", "512K", "--quiet")
    assert rc == 0, out
    with cl.client() as c:
        assert_split(chunk_map(c, "/cp/m/model.safetensors"), len(weights), 512 * KiB)
        assert c.read_file("/cp/m/model.safetensors") == weights
        assert c.read_file("/cp/m/sub/config.json") == b"{}"
    rc, out = kvfs("layout", "set", "/cp", "--chunk-size", "2M")
    assert rc == 0 and "2.0 MiB" in out, out
    rc, out = kvfs("layout", "set", "/cp", "--chunk-size", "5M")
    assert rc == 1 and out.count("\n") == 1
    rc, out = kvfs("models", "put", str(src), "/models/m", "--no-progress")
    assert rc == 0, out
    with cl.client() as c:
        assert_split(chunk_map(c, "/models/m/model.safetensors"), len(weights), 16 * MiB)  # weights: 16 MiB
        assert chunk_map(c, "/models/m/sub/config.json").chunk_size == CLUSTER_CHUNK
        assert c.read_file("/models/m/model.safetensors") == weights
    rc, out = kvfs("layout", "get", "/models/m/model.safetensors")
    assert "16.0 MiB" in out


def test_chunk_sizes_survive_a_meta_restart(make_cluster):
    cl = make_cluster(chunkservers=1, replication=1, chunk_size="1M")
    data = os.urandom(6 * MiB + 1)
    with cl.client() as c:
        c.mkdir("/keep")
        c.setxattr(c.resolve("/keep").ino, CHUNK_SIZE_XATTR, b"2M")
        c.write_file("/keep/policy", data)
        c.write_file("/keep/explicit", data, chunk_size=256 * KiB)
    cl.restart_meta()
    cl.wait_servers(1)
    with cl.client() as c:
        assert_split(chunk_map(c, "/keep/policy"), len(data), 2 * MiB)
        assert_split(chunk_map(c, "/keep/explicit"), len(data), 256 * KiB)
        assert c.read_file("/keep/policy") == data
        random_reads(c, "/keep/explicit", data, 256 * KiB, seed=11)
        c.write_file("/keep/new", data)  # the policy itself persisted
        assert_split(chunk_map(c, "/keep/new"), len(data), 2 * MiB)


def test_kv_blocks_under_a_policy_directory(cl):
    from kvfs.kv import KVLayout, KVStore

    layout = KVLayout("float16", block_tokens=16, num_layers=80, num_kv_heads=8, head_dim=64)  # 2.5 MiB blocks
    with cl.client() as c:
        c.mkdir("/kvp", parents=True)
        c.setxattr(c.resolve("/kvp").ino, CHUNK_SIZE_XATTR, b"256K")
        store = KVStore("/kvp/store", layout, client=c)
        hashes = [f"{i:032x}" for i in range(1, 5)]
        blocks = [torch.randn(layout.block_shape, generator=torch.Generator().manual_seed(i)).to(torch.float16)
                  for i in range(4)]
        assert store.put_many(list(zip(hashes, blocks))) == [True] * 4
        got = store.get_many(hashes)
        assert all(torch.equal(g, b) for g, b in zip(got, blocks))
        store.close()
        # Published blocks record the chunk size their writer split them by (the cluster's).
        files = [f for f in walk(c, "/kvp/store") if c.resolve(f).size > MiB]
        assert len(files) == 4, walk(c, "/kvp/store")
        for f in files:
            assert_split(chunk_map(c, f), c.resolve(f).size, CLUSTER_CHUNK)
    with cl.client(local_reads=False) as tcp:
        store = KVStore("/kvp/store", layout, client=tcp)
        assert all(torch.equal(g, b) for g, b in zip(store.get_many(hashes), blocks))
        store.close()


def test_a_cluster_chunk_size_that_is_not_a_power_of_two(make_cluster):
    """The cluster's --chunk-size may be any multiple of 64 KiB (192K here): files and KV blocks that
    take it still work; only explicit per-file sizes must be powers of two."""
    from kvfs.kv import KVLayout, KVStore

    cl = make_cluster(chunkservers=1, replication=1, chunk_size="192K")
    data = os.urandom(MiB + 7)
    layout = KVLayout("float16", block_tokens=16, num_layers=16, num_kv_heads=4, head_dim=64)  # 256 KiB: 2 chunks
    with cl.client() as c:
        c.write_file("/plain", data)
        assert_split(chunk_map(c, "/plain"), len(data), 192 * KiB)
        c.write_file("/pow2", data, chunk_size=128 * KiB)
        assert_split(chunk_map(c, "/pow2"), len(data), 128 * KiB)
        random_reads(c, "/plain", data, 192 * KiB, seed=5)
        store = KVStore("/kv", layout, client=c)
        blocks = [torch.randn(layout.block_shape, generator=torch.Generator().manual_seed(i)).to(torch.float16)
                  for i in range(3)]
        hashes = [f"{i:032x}" for i in range(10, 13)]
        assert store.put_many(list(zip(hashes, blocks))) == [True] * 3
        assert all(torch.equal(g, b) for g, b in zip(store.get_many(hashes), blocks))
        store.close()
        files = walk(c, "/kv")
        assert len(files) == 3, files
        for f in files:
            assert_split(chunk_map(c, f), c.resolve(f).size, 192 * KiB)
            assert len(chunk_map(c, f).chunks) == 2
