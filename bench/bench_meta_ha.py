"""HA meta on etcd (issue 12): metadata operations through the mount on three engines, and failover time.

One run, one machine, real processes (tests/cluster.py, tests/etcd.py):

* ``etcd``: 3 etcd members on loopback, 2 ``kvfs meta --engine etcd://...`` (one leads), 1 chunkserver;
* ``rocksdb``: one ``kvfs meta --data-dir`` with the durable default (group commit);
* ``rocksdb-nosync``: the same with ``--no-sync``;
* ``etcd-cold``: as ``etcd`` with ``--cold-standby`` (the standby keeps no copy of the namespace);
* ``etcd-baseline``, ``rocksdb-baseline`` (with ``--baseline-python``): as ``etcd``, ``rocksdb``, their
  processes run by another checkout's interpreter (before/after in the same run);
* ``juicefs-redis`` (with ``--juicefs BINARY``): JuiceFS on a durable Redis through its own FUSE mount
  (bench/juicefs_redis.py says where the binary comes from), the like-for-like anchor on this machine.

Each engine gets a FUSE mount; ``--files`` empty files are created (open O_CREAT + close), stat'ed
(kernel caches dropped and the mount's 1 s cache expired first) and unlinked through it by 1 and by 4 client threads (each thread in its own directory; the threads
spend their time in syscalls, so they run in parallel), reporting microseconds per operation
(wall time / operations; for 4 clients that is the aggregate rate, not each client's latency).

Failover (``--kills N``, etcd only): kill -9 the leader, measure the time until a native client's
next ``write_file`` succeeds (it retries from the moment of the kill), restart the killed meta as a
standby, wait for the cluster to settle; p50 and max over N kills.

The floor under a create on etcd (bench/floor.py): one raw etcd transaction, a disk fsync on the etcd
data dir's filesystem, and etcd's own mean WAL fsync and backend commit over the rounds. With
``--rpc-counts``, meta's RPCs per operation through the mount (kvfs_rpc_requests_total) on ``rocksdb``.

    python bench/bench_meta_ha.py --files 400 --repeat 3 --kills 10 --record docs/benchmarks.md

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

sys.path.insert(0, HERE)

from cluster import Cluster, free_port  # noqa: E402
from etcd import HaCluster  # noqa: E402
from floor import etcd_disk, etcd_disk_mean_us, fsync_us  # noqa: E402
from juicefs_redis import JuiceFSRedis  # noqa: E402
from mdsection import write_section  # noqa: E402

SECTION = "HA metadata on etcd (issue 12)"


def run_threads(n: int, fn) -> float:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


OPS = ("create", "stat", "unlink", "write")
WRITE = b"w" * 4096


def meta_ops(mountpoint: str, files: int, clients: int, tag: str, after=None) -> dict[str, float]:
    """Microseconds per create, stat, unlink and write (a small file whole: create, 4 KiB, close)
    through the mount (aggregate over ``clients`` threads); ``after(op)`` is called when each
    operation's loop is done."""
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

    def write(i: int) -> None:
        for k in range(per):
            fd = os.open(os.path.join(dirs[i], f"w{k}"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                os.write(fd, WRITE)
            finally:
                os.close(fd)

    out = {}
    total = per * clients
    for name, fn in (("create", create), ("stat", stat), ("unlink", unlink), ("write", write)):
        if name == "stat":
            drop_caches()  # the kernel's dentries and attributes: stat goes to the mount and to meta
            time.sleep(1.1)  # past the mount's own 1 s attribute/listing cache
        out[name] = run_threads(clients, fn) / total * 1e6
        if after is not None:
            after(name)
    for d in dirs:  # the written files go, untimed
        for k in range(per):
            os.unlink(os.path.join(d, f"w{k}"))
    return out


def rpcs_per_op(cluster: Cluster, mountpoint: str, files: int = 100) -> dict[str, dict[str, float]]:
    """Meta RPCs per create, stat, unlink and write of one client through the mount (background ones included:
    heartbeats and lease renewals show up as fractions)."""
    counts: dict[str, dict[str, float]] = {}
    last = [cluster.meta_rpcs()]

    def after(op: str) -> None:
        now = cluster.meta_rpcs()
        counts[op] = {m: (n - last[0].get(m, 0.0)) / files for m, n in now.items() if n - last[0].get(m, 0.0)}
        last[0] = now

    meta_ops(mountpoint, files, 1, "rpcs", after)
    return counts


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


def raw_txn_us(endpoints: list[str], n: int = 200) -> float:
    """Microseconds per etcd transaction of 2 puts (what one create costs in etcd), sent one after another
    from this process through the same gateway client meta uses: the floor under a create."""
    from kvfs.meta.engine_etcd import EtcdEngine

    engine = EtcdEngine(endpoints, b"/rawtxn")
    t0 = time.perf_counter()
    for i in range(n):
        engine.write([(b"i%d" % (i % 50), b"x" * 120), (b"d%d" % (i % 50), b"y" * 40)])
    elapsed = time.perf_counter() - t0
    engine.close()
    return elapsed / n * 1e6


def takeover_times(endpoints: list[str], sizes: list[int]) -> list[tuple[int, int, float, float, float]]:
    """(KV blocks, etcd keys, cold s, warm s, etcd db bytes) per size.

    The namespace under its own prefix is filled with ``size`` published KV blocks (one 64 KiB chunk
    each, 1,000 per directory) by a Namespace over a pipelined engine, as the leader writes them, while
    a standby's warm copy (meta/etcd_mirror.py) follows it in a thread. Then a leader key is created (as
    an election does) and timed: cold, what a new leader did before warm standbys (load everything from
    etcd: EtcdEngine cache=True + Namespace); warm, what it does now (the copy catches up to the election
    revision and is handed over: Mirror.take + EtcdEngine(loaded=...) + Namespace)."""
    import stat as st

    from kvfs import protocol as P
    from kvfs.meta.engine_etcd import EtcdClient, EtcdEngine
    from kvfs.meta.etcd_mirror import Mirror
    from kvfs.meta.leader import Election
    from kvfs.meta.namespace import ROOT_INO, Namespace

    out = []
    for size in sizes:
        prefix = f"/takeover{size}".encode()
        mirror = Mirror(endpoints, prefix)
        follower = threading.Thread(target=mirror.run)
        follower.start()
        engine = EtcdEngine(endpoints, prefix, cache=True, pipelined=True)
        ns = Namespace(engine, chunk_size=1 << 20)
        parent = 0
        for i in range(size):
            if i % 1000 == 0:
                parent = ns.mknode(ROOT_INO, f"d{i // 1000}", st.S_IFDIR | 0o755, 0, 0).ino
                engine.sync()
            batch: list = []
            chunk_id = ns.alloc_chunk_id(batch)
            ns.pending.add(batch, chunk_id)
            engine.write(batch)
            ns.publish(P.KVPublish(parent, f"b{i:08x}", 0o644, 0, 0, 64 << 10, [P.ChunkRef(0, chunk_id, 64 << 10, [])]))
        engine.close()
        election = Election(endpoints, prefix, "bench:1", ttl=60)
        c = election.client()
        won = election.acquire(c, election.grant(c))
        t0 = time.perf_counter()
        copy = mirror.take(won, timeout=120)
        assert copy is not None, "the warm copy did not catch up"
        engine = EtcdEngine(endpoints, prefix, cache=True, pipelined=True, loaded=copy)
        Namespace(engine, chunk_size=1 << 20)
        warm = time.perf_counter() - t0
        follower.join()
        t0 = time.perf_counter()
        cold_engine = EtcdEngine(endpoints, prefix, cache=True, pipelined=True)
        Namespace(cold_engine, chunk_size=1 << 20)
        cold = time.perf_counter() - t0
        keys = sum(1 for _ in cold_engine.scan(b""))
        same = dict(cold_engine.scan(b"")) == dict(engine.scan(b""))
        cold_engine.close()
        engine.close()
        election.resign(c, won)
        c.close()
        c = EtcdClient(endpoints)
        db = float(c.call("/v3/maintenance/status", {}).get("dbSize", 0))
        c.close()
        out.append((size, keys, cold, warm, db))
        print("takeover", size, keys, f"cold {cold:.2f}s warm {warm:.3f}s (copy equal to a load: {same})",
              f"db {db / 1e6:.0f} MB", flush=True)
    return out


BASELINES = ("etcd-baseline", "rocksdb-baseline")


Engine = Cluster | HaCluster | JuiceFSRedis


def start_engine(engine: str, root: str, args: argparse.Namespace) -> tuple[Engine, str]:
    """The engine's processes and its mountpoint."""
    if engine == "juicefs-redis":
        jfs = JuiceFSRedis(os.path.join(root, engine), args.juicefs).start()
        return jfs, jfs.mountpoint
    # A baseline: the same processes run by --baseline-python's checkout (tests/cluster.py's Proc.python).
    if engine in BASELINES:
        os.environ["KVFS_TEST_PYTHON"] = args.baseline_python
    try:
        cluster: Cluster | HaCluster
        if engine.startswith("etcd"):
            cluster = HaCluster(os.path.join(root, engine), metas=2, chunkservers=1, replication=1,
                                leader_ttl=args.leader_ttl,
                                meta_args=("--cold-standby",) if engine == "etcd-cold" else ()).start()
        else:
            cluster = Cluster(os.path.join(root, engine), chunkservers=1, replication=1,
                              meta_args=("--no-sync",) if engine == "rocksdb-nosync" else (),
                              meta_metrics_port=free_port() if engine == "rocksdb" else 0).start()
        return cluster, cluster.mount(os.path.join(root, f"mnt-{engine}"))
    finally:
        os.environ.pop("KVFS_TEST_PYTHON", None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=400, help="files per (engine, client count)")
    p.add_argument("--kills", type=int, default=5, help="leader kills for the failover time (0: skip)")
    p.add_argument("--leader-ttl", type=int, default=3)
    p.add_argument("--engines", default="etcd,rocksdb,rocksdb-nosync",
                   help="also etcd-cold (standby without a namespace copy), etcd-baseline and rocksdb-baseline "
                   "(the processes of --baseline-python's checkout)")
    p.add_argument("--baseline-python", metavar="PYTHON",
                   help="interpreter of a baseline checkout (e.g. main's .venv/bin/python) for the baselines")
    p.add_argument("--juicefs", metavar="BINARY",
                   help="a JuiceFS 0.14 binary: adds juicefs-redis (bench/juicefs_redis.py)")
    p.add_argument("--rpc-counts", action="store_true",
                   help="meta RPCs per operation through the mount (rocksdb)")
    p.add_argument("--repeat", type=int, default=3, help="rounds over the engines (the table has medians)")
    p.add_argument("--takeover", default="10000,50000",
                   help="KV-block counts for the new-leader load time (comma-separated; empty: skip)")
    p.add_argument("--record", metavar="MD", help="write the results into this markdown file's section")
    args = p.parse_args()
    engines = args.engines.split(",") + (["juicefs-redis"] if args.juicefs else [])
    if any(e in BASELINES for e in engines) and not args.baseline_python:
        p.error("a baseline engine needs --baseline-python")
    if args.rpc_counts and "rocksdb" not in engines:
        p.error("--rpc-counts needs the rocksdb engine")
    load_before = os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="kvfs-bench-ha-")
    runs: dict[str, dict[int, list[dict[str, float]]]] = {e: {1: [], 4: []} for e in engines}
    failover: list[float] = []
    takeover: list[tuple[int, int, float, float, float]] = []
    raw: list[float] = []
    fsyncs: list[float] = []
    disk: dict[str, float] = {}
    rpcs: dict[str, dict[str, float]] = {}
    clusters: dict[str, Engine] = {}
    mounts: dict[str, str] = {}
    try:
        # Every engine is up for the whole run and the rounds go round robin, so a change in the
        # machine's load (it is shared) hits all of them; the table has the medians.
        for engine in engines:
            clusters[engine], mounts[engine] = start_engine(engine, root, args)
        etcd = clusters["etcd"].etcd if "etcd" in clusters else None  # type: ignore[union-attr]
        disk_before = etcd_disk(etcd.endpoints) if etcd else {}
        for r in range(args.repeat):
            if etcd is not None:
                raw.append(raw_txn_us(etcd.endpoints))
                fsyncs.append(fsync_us(etcd.root))  # the filesystem under the etcd members' data dirs
                print("raw etcd txn", round(raw[-1]), "us; fsync", round(fsyncs[-1]), "us", flush=True)
            for engine in engines:
                for n in (1, 4):
                    result = meta_ops(mounts[engine], args.files, n, f"{engine}-r{r}")
                    runs[engine][n].append(result)
                    print(engine, n, {k: round(v) for k, v in result.items()}, flush=True)
        if etcd is not None:
            disk = etcd_disk_mean_us(disk_before, etcd_disk(etcd.endpoints))
            print("etcd disk", {k: round(v) for k, v in disk.items()}, flush=True)
        if args.rpc_counts:
            rpcs = rpcs_per_op(clusters["rocksdb"], mounts["rocksdb"])  # type: ignore[arg-type]
            print("rpcs per op", rpcs, flush=True)
        if "etcd" in clusters and args.kills:
            failover = failover_times(clusters["etcd"], args.kills)  # type: ignore[arg-type]
            print("failover", [f"{t:.2f}" for t in failover], flush=True)
        if etcd is not None and args.takeover:
            takeover = takeover_times(etcd.endpoints, [int(x) for x in args.takeover.split(",")])
    finally:
        for c in clusters.values():
            c.stop()
    results = {e: {n: {op: statistics.median(r[op] for r in rs) for op in OPS}
                   for n, rs in by_n.items()} for e, by_n in runs.items()}
    lines = [f"{args.files} files per run, median of {args.repeat} rounds run round robin over the engines; "
             "microseconds per operation through the mount (4 clients: aggregate, wall time / operations); write: a "
             "small file whole (open O_CREAT|O_TRUNC, one 4 KiB write, close); load average "
             f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
             "", "| engine | clients | " + " | ".join(f"{op} µs" for op in OPS) + " |",
             "| --- | --- |" + " --- |" * len(OPS)]
    for engine, by_clients in results.items():
        for n, r in by_clients.items():
            lines.append(f"| {engine} | {n} | " + " | ".join(f"{r[op]:.0f}" for op in OPS) + " |")
    pairs = [(e.removesuffix("-baseline"), e) for e in engines
             if e in BASELINES and e.removesuffix("-baseline") in runs]
    if args.juicefs and "rocksdb" in runs:
        pairs.append(("rocksdb", "juicefs-redis"))

    def ratio(a: str, b: str, op: str) -> float:
        return statistics.median(x[op] / y[op] for x, y in zip(runs[a][1], runs[b][1]))

    if pairs:
        # Rounds swing together (the machine's load): the ratio within each round is steadier than medians.
        lines += ["", "Median over the rounds of each round's ratio, 1 client: " + "; ".join(
            f"{a} / {b} " + ", ".join(f"{op} {ratio(a, b, op):.2f}" for op in OPS) for a, b in pairs) + "."]
    if args.juicefs:
        jfs = clusters["juicefs-redis"]
        assert isinstance(jfs, JuiceFSRedis) and jfs.redis is not None
        lines += ["", f"juicefs-redis: JuiceFS {jfs.version} (`--juicefs`; bench/juicefs_redis.py) through its own FUSE "
                  f"mount, on redis-server {jfs.redis.version} with `appendonly yes`, `appendfsync always` (every "
                  "change fsynced before its reply), `--storage file` on the local disk, default 1 s caches."]
    if raw:
        txn = statistics.median(raw)
        lines += ["", f"One raw etcd transaction of 2 puts (sent alone from the bench process through the same gateway "
                  f"client, once per round, median): {txn:.0f} µs. 1 client, through the mount, in transactions: "
                  + "; ".join(f"{e} create {results[e][1]['create'] / txn:.2f}x, unlink {results[e][1]['unlink'] / txn:.2f}x"
                              for e in ("etcd", "etcd-cold", "etcd-baseline") if e in results) + "."]
        lines += ["", f"Floor on this machine: `os.fsync` after a 256-byte append on the etcd data dirs' filesystem, "
                  f"median: {statistics.median(fsyncs):.0f} µs; etcd's own mean over the rounds (its metrics, "
                  f"summed over the 3 members): WAL fsync {disk.get('etcd_disk_wal_fsync_duration_seconds', 0):.0f} µs, "
                  f"backend commit {disk.get('etcd_disk_backend_commit_duration_seconds', 0):.0f} µs."]
    if rpcs:
        lines += ["", "Meta RPCs per operation through the mount (rocksdb, 1 client, 100 files; kvfs_rpc_requests_total; "
                  "fractions are background calls): " + "; ".join(
                      f"{op}: " + ", ".join(f"{m} {n:.2f}" for m, n in sorted(by.items())) for op, by in rpcs.items()) + "."]
    if failover:
        lines += ["", f"Failover (kill -9 of the leader until a native client's next `write_file` succeeds), "
                  f"`--leader-ttl {args.leader_ttl}`, {len(failover)} kills: p50 {statistics.median(failover):.2f} s, "
                  f"max {max(failover):.2f} s (each: {', '.join(f'{t:.2f}' for t in failover)})."]
    if takeover:
        lines += ["", "New leader's takeover of the namespace (on top of the leader TTL), by namespace size; one 64 KiB "
                  "chunk per KV block, 1,000 blocks per directory. Cold: load it all from etcd; warm: the standby's "
                  "copy, kept by etcd's watch, catches up to the election revision:", "",
                  "| KV blocks | etcd keys | cold load s | warm takeover s | etcd db size after |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {k} | {cold:.2f} | {warm:.3f} | {db / 1e6:.0f} MB |" for n, k, cold, warm, db in takeover]
    print()
    print("\n".join(lines))
    if args.record:
        import datetime
        import platform
        import shlex

        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = [f"## {SECTION}", "", f"`python {' '.join(shlex.quote(a) for a in sys.argv)}` — {when}, "
                f"{platform.node()}, {os.cpu_count()} CPUs, etcd 3 members on loopback (one machine).", ""]
        write_section(args.record, SECTION, "\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
