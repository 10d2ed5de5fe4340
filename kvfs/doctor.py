"""``kvfs doctor``: what this host's kvfs will run with, for bug reports and benchmark notes.

    kvfs doctor

One ``name: value`` line each: the kvfs version and where it is installed, the checksum code (the C
block hasher, the XXH3-64 implementation that verifies reads and the others usable here, the CPU's
vector units), and the optional pieces (pyfuse3 for the mount, kvikio). Looks at this process only:
it starts nothing and dials no service.
"""

from __future__ import annotations

import importlib.util
import os
import platform

import kvfs


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _found(module: str) -> str:
    return "yes" if importlib.util.find_spec(module) is not None else "no"


def report() -> list[tuple[str, str]]:
    from kvfs import chunkio, xxh3_impls

    flags = cpu_flags()
    return [
        ("kvfs", f"{kvfs.__version__} ({os.path.dirname(kvfs.__file__)})"),
        ("python", f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"),
        ("C block hasher (kvfs._blockhash)", "built" if chunkio._BLOCKHASH is not None else "not built"),
        ("XXH3-64 verifying reads", chunkio.xxh3_impl()),
        ("XXH3-64 hashing KV reads (one pass)", chunkio.stream_xxh3_impl() or "python (no kvfs._blockhash)"),
        ("XXH3-64 usable here", ", ".join(i.name for i in xxh3_impls.usable()) or "none"),
        ("SIMD XXH3 (kvfs._xxh3_simd)", "built" if _found("kvfs._xxh3_simd") == "yes" else
         "not built (needs xxhash.h at install: libxxhash-dev or KVFS_XXHASH_INCLUDE)"),
        ("CPU vector units", ", ".join(f for f in ("sse2", "avx2", "avx512f") if f in flags) or "unknown"),
        ("pyfuse3 (kvfs mount)", _found("pyfuse3")),
        ("kvikio", _found("kvikio")),
    ]


def _cmd_doctor(args) -> int:
    for name, value in report():
        print(f"{name}: {value}")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("doctor", help="show what this host's kvfs runs with (checksum code, optional parts)")
    sp.set_defaults(func=_cmd_doctor)
