"""Copy local files into kvfs through the client library, each with a chosen chunk size (``kvfs cp``,
``kvfs models put``).

A copy streams (one block in memory at a time, whole chunks so they upload as they fill) and commits
once at the end, so other clients see the old file or the whole new one. A destination with another
chunk size is replaced by a new file (a file's chunk size never changes once it has data).

Error handling: OSErrors from the local files and the client (EINVAL for a bad chunk size).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

COPY_BLOCK = 64 << 20


async def copy_file(client: Any, src: str, dest: str, *, chunk_size: int = 0,
                    progress: Callable[[int], None] | None = None) -> int:
    """Copy local file ``src`` to kvfs path ``dest`` (a ``kvfs.Client``); returns the bytes copied.
    ``chunk_size``: the new file's (0: the destination directory's policy, else the cluster's)."""
    attr = await client.create_replacing(dest, chunk_size=chunk_size)
    st = await client.open(attr.ino, write=True, truncate=True, created=attr)
    block = max(COPY_BLOCK // st.chunk_size, 1) * st.chunk_size  # whole chunks: each uploads as it fills
    buf = bytearray(block)
    done = 0
    try:
        with open(src, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                await client.write(attr.ino, done, memoryview(buf)[:n])
                done += n
                if progress is not None:
                    progress(n)
        await client.flush(attr.ino)
    finally:
        await client.release(attr.ino)
    return done


def plan_copies(sources: list[str], dest: str, dest_is_dir: bool) -> list[tuple[str, str]]:
    """(local file, kvfs path) pairs: files copy into ``dest`` (a directory when there are several, or
    it exists as one); directories copy recursively under ``dest``/their name."""
    out: list[tuple[str, str]] = []
    into_dir = dest_is_dir or len(sources) > 1
    for src in sources:
        base = os.path.basename(os.path.normpath(src))
        target = f"{dest.rstrip('/')}/{base}" if into_dir else dest
        if os.path.isdir(src):
            for top, _, files in os.walk(src):
                rel = os.path.relpath(top, src)
                for name in sorted(files):
                    sub = name if rel == "." else f"{rel}/{name}"
                    out.append((os.path.join(top, name), f"{target}/{sub}"))
        else:
            out.append((src, target))
    return out
