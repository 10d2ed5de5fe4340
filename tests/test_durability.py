"""Durability and failure behaviour with real processes: kill -9 of meta and chunkservers mid-workload,
corrupt replicas, full disks, a dead or hung meta under a mount, and bad CLI input.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from cluster import free_port, is_mounted, wait_for

from kvfs import protocol as P


def server_address(cluster, i: int) -> str:
    args = cluster.servers[i].args
    return args[args.index("--listen") + 1]


def server_index(cluster, address: str) -> int:
    return next(i for i in range(len(cluster.servers)) if server_address(cluster, i) == address)


def chunk_file(cluster, i: int, chunk_id: int) -> str:
    name = f"{chunk_id:016x}"
    return os.path.join(cluster.root, f"cs{i}", "chunks", name[-2:], name)


def call_with_bound(fn, bound: float):
    """Run ``fn`` in a thread; returns (result or exception, seconds). Fails the test if it hangs."""
    out: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["value"] = exc
        out["elapsed"] = time.monotonic() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    assert not t.is_alive(), f"call still blocked after {bound}s (hung)"
    return out["value"], out["elapsed"]


# --------------------------------------------------------------------------- crash mid-workload


class Workload:
    """Writers that record what was acknowledged: a file counts once close() (or fsync) returned."""

    def __init__(self, cluster, mnt: str, seed: int):
        self.cluster = cluster
        self.mnt = mnt
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.attempted: dict[str, bytes] = {}  # relative path -> full intended content
        self.acked: dict[str, int] = {}  # relative path -> bytes guaranteed durable (prefix length)
        # (when the failed operation started, errno, what): availability is asserted from these.
        self.failures: list[tuple[float, int | None, str]] = []
        self.threads: list[threading.Thread] = []

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def _payload(self) -> bytes:
        with self.lock:
            size = self.rng.choice([0, 1, 1000, 200_000, 256 << 10, 700_000, 1_300_000])
            return self.rng.randbytes(size)

    def _ack(self, rel: str, length: int) -> None:
        with self.lock:
            self.acked[rel] = max(self.acked.get(rel, 0), length)

    def _fail(self, started: float, exc: OSError, rel: str) -> None:
        with self.lock:
            self.failures.append((started, exc.errno, f"{rel}: {exc}"))
        time.sleep(0.05)  # pacing while a server is down, not an assertion

    def failures_since(self, t: float) -> list[tuple[float, int | None, str]]:
        """Failed operations that started at ``t`` or later."""
        with self.lock:
            return [f for f in self.failures if f[0] >= t]

    def _files(self, k: int):
        """(relative path, content) to write until stopped; each is recorded as attempted first."""
        i = 0
        while not self.stop.is_set():
            rel = f"w{k}/f{i}"
            i += 1
            data = self._payload()
            with self.lock:
                self.attempted[rel] = data
            yield rel, data

    def mount_writer(self, k: int, fsync_midway: bool) -> None:
        for rel, data in self._files(k):
            path = os.path.join(self.mnt, rel)
            started = time.monotonic()
            try:
                fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            except OSError as exc:
                self._fail(started, exc, rel)
                continue
            try:
                half = len(data) // 2
                pos = 0
                for end in (half, len(data)):
                    while pos < end:
                        pos += os.write(fd, data[pos:min(end, pos + (128 << 10))])
                    if fsync_midway and end == half:
                        os.fsync(fd)
                        self._ack(rel, half)
            except OSError as exc:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self._fail(started, exc, rel)
                continue
            try:
                os.close(fd)
            except OSError as exc:
                self._fail(started, exc, rel)
                continue
            self._ack(rel, len(data))

    def client_writer(self, k: int) -> None:
        with self.cluster.client(timeout=5.0) as c:
            for rel, data in self._files(k):
                started = time.monotonic()
                try:
                    c.write_file("/" + rel, data)
                except OSError as exc:
                    self._fail(started, exc, rel)
                    continue
                self._ack(rel, len(data))

    def start(self, mount_writers: int = 3, client_writers: int = 1) -> None:
        for k in range(mount_writers + client_writers):
            os.mkdir(os.path.join(self.mnt, f"w{k}"))
            if k < mount_writers:
                t = threading.Thread(target=self.mount_writer, args=(k, k % 2 == 1), daemon=True)
            else:
                t = threading.Thread(target=self.client_writer, args=(k,), daemon=True)
            self.threads.append(t)
            t.start()

    def progress(self, more: int, timeout: float = 60) -> None:
        target = self.count() + more
        wait_for(lambda: self.count() >= target, timeout, f"{more} more acknowledged files")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
            assert not t.is_alive(), "a writer hung"

    def verify(self, read) -> None:
        """Acknowledged files read back byte-identical (at least their durable prefix); the others
        read back as some prefix of what was being written, never as foreign or zeroed bytes."""
        bad = []
        for rel, data in sorted(self.attempted.items()):
            durable = self.acked.get(rel)
            try:
                got = read(rel)
            except FileNotFoundError:
                if durable is not None:
                    bad.append(f"{rel}: acknowledged but missing")
                continue
            except OSError as exc:
                bad.append(f"{rel}: {exc!r}")
                continue
            if durable == len(data):
                if got != data:
                    bad.append(f"{rel}: acknowledged file differs (len {len(got)} vs {len(data)})")
            elif got != data[:len(got)] or len(got) < (durable or 0):
                bad.append(f"{rel}: not a prefix of the written data (len {len(got)}, durable {durable})")
        assert not bad, f"{len(bad)} bad files of {len(self.attempted)}:\n" + "\n".join(bad[:20])


def _crash_run(make_cluster, tmp_path, rounds: int, per_phase: int) -> None:
    cluster = make_cluster(chunk_size="256K")
    mnt = cluster.mount(str(tmp_path / "mnt"))
    work = Workload(cluster, mnt, seed=rounds)
    work.start()
    try:
        work.progress(per_phase)
        for r in range(rounds):
            cluster.kill_meta()  # SIGKILL
            work.progress(0)
            cluster.meta.start()
            cluster.wait_meta()
            work.progress(per_phase)
            victim = r % len(cluster.servers)
            cluster.kill_chunkserver(victim)  # SIGKILL
            # One of three chunkservers down with replication 2: once meta has noticed (heartbeat
            # timeout), new chunks go to the two live ones and every write must succeed.
            time.sleep(cluster.heartbeat_timeout + 1)
            noticed = time.monotonic()
            work.progress(per_phase)
            during_outage = work.failures_since(noticed)
            assert not during_outage, f"writes failed with a chunkserver down: {during_outage[:5]}"
            cluster.start_chunkserver(victim)
            cluster.wait_servers(len(cluster.servers))
            work.progress(per_phase)
    finally:
        work.finish()
    assert work.count() >= per_phase * (1 + 3 * rounds)
    # Only a dead meta may fail operations, and only as EIO (never a hang, never another errno).
    odd = [f for f in work.failures if f[1] != errno.EIO]
    assert not odd, f"failures other than EIO: {odd[:5]}"

    def via_mount(rel: str) -> bytes:
        with open(os.path.join(mnt, rel), "rb") as f:
            return f.read()

    work.verify(via_mount)
    # A fresh client of its own, and a fresh mount (no caches from the writers' side).
    with cluster.client() as c:
        work.verify(lambda rel: c.read_file("/" + rel))
    second = cluster.mount(str(tmp_path / "mnt2"))
    work.verify(lambda rel: via_mount_at(second, rel))
    # Meta restarted once more (clean state, chunk locations rebuilt from the servers' reports);
    # files created after it get fresh inode and chunk ids, so every old file stays intact.
    cluster.restart_meta()
    cluster.wait_servers(len(cluster.servers))
    with cluster.client() as c:
        fresh = {f"/after{i}": os.urandom(300_000) for i in range(30)}
        for path, data in fresh.items():
            c.write_file(path, data)
        work.verify(lambda rel: c.read_file("/" + rel))
        assert all(c.read_file(path) == data for path, data in fresh.items())


def via_mount_at(mnt: str, rel: str) -> bytes:
    with open(os.path.join(mnt, rel), "rb") as f:
        return f.read()


def test_kill_meta_and_chunkserver_mid_workload(make_cluster, tmp_path):
    _crash_run(make_cluster, tmp_path, rounds=1, per_phase=8)


@pytest.mark.slow
def test_kill_meta_and_chunkserver_mid_workload_long(make_cluster, tmp_path):
    _crash_run(make_cluster, tmp_path, rounds=4, per_phase=30)


# --------------------------------------------------------------------------- corrupt replicas


def flip_bytes(path: str, offset: int = 1000) -> None:
    """Corrupt a chunk file in place (its checksum sidecar untouched)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def test_corrupt_replica_detected_and_other_replica_served(make_cluster, tmp_path):
    cluster = make_cluster()  # replication 2, 1 MiB chunks
    data = os.urandom(2 * (1 << 20) + 5000)
    with cluster.client() as c:
        c.write_file("/victim", data)
        ino = c.resolve("/victim").ino
        refs = c.call(c.client.meta.request, P.META_GET_CHUNKS, P.GetChunks(ino)).chunks
    assert len(refs) == 3 and all(len(r.replicas) == 2 for r in refs)

    def locations(chunk_id: int) -> list[str]:
        with cluster.client() as c:
            return c.call(c.client.meta.request, P.META_CHUNK_LOCATIONS, P.ChunkLocations([chunk_id])).replicas[0]

    # Corrupt the replica readers try first (meta lists replicas in a stable order while nothing is
    # written): the read must detect it, report it, and serve the bytes from the other replica.
    for ref, local in ((refs[1], True), (refs[2], False)):
        bad = ref.replicas[0]
        flip_bytes(chunk_file(cluster, server_index(cluster, bad), ref.chunk_id))
        with cluster.client(local_reads=local) as c:
            assert c.read_file("/victim") == data
        # Detected and reported: meta checks the report with the server (meta/bad_chunks.py, a queue
        # worked off in the background), then no longer lists the replica.
        wait_for(lambda: locations(ref.chunk_id) == [ref.replicas[1]], 20, "meta to drop the corrupt replica")

    # Only a corrupt replica left: the read fails with EIO, it never returns the corrupt bytes.
    ref = refs[0]
    bad_index, good_index = (server_index(cluster, a) for a in ref.replicas)
    flip_bytes(chunk_file(cluster, bad_index, ref.chunk_id), 5)
    cluster.kill_chunkserver(good_index)
    wait_for(lambda: cluster.live_servers() == len(cluster.servers) - 1, 20, "meta to see the server down")
    mnt = cluster.mount(str(tmp_path / "mnt"))
    with open(os.path.join(mnt, "victim"), "rb") as f:
        with pytest.raises(OSError) as info:
            f.read(1 << 20)
        assert info.value.errno == errno.EIO
    wait_for(lambda: locations(ref.chunk_id) == [], 20, "meta to drop the last, corrupt replica")

    cluster.start_chunkserver(good_index)
    cluster.wait_servers(len(cluster.servers))
    with open(os.path.join(mnt, "victim"), "rb") as f:
        assert f.read() == data
    with cluster.client() as c:
        assert c.read_file("/victim") == data


