"""Only the optional C helper lives here; everything else is in pyproject.toml.

``kvfs._blockhash`` verifies and computes per-block checksums without the GIL (kvfs/_blockhash.c).
``optional=True``: where no compiler is present the install goes on and kvfs uses its Python path.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvfs._blockhash", ["kvfs/_blockhash.c"], optional=True)])
