"""Only the optional C helpers live here; everything else is in pyproject.toml.

``kvfs._blockhash`` verifies and computes per-block checksums without the GIL (kvfs/_blockhash.c).
``kvfs._xxh3_simd`` carries AVX2 and AVX-512 builds of XXH3-64 (kvfs/_xxh3_simd.c); it needs xxhash.h
from Debian's libxxhash-dev, found in the standard include directories or in ``KVFS_XXHASH_INCLUDE``
(a directory holding xxhash.h, e.g. ``usr/include`` of a ``dpkg -x``-extracted libxxhash-dev deb on a
host without the package: docs/benchmarks.md, "AVX2 XXH3").
Both are ``optional=True``: where no compiler or no header is present the install goes on, and kvfs
hashes with python-xxhash's own XXH3 (or in Python).
"""

import os
import sys

from setuptools import Extension, setup

XXHASH_DIRS = [d for d in (os.environ.get("KVFS_XXHASH_INCLUDE"), "/usr/include", "/usr/local/include") if d]
xxhash_dir = next((d for d in XXHASH_DIRS if os.path.exists(os.path.join(d, "xxhash.h"))), None)

extensions = [Extension("kvfs._blockhash", ["kvfs/_blockhash.c"], optional=True)]
if xxhash_dir is not None:
    extensions.append(Extension(
        "kvfs._xxh3_simd", ["kvfs/_xxh3_simd.c", "kvfs/_xxh3_avx2.c", "kvfs/_xxh3_avx512.c"],
        include_dirs=[xxhash_dir], depends=["kvfs/_xxh3_simd.h"], optional=True))
    print(f"kvfs: building kvfs._xxh3_simd with {xxhash_dir}/xxhash.h", file=sys.stderr)
else:
    print(f"kvfs: xxhash.h not found in {XXHASH_DIRS}: kvfs._xxh3_simd not built (set KVFS_XXHASH_INCLUDE)",
          file=sys.stderr)

setup(ext_modules=extensions)