# --------------------------------------------------------------------------- full disk


def test_full_disk_gives_enospc_and_nothing_half_written(make_cluster, tmp_path):
    cluster = make_cluster(chunkserver_args=("--capacity", "3M"))  # 3 x 3 MiB, replication 2
    mnt = cluster.mount(str(tmp_path / "mnt"))
    keep = os.urandom(1 << 20)
    with open(os.path.join(mnt, "keep"), "wb") as f:
        f.write(keep)
    data = os.urandom(12 << 20)
    path = os.path.join(mnt, "big")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    code = None
    try:
        for pos in range(0, len(data), 1 << 20):
            os.write(fd, data[pos:pos + (1 << 20)])
    except OSError as exc:
        code = exc.errno
    try:
        os.close(fd)
    except OSError as exc:
        code = code or exc.errno
    assert code == errno.ENOSPC

    with cluster.client() as c:
        committed = c.read_file("/big")
        assert committed == data[:len(committed)]  # nothing committed, or a prefix: never foreign bytes
        assert c.read_file("/keep") == keep

    def mount_view() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    # The writer's mount drops what it could not commit (after its release), and shows the same file.
    wait_for(lambda: mount_view() == committed, 10, "the writer's mount to show the committed file")
    # no half-written chunk files on any server
    for i in range(len(cluster.servers)):
        for folder, _, names in os.walk(os.path.join(cluster.root, f"cs{i}", "chunks")):
            for name in names:
                assert not name.endswith(".tmp"), os.path.join(folder, name)
                if not name.endswith(".sum"):
                    assert name + ".sum" in names
                    assert os.path.getsize(os.path.join(folder, name)) > 0


