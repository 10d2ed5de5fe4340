"""Range readers: where the loader's bytes come from.

A ``RangeReader`` reads byte ranges of one file into caller-owned buffers; a ``Source`` names files
(stat, list a directory, open a reader). Two backends:

* ``LocalSource`` / ``LocalFileReader``: plain paths, ``os.preadv`` scatter reads that release the GIL
  (so reads run in parallel threads). A kvfs FUSE mount path is a plain path too.
* ``ClientSource`` / ``ClientFileReader``: a connected ``kvfs.SyncClient``, no mount. A chunk whose
  replica is on this host is read in the calling thread, straight into the caller's buffers and
  verified (``kvfs.chunkio``): no hop to the client's event loop, no staging copy, so the loader's
  threads read chunks in parallel. Other chunks (and local ones that fail) go through ``read_into``,
  which fetches from chunkservers over TCP, fails over between replicas and reports bad ones.

Every reader has ``alignment``: the loader plans its spans on multiples of it (page size locally,
the chunk size through the client) so no read straddles a page or chunk boundary needlessly.

Error handling: readers raise ``OSError`` (short reads are ``EIO``); sources raise
``FileNotFoundError``/``NotADirectoryError`` like the os module.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import TYPE_CHECKING, Protocol

from kvfs import protocol as P
from kvfs.chunkfiles import ChunkFiles
from kvfs.chunkio import OpenChunks, read_local_chunk
from kvfs.protocol import CHECKSUM_BLOCK as BLOCK

if TYPE_CHECKING:
    from kvfs.client import SyncClient

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# preadv takes at most IOV_MAX buffers per call.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class RangeReader(Protocol):
    name: str
    size: int
    alignment: int
    local_path: str | None  # a path the OS can open (kvikio needs one), or None

    def readv_into(self, offset: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` in order with the file's bytes from ``offset`` on (exactly, or raise EIO)."""

    def close(self) -> None: ...


class Source(Protocol):
    def open(self, path: str) -> RangeReader: ...

    def is_dir(self, path: str) -> bool: ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def read_bytes(self, path: str) -> bytes: ...

    def join(self, *parts: str) -> str: ...

    def dirname(self, path: str) -> str: ...


def _short(name: str, offset: int, want: int, got: int) -> OSError:
    return OSError(errno.EIO, f"{name}: short read at offset {offset} ({got} of {want} bytes; file changed?)")


class LocalFileReader:
    """A local (or FUSE-mounted) file read with ``os.preadv`` into the caller's buffers."""

    def __init__(self, path: str):
        self.name = path
        self.local_path: str | None = path
        self.alignment = PAGE
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(self._fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            self.size = st.st_size
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self._fd)
            raise

    def readv_into(self, offset: int, bufs: list[memoryview]) -> None:
        bufs = [b for b in bufs if len(b)]
        while bufs:
            batch = bufs[:IOV_MAX]
            want = sum(len(b) for b in batch)
            got = os.preadv(self._fd, batch, offset)
            if got < want:
                if got <= 0:
                    raise _short(self.name, offset, want, got)
                # Partial read (signals, FUSE request limits): continue after what arrived.
                rest: list[memoryview] = []
                skip = got
                for b in batch:
                    if skip >= len(b):
                        skip -= len(b)
                        continue
                    rest.append(b[skip:])
                    skip = 0
                bufs = rest + bufs[len(batch):]
            else:
                bufs = bufs[len(batch):]
            offset += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalSource:
    def open(self, path: str) -> LocalFileReader:
        return LocalFileReader(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path)


