"""Which XXH3-64 function kvfs hashes chunk blocks with, picked once per process.

Candidates, best first:

* ``avx512`` / ``avx2``: XXH3 compiled by kvfs for that instruction set (``kvfs._xxh3_simd``, an optional
  extension built where xxhash.h is present), offered only where the CPU supports it;
* ``xxhash-sse2``: python-xxhash's own ``XXH3_64bits`` (its SSE2 build), reached through ctypes.

A candidate is used only if it agrees with ``xxhash.xxh3_64_intdigest`` on a probe set (every XXH3 code
path: short inputs, the 129-240 byte one, long inputs with a partial stripe), so a wrong build can
never decide whether a block is corrupt. ``KVFS_XXH3=<name>`` picks a named one instead (benchmarks,
or a host where the wider one is slower); an unknown or unusable name is an error at import.

Each candidate is a C function ``uint64_t (const void *, size_t)``: its ``address`` goes to
``kvfs._blockhash.init`` and ``fn`` is the same function through ctypes (which releases the GIL).
"""

from __future__ import annotations

import ctypes
import os
import random
from dataclasses import dataclass

import xxhash

XXH3_FN = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)
PYTHON_XXHASH = "xxhash-sse2"
ENV = "KVFS_XXH3"
# Lengths that reach each XXH3 code path: 0, 1-3, 4-8, 9-16, 17-128, 129-240, and long inputs whose
# stripes, blocks and last partial stripe the vector code handles (a 64 KiB block and odd sizes).
PROBE_LENGTHS = (0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1023, 1024, 1025, 65536, 65536 + 63)


@dataclass(frozen=True)
class Impl:
    name: str
    address: int
    fn: ctypes._CFuncPtr  # type: ignore[name-defined]

    def __call__(self, address: int, length: int) -> int:
        return self.fn(address, length)


def _python_xxhash() -> Impl | None:
    try:
        from xxhash import _xxhash

        raw = ctypes.CDLL(_xxhash.__file__).XXH3_64bits
    except (ImportError, OSError, AttributeError):
        return None
    address = ctypes.cast(raw, ctypes.c_void_p).value
    return Impl(PYTHON_XXHASH, address, XXH3_FN(address))


def _simd() -> list[Impl]:
    try:
        from kvfs import _xxh3_simd
    except ImportError:
        return []
    return [Impl(name, address, XXH3_FN(address)) for name, address in _xxh3_simd.impls()]


def stream_functions(name: str) -> tuple[int, ...] | None:
    """Addresses of the named implementation's streaming XXH3-64 (create, free, reset, update, digest:
    ``kvfs._blockhash.init_stream``'s arguments), or None where that build has none."""
    if name == PYTHON_XXHASH:
        try:
            from xxhash import _xxhash

            lib = ctypes.CDLL(_xxhash.__file__)
            fns = [lib.XXH3_createState, lib.XXH3_freeState, lib.XXH3_64bits_reset,
                   getattr(lib, "XXH3_64bits_update_dispatch", None) or lib.XXH3_64bits_update,
                   lib.XXH3_64bits_digest]
        except (ImportError, OSError, AttributeError):
            return None
        return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in fns)
    try:
        from kvfs import _xxh3_simd
    except ImportError:
        return None
    return next((tuple(addresses) for n, addresses in getattr(_xxh3_simd, "streams", list)() if n == name), None)


def candidates() -> list[Impl]:
    """Every implementation this process can use, best first (not yet probed)."""
    fallback = _python_xxhash()
    return _simd() + ([fallback] if fallback is not None else [])


def agrees_with_xxhash(impl: Impl) -> bool:
    """The implementation gives python-xxhash's digest for every probe length, at an unaligned start."""
    pattern = bytearray(random.Random(3).randbytes(max(PROBE_LENGTHS) + 1))
    base = ctypes.addressof((ctypes.c_char * len(pattern)).from_buffer(pattern))
    return all(impl(base + 1, n) == xxhash.xxh3_64_intdigest(memoryview(pattern)[1:1 + n])
               for n in PROBE_LENGTHS)


def usable() -> list[Impl]:
    """``candidates()`` that pass the probe, best first."""
    return [impl for impl in candidates() if agrees_with_xxhash(impl)]


def choose(name: str | None = None) -> Impl | None:
    """The implementation to hash with: ``name`` (default: ``$KVFS_XXH3``) or the best usable one;
    None where none is reachable (kvfs then hashes with python-xxhash from Python).

    Error handling: ``ValueError`` for a name that is not usable here."""
    name = name if name is not None else os.environ.get(ENV) or None
    impls = usable()
    if name is None:
        return impls[0] if impls else None
    for impl in impls:
        if impl.name == name:
            return impl
    raise ValueError(f"{ENV}={name}: not usable here (usable: {', '.join(i.name for i in impls) or 'none'})")

