"""`dd bs=1M` first read through the kvfs mount against bindfs (issue 10), both after dropping caches.

Same machine, same disk, one run: a ``--size`` file is written once into each target (``bench/run.py``'s
bindfs mount of a local directory, and a kvfs cluster from ``tests/cluster.py`` with its ``kvfs mount``,
replication 1, like ``kvfs up``), then ``--repeat`` rounds alternate between targets: ``sync``, drop the
page cache, ``dd if=FILE of=/dev/null bs=1M``, MB/s from dd's byte count and wall time. The local
directory is the ceiling (labelled as one). Reported: per target the rounds and the median, and the
kvfs/bindfs ratio of medians.

    python bench/dd_first_read.py --size 1G --repeat 5
    python bench/dd_first_read.py --size 1G --repeat 5 --record docs/benchmarks.md

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
from run import bindfs_target, drop_caches, kvfs_target, local_target

from kvfs.config import parse_size

SECTION = "dd first read through the mount vs bindfs (issue 10)"


def dd_read(path: str) -> float:
    subprocess.run(["sync"], check=True)
    if not drop_caches():
        raise SystemExit("cannot drop the page cache (needs root)")
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    return os.path.getsize(path) / (time.perf_counter() - t0) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--record", metavar="MD")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dd-", dir="/var/tmp") as root, ExitStack() as stack:
        targets = [stack.enter_context(local_target(root)), stack.enter_context(bindfs_target(root)),
                   stack.enter_context(kvfs_target(root, "kvfs", chunkservers=1, replication=1, chunk_size="4M",
                                                   mount_args=[]))]
        block = os.urandom(1 << 20)
        for t in targets:
            with open(os.path.join(t.path, "f"), "wb") as f:
                for _ in range(size >> 20):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        for r in range(args.repeat):
            for t in (targets if r % 2 == 0 else targets[::-1]):
                rows.setdefault(t.name, []).append(dd_read(os.path.join(t.path, "f")))
                print(t.name, f"{rows[t.name][-1]:.0f} MB/s", flush=True)
    med = {name: statistics.median(v) for name, v in rows.items()}
    lines = ["| target | MB/s, each round | median MB/s | vs bindfs |", "| --- | --- | --- | --- |"]
    for name, v in rows.items():
        label = "local directory (ceiling)" if name == "local" else name
        lines.append(f"| {label} | {', '.join(f'{x:.0f}' for x in v)} | {med[name]:.0f} | "
                     f"{med[name] / med['bindfs']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        load = os.getloadavg()[0]
        cmd = command_line("dd_first_read.py", argv)
        body = (f"## {SECTION}\n\nCommand: `{cmd.strip()}` ({run_facts()}, "
                f"load average {load:.1f} at the end). `dd if=FILE of=/dev/null bs=1M` of a "
                f"{size >> 20} MiB file after `sync` and `echo 3 > /proc/sys/vm/drop_caches`, rounds alternating "
                f"the target order; kvfs: meta + 1 chunkserver (replication 1, 4 MiB chunks) + `kvfs mount` with "
                f"default options; bindfs 1.14 of a directory on the same disk. Target: kvfs >= 1.0x bindfs.\n\n"
                f"{table}\n")
        write_section(args.record, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
