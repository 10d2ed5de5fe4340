"""One thread reading KV-block-sized local files four ways: what verifying costs on top of the read.

    python bench/kv_read_hash.py [--files 8] [--mib 2] [--reps 15] [--dest torch|bytearray] [--dir /var/tmp]

Writes ``--files`` files of ``--mib`` MiB + 4 KiB (a block's header and payload, as one chunk file)
with their chunk checksum files, then reads them into one reused destination (``torch``: a CPU
tensor's memory, which torch allocates with transparent huge pages where the kernel offers them;
``bytearray``: Python's allocator), warm, interleaved round by round, best of ``--reps`` rounds of 5:

* ``preadv``: ``os.preadv`` alone, nothing checked (the floor);
* ``chunk-checked``: ``chunkio.read_chunk_start``, read and checked against the chunk checksums in one
  C call (what ``get_many`` did per chunk before session 8);
* ``chunk-checked + payload``: that, then the payload's XXH3-64 from memory (the block's own checksum:
  the second pass ``KVStore`` made);
* ``read_files_hashed``: ``chunkio.read_files_hashed``, the payload hashed as it lands, in cache, and
  nothing else (session 8: each byte hashed once); ``read_files_hashed@NAME``: the same with another
  streaming XXH3 (before session 9 it was always python-xxhash's SSE2 build, ``xxhash-sse2``).

Prints ms per pass over all files and GB/s. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from kvfs import chunkio, xxh3_impls

HEAD = 4096


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--mib", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--dest", choices=("torch", "bytearray"), default="torch")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args(argv)
    size = args.mib * (1 << 20) + HEAD
    work = tempfile.mkdtemp(prefix="kvfs-read-hash-", dir=args.dir)
    try:
        paths, sums = [], []
        for k in range(args.files):
            data = os.urandom(size)
            path = os.path.join(work, f"chunk{k}")
            with open(path, "wb") as f:
                f.write(data)
            sums.append(chunkio.packed_checksums(data, chunkio.BLOCK))
            with open(path + ".sum", "wb") as f:
                f.write(sums[-1])
            paths.append(path)
        if args.dest == "torch":
            import torch

            buf = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
        else:
            buf = memoryview(bytearray(size))
        head, body = buf[:HEAD], buf[HEAD:]

        def preadv() -> None:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.preadv(fd, [head, body], 0)
                finally:
                    os.close(fd)

        def checked() -> None:
            for path, raw in zip(paths, sums):
                chunkio.read_chunk_start(path, path + ".sum", 1, "bench", [head, body], raw)

        def checked_and_payload() -> None:
            for path, raw in zip(paths, sums):
                chunkio.read_chunk_start(path, path + ".sum", 1, "bench", [head, body], raw)
                chunkio.xxh3_64(body)

        def hashed() -> None:
            for path in paths:
                chunkio.read_files_hashed([path], [size], [head, body], HEAD)

        active = chunkio.xxh3_impl()
        methods = {"preadv": preadv, "chunk-checked": checked, "chunk-checked + payload": checked_and_payload,
                   "read_files_hashed": hashed}
        if chunkio.hashed_reads_in_c():  # the same with each other streaming XXH3 (kvfs.xxh3_impls)
            for impl in xxh3_impls.usable():
                if impl.name != active:
                    methods[f"read_files_hashed@{impl.name}"] = hashed
        best = dict.fromkeys(methods, float("inf"))
        for _ in range(args.reps):
            for name, fn in methods.items():
                chunkio.use_xxh3(name.partition("@")[2] or active)  # (switched outside the timed calls)
                fn()
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - t0) / 5)
            chunkio.use_xxh3(active)
        print(f"{args.files} files of {size} bytes into a {args.dest} buffer, one thread; "
              f"XXH3: {chunkio.xxh3_impl()}, read_files_hashed in C: {chunkio.hashed_reads_in_c()} "
              f"(streaming XXH3: {chunkio.stream_xxh3_impl()})")
        for name, secs in best.items():
            print(f"{name:26s} {secs * 1e3:8.3f} ms  {args.files * size / secs / 1e9:6.2f} GB/s  "
                  f"{secs / best['preadv']:5.2f}x preadv")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
