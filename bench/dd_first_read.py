"""`dd bs=1M` first read through the kvfs mount against bindfs (issue 10), both after dropping caches.

Same machine, same disk, one run: a ``--size`` file is written once into each target (``bench/run.py``'s
bindfs mount of a local directory, and a kvfs cluster from ``tests/cluster.py`` with its ``kvfs mount``,
replication 1, like ``kvfs up``), then ``--repeat`` rounds alternate between targets: ``sync``, drop the
page cache, ``dd if=FILE of=/dev/null bs=1M``, MB/s from dd's byte count and wall time. The local
directory is the ceiling (labelled as one). Reported: per target the rounds and the median, the
kvfs/bindfs ratio of medians, each mount's kernel readahead, and the CPU seconds the file system's own
processes (bindfs; kvfs's mount, meta and chunkserver) used per GB read (median).

``--baseline-python PY`` adds a second kvfs target, ``kvfs-baseline``, whose processes run another
checkout's kvfs (that checkout's virtualenv python; ``tests/cluster.py``'s ``KVFS_TEST_PYTHON``), so a
change and its baseline are measured in the same rounds. For each kvfs target the CPU of the mount's
event-loop thread (the one that answers every FUSE request) is reported besides the processes' total.

The kvfs mount sets its readahead itself (``kvfs mount --readahead``, 4 MiB by default) and bindfs
keeps the kernel's FUSE default (128 KiB), so a second bindfs target, ``bindfs-ra``, runs with kvfs's
readahead: both comparisons are in the table. ``--no-bindfs-ra`` leaves it out.

    python bench/dd_first_read.py --size 1G --repeat 5
    python bench/dd_first_read.py --size 1G --repeat 5 --record docs/benchmarks.md
    python bench/dd_first_read.py --size 1G --repeat 5 --baseline-python /work/main/.venv/bin/python

Needs root (drop_caches) and bindfs. Benchmarks are not tests: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from mdsection import command_line, run_facts, write_section
from pyspy import profiled
from run import bdi_file, bindfs_target, drop_caches, kvfs_target, local_target, set_readahead

from kvfs.config import parse_size

SECTION = "dd first read through the mount vs bindfs (issue 10)"


def dd_read(path: str, pids: list[int], loop_pid: int | None) -> tuple[float, float | None, float | None]:
    """MB/s, CPU seconds per GB of ``pids`` (None without pids) and of the main thread of ``loop_pid``
    (a kvfs mount's event loop; None without one)."""
    subprocess.run(["sync"], check=True)
    if not drop_caches():
        raise SystemExit("cannot drop the page cache (needs root)")
    cpu, loop = cpu_seconds(pids), thread_seconds(loop_pid)
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    gb = os.path.getsize(path) / 1e9
    return (gb * 1e3 / elapsed, (cpu_seconds(pids) - cpu) / gb if pids else None,
            (thread_seconds(loop_pid) - loop) / gb if loop_pid else None)


def thread_seconds(pid: int | None) -> float:
    """CPU time of a process's main thread (``schedstat``: nanoseconds on a CPU)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (all their threads)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def bindfs_pid(mountpoint: str) -> list[int]:
    """The bindfs process serving ``mountpoint`` (it daemonizes: found by its command line)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(args[0]) == b"bindfs" and os.fsencode(mountpoint) in args:
            return [int(pid)]
    return []


def readahead_kb(path: str) -> str:
    try:
        with open(bdi_file(path, "read_ahead_kb")) as f:
            return f"{int(f.read())} KiB"
    except OSError:
        return "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--record", metavar="MD")
    p.add_argument("--no-bindfs-ra", action="store_true", help="leave out bindfs with kvfs's readahead")
    p.add_argument("--baseline-python", metavar="PY", help="add kvfs-baseline: the same cluster run by another "
                                                            "checkout's interpreter (e.g. /work/main/.venv/bin/python)")
    p.add_argument("--profile", metavar="DIR", help="py-spy the kvfs processes during their dd rounds "
                                                    "(collapsed stacks; bench/profile_top.py summarises them)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    rows: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    loop_cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dd-", dir="/var/tmp") as root, ExitStack() as stack:
        targets = [stack.enter_context(local_target(root)), stack.enter_context(bindfs_target(root))]
        if not args.no_bindfs_ra:
            targets.append(stack.enter_context(bindfs_target(root, "bindfs-ra")))
        targets.append(stack.enter_context(kvfs_target(root, "kvfs", chunkservers=1, replication=1,
                                                       chunk_size="4M", mount_args=[])))
        if args.baseline_python:
            # tests/cluster.py's Proc takes its interpreter from KVFS_TEST_PYTHON when it is made.
            os.environ["KVFS_TEST_PYTHON"] = args.baseline_python
            try:
                targets.append(stack.enter_context(kvfs_target(root, "kvfs-baseline", chunkservers=1, replication=1,
                                                               chunk_size="4M", mount_args=[])))
            finally:
                os.environ.pop("KVFS_TEST_PYTHON", None)
        pids = {t.name: list(t.pids.values()) or bindfs_pid(t.path) for t in targets}
        block = os.urandom(1 << 20)
        for t in targets:
            with open(os.path.join(t.path, "f"), "wb") as f:
                for _ in range(size >> 20):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        if not args.no_bindfs_ra:
            # kvfs's mount has raised its readahead by now (it does so after its INIT): give bindfs the same.
            with open(bdi_file(targets[-1].path, "read_ahead_kb")) as f:
                set_readahead(targets[2].path, int(f.read()))
        for r in range(args.repeat):
            for t in (targets if r % 2 == 0 else targets[::-1]):
                with profiled(t.pids if t.name == "kvfs" else {}, f"dd{r}", args.profile):
                    mbs, cpu_gb, loop_gb = dd_read(os.path.join(t.path, "f"), pids[t.name], t.pids.get("mount"))
                rows.setdefault(t.name, []).append(mbs)
                if cpu_gb is not None:
                    cpu.setdefault(t.name, []).append(cpu_gb)
                if loop_gb is not None:
                    loop_cpu.setdefault(t.name, []).append(loop_gb)
                print(t.name, f"{mbs:.0f} MB/s", "" if cpu_gb is None else f"{cpu_gb:.2f} CPU s/GB",
                      "" if loop_gb is None else f"(event loop {loop_gb:.2f})", flush=True)
        ras = {t.name: readahead_kb(t.path) if t.name != "local" else "-" for t in targets}
    med = {name: statistics.median(v) for name, v in rows.items()}
    lines = ["| target | readahead | MB/s, each round | median MB/s | vs bindfs | fs CPU s/GB (median) "
             "| of it the mount's event loop |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in rows.items():
        label = {"local": "local directory (ceiling)", "bindfs-ra": "bindfs, kvfs's readahead",
                 "kvfs-baseline": f"kvfs, baseline (`{args.baseline_python}`)"}.get(name, name)
        cpu_med = f"{statistics.median(cpu[name]):.2f}" if name in cpu else "-"
        loop_med = f"{statistics.median(loop_cpu[name]):.2f}" if name in loop_cpu else "-"
        lines.append(f"| {label} | {ras[name]} | {', '.join(f'{x:.0f}' for x in v)} | {med[name]:.0f} | "
                     f"{med[name] / med['bindfs']:.2f}x | {cpu_med} | {loop_med} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        load = os.getloadavg()[0]
        cmd = command_line("dd_first_read.py", argv)
        body = (f"## {SECTION}\n\nCommand: `{cmd.strip()}` ({run_facts()}, "
                f"load average {load:.1f} at the end). `dd if=FILE of=/dev/null bs=1M` of a "
                f"{size >> 20} MiB file after `sync` and `echo 3 > /proc/sys/vm/drop_caches`, rounds alternating "
                f"the target order; kvfs: meta + 1 chunkserver (replication 1, 4 MiB chunks) + `kvfs mount` with "
                f"default options; bindfs 1.14 of a directory on the same disk, with its default readahead and "
                f"with kvfs's. fs CPU: user + system seconds of the file system's processes (bindfs; kvfs mount, "
                f"meta, chunkserver) per GB read; dd's own are not counted; the mount's event loop: its main thread. "
                f"Target: kvfs >= 1.0x bindfs.\n\n"
                f"{table}\n")
        write_section(args.record, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