# --------------------------------------------------------------------------- dead or hung meta


def test_dead_meta_gives_eio_not_hang(make_cluster, tmp_path):
    cluster = make_cluster()
    mnt = cluster.mount(str(tmp_path / "mnt"))
    with open(os.path.join(mnt, "f"), "wb") as f:
        f.write(b"x")
    meta = cluster.meta.popen

    # hung meta (stopped, connections accepted but never answered): EIO after the 10 s timeout
    meta.send_signal(signal.SIGSTOP)
    try:
        exc, elapsed = call_with_bound(lambda: os.stat(os.path.join(mnt, "new-name")), 40)
        assert isinstance(exc, OSError) and exc.errno == errno.EIO, exc
        assert elapsed < 30
    finally:
        meta.send_signal(signal.SIGCONT)
    assert sorted(os.listdir(mnt)) == ["f"]  # works again once meta answers

    # dead meta: every kind of operation fails with EIO, quickly
    cluster.kill_meta()
    ops = [
        lambda: os.stat(os.path.join(mnt, "other")),
        lambda: os.mkdir(os.path.join(mnt, "d")),
        lambda: open(os.path.join(mnt, "g"), "wb").close(),
        lambda: os.listdir(mnt),
        lambda: os.statvfs(mnt),
    ]
    for op in ops:
        exc, elapsed = call_with_bound(op, 40)
        assert isinstance(exc, OSError) and exc.errno == errno.EIO, exc
    assert is_mounted(mnt)  # the mount itself survives
    cluster.meta.start()
    cluster.wait_meta()
    wait_for(lambda: _listdir_or_none(mnt) == ["f"], 20, "the mount to recover")


