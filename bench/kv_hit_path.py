"""The storage side of a vLLM prefix hit, without vLLM (issue 11): what ``KvfsConnector`` does between a
request and its first token, timed per phase in fresh processes.

A 4096-token prompt's KV (default: 8 layers, 4 KV heads, head dim 64, bf16, 32-token blocks, 256-token
runs: 16 runs of 2 MiB, as bench/bench_vllm.py) is published once; then each round a fresh process does
what a fresh vLLM instance's connector does, with the scheduler's and the worker's own store (and own
client): ``runs_prefix`` (the lookup), then ``get_runs`` into one staging tensor (the load: read and
checked as it lands, as the connector does; ``--map``: ``map_local=True``, the chunk files mapped, as
main's connector did before issue 11's read path, and as a ``--baseline`` tree does), then the copy of
every layer into paged buffers (``kvfs.engines.pages.PagedCache``, identity page order, as the connector
copies on CPU; the copy reads the staging tensor or the mapped files), through the native client and
through the kvfs mount, the routes taking turns. Reported per route: lookup, load, copy and lookup +
load + copy (medians over rounds), and the meta requests each route's round sent (the meta's metrics
endpoint).

    python bench/kv_hit_path.py --rounds 10
    python bench/kv_hit_path.py --rounds 10 --strace      # also FUSE-side syscalls: strace -c of a mount round
    python bench/kv_hit_path.py --rounds 10 --touch-due --baseline /work/main   # against another tree
    python bench/kv_hit_path.py --rounds 10 --map                 # this tree, mapping the runs
    KVFS_TEST_PYTHON=/work/main/.venv/bin/python python bench/kv_hit_path.py --routes mount   # another
        # tree's meta, chunkserver and mount daemon (the mount route's cost is there, not in the round)

Nothing here asserts on time; every round checks that all 128 blocks loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

ROUND = r"""
import json, sys, time, torch
import kvfs
from kvfs.kv import KVLayout, KVStore
from kvfs.kv.run import run_spans
cfg = json.loads(sys.argv[1])
lay = KVLayout(**cfg["layout"])
hashes = cfg["hashes"]
def store():
    if cfg["route"] == "native":
        return KVStore(cfg["root"], lay, client=kvfs.SyncClient(cfg["meta"]), touch_interval=cfg["touch_interval"])
    return KVStore(cfg["root"], lay, touch_interval=cfg["touch_interval"])
sched, worker = store(), store()   # a vLLM instance: the scheduler's connector and the worker's
staging = torch.empty((len(hashes), *lay.block_shape), dtype=lay.torch_dtype())
staging.view(-1)[::2048] = 0  # touched once, as the connector's reused staging buffer is
pages = None
try:  # the engine's paged KV buffers, one per layer, in use already (touched; torch's copy warmed up)
    from kvfs.engines.pages import PagedCache, PageOrder
    shape = (len(hashes), lay.num_kv_heads, lay.block_tokens, 2 * lay.head_dim)
    pages = PagedCache([(torch.zeros(shape, dtype=lay.torch_dtype()), PageOrder.identity(lay))
                        for _ in range(lay.num_layers)])
    pages.start([(staging[:1], [0])])
    pages.finish()
except ImportError:
    pass  # a tree without kvfs.engines: no copy timed
t0 = time.perf_counter()
found = sched.runs_prefix(hashes, cfg["run_blocks"], len(hashes))
t1 = time.perf_counter()
runs = [hashes[s:s + n] for s, n in found.runs]
outs = list(staging[:sum(len(r) for r in runs)].split([len(r) for r in runs]))
kw = {"locations": found.locations} if cfg["pass_locations"] else {}  # (a baseline tree may not have them)
got = worker.get_runs(runs, outs, map_local=cfg["map_local"], **kw)
t2 = time.perf_counter()
blocks = sum(r.blocks for r in got)
if pages is not None:
    pos, pieces = 0, []
    for r, out in zip(got, outs):  # as the connector: runs read side by side into staging, copied as one
        if pieces and r.data is out and pieces[-1][0].data_ptr() + pieces[-1][0].nbytes == out.data_ptr():
            pieces[-1] = (staging[pieces[-1][1][0]:pos + r.blocks], pieces[-1][1] + list(range(pos, pos + r.blocks)))
        else:
            pieces.append((r.data[:r.blocks], list(range(pos, pos + r.blocks))))
        pos += r.blocks
    del got
    pages.start(pieces)
    del pieces
    pages.finish()  # every layer copied in, the sources dropped (mapped files unmapped)
