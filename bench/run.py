"""Core filesystem benchmark (issue 2): the kvfs mount against a bindfs mount and the local directory.

One run, one machine, three kinds of target on the same disk:

* ``local``: a plain directory;
* ``bindfs``: a bindfs (C FUSE passthrough, from apt) mount of a local directory;
* ``kvfs``: a real cluster from ``tests/cluster.py`` (meta + chunkservers + ``kvfs mount`` as separate
  processes), by default replication 1 on one chunkserver like ``kvfs up``; ``--replicated`` adds a
  replication-2 line on 3 chunkservers, ``--writeback`` a line mounted with ``--writeback-cache``.

Every target runs the same plain-Python loops: a sequential write of ``--size`` bytes in ``--block``
requests with one fsync at the end, page caches dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``),
a first read, a re-read; then create, stat (caches dropped first) and unlink of ``--files`` empty files.
The data read back is checked against what was written, outside the timed loops. ``--repeat N`` runs
the targets round robin N times (a change in machine load hits all of them) and reports medians.

    python bench/run.py                          # 1 GiB, 10,000 files
    python bench/run.py --size 256M --files 2000 # quick
    python bench/run.py --record docs/benchmarks.md --replicated --writeback

``--record`` writes the table, the command line, the date and the machine into the "Core filesystem
(issue 2)" section of that markdown file, leaving its other sections alone. ``--profile DIR`` runs
py-spy on the kvfs processes during each phase of the first kvfs target (collapsed stacks, one file per
process and phase; ``bench/profile_top.py`` summarises them). Benchmarks are not tests: nothing here
asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from cluster import Cluster, is_mounted, wait_for  # noqa: E402
from mdsection import write_section  # noqa: E402
from pyspy import profiled as profile_pids  # noqa: E402

from kvfs.config import format_size, parse_size  # noqa: E402

SECTION = "Core filesystem (issue 2)"
MB = 1e6  # dd's unit: the figures are dd's MB/s and GB/s

# (metric, label, unit)
METRICS = [
    ("write", "write", "MB/s"),
    ("read", "first read", "MB/s"),
    ("reread", "re-read", "MB/s"),
    ("create", "create", "files/s"),
    ("stat", "stat", "files/s"),
    ("unlink", "unlink", "files/s"),
]
# The targets: (metric, baseline target, minimum ratio).
TARGETS = [
    ("read", "bindfs", 1.0),
    ("reread", "local", 0.5),
    ("write", "local", 0.3),
    ("create", "bindfs", 0.3),
    ("stat", "bindfs", 0.3),
    ("unlink", "bindfs", 0.3),
]


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    path: str  # the directory the loops run in
    pids: dict[str, int] = field(default_factory=dict)  # kvfs processes to profile
    stop: Callable[[], None] = lambda: None


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def bdi_file(path: str, name: str) -> str:
    """A file of the kernel's backing-device info of the file system holding ``path``."""
    dev = os.stat(path).st_dev
    return f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/{name}"


