"""Write a model (a directory or a single weight file) into kvfs: ``kvfs models put``.

Weight files get large chunks (``WEIGHTS_CHUNK_SIZE``, 16 MiB, unless told otherwise): a load reads
them whole and front to back, and per-chunk work (a lookup, a file open, a checksum read per chunk)
is what limits it at 4 MiB (docs/benchmarks.md, "Per-file chunk sizes"). Everything else (configs,
tokenizers) takes the destination directory's policy, else the cluster's chunk size.

Error handling: OSErrors from the local files and the client (EINVAL for a bad chunk size).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kvfs.copy import copy_file, plan_copies
from kvfs.layout import WEIGHTS_CHUNK_SIZE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")


def is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES)


def model_copies(src: str, dest: str) -> list[tuple[str, str]]:
    """(local file, kvfs path) pairs: a directory's files under ``dest``, or one file as ``dest``/its name."""
    if os.path.isdir(src):
        return [(s, f"{dest.rstrip('/')}/{os.path.relpath(s, src)}") for s, _ in plan_copies([src], dest, True)]
    return plan_copies([src], dest, True)


async def put_model(client: Any, src: str, dest: str, *, chunk_size: int = WEIGHTS_CHUNK_SIZE,
                    progress: Callable[[int], None] | None = None) -> list[tuple[str, int]]:
    """Copy model ``src`` (a local directory or file) under kvfs directory ``dest`` with a
    ``kvfs.Client``; weight files get ``chunk_size``. Returns (kvfs path, chunk size) per file."""
    out = []
    for local, target in model_copies(src, dest):
        await client.mkdir(target.rpartition("/")[0] or "/", parents=True, exist_ok=True)
        size = chunk_size if is_weight_file(local) else 0
        await copy_file(client, local, target, chunk_size=size, progress=progress)
        out.append((target, client.file_chunk_size(await client.resolve(target))))
    return out
