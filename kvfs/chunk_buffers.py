"""Buffers for whole chunks read with ``O_DIRECT`` (kvfs.chunkio.read_chunk_direct): aligned to huge
pages, and reused once nothing views them any more.

Huge pages: an ``O_DIRECT`` read is one request per physically contiguous piece of the buffer, so in
4 KiB pages a 4 MiB read is split into many requests; on the 2-CPU test VM's virtio disk that halved
the throughput (0.9 against 1.8 GB/s, 4 reads of 4 MiB at once). Reuse: fresh memory per chunk costs
page faults, the kernel zeroing every page and an unmap, as much CPU as the read itself. A buffer whose
chunk left the cache is retired, and reused only once no view of it survives anywhere (``mmap.resize``
refuses while any buffer export is alive): a reader still holding a slice never sees it overwritten.
Thread-safe.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

ALIGN = mmap.PAGESIZE  # what O_DIRECT needs of lengths and offsets
HUGE = 2 << 20  # x86-64 transparent huge page


class ChunkBuffers:
    def __init__(self, keep: int = 8) -> None:
        self.keep = keep  # retired buffers kept for reuse (each one chunk)
        self._retired: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes rounded up to whole pages, starting on a huge page."""
        size = max(ALIGN, (size + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            for i, raw in enumerate(self._retired):
                if len(raw) == size + HUGE and _unviewed(raw):
                    return _aligned(self._retired.pop(i), size)
        raw = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            raw.madvise(mmap.MADV_HUGEPAGE)
        return _aligned(raw, size)

    def give(self, data: object) -> None:
        """Retire the buffer under ``data`` (a view of one from ``take``) now that its owner dropped it;
        anything else is left alone."""
        if isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap):
            with self._lock:
                self._retired.append(data.obj)
                if len(self._retired) > self.keep:
                    del self._retired[0]


def _aligned(raw: mmap.mmap, size: int) -> memoryview:
    probe = ctypes.c_char.from_buffer(raw)
    skip = -ctypes.addressof(probe) % HUGE
    del probe  # its buffer export would keep ``raw`` viewed for ever
    return memoryview(raw)[skip: skip + size]


def _unviewed(raw: mmap.mmap) -> bool:
    try:
        raw.resize(len(raw))  # refused while any view of it is alive; else a no-op
    except BufferError:
        return False
    return True