t3 = time.perf_counter()
print(json.dumps({"lookup": t1 - t0, "load": t2 - t1, "copy": t3 - t2, "blocks": blocks}))
sched.close(); worker.close()
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--routes", default="native,mount")
    p.add_argument("--map", action="store_true",
                   help="get_runs(map_local=True) in this tree's rounds (a --baseline tree's rounds always map, "
                        "as main's connector did)")
    p.add_argument("--strace", action="store_true", help="strace -c -f one extra mount round")
    p.add_argument("--touch-due", action="store_true",
                   help="every load finds its runs' access time due (touch_interval 0), as a hit minutes "
                        "after the runs were written does")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run each route with the kvfs package of another tree (e.g. /work/main: "
                        "PYTHONPATH=DIR), as route@base")
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    from cluster import Cluster, free_port

    import torch

    from kvfs.kv import KVLayout, KVStore, block_hashes

    lay = KVLayout("bf16", 32, 8, 4, 64)
    hashes = block_hashes(list(range(args.tokens)), 32)
    run_blocks = 8
    with tempfile.TemporaryDirectory(prefix="kv-hit-") as tmp:
        work = args.workdir or tmp
        cluster = Cluster(os.path.join(work, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                          chunkserver_args=("--fsync", "never"), meta_metrics_port=free_port()).start()
        try:
            mnt = cluster.mount(os.path.join(work, "mnt"))
            roots = {"native": "/kv/native", "mount": os.path.join(mnt, "kv", "mount")}
            items = []
            g = torch.Generator().manual_seed(1)
            from kvfs.kv.run import run_spans
            for s, n in run_spans(len(hashes), run_blocks):
                items.append((hashes[s:s + n], torch.randn((n, *lay.block_shape), generator=g).to(lay.torch_dtype())))
            client = cluster.client()
            with KVStore(roots["native"], lay, client=client) as st:
                st.put_runs(items)
            with KVStore(roots["mount"], lay) as st:
                st.put_runs(items)
            client.close()
            results: dict[str, list[dict]] = {}
            routes = args.routes.split(",")
            if args.baseline:
                routes += [r + "@base" for r in routes]
            for rnd in range(args.rounds):
                for route in routes:
                    base = route.split("-")[0].split("@")[0]
                    on_base = route.endswith("@base")
                    env = {**os.environ, "PYTHONPATH": args.baseline} if on_base else None
                    cfg = {"route": base, "root": roots[base], "meta": cluster.meta_address, "hashes": hashes,
                           "run_blocks": run_blocks, "pass_locations": "-relookup" not in route,
                           "map_local": on_base or args.map,
                           "touch_interval": 0 if args.touch_due else 60,
                           "layout": {"dtype": "bf16", "block_tokens": 32, "num_layers": 8, "num_kv_heads": 4,
                                      "head_dim": 64, "order": ""}}
                    before = cluster.meta_rpcs()
                    out = subprocess.run([sys.executable, "-c", ROUND, json.dumps(cfg)], check=True,
                                         capture_output=True, text=True, env=env).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    assert r["blocks"] == len(hashes), r
                    try:
                        after = cluster.meta_rpcs()
                        r["meta"] = {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0) > 0}
                    except Exception:
                        r["meta"] = {}
                    results.setdefault(route, []).append(r)
            for route, rs in results.items():
                med = {k: statistics.median(r[k] for r in rs) * 1000 for k in ("lookup", "load", "copy")}
                tot = statistics.median((r["lookup"] + r["load"] + r["copy"]) * 1000 for r in rs)
                print(f"{route:11s} lookup {med['lookup']:5.1f} ms  load {med['load']:5.1f} ms  copy {med['copy']:5.1f} ms  "
                      f"total {tot:5.1f} ms  (each total: "
                      f"{', '.join('%.0f' % ((r['lookup'] + r['load'] + r['copy']) * 1000) for r in rs)})  "
                      f"meta requests in the last round: {rs[-1]['meta']}")
            if args.strace:
                cfg = {"route": "mount", "root": roots["mount"], "meta": cluster.meta_address, "hashes": hashes,
                       "run_blocks": run_blocks, "pass_locations": True, "touch_interval": 60,
                       "map_local": args.map, "layout": {"dtype": "bf16", "block_tokens": 32, "num_layers": 8,
                                                           "num_kv_heads": 4, "head_dim": 64, "order": ""}}
                res = subprocess.run(["strace", "-c", "-f", "-e", "trace=%file,%desc", sys.executable, "-c", ROUND,
                                      json.dumps(cfg)], capture_output=True, text=True)
                print(res.stderr[-6000:])
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
