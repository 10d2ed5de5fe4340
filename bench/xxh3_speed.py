"""XXH3-64 per core: every implementation kvfs can use here (kvfs.xxh3_impls), hashing 64 KiB blocks.

One thread, ``kvfs._blockhash.hash_blocks`` (the C loop the verified reads use, GIL released) over:

* ``hot``: a ``--hot-kib`` buffer hashed again and again (in the CPU cache: the hash's own speed, as in
  ``preadv_verify``, which hashes each 1 MiB window right after reading it);
* ``memory``: a ``--mem-mib`` buffer, each pass from memory.

Implementations alternate within each rep; best of ``--reps`` is reported, with the ratio to
python-xxhash's SSE2 build (kvfs's hash before kvfs._xxh3_simd).

    python bench/xxh3_speed.py --reps 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def usable_rows(names: list[str]) -> list[str]:
    """Benchmark rows (``ROW`` or ``ROW@IMPL``) whose XXH3 implementation is usable here, so that one
    command runs on hosts with and without AVX-512; a note on stderr for each one left out."""
    from kvfs import xxh3_impls

    here = {impl.name for impl in xxh3_impls.usable()}
    kept = [n for n in names if "@" not in n or n.partition("@")[2] in here]
    for n in names:
        if n not in kept:
            print(f"{n}: XXH3 implementation not usable here (usable: {', '.join(sorted(here))}), left out",
                  file=sys.stderr)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hot-kib", type=int, default=1024)
    p.add_argument("--mem-mib", type=int, default=512)
    p.add_argument("--seconds", type=float, default=0.5, help="hashing time per measurement (hot)")
    args = p.parse_args(argv)

    from kvfs import _blockhash, chunkio, xxh3_impls

    impls = xxh3_impls.usable()
    block = chunkio.BLOCK
    print(f"{os.cpu_count()} CPUs; default XXH3 {chunkio.xxh3_impl()}; usable: {', '.join(i.name for i in impls)}; "
          f"{block // 1024} KiB blocks, one thread")
    hot = bytearray(os.urandom(args.hot_kib * 1024))
    mem = bytearray(os.urandom(args.mem_mib << 20))
    loops = 1
    _blockhash.init(impls[-1].address, impls[-1].name)
    while True:  # hot loop count: about --seconds with the slowest implementation
        t0 = time.perf_counter()
        for _ in range(loops):
            _blockhash.hash_blocks(hot, block)
        if time.perf_counter() - t0 > args.seconds / 4:
            loops = int(loops * args.seconds / (time.perf_counter() - t0)) + 1
            break
        loops *= 2
    best: dict[tuple[str, str], float] = {}
    reference = None  # the memory buffer's checksums: every implementation must give the same
    for _ in range(args.reps):
        for impl in impls:
            _blockhash.init(impl.address, impl.name)
            sums = None
            for what, buf, n in (("hot", hot, loops), ("memory", mem, 1)):
                t0 = time.perf_counter()
                for _ in range(n):
                    sums = _blockhash.hash_blocks(buf, block)
                rate = len(buf) * n / (time.perf_counter() - t0) / 1e9
                best[(impl.name, what)] = max(best.get((impl.name, what), 0.0), rate)
            reference = reference or sums
            assert sums == reference, f"{impl.name}: checksums differ"
    base = xxh3_impls.PYTHON_XXHASH
    print("| implementation | hot GB/s | vs xxhash-sse2 | memory GB/s | vs xxhash-sse2 |")
    print("|---|---|---|---|---|")
    for impl in impls:
        cells = []
        for what in ("hot", "memory"):
            rate = best[(impl.name, what)]
            ratio = f"{rate / best[(base, what)]:.2f}x" if (base, what) in best else "-"
            cells += [f"{rate:.2f}", ratio]
        print(f"| {impl.name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
