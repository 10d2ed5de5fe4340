"""Model loading into GPU memory from data stored in kvfs (issue 10), with the local directory as the
ceiling, all in one run on one machine.

Starts a real kvfs cluster on this machine (``kvfs meta`` + ``--chunkservers`` chunkservers as separate
processes, replication 1, from ``tests/cluster.py``), generates a llama-like bf16 model (the layout of
``bench/gpu_load.py``) in ``--dir``, copies every file into kvfs with the native client, then loads it
into ``--device`` with ``kvfs.models.load_safetensors`` from each source, round robin ``--reps`` times,
warm (every source read once before timing):

* ``local``: the model directory on local disk (the ceiling, not a kvfs figure);
* ``kvfs-native``: the same files in kvfs through ``SyncClient``, chunk files read directly on this host
  (short-circuit);
* ``kvfs-native-kvikio``: the same client, ``LoadOptions(use_kvikio=True)``: kvikio reads the file's
  chunk files on this host by path (``kvfs.chunkfiles``; the one route whose bytes skip the chunk
  checksums, documented there);
* ``kvfs-tcp``: the same with ``ClientOptions(local_reads=False)`` (chunk data over loopback TCP),
  received in ``--read-threads`` worker threads (kvfs/rpc_blocking.py);
* ``kvfs-tcp-loop``: TCP received on the client's event loop (``thread_read_min=0``: the path before);
* ``kvfs-mount``: the same loader on the model's path in a ``kvfs mount`` of the cluster (FUSE; needs
  pyfuse3, see docs/benchmarks.md for building it on a host without libfuse headers).

A kvfs source may end in ``@IMPL`` to verify with that XXH3-64 implementation (``kvfs.xxh3_impls``:
``avx512``, ``avx2``, ``xxhash-sse2``), switched in this process before each load, so implementations
compare in one run: ``--sources local,kvfs-native@xxhash-sse2,kvfs-native@avx2``. Without it, the
default (the widest one usable here).

A kvfs source may also end in ``:SIZE`` (before any ``@IMPL``) to read a copy of the model whose files
have that per-file chunk size (``SyncClient.write_file(..., chunk_size=...)``, kvfs/layout.py), stored
under ``/m-SIZE`` next to ``/m`` (the cluster's ``--chunk-size``), so chunk sizes compare in one run on
one cluster: ``--sources local,kvfs-native:4M,kvfs-native:16M,kvfs-tcp:4M,kvfs-tcp:16M``.

``local`` and ``kvfs-mount`` use the loader's pinned pipeline; ``local-kvikio`` and ``kvfs-mount-kvikio``
read with kvikio ``CuFile`` (compat mode through FUSE: POSIX reads by kvikio's threads).

``--cold``: before every timed load, ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches`` (root), and a
``disk`` row: the model's files read by 16 threads of 16 MiB ``preadv`` into host memory, no GPU (the
disk's own cold read, the issue's reference for cold loads). kvfs's chunk files are on the same disk.

Each load is bit-exact-checked (xxh3 of every tensor's bytes against the local load) outside the timing.
Reported: GB/s (best of the reps), the ratio to ``local``, and CPU-seconds per GB of this process plus
the kvfs processes. ``--device cpu`` runs the same on the CPU (a dry run on a machine without a GPU).

    PYTHONPATH=/tmp/site:. python3 bench/gpu_load_kvfs.py --dir /root/m --gib 6 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def proc_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of processes (the kvfs services)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def digest(tensors) -> dict[str, int]:
    import xxhash

    out = {}
    for name, t in tensors.items():
        out[name] = xxhash.xxh3_64_intdigest(t.cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp/kvfs-gpu-model")
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunkservers", type=int, default=3)
    p.add_argument("--chunk-size", default="4M", help="the cluster's chunk size (kvfs meta --chunk-size); a "
                   "source SOURCE:SIZE reads a copy whose files have chunk size SIZE")
    p.add_argument("--sources", default="local,kvfs-native,kvfs-tcp")
    p.add_argument("--read-threads", type=int, default=8, help="ClientOptions.read_threads for kvfs-tcp")
    p.add_argument("--out", default=".")
    p.add_argument("--load-threads", type=int, default=0, help="LoadOptions.threads (0: its default)")
    p.add_argument("--profile", metavar="DIR",
                   help="after the timed reps, one more load per source under py-spy (this process and the "
                        "kvfs services; collapsed stacks, bench/profile_top.py summarises them)")
    p.add_argument("--profile-native", action="store_true", help="--profile with C frames (py-spy --native)")
    p.add_argument("--cold", action="store_true",
                   help="sync and drop the page cache before every timed load; adds the 'disk' row")
    args = p.parse_args(argv)

    import torch
    from cluster import Cluster
    from gpu_load import generate

    import kvfs
    from xxh3_speed import usable_rows

    from kvfs import chunkio
    from kvfs.models import LoadOptions, load_safetensors

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    model = Path(args.dir)
    files = generate(model, args.gib)
    total = sum(f.stat().st_size for f in files)
    say(f"model: {len(files)} files, {total / 1e9:.2f} GB in {model}; device {args.device}; "
        f"{os.cpu_count()} CPUs; kvfs chunk size {args.chunk_size}; XXH3 {chunkio.xxh3_impl()}")
    cluster_dir = model.parent / f"kvfs-cluster-{args.chunk_size}"
    shutil.rmtree(cluster_dir, ignore_errors=True)  # a fresh cluster: no data from an earlier run or version
    cluster = Cluster(str(cluster_dir), chunkservers=args.chunkservers,
                      replication=1, chunk_size=args.chunk_size, chunkserver_args=("--fsync", "never"))
    cluster.start()
    pids = [cluster.meta.popen.pid] + [s.popen.pid for s in cluster.servers]
    clients = {}
    from kvfs.config import parse_size

    wanted = [s for s in args.sources.split(",") if s]
    # "" : /m with the cluster's chunk size; "16M": /m-16M, every file with 16 MiB chunks.
    copies = sorted({_split_source(s)[1] for s in wanted if s.startswith("kvfs")})
    try:
        with cluster.client(timeout=60) as c:
            for size in copies:
                top = f"/m-{size}" if size else "/m"
                c.mkdir(top, parents=True, exist_ok=True)
                t0 = time.perf_counter()
                for f in sorted(model.iterdir()):
                    if f.is_file():
                        c.write_file(f"{top}/{f.name}", f.read_bytes(), chunk_size=parse_size(size) if size else 0)
                say(f"copied into kvfs {top} (chunk size {size or args.chunk_size}) in {time.perf_counter() - t0:.1f} s")
        clients["kvfs-native"] = kvfs.SyncClient(cluster.meta_address, kvfs.ClientOptions(timeout=60))
        clients["kvfs-tcp"] = kvfs.SyncClient(cluster.meta_address, kvfs.ClientOptions(
            timeout=60, local_reads=False, read_threads=args.read_threads))
        clients["kvfs-tcp-loop"] = kvfs.SyncClient(cluster.meta_address, kvfs.ClientOptions(
            timeout=60, local_reads=False, thread_read_min=0))

        sources = usable_rows(wanted)
        mountpoint = str(model.parent / "kvfs-mnt")
        if any(s.startswith("kvfs-mount") for s in sources):
            cluster.mount(mountpoint)

        default_xxh3 = chunkio.xxh3_impl()

        def load(source: str):
            source, size, xxh3 = _split_source(source)
            top = f"m-{size}" if size else "m"
            if (xxh3 or default_xxh3) != chunkio.xxh3_impl():
                chunkio.use_xxh3(xxh3 or default_xxh3)
            opts = LoadOptions(use_kvikio=source.endswith("-kvikio"))
            if args.load_threads:
                opts.threads = args.load_threads
                opts.pinned_buffers = max(opts.pinned_buffers, args.load_threads)  # one per thread
            if source.startswith("local"):
                return load_safetensors(str(model), device=args.device, options=opts)
            if source.startswith("kvfs-mount"):
                return load_safetensors(os.path.join(mountpoint, top), device=args.device, options=opts)
            return load_safetensors(f"/{top}", device=args.device, client=clients[source.removesuffix("-kvikio")],
                                    options=opts)

        def read_disk() -> None:
            """The disk's own cold read: every model file by 16 threads of 16 MiB preadv, no GPU."""
            from concurrent.futures import ThreadPoolExecutor

            spans = [(f, off) for f in sorted(model.iterdir()) if f.is_file()
                     for off in range(0, f.stat().st_size, 16 << 20)]
            local = threading.local()

            def one(item) -> None:
                f, off = item
                buf = getattr(local, "buf", None)
                if buf is None:
                    buf = local.buf = bytearray(16 << 20)
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.preadv(fd, [buf], off)
                finally:
                    os.close(fd)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(one, spans))

        if args.cold:
            sources = ["disk"] + sources

        ref = digest(load("local"))
        for s in sources:  # warm every source's page cache, and check bit-exactness once
            if s == "disk":
                continue
            got = digest(load(s))
            assert got == ref, f"{s}: tensors differ from the local load"
        say("bit-exact: " + ", ".join(s for s in sources if s != "disk"))
        rows: dict[str, list[dict]] = {s: [] for s in sources}
        for rep in range(args.reps):
            for s in sources:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if args.cold:
                    os.sync()
                    with open("/proc/sys/vm/drop_caches", "w") as f:
                        f.write("3\n")
                cpu0, svc0, t0 = time.process_time(), proc_cpu(pids), time.perf_counter()
                tensors = read_disk() if s == "disk" else load(s)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                secs = time.perf_counter() - t0
                cpu = time.process_time() - cpu0 + proc_cpu(pids) - svc0
                del tensors
                row = {"source": s, "rep": rep, "secs": secs, "GBps": total / secs / 1e9,
                       "cpu_s_per_GB": cpu / (total / 1e9), "bytes": total, "device": args.device}
                rows[s].append(row)
                say(json.dumps(row))
        if args.profile:
            from pyspy import profiled

            spied = {"client": os.getpid(), "meta": cluster.meta.popen.pid}
            spied.update({f"cs{i}": srv.popen.pid for i, srv in enumerate(cluster.servers)})
            for s in sources:
                if s == "disk":
                    continue
                with profiled(spied, s, args.profile, native=args.profile_native):
                    for _ in range(2):
                        del_me = load(s)
                        if args.device.startswith("cuda"):
                            torch.cuda.synchronize()
                        del del_me
            say(f"profiles in {args.profile}")
        best = {s: max(r["GBps"] for r in v) for s, v in rows.items()}
        lines = ["| source | best GB/s | vs local | CPU s/GB (best rep) |", "|---|---|---|---|"]
        for s, v in rows.items():
            b = max(v, key=lambda r: r["GBps"])
            ratio = f"{best[s] / best['local']:.2f}x" if "local" in best else "-"
            lines.append(f"| {s} | {best[s]:.2f} | {ratio} | {b['cpu_s_per_GB']:.3f} |")
        say("\n".join(lines))
    finally:
        for c in clients.values():
            c.close()
        cluster.stop()
        log.close()
    return 0


def _split_source(source: str) -> tuple[str, str, str]:
    """``kvfs-native:16M@avx2`` -> (``kvfs-native``, ``16M``, ``avx2``); missing parts are ""."""
    head, _, xxh3 = source.partition("@")
    name, _, size = head.partition(":")
    return name, size, xxh3


if __name__ == "__main__":
    sys.exit(main())
