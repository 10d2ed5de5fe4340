"""The remote capacity tier (issue 3) against real things: a moto S3 server over HTTP in its own process
(driven only through boto3) and a pyarrow ``file://`` directory, behind real meta, chunkserver and
FUSE mount processes. The same suite runs on both backends; outage tests need a server to stop, so
they run on S3 only.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from cluster import free_port, wait_for

MiB = 1 << 20
_names = itertools.count()

REMOTE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "KVFS_REMOTE_TTL": "1", "KVFS_REMOTE_MAX_BACKOFF": "1", "KVFS_REMOTE_EVICT_MIN_AGE": "0",
    "KVFS_S3_CONNECT_TIMEOUT": "2", "KVFS_S3_READ_TIMEOUT": "10", "KVFS_S3_MAX_ATTEMPTS": "2",
}


class S3Server:
    """``python -m moto.server`` on a fixed loopback port; stop() and start() simulate an outage."""

    def __init__(self, root: str):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(root, "moto.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=log, start_new_session=True)
        import socket

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(up, 30, "moto server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)


@pytest.fixture(scope="module")
def remote_env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("s3"))
    server = S3Server(root)
    saved = {k: os.environ.get(k) for k in [*REMOTE_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(REMOTE_ENV, AWS_ENDPOINT_URL=server.endpoint)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def rmounted(remote_env, mounted):
    """The shared cluster and mount, started with the remote environment (moto endpoint, short TTLs)."""
    return mounted


class Backend:
    """One fresh remote location per test, reachable with plain boto3 / plain files."""

    def __init__(self, kind: str, server: S3Server, tmp: str):
        self.kind = kind
        self.server = server
        if kind == "s3":
            self.bucket = f"kvfs-{uuid.uuid4().hex[:12]}"
            server.s3().create_bucket(Bucket=self.bucket)
            self.url = f"s3://{self.bucket}/data"
        else:
            self.dir = os.path.join(tmp, f"remote{next(_names)}")
            os.makedirs(self.dir)
            self.url = f"file://{self.dir}"

    def put(self, key: str, data: bytes) -> None:
        if self.kind == "s3":
            self.server.s3().put_object(Bucket=self.bucket, Key=f"data/{key}", Body=data)
        else:
            path = os.path.join(self.dir, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)

    def get(self, key: str) -> bytes | None:
        if self.kind == "s3":
            try:
                return self.server.s3().get_object(Bucket=self.bucket, Key=f"data/{key}")["Body"].read()
            except self.server.s3().exceptions.NoSuchKey:
                return None
        try:
            with open(os.path.join(self.dir, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def recreate(self) -> None:
        """After an S3 server restart (moto keeps nothing), the bucket exists again, empty."""
        self.server.s3().create_bucket(Bucket=self.bucket)


@pytest.fixture(params=["s3", "file"])
def backend(request, remote_env, tmp_path):
    return Backend(request.param, remote_env, str(tmp_path))


def kvfs(meta: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a ``kvfs`` command in this process (the CLI code path, minus interpreter start-up)."""
    from kvfs.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*args, "--meta", meta])
    r = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    if check and r.returncode != 0:
        raise AssertionError(f"kvfs {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def cached_bytes(cluster, path: str) -> int:
    import kvfs.protocol as P

    with cluster.client() as c:
        attr = c.resolve(path)
        reply = c.call(c.client.meta.request, P.META_GET_CHUNKS, P.GetChunks(attr.ino))
        return sum(ch.length for ch in reply.chunks)


def chunk_ids(cluster, path: str) -> dict[int, int]:
    """index -> chunk id of a kvfs file's chunk map."""
    import kvfs.protocol as P

    with cluster.client() as c:
        attr = c.resolve(path)
        reply = c.call(c.client.meta.request, P.META_GET_CHUNKS, P.GetChunks(attr.ino))
        return {ch.index: ch.chunk_id for ch in reply.chunks}


def chunk_files(cluster, chunk_id: int) -> list[str]:
    """Where a chunk's replicas would be on the cluster's chunkservers (existing or not)."""
    from kvfs.chunkserver.store import chunk_path

    return [chunk_path(os.path.join(cluster.root, f"cs{i}"), chunk_id) for i in range(cluster.chunkservers)]


def warm_readonly(cluster, backend, key: str, data: bytes, name: str) -> str:
    """Put an object, bind its location read-only under a fresh kvfs path, warm it; the file's kvfs path."""
    backend.put(key, data)
    kpath = unique(name)
    kvfs(cluster.meta_address, "remote", "attach", kpath, backend.url, "--mode", "readonly")
    kvfs(cluster.meta_address, "warm", kpath)
    return f"{kpath}/{key}"


def state_of(path: str) -> str:
    return os.getxattr(path, "user.kvfs.state").decode()


def unique(name: str) -> str:
    return f"/{name}{next(_names)}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- the store interface


def test_store_contract(backend):
    """Every RemoteStore backend: listing, head, ranged reads pinned to a version, multipart, delete."""
    from kvfs.remote import open_store
    from kvfs.remote.store import read_range

    store = open_store(backend.url, cached=False)
    store.check()
    big = os.urandom(40 * MiB + 5)  # above the single-PUT limit: multipart on S3
    up = store.begin_upload("dir/big")
    for off in range(0, len(big), 3 * MiB):
        up.write(big[off: off + 3 * MiB])
    entry = up.complete()
    assert entry.size == len(big) and entry.etag
    backend.put("top.txt", b"hello")
    listing = {e.key: e for e in store.list("")}
    assert set(listing) == {"dir", "top.txt"} and listing["dir"].is_dir and listing["top.txt"].size == 5
    assert [e.key for e in store.list("dir")] == ["dir/big"]
    assert backend.get("dir/big") == big  # plain tools see the same object
    head = store.head("dir/big")
    assert head.etag == entry.etag
    buf = bytearray(MiB)
    assert read_range(store, "dir/big", 7 * MiB + 3, memoryview(buf), head.etag) == MiB
    assert bytes(buf) == big[7 * MiB + 3: 8 * MiB + 3]
    assert read_range(store, "dir/big", len(big) - 10, memoryview(buf)) == 10  # short only at the end
    time.sleep(1.1)
    backend.put("dir/big", b"replaced")
    with pytest.raises(OSError) as exc:
        read_range(store, "dir/big", 0, memoryview(buf), head.etag)
    assert exc.value.errno == errno.ESTALE  # never a mix of versions
    with pytest.raises(FileNotFoundError):
        store.head("missing")
    store.delete("dir/big")
    store.delete("missing")  # idempotent
    assert backend.get("dir/big") is None


# --------------------------------------------------------------------------- read-through


def test_read_through_objects_written_by_other_tools(rmounted, backend):
    big = os.urandom(3 * MiB + 12345)  # several 1 MiB chunks and a partial one
    small = b"config: 1\n"
    backend.put("model/weights.bin", big)
    backend.put("model/sub/config.yaml", small)
    kpath = unique("rt")
    kvfs(rmounted.meta_address, "remote", "attach", kpath, backend.url, "--mode", "readonly")
    local = rmounted.mountpoint + kpath
    assert sorted(os.listdir(local)) == ["model"]
    assert sorted(os.listdir(local + "/model")) == ["sub", "weights.bin"]
    assert os.stat(local + "/model/weights.bin").st_size == len(big)
    assert cached_bytes(rmounted, kpath + "/model/weights.bin") == 0
    with open(local + "/model/weights.bin", "rb") as f:
        f.seek(MiB + 7)
        assert f.read(100) == big[MiB + 7: MiB + 107]  # a random read fetches only what it needs
        f.seek(0)
        assert f.read() == big
    with open(local + "/model/sub/config.yaml", "rb") as f:
        assert f.read() == small
    assert cached_bytes(rmounted, kpath + "/model/weights.bin") == len(big)  # later reads are local
    assert state_of(local + "/model/weights.bin") == "clean"
    # Read-only binding: every write is EROFS.
    for attempt in (lambda: os.open(local + "/model/new", os.O_CREAT | os.O_WRONLY),
                    lambda: os.open(local + "/model/weights.bin", os.O_RDWR),
                    lambda: os.unlink(local + "/model/sub/config.yaml"), lambda: os.mkdir(local + "/d")):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
    out = kvfs(rmounted.meta_address, "stat", kpath + "/model/weights.bin").stdout
    assert "state: clean" in out and backend.url in out
    assert kpath in kvfs(rmounted.meta_address, "remote", "list").stdout
    assert kpath in kvfs(rmounted.meta_address, "status").stdout


def test_warm_then_evict_and_refetch(rmounted, backend):
    data = os.urandom(5 * MiB + 3)
    backend.put("w/blob", data)
    kpath = unique("warm")
    kvfs(rmounted.meta_address, "remote", "attach", kpath, backend.url, "--mode", "writeback")
    r = kvfs(rmounted.meta_address, "warm", kpath)
    assert "1 file(s) warm" in r.stdout
    assert cached_bytes(rmounted, kpath + "/w/blob") == len(data)
    r = kvfs(rmounted.meta_address, "remote", "evict", kpath)
    assert "1 clean file(s)" in r.stdout
    assert cached_bytes(rmounted, kpath + "/w/blob") == 0
    with open(rmounted.mountpoint + kpath + "/w/blob", "rb") as f:
        assert f.read() == data
    assert cached_bytes(rmounted, kpath + "/w/blob") == len(data)


def test_unreadable_fetched_chunks_are_fetched_again(rmounted, backend):
    """Fetched chunks are written without fsync (they are a cache of the remote object): a copy that
    is torn or corrupt on the chunkserver fails its checksums and is fetched again, never served."""
    data = os.urandom(3 * MiB + 5)
    blob = warm_readonly(rmounted, backend, "torn/blob", data, "torn")
    before = chunk_ids(rmounted, blob)
    assert len(before) >= 3
    damaged = 0
    for path in chunk_files(rmounted, before[1]):
        if os.path.exists(path):
            with open(path, "r+b") as f:  # flip bytes in the middle, as a torn write-back would leave them
                f.seek(300_000)
                f.write(bytes(b ^ 0xFF for b in f.read(4096)))
            damaged += 1
    assert damaged >= 1
    with rmounted.client() as c:  # a fresh client: no cached bytes, reads the damaged replicas first
        assert c.read_file(blob) == data
    after = chunk_ids(rmounted, blob)
    assert all(after[i] == before[i] for i in before if i != 1)
    assert after[1] != before[1]  # the damaged chunk was replaced by a fresh fetch


def test_eviction_under_an_open_reader_refetches(rmounted, backend):
    """A clean file evicted while a client holds its chunk map: that client's next reads fail over to
    the remote (the chunks are gone from every chunkserver) instead of returning EIO."""
    data = os.urandom(4 * MiB + 17)
    blob = warm_readonly(rmounted, backend, "ev/blob", data, "evr")
    files = [f for cid in chunk_ids(rmounted, blob).values() for f in chunk_files(rmounted, cid)]
    with rmounted.client() as c:
        ino = c.resolve(blob).ino
        c.open(ino)
        try:
            assert c.read(ino, 0, 1000) == data[:1000]  # the chunk map is now held by this client
            kvfs(rmounted.meta_address, "remote", "evict", blob)
            wait_for(lambda: not any(os.path.exists(f) for f in files), 20, "evicted chunks deleted")
            assert c.read(ino, MiB, len(data)) == data[MiB:]
        finally:
            c.release(ino)


def test_remote_change_is_detected(rmounted, backend):
    backend.put("f", b"version one " * 1000)
    kpath = unique("stale")
    kvfs(rmounted.meta_address, "remote", "attach", kpath, backend.url, "--mode", "writeback")
    path = rmounted.mountpoint + kpath + "/f"
    with open(path, "rb") as f:
        assert f.read() == b"version one " * 1000
    time.sleep(1.1)  # mtime granularity of some stores is one second
    backend.put("f", b"version two, longer " * 1000)
    kvfs(rmounted.meta_address, "remote", "sync", kpath)
    with open(path, "rb") as f:
        assert f.read() == b"version two, longer " * 1000
    # Without an explicit sync: the listing TTL (1 s here) catches it on the next lookup/open.
    time.sleep(1.1)
    backend.put("f", b"three")
    time.sleep(1.5)

    def fresh() -> bool:
        with open(path, "rb") as f:
            return f.read() == b"three"

    wait_for(fresh, 10, "the changed object to be served")


# --------------------------------------------------------------------------- write-back / write-through


def test_writeback_visible_to_plain_tools(rmounted, backend):
    kpath = unique("wb")
    kvfs(rmounted.meta_address, "remote", "attach", kpath, backend.url, "--mode", "writeback")
    local = rmounted.mountpoint + kpath
    data = os.urandom(2 * MiB + 100)
    os.makedirs(local + "/out")
    with open(local + "/out/model.bin", "wb") as f:
        f.write(data)
    with open(local + "/empty", "wb"):
        pass
    # Acknowledged before it is uploaded: the state says where the upload is, and never claims
    # "clean" before the remote holds these bytes.
    state = state_of(local + "/out/model.bin")
    assert state in ("dirty", "uploading", "clean"), state
    if state == "clean":
        assert backend.get("out/model.bin") == data
    kvfs(rmounted.meta_address, "flush", local, "--wait", "60")  # a mount path works too
    assert state_of(local + "/out/model.bin") == "clean"
    assert backend.get("out/model.bin") == data
    assert backend.get("empty") == b""
    # Overwrite, rename and delete are mirrored.
    with open(local + "/out/model.bin", "r+b") as f:
        f.seek(10)
        f.write(b"PATCH")
    os.rename(local + "/out/model.bin", local + "/out/renamed.bin")
    os.unlink(local + "/empty")
    kvfs(rmounted.meta_address, "flush", kpath, "--wait", "60")
    expect = data[:10] + b"PATCH" + data[15:]
    assert backend.get("out/renamed.bin") == expect
    wait_for(lambda: backend.get("out/model.bin") is None and backend.get("empty") is None, 20, "remote deletes")
    # The uploaded file stays readable after its local chunks are dropped.
    kvfs(rmounted.meta_address, "remote", "evict", kpath)
    assert cached_bytes(rmounted, kpath + "/out/renamed.bin") == 0
    with open(local + "/out/renamed.bin", "rb") as f:
        assert f.read() == expect


def test_kv_blocks_in_a_writeback_binding_are_uploaded(rmounted, backend):
    """A KV store under a remote-bound directory: meta refuses the one-step publish (EXDEV), the native
    store falls back to temp file + rename, and the blocks reach the remote like any file."""
    import torch

    from kvfs.kv import KVLayout, KVStore, block_hashes

    kpath = unique("kvwb")
    kvfs(rmounted.meta_address, "remote", "attach", kpath, backend.url, "--mode", "writeback")
    lay = KVLayout("float16", block_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8)
    hashes = block_hashes(list(range(12)), lay.block_tokens)
    blocks = [torch.randn(lay.block_shape).to(torch.float16) for _ in hashes]
    with rmounted.client() as c:
        store = KVStore(kpath + "/m", lay, client=c)
        assert store.put_many(list(zip(hashes, blocks))) == [True] * len(hashes)
        assert store.put(hashes[0], blocks[0]) is False
        assert all(torch.equal(got, want) for got, want in zip(store.get_many(hashes), blocks))
        store.close()
    kvfs(rmounted.meta_address, "flush", kpath, "--wait", "60")
    rel = store.path(hashes[1])[len(kpath) + 1:]
    raw = backend.get(rel)
    assert raw is not None and raw.endswith(blocks[1].numpy().tobytes())
    assert not any(".tmp" in name for name in os.listdir(rmounted.mountpoint + kpath + "/m/" + lay.name + "/" + hashes[1][:2]))


def test_writethrough_close_returns_after_upload(rmounted, backend):
    kpath = unique("wt")
    kvfs(rmounted.meta_address, "remote", "attach", kpath, backend.url, "--mode", "writethrough")
    data = os.urandom(MiB + 5)
    with open(rmounted.mountpoint + kpath + "/now.bin", "wb") as f:
        f.write(data)
    assert backend.get("now.bin") == data  # no flush, no wait


def test_attach_errors_are_one_line(rmounted, remote_env):
    r = kvfs(rmounted.meta_address, "remote", "attach", unique("bad"), "s3://no-such-bucket-kvfs/x", check=False)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "no such bucket" in r.stderr
    r = kvfs(rmounted.meta_address, "remote", "attach", unique("bad"), "ftp://x/y", check=False)
    assert r.returncode == 1 and "unsupported remote URL" in r.stderr


# --------------------------------------------------------------------------- faults (S3 only: a server to stop)


def test_queue_survives_restarts_and_s3_outage(remote_env, make_cluster):
    backend = Backend("s3", remote_env, "")
    cluster = make_cluster(chunkservers=2, replication=2)
    kpath = unique("q")
    kvfs(cluster.meta_address, "remote", "attach", kpath, backend.url, "--mode", "writeback")
    files = {f"{kpath}/f{i}": os.urandom(MiB * i + 17) for i in range(1, 4)}
    remote_env.stop()
    try:
        with cluster.client() as c:
            for path, data in files.items():
                c.write_file(path, data)  # S3 is down: local writes still succeed
            assert c.read_file(f"{kpath}/f1") == files[f"{kpath}/f1"]  # cached data stays readable
        # Restart every kvfs process with the upload queue non-empty.
        cluster.restart_meta()
        for i in range(2):
            cluster.kill_chunkserver(i)
            cluster.start_chunkserver(i)
        cluster.wait_servers(2)
        r = kvfs(cluster.meta_address, "remote", "list")
        assert "3" in r.stdout.splitlines()[1].split()  # three dirty files still queued
    finally:
        remote_env.start()
    backend.recreate()
    kvfs(cluster.meta_address, "flush", kpath, "--wait", "90")
    for path, data in files.items():
        assert backend.get(path.rsplit("/", 1)[1]) == data


def test_s3_stopped_mid_upload(remote_env, make_cluster):
    backend = Backend("s3", remote_env, "")
    cluster = make_cluster(chunkservers=1, replication=1)
    kpath = unique("mid")
    kvfs(cluster.meta_address, "remote", "attach", kpath, backend.url, "--mode", "writeback")
    data = os.urandom(48 * MiB)  # multipart: three 16 MiB parts
    with cluster.client() as c:
        c.write_file(f"{kpath}/big", data)
    s3 = remote_env.s3()
    wait_for(lambda: s3.list_multipart_uploads(Bucket=backend.bucket).get("Uploads"), 30,
             "the multipart upload to start", interval=0.01)
    remote_env.stop()
    time.sleep(1.5)
    remote_env.start()
    backend.recreate()
    kvfs(cluster.meta_address, "flush", kpath, "--wait", "90")
    assert backend.get("big") == data


def test_cold_read_with_remote_down_is_eio(remote_env, make_cluster):
    backend = Backend("s3", remote_env, "")
    backend.put("cold", os.urandom(2 * MiB))
    backend.put("warm", b"cached")
    cluster = make_cluster(chunkservers=1, replication=1)
    kpath = unique("down")
    kvfs(cluster.meta_address, "remote", "attach", kpath, backend.url, "--mode", "readonly")
    with cluster.client() as c:
        assert c.read_file(f"{kpath}/warm") == b"cached"
        remote_env.stop()
        try:
            t0 = time.monotonic()
            with pytest.raises(OSError) as exc:
                c.read_file(f"{kpath}/cold")
            assert exc.value.errno == errno.EIO
            assert time.monotonic() - t0 < 60
            assert c.read_file(f"{kpath}/warm") == b"cached"
        finally:
            remote_env.start()



def test_capacity_pressure_drops_clean_data_only(remote_env, make_cluster, monkeypatch):
    # Watermarks so low that any use counts as pressure: everything clean goes, nothing dirty does.
    monkeypatch.setenv("KVFS_REMOTE_HIGH_WATERMARK", "0.0000001")
    monkeypatch.setenv("KVFS_REMOTE_LOW_WATERMARK", "0")
    cluster = make_cluster(chunkservers=1, replication=1)
    source, sink = Backend("s3", remote_env, ""), Backend("s3", remote_env, "")
    clean, dirty = os.urandom(3 * MiB), os.urandom(2 * MiB)
    source.put("clean.bin", clean)
    kvfs(cluster.meta_address, "remote", "attach", "/src", source.url, "--mode", "readonly")
    kvfs(cluster.meta_address, "remote", "attach", "/sink", sink.url, "--mode", "writeback")
    sink.server.s3().delete_bucket(Bucket=sink.bucket)  # uploads to /sink now fail: its files stay dirty
    with cluster.client() as c:
        c.write_file("/sink/dirty.bin", dirty)
        assert c.read_file("/src/clean.bin") == clean
    wait_for(lambda: cached_bytes(cluster, "/src/clean.bin") == 0, 30, "clean data to be evicted")
    time.sleep(3)  # a few more eviction rounds
    assert cached_bytes(cluster, "/sink/dirty.bin") == len(dirty)
    with cluster.client() as c:
        assert c.read_file("/src/clean.bin") == clean  # fetched again transparently
        assert c.read_file("/sink/dirty.bin") == dirty
        ino = c.resolve("/sink/dirty.bin").ino
        import kvfs.protocol as P

        info = c.call(c.client.meta.request, P.META_REMOTE_INFO, P.RemoteInfo(ino))
        assert info.state != "clean" and info.error
    r = kvfs(cluster.meta_address, "remote", "detach", "/sink", check=False)
    assert r.returncode == 1 and "not uploaded yet" in r.stderr  # dirty data is never dropped
    kvfs(cluster.meta_address, "remote", "detach", "/src")
    assert "/src" not in kvfs(cluster.meta_address, "remote", "list").stdout
    with cluster.client() as c:
        assert c.listdir("/src") == []  # remote-backed entries leave with the binding; the remote keeps them


def test_attach_only_what_the_admin_allowed(make_cluster, tmp_path):
    """Meta opens remote stores with its own credentials, so only URLs under its --remote-allow
    prefixes may be attached (issue 13): no file:///etc/cron.d write-back binding for any client."""
    allowed = tmp_path / "allowed"
    (allowed / "models").mkdir(parents=True)
    (tmp_path / "allowed-evil").mkdir()
    (allowed / "link").symlink_to("/etc")
    cluster = make_cluster(chunkservers=1, replication=1, remote_allow=(f"file://{allowed}",))
    ok = kvfs(cluster.meta_address, "remote", "attach", "/m", f"file://{allowed}/models", "--mode", "readonly")
    assert ok.returncode == 0
    for url in (f"file://{tmp_path}/allowed-evil", "file:///etc/cron.d", f"file://{allowed}/../allowed-evil",
                f"file://{allowed}/link", "s3://some-bucket/x"):
        r = kvfs(cluster.meta_address, "remote", "attach", unique("no"), url, "--mode", "writeback", check=False)
        assert r.returncode == 1, url
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "not on this meta's remote allow-list" in lines[0], (url, r.stderr)
    # By default a cluster meta allows nothing.
    closed = make_cluster(chunkservers=1, replication=1, remote_allow=())
    r = kvfs(closed.meta_address, "remote", "attach", "/m", f"file://{allowed}/models", check=False)
    assert r.returncode == 1 and "allow-list" in r.stderr


def test_non_default_chunk_sizes_fill_and_upload(rmounted, backend):
    """Per-file chunk sizes (kvfs/layout.py) on the remote tier: a read-only binding under a 256 KiB
    policy fills its objects in 256 KiB chunks; a file written with 2 MiB chunks into a writeback
    binding uploads whole and is fetched back in 2 MiB chunks after an eviction."""
    from kvfs.layout import CHUNK_SIZE_XATTR

    obj = os.urandom(3 * MiB + 4321)
    backend.put("sized/obj", obj)
    kpath = unique("sized")
    with rmounted.client() as c:
        c.mkdir(kpath)
        c.setxattr(c.resolve(kpath).ino, CHUNK_SIZE_XATTR, b"256K")  # before attach: readonly refuses changes
    kvfs(rmounted.meta_address, "remote", "attach", kpath, backend.url, "--mode", "readonly")
    with rmounted.client() as c:
        ino = c.resolve(f"{kpath}/sized/obj").ino
        c.open(ino)
        try:
            assert c.read(ino, 300_000, 500_000) == obj[300_000:800_000]  # a random read fills what it needs
            assert c.read(ino, 0, len(obj)) == obj
        finally:
            c.release(ino)
        reply = c.chunk_map(ino)
        assert reply.chunk_size == 256 << 10
        assert [ch.length for ch in reply.chunks] == [min(256 << 10, len(obj) - i * (256 << 10))
                                                       for i in range(len(reply.chunks))]
        assert sum(ch.length for ch in reply.chunks) == len(obj)
    wpath = unique("wsized")
    kvfs(rmounted.meta_address, "remote", "attach", wpath, backend.url, "--mode", "writeback")
    data = os.urandom(5 * MiB + 17)
    with rmounted.client() as c:
        c.write_file(f"{wpath}/big", data, chunk_size=2 * MiB)
    kvfs(rmounted.meta_address, "flush", wpath, "--wait", "60")
    assert backend.get("big") == data
    kvfs(rmounted.meta_address, "remote", "evict", wpath)
    assert cached_bytes(rmounted, f"{wpath}/big") == 0
    with rmounted.client(local_reads=False) as c:
        assert c.read_file(f"{wpath}/big") == data
        reply = c.chunk_map(c.resolve(f"{wpath}/big").ino)
        assert reply.chunk_size == 2 * MiB and [ch.length for ch in reply.chunks] == [2 * MiB, 2 * MiB, MiB + 17]