def _listdir_or_none(path: str):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


# --------------------------------------------------------------------------- CLI bad input


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfs.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("kvfs: error: ")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr
    for word in words:
        assert word in errors[0], proc.stderr


@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only filesystem: a tmpfs mounted ro (we run as root), else a path under /proc."""
    path = tmp_path / "ro"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True, check=False).returncode == 0:
        try:
            yield str(path)
        finally:
            subprocess.run(["umount", str(path)], capture_output=True, check=False)
    else:
        yield "/proc/kvfs-readonly"


def test_cli_mount_missing_dir(tmp_path):
    assert_one_line_error(run_cli("mount", str(tmp_path / "nope"), "--meta", "127.0.0.1:1"), "does not exist")


def test_cli_mount_non_empty_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run_cli("mount", str(tmp_path), "--meta", "127.0.0.1:1"), "not empty")
    assert not is_mounted(str(tmp_path))


def test_cli_mount_unreachable_meta(tmp_path):
    port = free_port()  # nothing listens there
    proc = run_cli("mount", str(tmp_path), "--meta", f"127.0.0.1:{port}", "--timeout", "3")
    assert_one_line_error(proc, f"127.0.0.1:{port}")
    assert not is_mounted(str(tmp_path))


def test_cli_status_unreachable_meta():
    assert_one_line_error(run_cli("status", "--meta", f"127.0.0.1:{free_port()}", "--timeout", "3"))


def test_cli_chunkserver_readonly_data_dir(readonly_dir):
    proc = run_cli("chunkserver", "--insecure", "--data-dir", os.path.join(readonly_dir, "cs"), "--meta", "127.0.0.1:1",
                   "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, "data dir")


def test_cli_chunkserver_data_dir_under_proc():
    proc = run_cli("chunkserver", "--insecure", "--data-dir", "/proc/kvfs-test/cs", "--meta", "127.0.0.1:1",
                   "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, "/proc/kvfs-test/cs")


def test_cli_meta_readonly_data_dir(readonly_dir):
    proc = run_cli("meta", "--insecure", "--data-dir", os.path.join(readonly_dir, "meta"), "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, "data dir")


def test_cli_bad_values():
    assert_one_line_error(run_cli("meta", "--insecure", "--data-dir", "/tmp/x", "--chunk-size", "lots"), "lots")
    assert_one_line_error(run_cli("meta", "--insecure", "--data-dir", "/tmp/x", "--listen", "nowhere"), "nowhere")
