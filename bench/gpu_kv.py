"""KV blocks into GPU memory (device machine): ``KVStore.get`` routes vs a plain read-then-``.cuda()``.

One command, results under ``--out`` (the device machine's $OUT)::

    PYTHONPATH=. python3 bench/gpu_kv.py --dir /root/kvfs-kv --out $OUT [--native] [--cold]

For each block size (2 MiB: 16 tokens of a Llama-3-8B-like bf16 layout, 32 MiB: 256 tokens) it writes
``--gib`` GiB of random blocks with ``KVStore.put_many`` into a local-disk directory store, keeps the
source blocks on the GPU, then loads every block into preallocated ``cuda:0`` tensors with:

* ``kvikio``: ``KVStore(device_io="kvikio")``: header by pread and checked, payload by
  ``kvikio.CuFile.pread`` straight into the tensor (payload checksum not recomputed);
* ``staged``: ``KVStore(device_io="staged")``: payload into pinned staging, xxh3-verified, async copy;
* ``host+copy``: the pre-existing way: ``KVStore.get`` into a pinned CPU tensor (verified), then
  ``gpu.copy_(pinned, non_blocking=True)`` and a synchronize;
* ``host`` (``--device cpu`` only): ``KVStore.get_many`` straight into the CPU ``out`` tensors (verified);
* ``baseline``: no kvfs: ``os.preadv`` of the whole file into a pinned buffer, then ``.cuda()`` of the
  payload (a new device tensor; nothing checked);
* ``kvikio-raw``: no kvfs, kvikio alone: ``CuFile(path).pread`` of the payload into the tensor (nothing
  checked; kvikio's thread pool set to ``--batch`` threads): what the kvikio route costs on top of it.

Each method runs two ways: ``single`` (one block per call, sequentially: per-block latency) and
``batch`` (``get_many`` of ``--batch`` blocks; the baseline uses a pool of as many threads). Warm:
the files were just written (page cache), one warm-up pass, then the best of ``--reps`` passes. With
``--cold`` one more batched pass per method right after ``echo 3 > /proc/sys/vm/drop_caches``.
Every pass is checked bitwise on the GPU against the source blocks (``torch.equal`` of int16 views).

``--native``: also starts a real meta + one chunkserver (tests/cluster.py, 4 MiB chunks, replication
1, ``--fsync never``) on this machine, puts ``--native-gib`` GiB per size through the client library and
loads them with the native backend's routes (``staged``, ``host+copy``, and ``kvikio``: kvikio reads the
blocks' chunk files on this host, ``kvfs.chunkfiles``, payload not verified).
The services run as ``python -m kvfs.cli``, which must find ``kvfs.meta``, ``kvfs.chunkserver`` and
``kvfs.mount`` (an editable install does that; on the device machine, whose tree is a plain copy, link
them: ``ln -s ../meta kvfs/meta`` etc.) and imports pyfuse3 (through ``kvfs.mount``) even for meta: where
pyfuse3 is missing (it has no wheel; the device machine has no FUSE), a stub module with ``Operations``,
``FUSEError`` and ``default_options`` is enough for meta and chunkservers (docs/benchmarks.md has the
command).

Each row has the milliseconds per call of the best pass (its wall time over its calls) and, for the
native rows, the META_KV_CHUNKS requests meta served per call (0 while the batches' chunk maps are
leased: meta/kv_leases.py; ``--meta-args '--kv-lease-seconds 0'`` turns leases off for an A/B).
Each row also has the CPU seconds per GB of the best pass: this process's plus, in the native section,
the kvfs services' (meta and the chunkserver, from /proc). Ratio rows at the end: each native batched
row over the local store's baseline rows (batched, and single: the plain one-thread loop).

Output: ``results.json`` (one object per measurement, plus machine info) and ``log.txt`` (a table).
Benchmarks are not tests: nothing here asserts on time; a bit-exactness failure exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch
from gpu_load import drop_caches  # bench/ is on sys.path when run as a script

from kvfs import chunkio
from kvfs.gds import kvikio_available, mount_fstype
from kvfs.kv import KVLayout, KVStore, block_hashes

MiB = 1 << 20
GiB = 1 << 30
LAYOUTS = {  # as bench/bench_kv.py: bf16, 32 layers, 8 KV heads, head dim 128 (a Llama-3-8B)
    2 * MiB: "bf16-t16-l32-h8-d128-tp0of1",
    32 * MiB: "bf16-t256-l32-h8-d128-tp0of1",
}


SERVICE_PIDS: list[int] = []  # the kvfs services' processes while the native section runs
NATIVE_CLUSTER: list[Any] = []  # the native section's cluster (its meta's request counters), while it runs


def kv_chunks_served() -> float | None:
    """META_KV_CHUNKS requests the native section's meta served so far (None outside it): a batch read
    through leased chunk maps (meta/kv_leases.py) sends none."""
    if not NATIVE_CLUSTER:
        return None
    return sum(n for m, n in NATIVE_CLUSTER[0].meta_rpcs().items() if m.upper().endswith("KV_CHUNKS"))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of the kvfs services (meta, chunkservers)."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in SERVICE_PIDS:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


class Baseline:
    """No kvfs: read the whole block file into a pinned buffer, ``.cuda()`` the payload."""

    def __init__(self, store: KVStore, hashes: list[str], device: torch.device):
        self.store = store
        self.device = device
        self.header_len = store._header_len_for(hashes[0])
        self.size = self.header_len + store.layout.nbytes
        self.local = threading.local()

    def buf(self) -> tuple[torch.Tensor, memoryview]:
        b = getattr(self.local, "buf", None)
        if b is None:
            t = torch.empty(self.size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            b = self.local.buf = (t, memoryview(t.numpy()))
        return b

    def get(self, h: str) -> torch.Tensor:
        t, view = self.buf()
        fd = os.open(self.store.path(h), os.O_RDONLY)
        try:
            pos = 0
            while pos < self.size:
                n = os.preadv(fd, [view[pos:]], pos)
                if n == 0:
                    raise OSError(f"short file {h}")
                pos += n
        finally:
            os.close(fd)
        return t[self.header_len:].to(self.device, copy=True)  # .cuda(): a new tensor, synchronous


def run_method(name: str, store: KVStore, hashes: list[str], src: torch.Tensor, outs: torch.Tensor,
               batch: int, reps: int, cold: bool) -> list[dict[str, Any]]:
    """Time one method single and batched; check every pass against ``src``. Rows for results.json."""
    layout = store.layout
    nbytes = layout.nbytes
    n = len(hashes)
    dev = outs.device
    pinned = None
    baseline = None
    pool = None
    if name == "host+copy":
        pinned = [torch.empty(layout.block_shape, dtype=layout.torch_dtype(), pin_memory=dev.type == "cuda")
                  for _ in range(batch)]
    if name == "baseline":
        baseline = Baseline(store, hashes, dev)
    if name in ("baseline", "kvikio-raw"):
        pool = ThreadPoolExecutor(max_workers=batch)
    if name == "kvikio-raw":
        import kvikio
        import kvikio.defaults

        kvikio.defaults.set("num_threads", batch)
        header_len = store._header_len_for(hashes[0])

        def raw(i: int) -> None:
            with kvikio.CuFile(store.path(hashes[i]), "r") as f:
                assert f.pread(outs[i].reshape(-1).view(torch.uint8), nbytes, header_len).get() == nbytes
    got_base: list[torch.Tensor | None] = [None] * n  # baseline's results (new tensors)

    def load(idx: list[int]) -> None:
        if name in ("kvikio", "staged", "host"):
            res = store.get_many([hashes[i] for i in idx], [outs[i] for i in idx])
            assert all(r is not None for r in res)
        elif name == "kvikio-raw":
            if len(idx) == 1:
                raw(idx[0])
            else:
                assert pool is not None
                list(pool.map(raw, idx))
        elif name == "host+copy":
            res = store.get_many([hashes[i] for i in idx], pinned[:len(idx)])
            assert all(r is not None for r in res)
            for k, i in enumerate(idx):
                outs[i].copy_(pinned[k], non_blocking=True)
            sync(dev)
        else:
            assert baseline is not None
            if len(idx) == 1:
                got_base[idx[0]] = baseline.get(hashes[idx[0]])
            else:
                assert pool is not None
                for i, t in zip(idx, pool.map(lambda i: baseline.get(hashes[i]), idx)):
                    got_base[i] = t

    def check() -> bool:
        if name == "baseline":
            ok = all(torch.equal(got_base[i], src[i].reshape(-1).view(torch.uint8)) for i in range(n))
            got_base[:] = [None] * n
            return ok
        return torch.equal(outs.view(torch.int16), src.view(torch.int16))  # bits: random bf16 has NaNs

    def one_pass(mode: str) -> dict[str, Any]:
        outs.fill_(0)
        sync(dev)
        groups = [[i] for i in range(n)] if mode == "single" else [list(range(i, min(n, i + batch)))
                                                                     for i in range(0, n, batch)]
        lat = []
        served = kv_chunks_served() if name in ("kvikio", "staged", "host", "host+copy") else None
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        for g in groups:
            s = time.perf_counter()
            load(g)
            lat.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
        rpcs = None if served is None else (kv_chunks_served() or 0.0) - served
        return {"wall": wall, "lat": lat, "cpu": cpu, "ok": check(), "calls": len(groups),
                "kv_chunks": None if rpcs is None else rpcs / len(groups)}

    rows = []
    load(list(range(min(n, batch))))  # warm-up: pinned/staging buffers, kvikio threads, CUDA streams
    sync(dev)
    for mode in ("single", "batch"):
        passes = [one_pass(mode) for _ in range(reps)]
        best = min(passes, key=lambda p: p["wall"])
        rows.append({"method": name, "mode": mode, "cache": "warm", "blocks": n, "block_bytes": nbytes,
                     "batch": 1 if mode == "single" else batch, "GBps": round(n * nbytes / best["wall"] / 1e9, 2),
                     "p50_ms": round(pct(best["lat"], 50) * 1e3, 3), "p99_ms": round(pct(best["lat"], 99) * 1e3, 3),
                     "ms_per_call": round(best["wall"] / best["calls"] * 1e3, 3),
                     "kv_chunks_per_call": None if best["kv_chunks"] is None else round(best["kv_chunks"], 3),
                     "cpu_s_per_GB": round(best["cpu"] / (n * nbytes / 1e9), 3),
                     "walls": [round(p["wall"], 4) for p in passes], "bit_exact": all(p["ok"] for p in passes)})
    if cold and drop_caches():
        p = one_pass("batch")
        rows.append({"method": name, "mode": "batch", "cache": "cold", "blocks": n, "block_bytes": nbytes,
                     "batch": batch, "GBps": round(n * nbytes / p["wall"] / 1e9, 2),
                     "p50_ms": round(pct(p["lat"], 50) * 1e3, 3), "p99_ms": round(pct(p["lat"], 99) * 1e3, 3),
                     "ms_per_call": round(p["wall"] / p["calls"] * 1e3, 3),
                     "cpu_s_per_GB": round(p["cpu"] / (n * nbytes / 1e9), 3),
                     "walls": [round(p["wall"], 4)], "bit_exact": p["ok"]})
    if pool is not None:
        pool.shutdown()
    return rows


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_blocks(layout: KVLayout, n: int, seed: int, dev: torch.device) -> tuple[list[str], torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(seed)
    src = (torch.randint(-(1 << 15), 1 << 15, (n, layout.nbytes // 2), dtype=torch.int16, device=dev, generator=g)
           .view(torch.bfloat16).reshape(n, *layout.block_shape))
    hashes = block_hashes(range(n * layout.block_tokens), layout.block_tokens, salt=f"gpu-kv-{seed}")
    return hashes, src


def put_all(store: KVStore, hashes: list[str], src: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(hashes), batch):
        host = src[i:i + batch].cpu()
        store.put_many([(h, host[k]) for k, h in enumerate(hashes[i:i + batch])])
    return time.perf_counter() - t0


def bench_size(nbytes: int, args: argparse.Namespace, emit, client: Any = None, root: str | None = None,
               gib: float | None = None) -> bool:
    layout = KVLayout.from_name(LAYOUTS[nbytes])
    n = max(args.batch, int((gib or args.gib) * GiB // nbytes))
    dev = torch.device(args.device)
    hashes, src = make_blocks(layout, n, nbytes // MiB + (1000 if client is not None else 0), dev)
    root = root or os.path.join(args.dir, f"kv-{nbytes // MiB}M")
    where = "native" if client is not None else "local"
    writer = KVStore(root, layout, client=client, concurrency=args.batch)
    secs = put_all(writer, hashes, src, args.batch)
    writer.close()
    emit({"put": where, "block_bytes": nbytes, "blocks": n, "secs": round(secs, 3),
          "GBps": round(n * nbytes / secs / 1e9, 3)})
    outs = torch.empty_like(src)
    ok = True
    kvikio_ok = dev.type == "cuda" and kvikio_available()  # native: kvikio reads the chunk files
    methods = (["kvikio"] if kvikio_ok else []) + ["staged", "host+copy"] + (["host"] if dev.type == "cpu" else [])
    methods += (["baseline"] if client is None else []) + (["kvikio-raw"] if kvikio_ok and client is None else [])
    if args.methods:  # a subset, e.g. for a profile of one route
        methods = [m for m in methods if m in args.methods.split(",")]
    for name in methods:
        device_io = name if name in ("kvikio", "staged") else "auto"  # (raw methods only use its paths)
        store = KVStore(root, layout, client=client, concurrency=args.batch, device_io=device_io)
        try:
            for row in run_method(name, store, hashes, src, outs, args.batch, args.reps,
                                  args.cold and client is None):
                row["backend"] = where
                ok &= row["bit_exact"]
                emit(row)
        finally:
            store.close()
    del src, outs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return ok


def ceilings(emit) -> None:
    """Pinned host-to-device copy rate, for scale."""
    host = torch.empty(256 * MiB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(8):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    emit({"ceiling": "pinned H2D copy, 256 MiB x 8", "GBps": round(8 * 256 * MiB / (time.perf_counter() - t0) / 1e9, 2)})


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each native row's GB/s over the local store's baseline rows of the same block size: the batched
    baseline (a pool of ``--batch`` threads) and the single one (a plain one-thread loop)."""
    base = {(r["block_bytes"], r["mode"]): r["GBps"] for r in rows
            if r.get("method") == "baseline" and r.get("cache") == "warm"}
    out = []
    for r in rows:
        if r.get("backend") != "native" or r.get("cache") != "warm" or r["mode"] != "batch":
            continue
        pool, loop = base.get((r["block_bytes"], "batch")), base.get((r["block_bytes"], "single"))
        if pool and loop:
            out.append({"ratio": f"native {r['method']} get_many({r['batch']}) / local baseline",
                        "block_bytes": r["block_bytes"], "GBps": r["GBps"], "vs_baseline_pool": round(r["GBps"] / pool, 2),
                        "vs_baseline_loop": round(r["GBps"] / loop, 2)})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | block | method | calls | cache | GB/s | ms/call | p50 ms | p99 ms | KV_CHUNKS/call | CPU s/GB "
             "| bit-exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "method" not in r:
            continue
        calls = "get (1 block)" if r["batch"] == 1 else f"get_many ({r['batch']} blocks)"
        lines.append(f"| {r['backend']} | {r['block_bytes'] // MiB} MiB | {r['method']} | {calls} | {r['cache']} | "
                     f"{r['GBps']} | {r.get('ms_per_call', '')} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{'' if r.get('kv_chunks_per_call') is None else r['kv_chunks_per_call']} | "
                     f"{r.get('cpu_s_per_GB', '')} | "
                     f"{'yes' if r['bit_exact'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/root/kvfs-kv", help="local-disk directory for the block files")
    p.add_argument("--out", default=".", help="where results.json and log.txt go")
    p.add_argument("--sizes", default="2,32", help="block sizes in MiB (2 and/or 32)")
    p.add_argument("--gib", type=float, default=1.0, help="GiB of blocks per size (local store)")
    p.add_argument("--batch", type=int, default=8, help="blocks per get_many (and KVStore concurrency)")
    p.add_argument("--reps", type=int, default=2, help="timed passes per method and mode (best is reported)")
    p.add_argument("--cold", action="store_true", help="also one batched pass per method after drop_caches")
    p.add_argument("--native", action="store_true", help="also a real meta + chunkserver, native backend")
    p.add_argument("--native-gib", type=float, default=0.5, help="GiB of blocks per size through the client")
    p.add_argument("--meta-args", default="", help="extra `kvfs meta` flags for --native, e.g. "
                   "'--kv-lease-seconds 0' (no KV map leases: every batch checked with meta)")
    p.add_argument("--methods", default="", help="only these methods (comma-separated, e.g. staged,baseline)")
    p.add_argument("--device", default="cuda:0", help="cuda:N, or cpu: CPU tensors as the destination (no GPU)")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if gpu and not torch.cuda.is_available():
        print("gpu_kv.py needs a CUDA device (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.dir, exist_ok=True)
    rows: list[dict[str, Any]] = []
    log = open(os.path.join(args.out, "log.txt"), "w")  # noqa: SIM115  (closed at the end)

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "gpu": torch.cuda.get_device_name(args.device) if gpu else None, "cpus": os.cpu_count(),
                            "python": platform.python_version(), "kernel": platform.release(),
                            "dir_fstype": mount_fstype(args.dir), "kvikio": kvikio_available(),
                            "xxh3": chunkio.xxh3_impl()}
    if info["kvikio"]:
        import kvikio
        import kvikio.defaults

        info["kvikio_version"] = kvikio.__version__
        info["kvikio_compat_mode_preferred"] = kvikio.defaults.is_compat_mode_preferred()
    emit({"info": info, "argv": sys.argv[1:]})
    if gpu:
        ceilings(emit)
    ok = True
    sizes = [int(s) * MiB for s in args.sizes.split(",") if s]
    for nbytes in sizes:
        ok &= bench_size(nbytes, args, emit)
    if args.native:
        from cluster import Cluster, free_port

        work = tempfile.mkdtemp(prefix="kvfs-gpu-kv-", dir=args.dir)
        cluster = Cluster(os.path.join(work, "cluster"), chunkservers=1, replication=1, chunk_size="4M",
                          chunkserver_args=("--fsync", "never"), meta_metrics_port=free_port(),
                          meta_args=tuple(args.meta_args.split()))
        try:
            cluster.start()
            NATIVE_CLUSTER[:] = [cluster]
            SERVICE_PIDS[:] = [p.popen.pid for p in [cluster.meta, *cluster.servers] if p is not None and p.popen]
            with cluster.client(timeout=60.0) as client:
                for nbytes in sizes:
                    ok &= bench_size(nbytes, args, emit, client=client, root=f"/kv/gpu-{nbytes // MiB}M",
                                     gib=args.native_gib)
        except Exception as exc:  # noqa: BLE001  (report, keep the local results)
            emit({"native_error": repr(exc), "meta_log": cluster.meta.log()[-2000:] if cluster.meta else ""})
            ok = False
        finally:
            NATIVE_CLUSTER.clear()
            cluster.stop()
            subprocess.run(["rm", "-rf", work], check=False)
    for row in ratios(rows):
        emit(row)
    text = table(rows)
    print(text)
    log.write(text + "\n")
    log.close()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
