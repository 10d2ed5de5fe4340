"""HA meta on etcd (issue 12): metadata operations through the mount on three engines, and failover time.

One run, one machine, real processes (tests/cluster.py, tests/etcd.py):

* ``etcd``: 3 etcd members on loopback, 2 ``kvfs meta --engine etcd://...`` (one leads), 1 chunkserver;
* ``rocksdb``: one ``kvfs meta --data-dir`` with the durable default (group commit);
* ``rocksdb-nosync``: the same with ``--no-sync``.

Each engine gets a FUSE mount; ``--files`` empty files are created (open O_CREAT + close), stat'ed
(kernel caches dropped and the mount's 1 s cache expired first) and unlinked through it by 1 and by 4 client threads (each thread in its own directory; the threads
spend their time in syscalls, so they run in parallel), reporting microseconds per operation
(wall time / operations; for 4 clients that is the aggregate rate, not each client's latency).

Failover (``--kills N``, etcd only): kill -9 the leader, measure the time until a native client's
next ``write_file`` succeeds (it retries from the moment of the kill), restart the killed meta as a
standby, wait for the cluster to settle; p50 and max over N kills.

    python bench/bench_meta_ha.py --files 500 --kills 5

Benchmarks are not tests: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from cluster import Cluster  # noqa: E402
from etcd import HaCluster  # noqa: E402


def run_threads(n: int, fn) -> float:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def meta_ops(mountpoint: str, files: int, clients: int, tag: str) -> dict[str, float]:
    """Microseconds per create, stat and unlink through the mount (aggregate over ``clients`` threads)."""
    per = files // clients
    dirs = [os.path.join(mountpoint, f"{tag}-c{clients}-{i}") for i in range(clients)]
    for d in dirs:
        os.mkdir(d)

    def create(i: int) -> None:
        for k in range(per):
            os.close(os.open(os.path.join(dirs[i], f"f{k}"), os.O_CREAT | os.O_WRONLY, 0o644))

    def stat(i: int) -> None:
        for k in range(per):
            os.stat(os.path.join(dirs[i], f"f{k}"))

    def unlink(i: int) -> None:
        for k in range(per):
            os.unlink(os.path.join(dirs[i], f"f{k}"))

    out = {}
    total = per * clients
    for name, fn in (("create", create), ("stat", stat), ("unlink", unlink)):
        if name == "stat":
            drop_caches()  # the kernel's dentries and attributes: stat goes to the mount and to meta
            time.sleep(1.1)  # past the mount's own 1 s attribute/listing cache
        out[name] = run_threads(clients, fn) / total * 1e6
    return out


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        print(f"cannot drop caches ({exc}): stat may be answered by the kernel", file=sys.stderr)


def failover_times(ha: HaCluster, kills: int) -> list[float]:
    times = []
    with ha.client(timeout=5.0) as c:
        c.mkdir("/failover", exist_ok=True)
        for k in range(kills):
            ha.wait_servers(ha.chunkservers)
            c.write_file(f"/failover/warm{k}", b"x")
            leader = ha.leader()
            killed = time.monotonic()
            ha.meta_procs[leader].kill(signal.SIGKILL)
            n = 0
            while True:
                try:
                    c.write_file(f"/failover/k{k}-{n}", b"y" * 1000)
                    break
                except OSError:
                    n += 1
                    time.sleep(0.02)
            times.append(time.monotonic() - killed)
            ha.meta_procs[leader].start()
            time.sleep(1.0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=400, help="files per (engine, client count)")
    p.add_argument("--kills", type=int, default=5, help="leader kills for the failover time (0: skip)")
    p.add_argument("--leader-ttl", type=int, default=3)
    p.add_argument("--engines", default="etcd,rocksdb,rocksdb-nosync")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="kvfs-bench-ha-")
    results: dict[str, dict[int, dict[str, float]]] = {}
    failover: list[float] = []
    for engine in args.engines.split(","):
        mountpoint = os.path.join(root, f"mnt-{engine}")
        if engine == "etcd":
            cluster = HaCluster(os.path.join(root, engine), metas=2, chunkservers=1, replication=1,
                                leader_ttl=args.leader_ttl).start()
        else:
            cluster = Cluster(os.path.join(root, engine), chunkservers=1, replication=1,
                              meta_args=("--no-sync",) if engine == "rocksdb-nosync" else ()).start()
        try:
            cluster.mount(mountpoint)
            results[engine] = {n: meta_ops(mountpoint, args.files, n, engine) for n in (1, 4)}
            print(engine, results[engine], flush=True)
            if engine == "etcd" and args.kills:
                failover = failover_times(cluster, args.kills)
                print("failover", [f"{t:.2f}" for t in failover], flush=True)
        finally:
            cluster.stop()
    print()
    print(f"{args.files} files per run; microseconds per operation through the mount "
          f"(4 clients: aggregate, wall time / operations); load {os.getloadavg()[0]:.1f}")
    print("| engine | clients | create µs | stat µs | unlink µs |")
    print("| --- | --- | --- | --- | --- |")
    for engine, by_clients in results.items():
        for n, r in by_clients.items():
            print(f"| {engine} | {n} | {r['create']:.0f} | {r['stat']:.0f} | {r['unlink']:.0f} |")
    if failover:
        print(f"\nfailover (kill -9 of the leader -> next successful write_file), --leader-ttl {args.leader_ttl}, "
              f"{len(failover)} kills: p50 {statistics.median(failover):.2f} s, max {max(failover):.2f} s")


if __name__ == "__main__":
    main()
