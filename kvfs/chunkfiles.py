"""A kvfs file as the chunk files that hold it on this host, for readers that take a path and an offset.

kvikio (``kvikio.CuFile``) reads files by path, straight into GPU memory (GPUDirect Storage where the
system has it, its own pinned bounce buffers and threads elsewhere). A kvfs file read through the
native client has no path, but each committed chunk whose replica is on this host is a plain file
whose byte ``i`` is the chunk's byte ``i``, and a committed chunk is never rewritten (a chunkserver
refuses to overwrite one). ``ChunkFiles`` maps a file range onto those chunk files so kvikio can read
them in parallel.

**These reads are not verified.** The bytes go from the chunk file to the caller's buffer (GPU memory)
without passing the chunk checksums: this is the documented kvikio route of kvfs's data path, taken
only when the caller asks for it (``LoadOptions(use_kvikio=True)`` with a client). Every other
route verifies every 64 KiB block (``kvfs.chunkio``). What still guards this one: the file's size and
chunk map come from meta, and a replica that fails any verified read is reported and dropped.

``open_file(path)`` returns an object with ``pread(buf, n, offset)`` returning something with
``get() -> bytes read``, and ``close()``: ``kvikio.CuFile`` on a GPU host; ``PosixFile`` here (host
memory, synchronous), which is how the mapping is tested without a GPU.

Error handling: ``OSError(ENXIO)`` when a chunk of the range has no replica on this host (the caller
reads through the verified path instead), ``OSError(EIO)`` for a short read.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from kvfs.client_types import LocalChunk
from kvfs.gds import wait_all


class PosixFile:
    """``kvikio.CuFile``'s ``pread`` shape over ``os.preadv`` into host memory (completed at once)."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, buf: Any, n: int, offset: int) -> _Done:
        if hasattr(buf, "numpy"):  # a CPU torch tensor (kvikio takes tensors too)
            buf = buf.numpy()
        view = memoryview(buf).cast("B")[:n]
        got = 0
        while got < n:
            k = os.preadv(self._fd, [view[got:]], offset + got)
            if k <= 0:
                break
            got += k
        return _Done(got)

    def close(self) -> None:
        os.close(self._fd)


class _Done:
    def __init__(self, n: int):
        self.n = n

    def get(self) -> int:
        return self.n


class _Pending:
    """Several chunk-file reads that make up one range: ``get`` waits for all, returns the bytes read."""

    def __init__(self, futures: list[Any]):
        self._futures = futures

    def get(self) -> int:
        return wait_all(self._futures, "chunk file read")


class OpenFileCache:
    """Open files shared by many ``ChunkFiles`` (a ``kvikio.CuFile`` open costs two ``open`` calls and
    kvikio's set-up, and a KV batch touches dozens of chunk files): used as their ``open_file``, it
    hands out leases on one handle per path. A lease's ``close`` returns it; handles nobody holds are
    closed, least recently used first, beyond ``capacity``. A committed chunk file never changes, so a
    kept handle reads the same bytes as a fresh one; a deleted one keeps its inode until closed."""

    def __init__(self, open_file: Callable[[str], Any], capacity: int = 1024):
        self._open_file = open_file
        self.capacity = capacity
        self._files: dict[str, list] = {}  # path -> [handle, leases held]; insertion order = recency
        self._lock = threading.Lock()

    def __call__(self, path: str) -> _Lease:
        with self._lock:
            entry = self._files.pop(path, None)
            if entry is not None:
                self._files[path] = entry  # most recently used last
                entry[1] += 1
                return _Lease(self, path, entry[0])
        handle = self._open_file(path)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                entry = self._files[path] = [handle, 0]
            else:  # another thread opened it meanwhile: use theirs
                handle.close()
            entry[1] += 1
            self._trim()
            return _Lease(self, path, entry[0])

    def _release(self, path: str) -> None:
        with self._lock:
            entry = self._files.get(path)
            if entry is not None:
                entry[1] -= 1
            self._trim()

    def _trim(self) -> None:
        over = len(self._files) - self.capacity
        if over <= 0:
            return
        for path in [p for p, e in self._files.items() if e[1] == 0][:over]:
            self._files.pop(path)[0].close()

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        """Close every handle nobody holds (call when no read is in flight)."""
        with self._lock:
            idle = [p for p, e in self._files.items() if e[1] == 0]
            for path in idle:
                self._files.pop(path)[0].close()


class _Lease:
    def __init__(self, cache: OpenFileCache, path: str, handle: Any):
        self._cache, self._path, self._handle = cache, path, handle

    def pread(self, buf: Any, n: int, offset: int) -> Any:
        return self._handle.pread(buf, n, offset)

    def close(self) -> None:
        if self._cache is not None:
            self._cache._release(self._path)
            self._cache = None


class ChunkFiles:
    """One kvfs file's chunk files on this host. Thread-safe; ``close`` closes what it opened."""

    def __init__(self, name: str, chunk_size: int, local: dict[int, LocalChunk | None], size: int,
                 open_file: Callable[[str], Any] = PosixFile):
        self.name = name
        self.chunk_size = chunk_size
        self.size = size
        self._local = local
        self.open_file = open_file  # may be replaced before the first read (kvfs.kv.device sets kvikio's)
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def first_path(self) -> str | None:
        """A chunk file's path (kvikio's settings depend on the file system it is on)."""
        return next((lc.path for lc in self._local.values() if lc is not None), None)

    def pieces(self, offset: int, length: int) -> list[tuple[LocalChunk, int, int, int]]:
        """[offset, offset + length) of the file as (chunk file, offset in it, bytes, offset in the range)."""
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{self.name}: range {offset}+{length} outside the file ({self.size} bytes)")
        out = []
        done = 0
        while done < length:
            index, in_chunk = divmod(offset + done, self.chunk_size)
            n = min(self.chunk_size - in_chunk, length - done)
            lc = self._local.get(index)
            if lc is None or in_chunk + n > lc.length:
                raise OSError(errno.ENXIO, f"{self.name}: chunk {index} has no replica on this host")
            out.append((lc, in_chunk, n, done))
            done += n
        return out

    def _file(self, path: str) -> Any:
        with self._lock:
            f = self._open.get(path)
            if f is None:
                f = self._open[path] = self.open_file(path)
            return f

    def pread(self, buf: Any, n: int, offset: int) -> _Pending:
        """Start reading file bytes [offset, offset + n) into ``buf[:n]``; ``get()`` on the result waits."""
        futures = []
        if isinstance(buf, (bytearray, memoryview)):
            buf = memoryview(buf).cast("B")  # slices of a view share its memory; a bytearray's would copy
        try:
            for lc, in_chunk, k, dest in self.pieces(offset, n):
                futures.append(self._file(lc.path).pread(buf[dest:dest + k], k, in_chunk))
        except BaseException:
            for fut in futures:  # never leave a read running into buf
                try:
                    fut.get()
                except Exception:  # noqa: BLE001, S110  (the first error is already propagating)
                    pass
            raise
        return _Pending(futures)

    def close(self) -> None:
        with self._lock:
            files, self._open = self._open, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> ChunkFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
