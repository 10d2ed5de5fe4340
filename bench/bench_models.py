"""CPU model-loading benchmark: kvfs.models vs safetensors.torch.load_file, local disk and kvfs.

Starts a real kvfs cluster (meta + 3 chunkservers + FUSE mount, tests/cluster.py), writes a generated
~``--gib`` GiB bf16 model (llama-like layout) to local disk and copies it into kvfs, then loads it, all
in this process, ``--reps`` rounds in which every method loads once (round 0 is each method's first load)::

    python bench/bench_models.py --gib 2

Methods (CPU target; every load ends with all bytes in process memory):

* ``st-local``      ``load_file(local) `` then ``clone()`` per tensor (load_file maps the file lazily; the
                    clone is what reads it)
* ``st-local-lazy`` ``load_file(local)`` alone: mmap, no byte read yet (shown for reference only)
* ``kvfs-local``    ``load_safetensors(local)``
* ``st-mount``      ``load_file`` + ``clone`` on the kvfs mount path
* ``kvfs-mount``    ``load_safetensors`` on the kvfs mount path (the file was written through this mount,
                    so the kernel's page cache for it may already hold the bytes)
* ``st-mount-fresh`` / ``kvfs-mount-fresh``  the same right after a remount, so every byte goes through the
                    FUSE daemon (chunk files still in the page cache: a model staged on this node)
* ``kvfs-client``   ``load_safetensors`` through the client library, short-circuit chunk-file reads
* ``kvfs-client-tcp`` the same with ``local_reads=False`` (chunk data over loopback TCP)

CPU s/GB counts this process plus the kvfs processes (mount, chunkservers, meta). The table's ratio is
each method's best GB/s over ``st-local``'s. kvfs results are checked bit-exact against ``st-local``.
Benchmarks assert nothing (STYLE.md 14); rows also go to ``--out`` as JSON lines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import torch
from gpu_load import layout
from safetensors.torch import load_file, save_file

from kvfs.models import LoadOptions, load_safetensors

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime
    except OSError:
        return 0.0


def generate(path: Path, gib: float) -> int:
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16) for n, s in layout(gib)}
    save_file(tensors, path, metadata={"format": "pt"})
    return sum(t.numel() * 2 for t in tensors.values())


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/kvfs-bench-models", help="work dir (removed afterwards)")
    ap.add_argument("--chunk-size", default="4M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="kvfs loader threads (default: LoadOptions)")
    ap.add_argument("--hugepages", action="store_true", help="kvfs loader: huge-page backed tensors")
    ap.add_argument("--out", default=str(HERE / "results" / "models-cpu.jsonl"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()

    from cluster import Cluster

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    local = work / "model.safetensors"
    t0 = time.perf_counter()
    nbytes = generate(local, args.gib)
    print(f"generated {local} ({local.stat().st_size / 1e9:.2f} GB, {nbytes / 1e9:.2f} GB of tensors) "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)

    cluster = Cluster(str(work / "cluster"), chunk_size=args.chunk_size).start()
    mnt = str(work / "mnt")
    rows: list[dict[str, Any]] = []
    try:
        cluster.mount(mnt)
        t0 = time.perf_counter()
        os.makedirs(os.path.join(mnt, "models"), exist_ok=True)
        shutil.copyfile(local, os.path.join(mnt, "models", "model.safetensors"))
        print(f"copied into kvfs through the mount in {time.perf_counter() - t0:.1f}s", flush=True)
        mounted = os.path.join(mnt, "models", "model.safetensors")
        kpath = "/models/model.safetensors"
        opts = LoadOptions(hugepages=args.hugepages)
        if args.threads:
            opts.threads = args.threads
        client = cluster.client()
        tcp = cluster.client(local_reads=False)
        pids = [p.popen.pid for p in [cluster.meta, *cluster.servers, *cluster.mounts.values()]
                if p is not None and p.popen is not None]

        def st(path: Any) -> Callable[[], dict[str, torch.Tensor]]:
            return lambda: {k: v.clone() for k, v in load_file(path).items()}

        def remount() -> None:
            # A new mount starts with an empty kernel page cache for its files: reads reach the daemon.
            cluster.unmount(mnt)
            cluster.mount(mnt)
            pids[:] = [p.popen.pid for p in [cluster.meta, *cluster.servers, *cluster.mounts.values()]
                       if p is not None and p.popen is not None]

        methods: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
            "st-local": st(local),
            "st-local-lazy": lambda: load_file(local),
            "kvfs-local": lambda: load_safetensors(local, options=opts),
            "st-mount": st(mounted),
            "kvfs-mount": lambda: load_safetensors(mounted, options=opts),
            "st-mount-fresh": st(mounted),
            "kvfs-mount-fresh": lambda: load_safetensors(mounted, options=opts),
            "kvfs-client": lambda: load_safetensors(kpath, client=client, options=opts),
            "kvfs-client-tcp": lambda: load_safetensors(kpath, client=tcp, options=opts),
        }
        ref = load_file(local)
        # Methods take turns within each repetition, so a change in machine load hits them alike.
        for rep in range(args.reps):
            for name, fn in methods.items():
                if name.endswith("-fresh"):
                    remount()
                gc.collect()
                c0 = time.process_time()
                s0 = sum(proc_cpu(p) for p in pids)
                t0 = time.perf_counter()
                out = fn()
                secs = time.perf_counter() - t0
                cpu = time.process_time() - c0
                srv = sum(proc_cpu(p) for p in pids) - s0
                if rep == 0 and name.startswith("kvfs"):
                    bad = [k for k in ref if not torch.equal(as_bytes(out[k]), as_bytes(ref[k]))]
                    assert not bad and out.keys() == ref.keys(), f"{name}: mismatched tensors {bad[:3]}"
                row = {"method": name, "loadavg": round(os.getloadavg()[0], 1), "rep": rep, "secs": round(secs, 4),
                       "GBps": round(nbytes / 1e9 / secs, 3), "cpu_s_per_GB": round(cpu / (nbytes / 1e9), 3),
                       "servers_cpu_s_per_GB": round(srv / (nbytes / 1e9), 3), "bytes": nbytes,
                       "threads": opts.threads, "hugepages": opts.hugepages, "chunk_size": args.chunk_size,
                       "cpus": os.cpu_count()}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del out
        client.close()
        tcp.close()
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    base = max(r["GBps"] for r in by["st-local"])
    print("| method | first load s | first GB/s | best GB/s | best vs st-local | CPU s/GB (this process + kvfs "
          "processes, best rep) |")
    print("|---|---|---|---|---|---|")
    for m, rs in by.items():
        first = rs[0]
        best = max(rs, key=lambda r: r["GBps"])
        print(f"| {m} | {first['secs']} | {first['GBps']} | {best['GBps']} | {best['GBps'] / base:.2f}x | "
              f"{best['cpu_s_per_GB']} + {best['servers_cpu_s_per_GB']} |")


if __name__ == "__main__":
    main()
