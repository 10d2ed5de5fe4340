"""What chunk capabilities (issue 13) cost: signing and checking one token, and reads through a
chunkserver with and without them, side by side.

``micro``: meta's ``KeyRing.issue`` (sign) and a chunkserver's ``Verifier.check`` per token, in this process.

``read --python LABEL=INTERPRETER ...``: for each interpreter (a venv whose kvfs is the tree to measure,
e.g. main before capabilities and this branch), in alternating rounds, a subprocess starts a cluster
(tests/cluster.py: meta + 1 chunkserver, 4 MiB chunks, no fsync), writes a file and reads it through
the chunkserver (``local_reads=False``, no client cache or prefetch): random 64 KiB reads (one
CHUNK_READ each: where a per-request cost shows) and whole-file sequential reads. Medians per label,
and each label's ratio to the first.

    python bench/bench_captoken.py micro
    python bench/bench_captoken.py read --python base=/tmp/kvfs-base/.venv/bin/python \\
        --python tokens=.venv/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def micro(n: int) -> dict[str, float]:
    from kvfs import captoken
    from kvfs import protocol as P
    from kvfs.meta.chunk_keys import KeyRing
    from kvfs.meta.engine_memory import MemoryEngine

    ring = KeyRing(MemoryEngine())
    verifier = captoken.Verifier()
    verifier.set_keys(ring.accepted())
    token = ring.issue(12345, P.TOKEN_READ)
    sign = min(timeit.repeat(lambda: ring.issue(12345, P.TOKEN_READ), number=n, repeat=5)) / n
    check = min(timeit.repeat(lambda: verifier.check(token, 12345, P.TOKEN_READ), number=n, repeat=5)) / n
    return {"sign_us": sign * 1e6, "verify_us": check * 1e6, "sign_verify_us": (sign + check) * 1e6,
            "token_bytes": len(token)}


def read_one(size_mib: int, random_reads: int, seq_reps: int) -> dict[str, float]:
    """Runs inside the measured interpreter: its kvfs serves and reads."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from cluster import Cluster

    import kvfs

    with tempfile.TemporaryDirectory(prefix="kvfs-captoken-") as root:
        cluster = Cluster(root, chunkservers=1, replication=1, chunk_size="4M",
                          chunkserver_args=("--fsync", "never")).start()
        try:
            size = size_mib * MiB
            with cluster.client() as c:
                c.write_file("/f", os.urandom(size))
            options = kvfs.ClientOptions(timeout=60, local_reads=False, prefetch=False, read_cache_chunks=0)
            with kvfs.SyncClient(cluster.meta_address, options) as c:
                ino = c.resolve("/f").ino
                c.open(ino)
                rng = random.Random(1)
                offsets = [rng.randrange(0, size // (64 << 10)) * (64 << 10) for _ in range(random_reads)]
                for off in offsets[:200]:  # warm connections and the page cache path
                    c.read(ino, off, 64 << 10)
                t = time.perf_counter()
                for off in offsets:
                    c.read(ino, off, 64 << 10)
                rand = random_reads / (time.perf_counter() - t)
                best = 0.0
                for _ in range(seq_reps):
                    t = time.perf_counter()
                    pos = 0
                    while pos < size:
                        pos += len(c.read(ino, pos, 16 * MiB))
                    best = max(best, size / (time.perf_counter() - t) / 1e6)
                c.release(ino)
        finally:
            cluster.stop()
    return {"random_64k_per_s": rand, "seq_MBps": best}


def read_many(pythons: list[tuple[str, str]], rounds: int, size_mib: int, random_reads: int) -> dict:
    results: dict[str, list[dict]] = {label: [] for label, _ in pythons}
    for r in range(rounds):
        for label, python in (pythons if r % 2 == 0 else list(reversed(pythons))):
            out = subprocess.run([python, str(Path(__file__).resolve()), "read-one", "--size-mib", str(size_mib),
                                  "--random-reads", str(random_reads)], capture_output=True, text=True,
                                 cwd="/", check=True)
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for label, runs in results.items():
        summary[label] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    first = pythons[0][0]
    for row in summary.values():
        row["ratio_random"] = row["random_64k_per_s"] / summary[first]["random_64k_per_s"]
        row["ratio_seq"] = row["seq_MBps"] / summary[first]["seq_MBps"]
    return {"rounds": rounds, "size_mib": size_mib, "random_reads": random_reads, "medians": summary, "runs": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro")
    m.add_argument("-n", type=int, default=100_000)
    for name in ("read", "read-one"):
        sp = sub.add_parser(name)
        sp.add_argument("--size-mib", type=int, default=256)
        sp.add_argument("--random-reads", type=int, default=3000)
        if name == "read":
            sp.add_argument("--python", action="append", required=True, help="LABEL=INTERPRETER")
            sp.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.cmd == "micro":
        print(json.dumps(micro(args.n)))
    elif args.cmd == "read-one":
        print(json.dumps(read_one(args.size_mib, args.random_reads, 2)))
    else:
        pythons = [tuple(s.split("=", 1)) for s in args.python]
        print(json.dumps(read_many(pythons, args.rounds, args.size_mib, args.random_reads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