@contextmanager
def local_target(root: str) -> Iterator[Target]:
    path = os.path.join(root, "local")
    os.makedirs(path)
    try:
        yield Target("local", path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def bindfs_target(root: str, name: str = "bindfs") -> Iterator[Target]:
    src, mnt = os.path.join(root, f"{name}-src"), os.path.join(root, f"{name}-mnt")
    os.makedirs(src)
    os.makedirs(mnt)
    subprocess.run(["bindfs", "--no-allow-other", src, mnt], check=True)
    try:
        wait_for(lambda: is_mounted(mnt), 10, "bindfs mount")
        yield Target(name, mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, check=False)
        os.rmdir(mnt)
        shutil.rmtree(src, ignore_errors=True)


def set_readahead(mountpoint: str, readahead_kb: int) -> None:
    """Set a mount's kernel readahead (its bdi's ``read_ahead_kb``) until it reads back: the kernel
    resets it when it takes a FUSE daemon's INIT reply (kvfs's mount does the same, mount/runner.py)."""
    def stuck() -> bool:
        with open(bdi_file(mountpoint, "read_ahead_kb")) as f:
            if int(f.read()) == readahead_kb:
                return True
        with open(bdi_file(mountpoint, "read_ahead_kb"), "w") as f:
            f.write(str(readahead_kb))
        return False

    wait_for(stuck, 10, f"readahead of {mountpoint}", interval=0.2)


@contextmanager
def kvfs_target(root: str, name: str, *, chunkservers: int, replication: int, chunk_size: str,
                mount_args: list[str]) -> Iterator[Target]:
    cluster = Cluster(os.path.join(root, name.replace(" ", "-").replace("/", "-")), chunkservers=chunkservers,
                      replication=replication, chunk_size=chunk_size)
    try:
        cluster.start()
        mnt = cluster.mount(os.path.join(cluster.root, "mnt"), *mount_args)
        procs = {"mount": cluster.mounts[mnt], "meta": cluster.meta}
        procs.update({f"cs{i}": p for i, p in enumerate(cluster.servers)})
        pids = {name: p.popen.pid for name, p in procs.items() if p is not None and p.popen is not None}
        yield Target(name, mnt, pids)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


# --------------------------------------------------------------------------- profiling


def profiled(target: Target, phase: str, out_dir: str | None):
    """py-spy on every kvfs process of ``target`` for the duration of one phase (collapsed stacks)."""
    return profile_pids(target.pids, phase, out_dir)


# --------------------------------------------------------------------------- workloads


def _pattern(block: int) -> memoryview:
    """Random bytes from which every block of the file is a different window (misplaced data shows)."""
    return memoryview(os.urandom(block + 255 * 4096))


def _window(pool: memoryview, block: int, i: int) -> memoryview:
    k = (i * 97) % 256
    return pool[k * 4096: k * 4096 + block]


def expected_digest(pool: memoryview, block: int, size: int) -> int:
    h = xxhash.xxh3_64()
    for i in range(size // block):
        h.update(_window(pool, block, i))
    return h.intdigest()


def seq_write(path: str, pool: memoryview, block: int, size: int) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // block):
            view = _window(pool, block, i)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def seq_read(path: str, block: int, size: int) -> float:
    buf = bytearray(block)
    got = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            got += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{path}: read {got} bytes, wrote {size}")
    return elapsed


def file_digest(path: str, block: int) -> int:
    h = xxhash.xxh3_64()
    buf = bytearray(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.intdigest()


def metadata(path: str, files: int, target: Target, profile: str | None) -> dict[str, float]:
    d = os.path.join(path, "meta")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:06d}") for i in range(files)]
    out = {}
    with profiled(target, "create", profile):
        t0 = time.perf_counter()
        for name in names:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        out["create"] = files / (time.perf_counter() - t0)
    drop_caches()
    with profiled(target, "stat", profile):
        t0 = time.perf_counter()
        for name in names:
            os.stat(name)
        out["stat"] = files / (time.perf_counter() - t0)
    with profiled(target, "unlink", profile):
        t0 = time.perf_counter()
        for name in names:
            os.unlink(name)
        out["unlink"] = files / (time.perf_counter() - t0)
    os.rmdir(d)
    return out


def run_target(target: Target, args, pool: memoryview, digest: int, profile: str | None) -> dict[str, float]:
    path = os.path.join(target.path, "big")
    size, block = args.size, args.block
    result: dict[str, float] = {}
    with profiled(target, "write", profile):
        result["write"] = size / seq_write(path, pool, block, size) / MB
    drop_caches()
    with profiled(target, "read", profile):
        result["read"] = size / seq_read(path, block, size) / MB
    with profiled(target, "reread", profile):
        result["reread"] = size / seq_read(path, block, size) / MB
    result["verified"] = float(file_digest(path, block) == digest)
    os.unlink(path)
    result.update(metadata(target.path, args.files, target, profile))
    return result


# --------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def tables(results: dict[str, dict[str, float]]) -> str:
    head = ["target"] + [f"{label} ({unit})" for _, label, unit in METRICS] + ["data check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name] + [fmt(r[m]) for m, _, _ in METRICS] + ["ok" if r["verified"] else "MISMATCH"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| kvfs target | metric | vs | ratio | issue target | met |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not name.startswith("kvfs"):
            continue
        for metric, base, minimum in TARGETS:
            if base not in results:
                continue
            ratio = r[metric] / results[base][metric]
            label = next(lbl for m, lbl, _ in METRICS if m == metric)
            lines.append(f"| {name} | {label} | {base} | {ratio:.2f}x | >= {minimum}x | "
                         f"{'yes' if ratio >= minimum else 'no'} |")
    return "\n".join(lines)


def machine_facts(root: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", root], capture_output=True,
                            text=True, check=False).stdout.split()
    bindfs = subprocess.run(["bindfs", "--version"], capture_output=True, text=True,
                            check=False).stdout.strip()
    import pyfuse3

    return (f"{os.cpu_count()} cores ({cpu}), {format_size(mem)} RAM, Linux {platform.release()}, "
            f"disk {' '.join(fstype) or '?'}, Python {platform.python_version()}, "
            f"pyfuse3 {pyfuse3.__version__}, "
            f"{bindfs}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="file size (default 1G)")
    p.add_argument("--block", type=parse_size, default=parse_size("1M"), help="request size (default 1M)")
    p.add_argument("--files", type=int, default=10_000, help="empty files for the metadata phase")
    p.add_argument("--repeat", type=int, default=1, help="runs per target; the median is reported")
    p.add_argument("--chunk-size", default="4M", help="kvfs chunk size (default 4M, as `kvfs up`)")
    p.add_argument("--replicated", action="store_true",
                   help="add a kvfs line: replication 2 on 3 chunkservers")
    p.add_argument("--writeback", action="store_true", help="add a kvfs line mounted with --writeback-cache")
    p.add_argument("--only", help="comma-separated subset of targets: local,bindfs,kvfs,kvfs-wb,kvfs-r2")
    p.add_argument("--dir", help="where targets live (default: a fresh directory under /var/tmp)")
    p.add_argument("--profile", metavar="DIR", help="py-spy the first kvfs target's processes per phase")
    p.add_argument("--record", metavar="MD", help="write the results into this markdown file's section")
    args = p.parse_args(argv)
    if args.size % args.block:
        p.error("--size must be a multiple of --block")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python bench/run.py" + "".join(" " + shlex.quote(a) for a in given)
    root = tempfile.mkdtemp(prefix="kvfs-bench-", dir=args.dir or "/var/tmp")
    os.chmod(root, 0o755)
    if not drop_caches():
        print("warning: cannot drop page caches (not root?): first reads may come from memory",
              file=sys.stderr)

    def kvfs(name: str, cs: int, r: int, extra: list[str]):
        return lambda: kvfs_target(root, name, chunkservers=cs, replication=r, chunk_size=args.chunk_size,
                                   mount_args=extra)

    plan: list[tuple[str, str, Callable]] = [
        ("local", "local", lambda: local_target(root)),
        ("bindfs", "bindfs", lambda: bindfs_target(root)),
        ("kvfs", "kvfs r1/1cs", kvfs("kvfs r1/1cs", 1, 1, [])),
    ]
    if args.writeback:
        wb = "kvfs r1/1cs writeback"
        plan.append(("kvfs-wb", wb, kvfs(wb, 1, 1, ["--writeback-cache"])))
    if args.replicated:
        plan.append(("kvfs-r2", "kvfs r2/3cs", kvfs("kvfs r2/3cs", 3, 2, [])))
    if args.only:
        keep = set(args.only.split(","))
        plan = [t for t in plan if t[0] in keep]
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)

    pool = _pattern(args.block)
    digest = expected_digest(pool, args.block, args.size)
    started = datetime.datetime.now(datetime.UTC)
    print(f"{command}\n{format_size(args.size)} in {format_size(args.block)} requests, {args.files} files, "
          f"{args.repeat} run(s) per target, in {root}", flush=True)
    results: dict[str, dict[str, float]] = {}
    loads = [os.getloadavg()[0]]
    profile_dir = args.profile
    try:
        runs: dict[str, list[dict[str, float]]] = {name: [] for _, name, _ in plan}
        for rep in range(args.repeat):  # round robin: a change in machine load hits every target alike
            for _, name, make in plan:
                with make() as target:
                    profile = profile_dir if target.pids else None
                    runs[name].append(run_target(target, args, pool, digest, profile))
                if target.pids:
                    profile_dir = None  # profile one kvfs run only
                loads.append(os.getloadavg()[0])
                r = runs[name][-1]
                cells = ", ".join(f"{lbl} {fmt(r[m])} {u}" for m, lbl, u in METRICS)
                print(f"  run {rep + 1} {name}: {cells} (load {loads[-1]:.1f})", flush=True)
        for name, done in runs.items():
            results[name] = {k: statistics.median(r[k] for r in done) for k in done[0]}
            results[name]["verified"] = float(all(r["verified"] for r in done))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = tables(results)
    load = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run"
    print(f"\n{table}\n\n{load}")
    if args.record:
        body = (f"## {SECTION}\n\n"
                f"Measured {started:%Y-%m-%d %H:%M} UTC with\n\n    {command}\n\n"
                f"Machine: {machine_facts(args.dir or '/var/tmp')}; {load}.\n\n"
                f"{format_size(args.size)} file written in {format_size(args.block)} requests with one fsync "
                f"at the end; page caches dropped before the first read; re-read from the page cache; "
                f"{args.files} empty files created, stat'ed (caches dropped first) and unlinked. Plain "
                f"Python os.write/os.readv/os.stat loops, the same for every target; median of "
                f"{args.repeat} run(s), targets run round robin. MB = 10^6 bytes. kvfs rN/Mcs: replication N on M chunkservers "
                f"(chunk size {args.chunk_size}, "
                f"chunkserver fsync on every chunk), each a separate process, mounted with `kvfs mount`.\n\n"
                f"{table}\n")
        write_section(args.record, SECTION, body)
        print(f"\nrecorded in {args.record}")
    return 0 if all(r["verified"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
