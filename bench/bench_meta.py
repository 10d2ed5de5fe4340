"""Metadata operations on each meta durability setting (issue 9; etcd joins with issue 12).

One run, one machine: a real cluster per target (``kvfs meta`` + one chunkserver + ``kvfs mount``,
separate processes, from ``tests/cluster.py``), and the same loops on each:

* ``durable``: the default, every acknowledged change fsynced (group commit, meta/durability.py);
* ``no-sync``: ``kvfs meta --no-sync``, acknowledged before the fsync (survives a killed process, not
  a power loss).

Each client is its own process working in its own directory of the mount: create (``open`` with
``O_CREAT|O_EXCL`` + ``close``), stat, unlink of ``--files`` empty files each, for 1 and for ``--clients``
clients at once. Reported: total operations per second and mean microseconds per operation of one
client. Targets run round robin ``--repeat`` times; medians. Nothing here asserts on time.

    python bench/bench_meta.py --files 2000 --repeat 3 --record docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from cluster import Cluster  # noqa: E402
from mdsection import write_section  # noqa: E402

SECTION = "Metadata durability (issue 9)"
OPS = ("create", "stat", "unlink")
TARGETS = {"durable": (), "no-sync": ("--no-sync",)}


@contextmanager
def kvfs_target(root: str, name: str, meta_args: tuple[str, ...]) -> Iterator[str]:
    cluster = Cluster(os.path.join(root, name), chunkservers=1, replication=1, chunk_size="4M",
                      meta_args=meta_args)
    try:
        cluster.start()
        yield cluster.mount(os.path.join(cluster.root, "mnt"))
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def client_loop(directory: str, files: int, start: multiprocessing.Event, out) -> None:
    names = [os.path.join(directory, f"f{i:06d}") for i in range(files)]
    start.wait()
    times = {}
    t0 = time.perf_counter()
    for name in names:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    times["create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in names:
        os.stat(name)
    times["stat"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in names:
        os.unlink(name)
    times["unlink"] = time.perf_counter() - t0
    out.put(times)


def run_clients(mnt: str, clients: int, files: int, tag: str) -> dict[str, float]:
    """ops/s over all clients (per op: files*clients / slowest client) and mean µs per op per client."""
    start = multiprocessing.Event()
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = []
    for k in range(clients):
        d = os.path.join(mnt, f"{tag}-c{k}")
        os.mkdir(d)
        p = multiprocessing.Process(target=client_loop, args=(d, files, start, out))
        p.start()
        procs.append(p)
    time.sleep(0.2)
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    row = {}
    for op in OPS:
        row[f"{op}_ops"] = files * clients / max(r[op] for r in results)
        row[f"{op}_us"] = statistics.mean(r[op] for r in results) / files * 1e6
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000, help="files per client (default 2000)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients of the second row (default 4)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", help="where clusters live (default: a fresh directory under /var/tmp)")
    p.add_argument("--record", metavar="MD")
    args = p.parse_args(argv)
    command = "python bench/bench_meta.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    root = tempfile.mkdtemp(prefix="kvfs-bench-meta-", dir=args.dir or "/var/tmp")
    started = datetime.datetime.now(datetime.UTC)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    loads = [os.getloadavg()[0]]
    try:
        for rep in range(args.repeat):
            for name, meta_args in TARGETS.items():  # round robin: load changes hit both alike
                with kvfs_target(root, f"{name}-{rep}", meta_args) as mnt:
                    for clients in (1, args.clients):
                        row = run_clients(mnt, clients, args.files, f"n{clients}")
                        runs.setdefault((name, clients), []).append(row)
                        loads.append(os.getloadavg()[0])
                        print(f"  run {rep + 1} {name} x{clients}: " + ", ".join(
                            f"{op} {row[op + '_ops']:,.0f}/s ({row[op + '_us']:,.0f} us)" for op in OPS), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    head = "| meta | clients | " + " | ".join(f"{op} ops/s (µs/op per client)" for op in OPS) + " |"
    lines = [head, "|---|---|" + "---|" * len(OPS)]
    for (name, clients), row in med.items():
        lines.append(f"| {name} | {clients} | " + " | ".join(
            f"{row[op + '_ops']:,.0f} ({row[op + '_us']:,.0f})" for op in OPS) + " |")
    lines += ["", "| clients | durable / no-sync: " + " | ".join(OPS) + " |", "|---|" + "---|" * len(OPS)]
    for clients in (1, args.clients):
        d, n = med[("durable", clients)], med[("no-sync", clients)]
        lines.append(f"| {clients} | " + " | ".join(f"{d[op + '_ops'] / n[op + '_ops']:.2f}x" for op in OPS) + " |")
    table = "\n".join(lines)
    load = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run"
    print(f"\n{table}\n\n{load}")
    if args.record:
        body = (f"## {SECTION}\n\nMeasured {started:%Y-%m-%d %H:%M} UTC with\n\n    {command}\n\n"
                f"Machine: {os.cpu_count()} CPUs; {load}. Each target: `kvfs meta` (RocksDB) + 1 chunkserver + "
                f"`kvfs mount` (attr timeout 1 s), separate processes. Each client is a process with its own "
                f"directory: create (O_CREAT|O_EXCL + close), stat, unlink of {args.files} empty files. "
                f"ops/s counts all clients (slowest client's time); µs/op is one client's mean. Median of "
                f"{args.repeat} runs, targets round robin.\n\n{table}\n")
        write_section(args.record, SECTION, body)
        print(f"recorded in {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
