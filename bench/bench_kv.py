"""KV-cache blocks benchmark (issue 5): kvfs native API vs the kvfs mount vs redis-server.

One run, one machine, the same bytes everywhere:

* ``native``: ``KVStore(root, layout, client=kvfs.SyncClient(...))`` on a real cluster from
  ``tests/cluster.py`` (meta + chunkservers as separate processes; by default like ``kvfs up``: one
  chunkserver, replication 1, 4 MiB chunks; chunkservers with ``--fsync never`` by default, as redis
  runs here without persistence: KV blocks are a recomputable cache);
* ``mount``: ``KVStore(<mountpoint>/..., layout)`` through ``kvfs mount`` of that cluster (os calls);
* ``redis``: a ``redis-server`` (from apt) started here on a free loopback port, no persistence; a block
  is one key holding exactly the kvfs block file bytes (header + payload); ``get`` copies the value into
  the caller's preallocated tensor like ``KVStore.get(out=...)``.

For each block size (2 MiB: a vLLM block of a 8B model, 16 tokens; 32 MiB: an LMCache chunk, 256
tokens) and each number of concurrent clients (1, 4, 16; each client is its own process with its own
connection), every client puts its own fresh blocks, then gets them back into a preallocated tensor.
Throughput is total bytes over the wall time from a common start to the last client's end; latencies
are per operation, p50 and p99 over all clients' operations. Gets are checked (the kvfs path verifies
the block checksum on every read; redis values are compared by length).

``longest_prefix``: 2,048 blocks of one 32k-token prompt are stored, then ``longest_prefix`` over the
2,048 chained hashes is timed (native: one META_KV_EXISTS round trip; mount: a stat per block).

    python bench/bench_kv.py                         # full matrix
    python bench/bench_kv.py --sizes 2M --clients 1,4 --budget 256M   # quick
    python bench/bench_kv.py --record docs/benchmarks.md
    python bench/bench_kv.py --prefix-only           # just longest_prefix (native)

Benchmarks are not tests: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

sys.path.insert(0, HERE)

from cluster import Cluster
from mdsection import write_section
from redis_server import RedisServer

from kvfs.config import format_size, parse_size

SECTION = "KV-cache blocks"
LAYOUTS = {  # block bytes -> layout name (bf16, 32 layers, 8 KV heads, head dim 128: a Llama-3-8B)
    2 << 20: "bf16-t16-l32-h8-d128-tp0of1",
    32 << 20: "bf16-t256-l32-h8-d128-tp0of1",
}

# --------------------------------------------------------------------------- one client (a subprocess)

CLIENT = r"""
import json, os, sys, time, torch
cfg = json.loads(sys.argv[1])
from kvfs.kv import KVLayout, KVStore
from kvfs.kv.block import encode_block
layout = KVLayout.from_name(cfg["layout"])
hashes = cfg["hashes"]
g = torch.Generator().manual_seed(cfg["seed"])
data = (torch.randint(-(1 << 15), 1 << 15, (layout.nbytes // 2,), dtype=torch.int16, generator=g)
        .view(torch.bfloat16).reshape(layout.block_shape))
out = torch.empty_like(data)
kind = cfg["kind"]
if kind == "redis":
    import redis
    r = redis.Redis(host="127.0.0.1", port=cfg["port"])
    header, views = encode_block(layout, hashes[0], data)
    value = header + bytes(views[0])  # the same bytes as a kvfs block file
    out_bytes = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    def put(h):
        r.set(h, value)
    def get(h):
        v = r.get(h)
        assert v is not None and len(v) == len(value)
        out_bytes[:] = memoryview(v)[len(header):]
else:
    client = None
    if kind == "native":
        import kvfs
        client = kvfs.SyncClient(cfg["meta"], kvfs.ClientOptions(timeout=60))
    store = KVStore(cfg["root"], layout, client=client)
    def put(h):
        assert store.put(h, data)
    def get(h):
        assert store.get(h, out=out) is out
# warm up the connection (and directories) outside the timed loops
put(cfg["warm"]); get(cfg["warm"])
for phase in ("put", "get"):
    fn = put if phase == "put" else get
    print("ready", flush=True)
    sys.stdin.readline()  # the go signal: every client starts a phase together
    lat = []
    t0 = time.perf_counter()
    for h in hashes:
        s = time.perf_counter()
        fn(h)
        lat.append(time.perf_counter() - s)
    print(json.dumps({"phase": phase, "lat": lat, "start": t0, "end": time.perf_counter()}), flush=True)
"""


def run_clients(kind: str, layout: str, nbytes: int, nclients: int, ops: int, common: dict) -> dict:
    procs = []
    for i in range(nclients):
        hashes = [os.urandom(16).hex() for _ in range(ops)]
        cfg = dict(common, kind=kind, layout=layout, hashes=hashes, seed=i, warm=os.urandom(16).hex())
        procs.append(subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(cfg)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    result = {}
    try:
        for phase in ("put", "get"):
            for p in procs:
                line = p.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"{kind} client failed before {phase}: {line!r}")
            for p in procs:  # go
                p.stdin.write("\n")
                p.stdin.flush()
            reports = [json.loads(p.stdout.readline()) for p in procs]
            lat = sorted(x for r in reports for x in r["lat"])
            wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
            result[phase] = {
                "MBps": nbytes * len(lat) / wall / 1e6,
                "p50_ms": 1e3 * statistics.median(lat),
                "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                "ops": len(lat),
            }
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=120)
            if p.returncode:
                raise RuntimeError(f"{kind} client exited with {p.returncode}")
    return result


# --------------------------------------------------------------------------- longest_prefix


def bench_prefix(cluster: Cluster, mountpoint: str | None, repeat: int) -> dict:
    import torch

    from kvfs.kv import KVLayout, KVStore, block_hashes

    layout = KVLayout("bfloat16", 16, 1, 1, 8)  # tiny blocks: only the names matter here
    hashes = block_hashes(list(range(16 * 2048)), 16)  # a 32k-token prompt
    out = {}
    with cluster.client() as c:
        store = KVStore("/kvbench/prefix", layout, client=c, concurrency=16)
        block = torch.zeros(layout.block_shape, dtype=torch.bfloat16)
        for i in range(0, len(hashes), 256):
            store.put_many([(h, block) for h in hashes[i:i + 256]])
        assert store.longest_prefix(hashes) == len(hashes)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            n = store.longest_prefix(hashes)
            times.append(time.perf_counter() - t)
            assert n == len(hashes)
        times.sort()
        out["native"] = {"p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))],
                         "min_ms": 1e3 * times[0]}
        half = hashes[:1024] + [os.urandom(16).hex()] + hashes[1025:]
        t = time.perf_counter()
        assert store.longest_prefix(half) == 1024
        out["native_miss_at_1024_ms"] = 1e3 * (time.perf_counter() - t)
        store.close()
    if mountpoint:
        mstore = KVStore(f"{mountpoint}/kvbench/prefix", layout)
        times = []
        for _ in range(max(3, repeat // 10)):
            t = time.perf_counter()
            assert mstore.longest_prefix(hashes) == len(hashes)
            times.append(time.perf_counter() - t)
        out["mount"] = {"p50_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}
        mstore.close()
    return out


# --------------------------------------------------------------------------- report


def render(results: dict, prefix: dict, args: argparse.Namespace, env: dict) -> str:
    lines = [f"## {SECTION}", "",
             f"Command: `{env['command']}`  ",
             (f"Date: {env['date']}; machine: {env['machine']}; kvfs cluster: {env['cluster']}; "
              f"redis-server {env['redis']}."), ""]
    lines += [("| block | clients | op | native MB/s | native p50 / p99 ms | mount MB/s | mount p50 / p99 ms | "
               "redis MB/s | redis p50 / p99 ms | native/redis MB/s |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(results, key=lambda k: (k[0], k[1])):
        size, n = key
        for op in ("put", "get"):
            row = [format_size(size), str(n), op]
            by = results[key]
            for kind in ("native", "mount", "redis"):
                r = by.get(kind, {}).get(op)
                row += [f"{r['MBps']:.0f}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"] if r else ["-", "-"]
            nat, red = by.get("native", {}).get(op), by.get("redis", {}).get(op)
            row.append(f"{nat['MBps'] / red['MBps']:.2f}x" if nat and red else "-")
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if prefix:
        nat = prefix.get("native", {})
        lines.append(f"`longest_prefix` over 2,048 chained hashes (a 32k-token prompt, all present), "
                     f"{args.prefix_repeat} runs: native p50 {nat.get('p50_ms', 0):.2f} ms, "
                     f"p99 {nat.get('p99_ms', 0):.2f} ms, min {nat.get('min_ms', 0):.2f} ms (target < 5 ms); "
                     f"a miss at block 1,024: {prefix.get('native_miss_at_1024_ms', 0):.2f} ms"
                     + (f"; through the mount (one stat per block) p50 {prefix['mount']['p50_ms']:.1f} ms."
                        if "mount" in prefix else "."))
        lines.append("")
    lines.append("Targets (issue 5): native get throughput >= 1.5x redis and p99 <= redis's; longest_prefix "
                 "for 2,048 blocks < 5 ms. See docs/kv.md for what the numbers mean and the machine's limits.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2M,32M", help="block sizes (2M and/or 32M)")
    p.add_argument("--clients", default="1,4,16", help="numbers of concurrent client processes")
    p.add_argument("--targets", default="native,mount,redis")
    p.add_argument("--budget", type=parse_size, default=parse_size("512M"),
                   help="bytes each (size, clients) cell puts per target (ops = budget / size / clients, >= 3)")
    p.add_argument("--chunkservers", type=int, default=1)
    p.add_argument("--replication", type=int, default=1)
    p.add_argument("--chunk-size", default="4M")
    p.add_argument("--fsync", choices=["always", "never"], default="never",
                   help="chunkserver fsync policy (default never: a cache, like redis without persistence)")
    p.add_argument("--prefix-repeat", type=int, default=200)
    p.add_argument("--no-prefix", action="store_true")
    p.add_argument("--prefix-only", action="store_true", help="only the longest_prefix measurement")
    p.add_argument("--dir", help="working directory (default: a fresh one under /var/tmp)")
    p.add_argument("--record", metavar="MD", help="write the results into this markdown file's section")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    for s in sizes:
        if s not in LAYOUTS:
            p.error(f"block size {s} not one of {', '.join(format_size(k) for k in LAYOUTS)}")
    clients = [int(c) for c in args.clients.split(",")]
    targets = args.targets.split(",")

    work = args.dir or tempfile.mkdtemp(prefix="kvfs-bench-kv-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    cluster = Cluster(os.path.join(work, "cluster"), chunkservers=args.chunkservers,
                      replication=args.replication, chunk_size=args.chunk_size,
                      chunkserver_args=("--fsync", args.fsync)).start()
    mountpoint = None
    redis_srv = None
    results: dict = {}
    prefix: dict = {}
    try:
        if "mount" in targets and not args.prefix_only:
            mountpoint = cluster.mount(os.path.join(work, "mnt"))
        if "redis" in targets and not args.prefix_only:
            redis_srv = RedisServer(work)
        with cluster.client() as c:
            c.mkdir("/kvbench", exist_ok=True)
        for size in [] if args.prefix_only else sizes:
            for n in clients:
                ops = max(3, args.budget // size // n)
                cell = results.setdefault((size, n), {})
                for kind in targets:
                    root = f"/kvbench/{kind}-{size}-{n}"
                    common = {"meta": cluster.meta_address, "root": root,
                              "port": redis_srv.port if redis_srv else 0}
                    if kind == "mount":
                        common["root"] = f"{mountpoint}{root}"
                    t = time.perf_counter()
                    cell[kind] = run_clients(kind, LAYOUTS[size], size, n, ops, common)
                    print(f"{format_size(size):>5} x{n:<2} {kind:6} put {cell[kind]['put']['MBps']:7.0f} MB/s "
                          f"p50 {cell[kind]['put']['p50_ms']:6.1f} p99 {cell[kind]['put']['p99_ms']:6.1f} | "
                          f"get {cell[kind]['get']['MBps']:7.0f} MB/s p50 {cell[kind]['get']['p50_ms']:6.1f} "
                          f"p99 {cell[kind]['get']['p99_ms']:6.1f}  ({ops} ops/client, {time.perf_counter() - t:.0f}s)",
                          flush=True)
                    # free the space before the next cell
                    if kind == "redis":
                        redis_srv.flush()
                    else:
                        with cluster.client() as c:
                            _rmtree(c, root)
        if not args.no_prefix:
            prefix = bench_prefix(cluster, mountpoint, args.prefix_repeat)
            print("longest_prefix(2048):", json.dumps(prefix), flush=True)
    finally:
        if redis_srv:
            redis_srv.stop()
        cluster.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    env = {
        "command": "python bench/bench_kv.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "cluster": f"{args.chunkservers} chunkserver(s), replication {args.replication}, chunk size {args.chunk_size}, "
                   f"chunkserver fsync {args.fsync}, all on this machine (native reads use the local short-circuit)",
        "redis": redis_srv.version if redis_srv else "-",
    }
    body = render(results, prefix, args, env)
    print(body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": {f"{k[0]}x{k[1]}": v for k, v in results.items()}, "prefix": prefix, "env": env},
                      f, indent=1)
    if args.record:
        write_section(args.record, SECTION, body)
    return 0


def _rmtree(c, path: str) -> None:
    try:
        attr = c.stat(path)
    except FileNotFoundError:
        return
    import stat as st

    if st.S_ISDIR(attr.mode):
        for name in c.listdir(path):
            _rmtree(c, f"{path}/{name}")
        c.rmdir(path)
    else:
        c.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
