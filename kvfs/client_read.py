"""The client's read path (a part of ``kvfs.Client``, kvfs/client.py): ranged reads split per chunk,
replica choice and failover, verified fetches over TCP or straight from chunk files on this host
(short-circuit), and remote-tier fills. The chunk cache and read-ahead: kvfs/client_prefetch.py."""

from __future__ import annotations

import errno
import logging
import os
import time

import trio

from kvfs import protocol as P
from kvfs.chunkio import ChecksumError, NotCached, read_local_chunk
from kvfs.chunkio import verify as _verify
from kvfs.client_types import BLOCK, FileState, LocalChunk, _ServerInfo
from kvfs.errors import error
from kvfs.tasks import open_nursery, run_in_thread

log = logging.getLogger("kvfs.client")


class ClientReads:
    """Mixed into Client: uses its open files (``self.files``), servers, meta connection and nursery."""

    def local_chunks(self, ino: int) -> tuple[int, dict[int, LocalChunk | None]] | None:
        """For short-circuit readers in other threads (kvfs.models): the open file's committed chunks as
        (chunk size, index -> LocalChunk, or None for a chunk with no replica on this host). None when
        the file has uncommitted writes in this client (its bytes are not all in chunk files)."""
        st = self.files.get(ino)
        if st is None or st.modified or st.dirty or st.uploaded:
            return None
        return st.chunk_size, {index: self.local_chunk(ref) for index, ref in st.chunks.items()}

    def local_chunk(self, ref: P.ChunkRef) -> LocalChunk | None:
        """The chunk file of a replica on this host, if there is one (short-circuit reads)."""
        from kvfs.chunkserver.store import SUM_SUFFIX, chunk_path

        for address in ref.replicas:
            info = self._servers.get(address)
            if info is not None and self._is_local(info):
                path = chunk_path(info.data_dir, ref.chunk_id)
                return LocalChunk(path, path + SUM_SUFFIX, ref.chunk_id, address, ref.length)
        return None

    # ------------------------------------------------------------------ reads

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        st = self._state(ino)
        end = min(offset + size, st.size)
        if end <= offset:
            return b""
        buf = bytearray(end - offset)
        await self._read_range(st, offset, memoryview(buf))
        return bytes(buf)

    async def read_into(self, ino: int, offset: int, into: memoryview) -> int:
        """Read into ``into`` (any writable buffer); returns bytes read (short at end of file)."""
        st = self._state(ino)
        view = memoryview(into).cast("B")
        n = max(0, min(len(view), st.size - offset))
        if n:
            await self._read_range(st, offset, view[:n])
        return n

    async def read_buffer(self, ino: int, offset: int, size: int, into: memoryview) -> memoryview:
        """Up to ``size`` bytes at ``offset`` (short at end of file): a read-only view of the file's
        cached, verified chunk when the range lies inside one (no copy; the view keeps that memory
        alive), else ``into`` filled (a writable buffer of at least ``size`` bytes)."""
        st = self._state(ino)
        n = max(0, min(size, st.size - offset))
        if not n:
            return memoryview(b"")
        out = memoryview(into).cast("B")[:n]
        view = await self._read_range(st, offset, out, view_ok=True)
        return view if view is not None else out

    def _state(self, ino: int) -> FileState:
        st = self.files.get(ino)
        if st is None:
            raise error(errno.EBADF, f"inode {ino} is not open")
        return st

    async def _fill_remote(self, st: FileState, first: int, last: int, sequential: bool = False) -> None:
        """Chunks missing inside the file's size may live in a remote store: fetch them (kvfs.remote)."""
        if not st.modified:
            from kvfs.remote.fill import fill

            await fill(self, st, first, last, sequential)

    async def _read_range(self, st: FileState, offset: int, out: memoryview,
                          view_ok: bool = False) -> memoryview | None:
        """Fill ``out`` with the bytes at ``offset``; with ``view_ok``, a range inside one cached chunk
        is returned as a view of it instead (``out`` untouched)."""
        cs = st.chunk_size
        end = offset + len(out)
        small = len(out) < cs
        sequential = offset == st.last_read_end
        self._read_ahead(st, end, sequential, small)
        await self._fill_remote(st, offset // cs, (end - 1) // cs, sequential)
        pieces = []
        pos = offset
        while pos < end:
            index = pos // cs
            in_chunk = pos - index * cs
            n = min(cs - in_chunk, end - pos)
            pieces.append((index, in_chunk, out[pos - offset: pos - offset + n]))
            pos += n
        if len(pieces) == 1:
            # Whole-chunk fetch pays off for sequential small reads, not for random ones.
            return await self._read_piece(st, *pieces[0], small=small and (sequential or pieces[0][1] == 0),
                                          view_ok=view_ok)
        async with open_nursery() as nursery:
            for piece in pieces:
                nursery.start_soon(self._read_piece, st, *piece, False)
        return None

    async def _refill_remote(self, st: FileState, index: int, ref: P.ChunkRef) -> bool:
        """A fetched copy of a remote object's chunk could not be read: fetch it again (kvfs.remote)."""
        if st.modified:
            return False
        from kvfs.remote.fill import refill

        return await refill(self, st, index, ref)

    async def _read_piece(self, st: FileState, index: int, in_chunk: int, out: memoryview, small: bool,
                          retry: bool = True, view_ok: bool = False) -> memoryview | None:
        """Fill ``out`` from chunk ``index`` at ``in_chunk``; or, with ``view_ok``, return a view of the
        cached chunk when it holds the whole range."""
        while index in st.inflight:  # its new contents are being uploaded: neither dirty nor a ref yet
            await st.upload_done.wait()
        buf = st.dirty.get(index)
        if buf is not None:
            _copy_with_zeros(buf, in_chunk, out)
            return None
        cached = st.cache.get(index)
        if cached is not None:
            return _serve(cached, in_chunk, out, view_ok)
        ref = st.ref(index)
        if ref is None or in_chunk >= ref.length:
            out[:] = bytes(len(out))
            return None
        try:
            if small or index in st.prefetching:
                # Small reads: fetch the whole chunk once, verified, and serve the following reads from it.
                try:
                    data = await self._load_chunk(st, index, ref)
                except OSError:
                    # Some of the chunk is unreadable (as when the read-ahead loaded it): read just
                    # this piece, so only reads of the bad part fail.
                    data = None
                if data is not None:
                    return _serve(data, in_chunk, out, view_ok)
            n = min(len(out), ref.length - in_chunk)
            await self._fetch(ref, in_chunk, out[:n])
        except OSError:
            # A clean copy of a remote object re-fetches what it cannot read (evicted, torn, lost);
            # any other file may have been rewritten by another client meanwhile.
            if not retry or not (await self._refill_remote(st, index, ref)
                                 or await self._refresh_after_rewrite(st, index, ref)):
                raise
            return await self._read_piece(st, index, in_chunk, out, small, retry=False, view_ok=view_ok)
        if n < len(out):
            out[n:] = bytes(len(out) - n)
        return None

    async def _refresh_after_rewrite(self, st: FileState, index: int, ref: P.ChunkRef) -> bool:
        """A committed chunk could not be read. If another client replaced the file since this one
        opened it (the old chunks get deleted), adopt the new chunk map and return True: a reader
        then sees the newer version (close-to-open promises no snapshot), instead of EIO."""
        if st.modified or st.chunks.get(index) is not ref:
            return False
        reply = await self.meta.request(P.META_GET_CHUNKS, P.GetChunks(st.ino))
        chunks = {c.index: c for c in reply.chunks}
        new = chunks.get(index)
        if (new is not None and new.chunk_id == ref.chunk_id) or st.modified or st.chunks.get(index) is not ref:
            return False
        log.info("inode %d changed under an open handle: reading the new version", st.ino)
        st.attr, st.chunks, st.size = reply.attr, chunks, reply.attr.size
        st.cache.clear()
        return True

    async def _fetch(self, ref: P.ChunkRef, offset: int, out: memoryview) -> None:
        """Read ``len(out)`` bytes of a chunk at ``offset`` from some replica, verified."""
        replicas = list(ref.replicas)
        if not replicas:
            replicas = await self._locate(ref)
        tried: set[str] = set()
        renewed = False
        while True:
            last = await self._fetch_from(ref, offset, out, [a for a in self._order_replicas(replicas)
                                                             if a not in tried], tried)
            if last is None:
                return
            # Every replica this client knew failed. The chunk map may be older than meta's view (a
            # holder came back, a copy was re-replicated elsewhere): ask meta where it is now.
            try:
                reply = await self.meta.request(P.META_CHUNK_LOCATIONS, P.ChunkLocations([ref.chunk_id]))
            except OSError:
                break
            if last.errno == errno.EACCES:
                # The capability expired while the file stayed open (or its key retired): take the
                # fresh one meta just sent, for this and later reads of the chunk, and try once more.
                if renewed or not reply.tokens:
                    raise last
                renewed = True
                ref.token = reply.tokens[0]
                tried.clear()
                replicas = reply.replicas[0] or replicas
                continue
            replicas = [a for a in reply.replicas[0] if a not in tried]
            if not replicas:
                break
        if last.errno != errno.EIO:  # e.g. ENOENT: the chunk is gone from a server
            last = error(errno.EIO, f"chunk {ref.chunk_id:x}: {last.strerror or last}")
        raise last

    async def _fetch_from(self, ref: P.ChunkRef, offset: int, out: memoryview, replicas: list[str],
                          tried: set[str]) -> OSError | None:
        """Try ``replicas`` in order; None once one served the range, else the last error."""
        last: OSError | None = None
        for address in replicas:
            tried.add(address)
            try:
                info = self._servers.get(address)
                if info is not None and self._is_local(info):
                    await self._fetch_local(info, ref, offset, out)
                else:
                    await self._fetch_remote(address, ref, offset, out)
                return None
            except ChecksumError as exc:
                log.error("%s", exc)
                last = error(errno.EIO, str(exc))
                try:
                    await self.meta.request(P.META_REPORT_BAD_CHUNK, P.ReportBadChunk(ref.chunk_id, address, str(exc)))
                except OSError:
                    pass
            except PermissionError as exc:
                return exc  # every replica checks the same capability
            except OSError as exc:
                log.warning("reading chunk %x from %s: %s", ref.chunk_id, address, exc)
                last = exc
        return last if last is not None else error(errno.EIO, f"chunk {ref.chunk_id:x}: no replica available")

    async def _locate(self, ref: P.ChunkRef) -> list[str]:
        """Replica addresses when meta has none yet (it restarted and servers are re-registering)."""
        chunk_id = ref.chunk_id
        deadline = trio.current_time() + min(self.options.timeout, 15.0)
        while True:
            reply = await self.meta.request(P.META_CHUNK_LOCATIONS, P.ChunkLocations([chunk_id]))
            if reply.replicas[0]:
                await self.refresh_servers()
                if reply.tokens:
                    ref.token = reply.tokens[0]
                return reply.replicas[0]
            if trio.current_time() > deadline:
                raise error(errno.EIO, f"chunk {chunk_id:x}: no live replica")
            await trio.sleep(0.25)

    def _is_local(self, info: _ServerInfo) -> bool:
        if not self.options.local_reads or info.host_id != self._host_id:
            return False
        # Whether its data dir is visible, checked once a second: a stat per read showed in profiles of
        # 1 MiB FUSE reads. A dir that vanishes meanwhile makes the read fail over like a missing chunk.
        now = time.monotonic()
        if now - info.visible_at > 1.0:
            info.visible, info.visible_at = os.path.isdir(info.data_dir), now
        return info.visible

    def _order_replicas(self, replicas: list[str]) -> list[str]:
        local = [a for a in replicas if (i := self._servers.get(a)) is not None and self._is_local(i)]
        return local + [a for a in replicas if a not in local]

    async def _fetch_remote(self, address: str, ref: P.ChunkRef, offset: int, out: memoryview) -> None:
        start = offset // BLOCK * BLOCK
        aligned = start == offset and (len(out) % BLOCK == 0 or offset + len(out) >= ref.length)
        into = out if aligned else memoryview(bytearray(offset + len(out) - start + BLOCK))
        request = P.ReadChunk(ref.chunk_id, offset, len(out), ref.token)

        def finish(reply: P.ReadChunkReply, data: memoryview | None, verified: bool = False) -> None:
            data = data if data is not None else memoryview(b"")
            if not verified:
                _verify(ref.chunk_id, address, data, reply.data_offset, reply.checksums, reply.chunk_length)
            skip = offset - reply.data_offset
            if len(data) - skip < len(out):
                raise error(errno.EIO, f"chunk {ref.chunk_id:x} on {address}: short read")
            if not aligned:
                out[:] = data[skip: skip + len(out)]

        if self.options.thread_read_min and len(out) >= self.options.thread_read_min:
            # Large reads: received and verified in a worker thread (kvfs/rpc_blocking.py), several at once.
            def work() -> None:
                finish(*self._thread_chunkserver(address).read(request, into), verified=True)

            await trio.to_thread.run_sync(work, limiter=self._read_threads)
            return
        finish(*await self._chunkserver(address).call(P.CHUNK_READ, request, into=into))

    async def _fetch_local(self, info: _ServerInfo, ref: P.ChunkRef, offset: int, out: memoryview) -> None:
        """Short-circuit read of a chunk file on this host, straight into ``out`` (kvfs.chunkio)."""
        from kvfs.chunkserver.store import SUM_SUFFIX, chunk_path

        path = chunk_path(info.data_dir, ref.chunk_id)

        def work(nowait: bool = False) -> None:
            read_local_chunk(path, path + SUM_SUFFIX, ref.chunk_id, info.address, offset, [out], nowait=nowait,
                             sums=self._local_sums)

        try:
            try:
                # From the page cache right here when it is there: a hand-off to a worker thread and
                # back costs more CPU than the copy and the check. Only a read that would wait for
                # the disk goes to a thread, so the event loop never does.
                work(nowait=True)
            except NotCached:
                await run_in_thread(work, limiter=self._io)
        except FileNotFoundError:
            raise error(errno.EIO, f"chunk {ref.chunk_id:x} missing from {info.data_dir}") from None


def _serve(src: bytes, offset: int, out: memoryview, view_ok: bool) -> memoryview | None:
    """``out``'s bytes from a cached chunk: a read-only view of it when allowed and it holds them all."""
    if view_ok and offset + len(out) <= len(src):
        return memoryview(src)[offset: offset + len(out)].toreadonly()
    _copy_with_zeros(src, offset, out)
    return None


def _copy_with_zeros(src: bytes | bytearray, offset: int, out: memoryview) -> None:
    avail = max(0, min(len(out), len(src) - offset))
    if avail:
        out[:avail] = memoryview(src)[offset: offset + avail]
    if avail < len(out):
        out[avail:] = bytes(len(out) - avail)


# --------------------------------------------------------------------------- blocking facade
