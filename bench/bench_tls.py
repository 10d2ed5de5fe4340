"""The cost of mutual TLS (issue 13): plaintext vs TLS clusters of the same layout, in the same run.

Each target: ``kvfs meta`` + 1 chunkserver (replication 1, 4 MiB chunks), started ``--insecure`` or
with certificates (tests/cluster.py ``tls=True``). Through one native client with
``local_reads=False`` (every byte crosses the socket, so the chunkserver's send path is measured):

* sequential write, then read, of one ``--size`` file (default 512 MiB);
* metadata: ``--ops`` creates of empty files, then as many path lookups (resolve) (one client, one at a time).

Reports MB/s and ops/s per target and TLS/plaintext ratios. ``--rounds`` repeats the pair, alternating
the order. Usage: python bench/bench_tls.py [--size 512M] [--ops 2000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from cluster import Cluster  # noqa: E402

from kvfs.config import parse_size  # noqa: E402


def measure(tls: bool, size: int, ops: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kvfs-bench-tls-") as root:
        cluster = Cluster(root, chunkservers=1, replication=1, chunk_size="4M", tls=tls,
                          chunkserver_args=("--fsync", "never"), meta_args=("--no-sync",))
        try:
            cluster.start()
            data = os.urandom(size)
            with cluster.client(local_reads=False, timeout=120) as c:
                t0 = time.perf_counter()
                c.write_file("/big", data)
                write_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                back = c.read_file("/big")
                read_s = time.perf_counter() - t0
                assert back == data
                c.mkdir("/m")
                t0 = time.perf_counter()
                for i in range(ops):
                    c.create(f"/m/f{i}")
                create_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                for i in range(ops):
                    c.resolve(f"/m/f{i}")
                stat_s = time.perf_counter() - t0
        finally:
            cluster.stop()
    return {"write MB/s": size / write_s / 1e6, "read MB/s": size / read_s / 1e6,
            "create/s": ops / create_s, "stat/s": ops / stat_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    size = parse_size(args.size)
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        results = {tls: measure(tls, size, args.ops) for tls in order}
        plain, secure = results[False], results[True]
        print(f"round {r + 1}: {os.cpu_count()} CPUs, {args.size} file, {args.ops} metadata ops")
        print(f"  {'metric':<12} {'plaintext':>10} {'TLS':>10} {'TLS/plain':>10}")
        for key in plain:
            print(f"  {key:<12} {plain[key]:>10.1f} {secure[key]:>10.1f} {secure[key] / plain[key]:>10.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
