"""The client's write path (a part of ``kvfs.Client``, kvfs/client.py): per-chunk write buffers,
background uploads down replica chains, the commit that publishes a file's new size and chunks
(close-to-open), and truncation."""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

import trio

from kvfs import protocol as P
from kvfs.client_types import FileState
from kvfs.errors import error

log = logging.getLogger("kvfs.client")

BORN_MTIME_WINDOW = 2.0  # seconds after its create in which a new file's first commit keeps its mtime


def written_ref(index: int, alloc: P.AllocChunkReply, length: int) -> P.ChunkRef:
    """The ref of a chunk this client just wrote (its write capability also reads it back)."""
    return P.ChunkRef(index, alloc.chunk_id, length, alloc.replicas, alloc.token)


class ClientWrites:
    """Mixed into Client: uses its open files (``self.files``), meta connection, upload slots and nursery."""

    async def write(self, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        st = self._state(ino)
        if not st.writable:
            raise error(errno.EBADF, "file not open for writing")
        if st.upload_error is not None:
            exc, st.upload_error = st.upload_error, None
            raise exc
        if not st.leased:
            await self._lease(st)
        view = memoryview(data).cast("B")
        cs = st.chunk_size
        pos = offset
        end = offset + len(view)
        while pos < end:
            index = pos // cs
            in_chunk = pos - index * cs
            n = min(cs - in_chunk, end - pos)
            buf = await self._dirty_chunk(st, index, in_chunk == 0 and n == cs)
            if len(buf) < in_chunk:
                buf.extend(bytes(in_chunk - len(buf)))
            buf[in_chunk: in_chunk + n] = view[pos - offset: pos - offset + n]
            pos += n
            st.size = max(st.size, pos)
            if in_chunk + n == cs:
                # The chunk is written to its end: upload it now so large writes stream.
                await self._start_upload(st, index)
        st.modified = True
        st.version += 1
        st.cache.clear()
        return len(view)

    async def _lease(self, st: FileState) -> None:
        """Take the write lease (EBUSY while another client writes the file). A file this client
        created is leased here, at its first write: if another client wrote it since the create, this
        writer starts from that version (close-to-open), as if it had opened the file now."""
        async with st.leasing:
            if st.leased:
                return
            reply = await self.meta.request(P.META_OPEN_WRITE, P.OpenWrite(st.ino, self.client_id))
            st.leased = True
            now = reply.attr
            if now is not None and not st.modified and (now.size, now.mtime_ns) != (st.attr.size, st.attr.mtime_ns):
                chunks = await self.meta.request(P.META_GET_CHUNKS, P.GetChunks(st.ino))
                st.attr, st.chunks, st.size = chunks.attr, {c.index: c for c in chunks.chunks}, chunks.attr.size
                st.chunk_size = chunks.chunk_size
                st.cache.clear()
                if st.size:
                    await self._fill_remote(st, 0, (st.size - 1) // st.chunk_size)

    async def _dirty_chunk(self, st: FileState, index: int, whole: bool) -> bytearray:
        buf = st.dirty.get(index)
        if buf is not None:
            return buf
        while index in st.inflight:  # its new contents are being uploaded: build on them
            await st.upload_done.wait()
        buf = st.dirty.get(index)
        if buf is not None:
            return buf
        buf = bytearray()
        ref = st.ref(index)
        if ref is not None and not whole and ref.length:
            base = bytearray(min(ref.length, max(st.size - index * st.chunk_size, 0)))
            if base:
                await self._fetch(ref, 0, memoryview(base))
                # A copy: a worker thread of the fetch may still hold a view of ``base`` for a moment,
                # and a dirty buffer must stay resizable (BufferError on extend/truncate otherwise).
                base = bytearray(base)
                if index in st.dirty or index in st.inflight or st.ref(index) is not ref:
                    # A concurrent write to this chunk (the kernel sends several at once with
                    # --writeback-cache) loaded it meanwhile: build on its buffer, not on our stale base.
                    return await self._dirty_chunk(st, index, whole)
            buf = base
        st.dirty[index] = buf
        return buf

    async def _start_upload(self, st: FileState, index: int) -> None:
        buf = st.dirty.pop(index)
        st.inflight.add(index)
        await self._upload_slots.acquire()
        st.uploads += 1
        if st.upload_done.is_set():
            st.upload_done = trio.Event()

        async def run() -> None:
            try:
                ref = await self._upload(st.ino, index, buf)
                if index not in st.dirty and index * st.chunk_size < st.size:
                    st.uploaded[index] = ref
                    st.cache.pop(index, None)  # a read during the upload may have cached the old chunk
            except OSError as exc:
                st.upload_error = exc
                st.dirty.setdefault(index, buf)  # keep the data: a later flush retries
            finally:
                st.inflight.discard(index)
                self._upload_slots.release()
                st.uploads -= 1
                if st.uploads == 0:
                    st.upload_done.set()

        assert self._nursery is not None, "Client.connect() was not called"
        self._nursery.start_soon(run)

    async def _upload(self, ino: int, index: int, data: bytearray | bytes) -> P.ChunkRef:
        """Write one immutable chunk of open file ``ino`` to a fresh replica chain."""
        return await self.upload_chunk(index, data, P.META_ALLOC_CHUNK, P.AllocChunk(ino, self.client_id, len(data)))

    async def write_chunk(self, alloc: P.AllocChunkReply, data: bytearray | bytes | memoryview,
                          sums: list[int] | None = None, durable: bool = True) -> None:
        """Write an allocated chunk down its replica chain (acked once every replica has it);
        ``durable=False`` for a cache of data that lives elsewhere (P.WriteChunk)."""
        from kvfs.chunkserver.store import block_checksums

        await self._chunkserver(alloc.replicas[0]).call(P.CHUNK_WRITE, P.WriteChunk(
            alloc.chunk_id, block_checksums(data) if sums is None else sums, alloc.replicas[1:], durable,
            alloc.token), data)

    async def upload_chunk(self, index: int, data: bytearray | bytes | memoryview, alloc_method: int,
                           alloc_request: Any) -> P.ChunkRef:
        """Allocate a chunk with ``alloc_method`` (META_ALLOC_CHUNK for an open file, META_KV_ALLOC for
        a file published later) and write ``data`` to its replica chain; on a failure, retries on a
        new chain (a few times, backing off). Error handling: ENOSPC at once; else the last OSError."""
        from kvfs.chunkserver.store import block_checksums

        sums = block_checksums(data)
        last: OSError | None = None
        for attempt in range(5):
            if attempt:
                await trio.sleep(0.5 * attempt)  # let meta notice a dead server before re-placing
            alloc = await self.meta.request(alloc_method, alloc_request)
            try:
                await self.write_chunk(alloc, data, sums)
                return written_ref(index, alloc, len(data))
            except OSError as exc:
                last = exc
                if exc.errno == errno.ENOSPC:
                    raise
                log.warning("chunk upload to %s failed (%s); retrying on a new chain", alloc.replicas, exc)
        assert last is not None
        raise last

    async def drop_write_lease(self, st: FileState) -> None:
        """Give the file's write lease back to meta (RELEASE_WRITE), if this client still holds it."""
        async with st.leasing:  # a new open's lease request waits for this release
            if not st.leased:
                return
            st.leased = False
            try:
                await self.meta.request(P.META_RELEASE_WRITE, P.ReleaseWrite(st.ino, self.client_id))
            except OSError as exc:
                log.warning("releasing write lease of inode %d: %s", st.ino, exc)

    async def flush(self, ino: int, *, release: bool = False) -> P.Attr:
        """Upload buffered data and commit size + chunk map: afterwards every client sees it.
        ``release``: the caller's handle is this client's last one on the file and is closing: the
        commit drops the write lease too (no RELEASE_WRITE after it; a later write takes it again)."""
        st = self._state(ino)
        if not st.modified:
            if release and st.leased and st.opens <= 1:
                # Nothing to commit (e.g. a create closed unwritten): drop the lease now, with the
                # close, not at the kernel's asynchronous RELEASE (a setxattr of the file's chunk size
                # right after close() would otherwise find it still being written: EBUSY).
                await self.drop_write_lease(st)
            return st.attr
        if not st.leased:  # writes that raced a commit which released the lease
            await self._lease(st)
        while st.uploads:
            await st.upload_done.wait()
        for index in sorted(st.dirty):
            if index * st.chunk_size < st.size:
                await self._start_upload(st, index)
            else:
                del st.dirty[index]
        while st.uploads:
            await st.upload_done.wait()
        if st.upload_error is not None:
            exc, st.upload_error = st.upload_error, None
            raise exc
        # Writes may arrive while the commit is in flight (another handle): commit a snapshot and
        # stay dirty unless nothing changed meanwhile.
        version, cut, committed = st.version, st.truncated_to, dict(st.uploaded)
        refs = [P.ChunkRef(i, r.chunk_id, r.length, []) for i, r in sorted(committed.items())]
        release = release and st.opens <= 1  # the closing handle at most: none opened meanwhile
        attr = await self.meta.request(P.META_COMMIT, P.Commit(ino, self.client_id, st.size, refs, _commit_mtime(st),
                                                               cut, release, st.chunk_size))
        st.born_mtime_ns = 0
        if release:
            st.leased = False
        self._changed(ino)
        if st.truncated_to == cut:
            st.truncated_to = -1
        for i, r in committed.items():
            st.chunks[i] = r
            if st.uploaded.get(i) is r:
                del st.uploaded[i]
        st.chunks = {i: r for i, r in st.chunks.items() if i * st.chunk_size < st.size}
        if st.version == version and not st.dirty and not st.uploaded and not st.uploads:
            st.modified = False
        st.attr = attr
        return attr

    fsync = flush

    async def truncate(self, ino: int, size: int) -> P.Attr:
        st = await self.open(ino, write=True)
        try:
            await self._truncate_state(st, size)
            return await self.flush(ino)
        finally:
            await self.release(ino)

    async def _truncate_state(self, st: FileState, size: int) -> None:
        if size < 0:
            raise error(errno.EINVAL, "negative size")
        while st.uploads:
            await st.upload_done.wait()
        cs = st.chunk_size
        if size < st.size and size % cs:
            index = size // cs
            if index in st.dirty:
                del st.dirty[index][size - index * cs:]
            elif st.ref(index) is not None:
                # Zero the tail of the new last chunk, so a later extension reads zeros.
                buf = await self._dirty_chunk(st, index, False)
                del buf[size - index * cs:]
        for index in [i for i in st.dirty if i * cs >= size]:
            del st.dirty[index]
        for index in [i for i in st.uploaded if i * cs >= size]:
            del st.uploaded[index]
        if size < st.size:
            st.truncated_to = size if st.truncated_to < 0 else min(st.truncated_to, size)
            # Committed chunks past the new end read as zeros from now on; the commit drops them.
            for index in [i for i in st.chunks if i * cs >= size]:
                del st.chunks[index]
        st.size = size
        st.modified = True
        st.version += 1
        st.cache.clear()


def _commit_mtime(st: FileState) -> int:
    """The mtime a commit sets: now, except for the first commit of a file this client created less
    than ``BORN_MTIME_WINDOW`` ago, which keeps its create mtime. Why: the kernel does not update a FUSE
    file's mtime on writes (without the writeback cache), so it still holds the create's; the first
    attributes it fetches with another mtime make it drop the file's page cache (``auto_inval_data``),
    i.e. the pages just written, which the next reader on this host then reads through the mount
    daemon (issue 11: a KV run read right after its put). Off by at most the window, and earlier, never
    later, than the last write (``make`` stays safe)."""
    if st.born_mtime_ns and time.monotonic() - st.born_at <= BORN_MTIME_WINDOW:
        return st.born_mtime_ns
    return time.time_ns()
