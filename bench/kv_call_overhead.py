"""Per-call cost of ``KVStore.get_many`` through the native client (issue 10): microseconds and CPU per call.

    python bench/kv_call_overhead.py [--sizes 4K,2M,32M] [--calls 400] [--out DIR] [--profile DIR]

Starts meta + one chunkserver (tests/cluster.py: replication 1, 4 MiB chunks, ``--fsync never``) under
``--dir``. For each block size it puts ``--batch`` blocks (4 KiB: a tiny bf16 layout, 2 MiB: 16 tokens
of a Llama-3-8B-like layout, 32 MiB: 256 tokens) through the client and the same blocks into a local
directory store, reads them once (chunk maps cached), then times, interleaved round by round:

* ``native``: ``get_many`` of the batch into preallocated CPU tensors (pinned where torch can pin, i.e.
  with CUDA; plain otherwise), every byte verified;
* ``loop``: the issue's plain one-thread loop over the local block files: ``os.preadv`` of each file into
  one reused buffer (pinned where possible), then ``copy_`` of its payload into the same ``out`` tensor;
  nothing checked.

Per row: microseconds per call (median and best of ``--rounds`` rounds of ``--calls`` calls), GB/s,
CPU microseconds per call (this process plus meta and the chunkserver, from /proc) and the count of
META_KV_CHUNKS requests meta served per call (from its metrics). ``--profile DIR``: py-spy of the client
and meta during one extra native round per size (``bench/profile_top.py DIR`` summarises it). Bit-exact
checks after each round; nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

import torch
from cluster import Cluster, free_port
from gpu_kv import SERVICE_PIDS, cpu_seconds

from kvfs.kv import KVLayout, KVStore, block_hashes

KiB, MiB = 1 << 10, 1 << 20
LAYOUTS = {
    4 * KiB: "bf16-t16-l1-h1-d64-tp0of1",
    2 * MiB: "bf16-t16-l32-h8-d128-tp0of1",
    32 * MiB: "bf16-t256-l32-h8-d128-tp0of1",
}


def can_pin() -> bool:
    try:
        torch.empty(1, pin_memory=True)
        return True
    except RuntimeError:
        return False


def parse_size(text: str) -> int:
    text = text.strip().upper()
    unit = {"K": KiB, "M": MiB}.get(text[-1], 1)
    return int(text.rstrip("KM")) * unit


class Loop:
    """The issue's baseline: per block ``os.preadv`` of the whole file into a reused buffer, then ``copy_``."""

    def __init__(self, store: KVStore, hashes: list[str], pin: bool):
        self.paths = [store.path(h) for h in hashes]
        self.header_len = store._header_len_for(hashes[0])
        self.size = self.header_len + store.layout.nbytes
        self.buf = torch.empty(self.size, dtype=torch.uint8, pin_memory=pin)
        self.view = memoryview(self.buf.numpy())

    def get_many(self, outs: list[torch.Tensor]) -> None:
        for path, out in zip(self.paths, outs):
            fd = os.open(path, os.O_RDONLY)
            try:
                pos = 0
                while pos < self.size:
                    n = os.preadv(fd, [self.view[pos:]], pos)
                    if n == 0:
                        raise OSError(f"short file {path}")
                    pos += n
            finally:
                os.close(fd)
            out.view(-1).view(torch.uint8).copy_(self.buf[self.header_len:])


def kv_chunks_calls(cluster: Cluster) -> float:
    return sum(n for m, n in cluster.meta_rpcs().items() if m.upper().endswith("KV_CHUNKS"))