class ClientFileReader:
    """A kvfs file read through the client library (no mount). Thread-safe: each range is one call."""

    def __init__(self, client: SyncClient, path: str):
        self.name = f"kvfs:{path}"
        self.local_path = None
        self._client = client
        self._staging = threading.local()
        attr = client.resolve(path)
        if stat.S_ISDIR(attr.mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        self.ino = attr.ino
        st = client.open(attr.ino)
        self._open = True
        self.size = st.size
        self.alignment = int(st.chunk_size)  # the file's own (kvfs/layout.py): reads split at its chunks
        self._chunk_size = int(st.chunk_size)
        # Chunk files on this host, read directly (None: no short-circuit, e.g. local_reads=False).
        self._local: dict | None = None
        self._files = OpenChunks()
        if client.client.options.local_reads:
            found = client.call(_local_chunks, client.client, attr.ino)
            if found is not None and any(v is not None for v in found[1].values()):
                self._chunk_size, self._local = found
        # Otherwise large chunk reads go over TCP straight from the calling thread (kvfs.rpc_blocking),
        # not through the client's event loop: one hop less per chunk, and the loader's threads
        # receive and verify in parallel. None: the event loop's path (thread_read_min=0, or no map).
        self._remote: dict[int, P.ChunkRef] | None = None
        self._direct_min = client.client.options.thread_read_min
        if self._local is None and self._direct_min:
            self._remote = client.call(_remote_chunks, client.client, attr.ino)

    def chunk_files(self, open_file) -> ChunkFiles | None:
        """The file as its chunk files on this host, for kvikio (``kvfs.chunkfiles``: reads that skip the
        chunk checksums), or None when some chunk has no replica here or short-circuit reads are off."""
        if self._local is None or self.size == 0:
            return None
        count = (self.size + self._chunk_size - 1) // self._chunk_size
        if any(self._local.get(i) is None for i in range(count)):
            return None
        return ChunkFiles(self.name, self._chunk_size, dict(self._local), self.size, open_file)

    def readv_into(self, offset: int, bufs: list[memoryview]) -> None:
        if self._local is not None or self._remote is not None:
            read = self._read_chunk if self._local is not None else self._read_chunk_tcp
            pos = offset
            for index, in_chunk, views in _per_chunk(offset, [b for b in bufs if len(b)], self._chunk_size):
                read(index, in_chunk, views, pos)
                pos += sum(len(v) for v in views)
            return
        self._read_via_client(offset, [b for b in bufs if len(b)])

    def _read_chunk_tcp(self, index: int, in_chunk: int, views: list[memoryview], file_offset: int) -> None:
        """One chunk range from its first replica over TCP in this thread, verified (kvfs.rpc_blocking). Any
        failure goes to the client's path, which renews tokens, fails over and reports bad replicas."""
        assert self._remote is not None
        ref = self._remote.get(index)
        want = sum(len(v) for v in views)
        if ref is None or not ref.replicas or want < self._direct_min or in_chunk + want > ref.length:
            self._read_via_client(file_offset, views)
            return
        aligned = in_chunk % BLOCK == 0 and len(views) == 1 and (want % BLOCK == 0 or in_chunk + want == ref.length)
        into = views[0] if aligned else self._scratch(want + 2 * BLOCK)
        address = ref.replicas[0]
        try:
            reply, data = self._client.client._thread_chunkserver(address).read(  # verified as it arrives
                P.ReadChunk(ref.chunk_id, in_chunk, want, ref.token), into)
            skip = in_chunk - reply.data_offset
            if len(data) - skip < want:
                raise OSError(errno.EIO, f"chunk {ref.chunk_id:x} on {address}: short read")
        except OSError:
            self._read_via_client(file_offset, views)
            return
        if not aligned:
            pos = skip
            for v in views:
                v[:] = data[pos:pos + len(v)]
                pos += len(v)

    def _scratch(self, n: int) -> memoryview:
        staging = getattr(self._staging, "buf", None)
        if staging is None or len(staging) < n:
            staging = self._staging.buf = bytearray(n)
        return memoryview(staging)[:n]

    def _read_chunk(self, index: int, in_chunk: int, views: list[memoryview], file_offset: int) -> None:
        assert self._local is not None
        local = self._local.get(index)
        want = sum(len(v) for v in views)
        if local is not None and in_chunk + want <= local.length:
            try:
                read_local_chunk(local.path, local.sums_path, local.chunk_id, local.address, in_chunk, views,
                                 self._files)
                return
            except OSError:
                # Corrupt, missing or moved: the client's path retries other replicas and reports it.
                self._local.pop(index, None)
                self._files.drop(local.path)
        self._read_via_client(file_offset, views)

    def _read_via_client(self, offset: int, bufs: list[memoryview]) -> None:
        if not bufs:
            return
        if len(bufs) == 1:
            want = len(bufs[0])
            got = self._client.read_into(self.ino, offset, bufs[0])
            if got != want:
                raise _short(self.name, offset, want, got)
            return
        # Several buffers: one read into a per-thread staging buffer, then copy out.
        want = sum(len(b) for b in bufs)
        view = self._scratch(want)
        got = self._client.read_into(self.ino, offset, view)
        if got != want:
            raise _short(self.name, offset, want, got)
        pos = 0
        for b in bufs:
            b[:] = view[pos: pos + len(b)]
            pos += len(b)

    def close(self) -> None:
        self._files.close()
        if self._open:
            self._open = False
            self._client.release(self.ino)


async def _local_chunks(client, ino: int):
    return client.local_chunks(ino)


async def _remote_chunks(client, ino: int) -> dict[int, P.ChunkRef] | None:
    """The open file's committed chunk map (index -> ref with replicas and read token), or None when
    this client holds uncommitted writes to it."""
    st = client.files.get(ino)
    if st is None or st.modified or st.dirty or st.uploaded:
        return None
    return dict(st.chunks)


def _per_chunk(offset: int, bufs: list[memoryview], chunk_size: int):
    """Split consecutive buffers holding file bytes from ``offset`` into (chunk index, offset in
    chunk, views) per chunk, cutting buffers at chunk boundaries (views, never copies)."""
    out: list[tuple[int, int, list[memoryview]]] = []
    pos = offset
    for b in bufs:
        done = 0
        while done < len(b):
            index, in_chunk = divmod(pos, chunk_size)
            n = min(len(b) - done, chunk_size - in_chunk)
            if out and out[-1][0] == index:
                out[-1][2].append(b[done:done + n])
            else:
                out.append((index, in_chunk, [b[done:done + n]]))
            done += n
            pos += n
    return out


class ClientSource:
    """Paths are kvfs namespace paths (``/models/llama``) read through ``client``."""

    def __init__(self, client: SyncClient):
        self.client = client

    def open(self, path: str) -> ClientFileReader:
        return ClientFileReader(self.client, path)

    def is_dir(self, path: str) -> bool:
        return stat.S_ISDIR(self.client.resolve(path).mode)

    def exists(self, path: str) -> bool:
        try:
            self.client.resolve(path)
            return True
        except FileNotFoundError:
            return False

    def listdir(self, path: str) -> list[str]:
        return list(self.client.listdir(path))

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.client.read_file(path))

    def join(self, *parts: str) -> str:
        return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])

    def dirname(self, path: str) -> str:
        return path.rstrip("/").rpartition("/")[0] or "/"
