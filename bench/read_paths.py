"""Where the short-circuit read path spends its time: the same chunk files read by N threads four ways.

Starts a kvfs cluster on this machine (tests/cluster.py), writes ``--gib`` GiB into one kvfs file, warms
the page cache, then reads the file's chunk files with ``--threads`` threads into pinned (CUDA present)
or ordinary host buffers:

* ``preadv``: plain ``os.preadv`` of each chunk file, no checks (the ceiling);
* ``chunkio-noverify``: ``kvfs.chunkio.read_local_chunk`` with verification switched off;
* ``chunkio-pyxxh``: the same, hashing with python-xxhash (which keeps the GIL while it hashes);
* ``chunkio-split``: the read in Python (``os.preadv``), then every 64 KiB block verified by
  kvfs._blockhash with the GIL released (kvfs before ``preadv_verify``);
* ``chunkio``: ``read_local_chunk`` as kvfs runs it: read and verification in one C call
  (``kvfs._blockhash.preadv_verify``, GIL released throughout), where it was built;
* ``reader``: ``kvfs.models`` ``ClientFileReader.readv_into`` over 16 MiB spans (what the loader does);
* ``tcp-blocking``: each chunk over loopback TCP with ``kvfs.rpc_blocking.BlockingChunkClient`` straight
  from the worker thread (no event loop), verified as the client does (the TCP path's ceiling here);
* ``tcp-reader``: ``ClientFileReader`` over a client with ``local_reads=False`` (the loader over TCP).

A row may end in ``@IMPL`` to verify with that XXH3-64 implementation (``kvfs.xxh3_impls``: ``avx512``,
``avx2``, ``xxhash-sse2``), so they compare in one run: ``--rows preadv,chunkio@xxhash-sse2,chunkio@avx2``.

    PYTHONPATH=/tmp/site python3 bench/read_paths.py --gib 4 --threads 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

MiB = 1 << 20
ROWS = ("preadv", "chunkio-noverify", "chunkio-pyxxh", "chunkio-split", "chunkio", "reader", "tcp-blocking",
        "tcp-reader")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--dir", default="/var/tmp/kvfs-read-paths")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunkservers", type=int, default=1, help="chunks spread over this many (TCP rows)")
    p.add_argument("--rows", default=",".join(ROWS), help="which rows to run (comma-separated, ROW[@XXH3])")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    if unknown := [r for r in rows if r.partition("@")[0] not in ROWS]:
        p.error(f"unknown rows {unknown} (known: {', '.join(ROWS)})")
    from xxh3_speed import usable_rows

    rows = usable_rows(rows)

    import torch
    from cluster import Cluster
    from gpu_load_kvfs import proc_cpu

    import kvfs
    from kvfs import chunkio
    from kvfs.models.reader import ClientFileReader, _local_chunks

    pinned = torch.cuda.is_available()
    cluster = Cluster(args.dir, chunkservers=args.chunkservers, replication=1, chunk_size="4M",
                      chunkserver_args=("--fsync", "never")).start()
    try:
        size = int(args.gib * (1 << 30)) // (4 * MiB) * 4 * MiB
        with kvfs.SyncClient(cluster.meta_address, kvfs.ClientOptions(timeout=60)) as c:
            c.write_file("/f", os.urandom(size))
            st = c.open(c.resolve("/f").ino)
            chunk_size, local = c.call(_local_chunks, c.client, st.ino)
            chunks = [local[i] for i in sorted(local)]
            tokens = {ref.chunk_id: ref.token for ref in c.client.files[st.ino].chunks.values()}
            assert all(ch is not None for ch in chunks), "chunk files not local"
            import threading

            mine = threading.local()  # one buffer per worker thread

            def buffer() -> memoryview:
                view = getattr(mine, "view", None)
                if view is None:
                    mine.tensor = torch.empty(16 * MiB, dtype=torch.uint8, pin_memory=pinned)
                    view = mine.view = memoryview(mine.tensor.numpy())
                return view

            reader = ClientFileReader(c, "/f")
            tcp_client = kvfs.SyncClient(cluster.meta_address, kvfs.ClientOptions(
                timeout=60, local_reads=False, read_threads=args.threads))
            tcp_reader = ClientFileReader(tcp_client, "/f")
            from kvfs import protocol as P
            from kvfs.rpc_blocking import BlockingChunkClient

            blocking = {ch.address: BlockingChunkClient(ch.address, timeout=60) for ch in chunks}

            pids = [cluster.meta.popen.pid] + [s.popen.pid for s in cluster.servers]

            def run(name: str) -> tuple[float, float, float]:
                """(GB/s, CPU seconds per GB of this process, of the kvfs services)"""
                def one(i: int) -> None:
                    view = buffer()
                    if name in ("reader", "tcp-reader"):
                        (reader if name == "reader" else tcp_reader).readv_into(i * 16 * MiB, [view])
                        return
                    ch = chunks[i]
                    dest = view[:ch.length]
                    if name == "tcp-blocking":
                        # Verified as it arrives (kvfs.rpc_blocking), as the client does.
                        blocking[ch.address].read(P.ReadChunk(ch.chunk_id, 0, ch.length, tokens[ch.chunk_id]), dest)
                        return
                    if name == "preadv":
                        fd = os.open(ch.path, os.O_RDONLY)
                        try:
                            os.preadv(fd, [dest], 0)
                        finally:
                            os.close(fd)
                    else:
                        chunkio.read_local_chunk(ch.path, ch.sums_path, ch.chunk_id, ch.address, 0, [dest])

                n = size // (16 * MiB) if name.endswith("reader") else len(chunks)
                cpu0, svc0, t0 = time.process_time(), proc_cpu(pids), time.perf_counter()
                with ThreadPoolExecutor(args.threads) as pool:
                    list(pool.map(one, range(n)))
                secs = time.perf_counter() - t0
                gb = size / 1e9
                return size / secs / 1e9, (time.process_time() - cpu0) / gb, (proc_cpu(pids) - svc0) / gb

            real_verify, native, helper = chunkio.verify_views, chunkio._XXH3, chunkio._BLOCKHASH
            one_call = chunkio._PREADV_VERIFY
            default_xxh3 = chunkio.xxh3_impl()
            run("preadv")  # warm
            results: dict[str, list[tuple[float, float, float]]] = {}
            for _ in range(args.reps):
                for row in rows:
                    name, _, xxh3 = row.partition("@")
                    chunkio.verify_views = (lambda *a, **k: None) if name == "chunkio-noverify" else real_verify
                    python_only = name == "chunkio-pyxxh"  # python-xxhash per block, GIL held
                    chunkio._XXH3, chunkio._BLOCKHASH = (None, None) if python_only else (native, helper)
                    if not python_only and helper is not None:
                        chunkio.use_xxh3(xxh3 or default_xxh3)
                    chunkio._PREADV_VERIFY = one_call if name in ("chunkio", "reader") else None
                    results.setdefault(row, []).append(run(name.replace("-pyxxh", "").replace("-split", "")))
            chunkio.verify_views, chunkio._XXH3, chunkio._BLOCKHASH = real_verify, native, helper
            chunkio._PREADV_VERIFY = one_call
            if helper is not None:
                chunkio.use_xxh3(default_xxh3)
            reader.close()
            tcp_reader.close()
            tcp_client.close()
            for b in blocking.values():
                b.close()
            print(f"{size / 1e9:.2f} GB, {args.threads} threads, {args.chunkservers} chunkserver(s), {'pinned' if pinned else 'pageable'} buffers, "
                  f"C block hasher {chunkio._BLOCKHASH is not None}, XXH3 {chunkio.xxh3_impl()}")
            print("  CPU s/GB: this process + the kvfs services (meta, chunkservers), each run")
            for name, v in results.items():
                cpus = ", ".join(f"{c + s:.3f} ({c:.3f}+{s:.3f})" for _, c, s in v)
                print(f"  {name:18s} best {max(x for x, _, _ in v):6.2f} GB/s (runs: "
                      f"{', '.join(f'{x:.2f}' for x, _, _ in v)})  CPU s/GB: {cpus}")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
