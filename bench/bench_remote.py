"""Remote tier benchmark (issue 3): cold read and warm re-read of one large S3 object.

One S3 server for everything: ``python -m moto.server`` started here on a free loopback port. The
object (random bytes, default 1 GiB) is uploaded once with boto3, then read with 1 MiB requests:

* ``kvfs``: a real cluster from ``tests/cluster.py`` (meta + one chunkserver, replication 1, 4 MiB
  chunks, like ``kvfs up``), ``kvfs mount``, the bucket bound read-only with ``kvfs remote attach``.
  Cold read = first read through the mount (fetched from S3 into chunkservers); warm = a second read.
* ``rclone``: ``rclone mount --vfs-cache-mode full`` of the bucket (cache dir under the run's temp dir).
* ``s3fs``: ``s3fs`` (FUSE) of the bucket with default options (no local cache).
* ``boto3``: ``download_fileobj`` (parallel ranged GETs, s3transfer defaults) into a discarding sink,
  and ``boto3-1``: one plain ``get_object`` of the whole object: the ceilings (no filesystem).

Each read through a mount is checked with xxh3 against the uploaded bytes (boto3: the byte count). Nothing asserts on time.

    python bench/bench_remote.py                     # 1 GiB
    python bench/bench_remote.py --size 256M         # quick
    python bench/bench_remote.py --record docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from cluster import Cluster, free_port, is_mounted, wait_for
from mdsection import write_section

SECTION = "Remote tier (issue 3)"
BUCKET = "kvfs-bench"
KEY = "model/weights.bin"
BLOCK = 1 << 20


def parse_size(text: str) -> int:
    from kvfs.config import parse_size as p

    return p(text)


def read_file(path: str) -> tuple[float, str]:
    h = xxhash.xxh3_64()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return time.perf_counter() - t0, h.hexdigest()


class Sink:
    """A seekable write-only file that discards the bytes (s3transfer writes parts at their offsets)."""

    def __init__(self) -> None:
        self.pos = 0
        self.total = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        self.total += len(data)
        self.pos += len(data)
        return len(data)


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


def spawn(argv: list[str], log_path: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)


def mbps(size: int, seconds: float | None) -> float | None:
    return size / seconds / 1e6 if seconds else None


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout, f"port {port}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--record", help="write the results section into this markdown file")
    ap.add_argument("--skip", default="", help="comma list of targets to skip (kvfs,rclone,s3fs,boto3)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs) and print it")
    ap.add_argument("--reps", type=int, default=3, help="rounds of kvfs and rclone, alternating (medians reported)")
    ap.add_argument("--chunkserver-args", default="", help="extra `kvfs chunkserver` flags for the kvfs target")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    skip = set(filter(None, args.skip.split(",")))
    root = tempfile.mkdtemp(prefix="kvfs-bench-remote-")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(s3_env(endpoint))
    procs: list[subprocess.Popen] = []
    mounts: list[str] = []
    cluster: Cluster | None = None
    results: list[tuple[str, float | None, float | None, str]] = []
    try:
        procs.append(spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                           os.path.join(root, "moto.log")))
        wait_port(port)
        import boto3
        from boto3.s3.transfer import TransferConfig

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        print(f"uploading {size >> 20} MiB to {endpoint}/{BUCKET}/{KEY} ...", flush=True)
        data = os.urandom(size)
        expect = xxhash.xxh3_64_hexdigest(data)
        import io

        s3.upload_fileobj(io.BytesIO(data), BUCKET, KEY, Config=TransferConfig(multipart_chunksize=64 << 20))
        del data

        def record(name: str, cold: float | None, warm: float | None, note: str = "") -> None:
            results.append((name, cold, warm, note))
            c, w = mbps(size, cold), mbps(size, warm)
            print(f"{name:8s} cold {f'{c:8.0f} MB/s' if c else '       -'}   "
                  f"warm {f'{w:8.0f} MB/s' if w else '       -'}  {note}", flush=True)

        def timed_read(path: str) -> float:
            t, digest = read_file(path)
            if digest != expect:
                raise SystemExit(f"{path}: data mismatch")
            return t

        def kvfs_round(rep: int) -> tuple[float, float]:
            nonlocal cluster
            cluster = Cluster(os.path.join(root, f"kvfs{rep}"), chunkservers=1, replication=1, chunk_size="4M",
                              chunkserver_args=tuple(shlex.split(args.chunkserver_args))).start()
            mp = os.path.join(root, f"mnt-kvfs{rep}")
            try:
                cluster.mount(mp)
                rc = subprocess.run([sys.executable, "-m", "kvfs.cli", "remote", "attach", "/s3", f"s3://{BUCKET}",
                                     "--mode", "readonly", "--meta", cluster.meta_address], capture_output=True,
                                    text=True, check=False)
                if rc.returncode:
                    raise SystemExit(rc.stderr)
                path = os.path.join(mp, "s3", KEY)
                wait_for(lambda: os.path.exists(path), 30, "the object in the kvfs namespace")
                return timed_read(path), timed_read(path)
            finally:
                cluster.stop()
                cluster = None

        def rclone_round(rep: int) -> tuple[float, float]:
            mp = os.path.join(root, f"mnt-rclone{rep}")
            os.makedirs(mp)
            env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # rclone rejects it over http
            env.update(RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                       RCLONE_CONFIG_BENCH_ENDPOINT=endpoint, RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="bench",
                       RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="bench", RCLONE_CONFIG_BENCH_REGION="us-east-1")
            proc = spawn(["rclone", "mount", f"bench:{BUCKET}", mp, "--vfs-cache-mode", "full",
                          "--cache-dir", os.path.join(root, f"rclone-cache{rep}")],
                         os.path.join(root, f"rclone{rep}.log"), env=env)
            try:
                wait_for(lambda: is_mounted(mp), 30, "rclone mount")
                path = os.path.join(mp, KEY)
                return timed_read(path), timed_read(path)
            finally:
                subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
                proc.terminate()
                proc.wait(timeout=30)
                shutil.rmtree(os.path.join(root, f"rclone-cache{rep}"), ignore_errors=True)

        # Alternate the two file systems round by round, each time from nothing (a fresh kvfs cluster, a
        # fresh rclone cache): the machine's background load then hits both alike; medians are reported.
        rounds: dict[str, list[tuple[float, float]]] = {}
        for rep in range(args.reps):
            for name, fn in (("kvfs", kvfs_round), ("rclone", rclone_round)):
                if name in skip or (name == "rclone" and not shutil.which("rclone")):
                    continue
                os.sync()  # the previous round's cache writes must not be flushed during this one
                time.sleep(1)
                cold, warm = fn(rep)
                rounds.setdefault(name, []).append((cold, warm))
                print(f"  round {rep + 1}: {name:6s} cold {mbps(size, cold):6.0f} MB/s  warm {mbps(size, warm):6.0f} MB/s",
                      flush=True)
        fill_fsync = os.environ.get("KVFS_REMOTE_FILL_FSYNC") == "1"
        notes = {"kvfs": "mount, readonly binding; fetched chunks " + ("fsynced" if fill_fsync else "not fsynced")
                 + (f"; chunkserver {args.chunkserver_args}" if args.chunkserver_args else ""),
                 "rclone": "rclone mount --vfs-cache-mode full"}
        for name, pairs in rounds.items():
            colds = sorted(c for c, _ in pairs)
            warms = sorted(w for _, w in pairs)
            each = ", ".join(f"{mbps(size, c):.0f}" for c, _ in pairs)
            record(name, colds[len(colds) // 2], warms[len(warms) // 2],
                   notes[name] + (f"; median of {len(pairs)} rounds, cold MB/s per round: {each}" if len(pairs) > 1 else ""))

        # The ceilings last: s3transfer's many ranged GETs make moto allocate the whole object per
        # request, which leaves the server slower for a while after.
        if "boto3" not in skip:
            sink = Sink()
            t0 = time.perf_counter()
            s3.download_fileobj(BUCKET, KEY, sink)
            t = time.perf_counter() - t0
            assert sink.total == size
            record("boto3", t, None, "download_fileobj, s3transfer defaults (10 threads, 8 MiB ranges)")
            h = xxhash.xxh3_64()
            t0 = time.perf_counter()
            body = s3.get_object(Bucket=BUCKET, Key=KEY)["Body"]
            for piece in body.iter_chunks(BLOCK):
                h.update(piece)
            t = time.perf_counter() - t0
            if h.hexdigest() != expect:
                raise SystemExit("boto3 get_object: data mismatch")
            record("boto3-1", t, None, "one get_object of the whole object, read in 1 MiB pieces")

        if "s3fs" not in skip and shutil.which("s3fs"):
            mp = os.path.join(root, "mnt-s3fs")
            os.makedirs(mp)
            pw = os.path.join(root, "s3fs.passwd")
            with open(pw, "w") as f:
                f.write("bench:bench\n")
            os.chmod(pw, 0o600)
            procs.append(spawn(["s3fs", BUCKET, mp, "-f", "-o", f"url={endpoint}", "-o", "use_path_request_style",
                                "-o", f"passwd_file={pw}"], os.path.join(root, "s3fs.log")))
            wait_for(lambda: is_mounted(mp), 30, "s3fs mount")
            mounts.append(mp)
            path = os.path.join(mp, KEY)
            record("s3fs", timed_read(path), timed_read(path), "s3fs defaults (no local cache)")
    finally:
        for mp in mounts:
            if cluster is not None and mp in cluster.mounts:
                cluster.unmount(mp)
            elif is_mounted(mp):
                subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
        if cluster is not None:
            cluster.stop()
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    if args.record:
        write_record(args.record, size, results, argv)
    return 0


def write_record(path: str, size: int, results, argv) -> None:
    by = {name: (cold, warm) for name, cold, warm, _ in results}
    intro = (f"`python bench/bench_remote.py {shlex.join(argv or sys.argv[1:])}` — "
             f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs. One moto S3 server "
             f"(`python -m moto.server`, loopback) for all targets; one {size >> 20} MiB object of random bytes, "
             "read with 1 MiB requests, every mount read checked with xxh3. Load average at the end: "
             f"{os.getloadavg()[0]:.1f} (the machine is shared: absolute numbers are noisy, ratios less so).")
    lines = [f"## {SECTION}", "", intro, "",
             "| target | cold read MB/s | warm re-read MB/s | notes |", "|---|---|---|---|"]
    for name, cold, warm, note in results:
        c, w = mbps(size, cold), mbps(size, warm)
        lines.append(f"| {name} | {c:.0f} |" if c else f"| {name} | - |")
        lines[-1] += f" {w:.0f} | {note} |" if w else f" - | {note} |"
    if "kvfs" in by:
        kc, kw = by["kvfs"]
        ratios = []
        if "rclone" in by and by["rclone"][0]:
            ratios.append(f"cold vs rclone {by['rclone'][0] / kc:.2f}× (target ≥ 1.2×)")
        for ceiling in ("boto3", "boto3-1"):
            if ceiling in by and by[ceiling][0]:
                ratios.append(f"cold vs raw {ceiling} {by[ceiling][0] / kc:.2f}× (target ≥ 0.8×)")
        if "rclone" in by and by["rclone"][1] and kw:
            ratios.append(f"warm vs rclone {by['rclone'][1] / kw:.2f}× (target ≥ 2×)")
        lines += ["", "kvfs ratios: " + "; ".join(ratios) + "."]
    write_section(path, SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