def bench_size(nbytes: int, args, client, cluster: Cluster, local_dir: str, pin: bool, emit) -> bool:
    layout = KVLayout.from_name(LAYOUTS[nbytes])
    n = args.batch
    hashes = block_hashes(range(n * layout.block_tokens), layout.block_tokens, salt=f"overhead-{nbytes}")
    src = (torch.randint(-(1 << 15), 1 << 15, (n, layout.nbytes // 2), dtype=torch.int16)
           .view(layout.torch_dtype()).reshape(n, *layout.block_shape))
    native = KVStore(f"/kv/overhead-{nbytes}", layout, client=client, concurrency=n)
    local = KVStore(os.path.join(local_dir, f"kv-{nbytes}"), layout, concurrency=n)
    native.put_many(list(zip(hashes, src)))
    local.put_many(list(zip(hashes, src)))
    outs = [torch.empty(layout.block_shape, dtype=layout.torch_dtype(), pin_memory=pin) for _ in range(n)]
    loop = Loop(local, hashes, pin)
    calls = args.calls if nbytes < 32 * MiB else max(20, args.calls // 8)
    methods = {"native": lambda: native.get_many(hashes, outs), "loop": lambda: loop.get_many(outs)}
    for fn in methods.values():
        fn()  # warm: maps cached, buffers touched

    def check() -> bool:
        ok = all(torch.equal(o.view(torch.int16), s.view(torch.int16)) for o, s in zip(outs, src))
        for o in outs:
            o.zero_()
        return ok

    ok = check()
    samples: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            rpc0 = kv_chunks_calls(cluster) if name == "native" else 0.0
            c0, t0 = cpu_seconds(), time.perf_counter()
            for _ in range(calls):
                fn()
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            rpcs = (kv_chunks_calls(cluster) - rpc0) / calls if name == "native" else 0.0
            samples[name].append((wall / calls, cpu / calls, rpcs))
            ok &= check()
    if args.profile:
        from pyspy import profiled

        with profiled({"client": os.getpid(), "meta": SERVICE_PIDS[0]}, f"native-{nbytes}", args.profile):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 4.0:
                methods["native"]()
    base = statistics.median(s[0] for s in samples["loop"])
    for name, rows in samples.items():
        per_call = statistics.median(s[0] for s in rows)
        emit({"block_bytes": nbytes, "batch": n, "method": name, "pinned": pin, "calls": calls,
              "us_per_call": round(per_call * 1e6, 1), "best_us_per_call": round(min(s[0] for s in rows) * 1e6, 1),
              "GBps": round(n * layout.nbytes / per_call / 1e9, 2),
              "cpu_us_per_call": round(statistics.median(s[1] for s in rows) * 1e6, 1),
              "kv_chunks_per_call": round(statistics.median(s[2] for s in rows), 3),
              "vs_loop": round(base / per_call, 2), "bit_exact": ok})
    native.close()
    local.close()
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4K,2M,32M", help="block sizes (4K, 2M, 32M)")
    p.add_argument("--batch", type=int, default=8, help="blocks per get_many")
    p.add_argument("--calls", type=int, default=400, help="calls per timed round (32 MiB: an eighth)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per method, interleaved")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--profile", default=None, help="py-spy the client and meta into this directory")
    p.add_argument("--meta-args", default="", help="extra `kvfs meta` flags (e.g. '--kv-lease-seconds 0')")
    args = p.parse_args(argv)
    pin = can_pin()
    work = tempfile.mkdtemp(prefix="kvfs-kv-overhead-", dir=args.dir)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    cluster = Cluster(os.path.join(work, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                      chunkserver_args=("--fsync", "never"), meta_metrics_port=free_port(),
                      meta_args=tuple(args.meta_args.split()))
    ok = True
    try:
        cluster.start()
        SERVICE_PIDS[:] = [p.popen.pid for p in [cluster.meta, *cluster.servers] if p is not None and p.popen]
        emit({"info": {"cpus": os.cpu_count(), "pinned": pin, "torch": torch.__version__}, "argv": sys.argv[1:]})
        with cluster.client(timeout=60.0) as client:
            for size in args.sizes.split(","):
                ok &= bench_size(parse_size(size), args, client, cluster, os.path.join(work, "local"), pin, emit)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("| block | method | us/call (median) | best | GB/s | CPU us/call | KV_CHUNKS/call | vs loop | bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "method" in r:
            print(f"| {r['block_bytes'] // KiB} KiB | {r['method']} | {r['us_per_call']} | {r['best_us_per_call']} | "
                  f"{r['GBps']} | {r['cpu_us_per_call']} | {r['kv_chunks_per_call']} | {r['vs_loop']} | "
                  f"{'yes' if r['bit_exact'] else 'NO'} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
