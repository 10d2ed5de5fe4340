"""The client's chunk cache and read-ahead (a part of ``kvfs.Client``, kvfs/client.py).

Readers of less than a chunk at a time get whole chunks: fetched once, verified, kept in the file's
cache (``ClientOptions.cache_chunks`` at most: ``read_cache_chunks``, but never fewer than the
read-ahead window and the chunk being read) and served from there; the mount replies
straight from that memory (``read_buffer``). A reader is sequential when a read starts where its
previous one ended; ahead of it, up to ``prefetch_chunks`` chunks are fetched at once in the
background, so disk and network reads overlap with serving it. Memory is bounded per open file by
``cache_chunks + prefetch_chunks`` chunks; a reader that jumps stops the read-ahead (only reads
that continue the previous one start it). A failed prefetch is only logged: the read that needs the
chunk fetches it again, through the replicas in turn, and that read alone gets the error.

A chunk with a replica on this host is read whole from its chunk file with ``O_DIRECT`` in a worker
thread (kvfs.chunkio.read_chunk_direct): the page cache fill and copy of a buffered read cost about as
much CPU as the rest of serving the mount's reads (reading 1 GiB of chunk files cold on the 2-CPU
test VM: 0.5 CPU seconds buffered, 0.1 with O_DIRECT).
"""

from __future__ import annotations

import logging

import trio

from kvfs import protocol as P
from kvfs.chunkio import read_chunk_direct
from kvfs.client_types import FileState
from kvfs.tasks import run_in_thread

log = logging.getLogger("kvfs.client")


class ClientPrefetch:
    """Mixed into Client: uses its options, nursery, I/O limiter and the read path's ``_fetch``."""

    def _read_ahead(self, st: FileState, end: int, sequential: bool, small: bool) -> None:
        """Called for every read of ``st`` (ending at ``end``) before it is served: note where the
        reader is and, for a sequential reader of less than a chunk at a time, start fetching the
        chunks after ``end``."""
        st.last_read_end = end
        if not (sequential and small and self.options.prefetch and self._nursery is not None):
            return
        cs = st.chunk_size
        first = (end + cs - 1) // cs
        for index in range(first, min(first + self.options.prefetch_chunks, (st.size + cs - 1) // cs)):
            if index in st.cache or index in st.prefetching or index in st.dirty or index in st.inflight:
                continue
            ref = st.ref(index)
            if ref is not None:
                # Claimed now, not when the task first runs: a read served from the cache does not yield,
                # so the next one would otherwise start the same chunks again (4 tasks per chunk).
                st.prefetching[index] = trio.Event()
                try:
                    self._nursery.start_soon(self._prefetch, st, index, ref)
                except RuntimeError:  # the client is closing: no read-ahead
                    st.prefetching.pop(index).set()
                    return

    async def _prefetch(self, st: FileState, index: int, ref: P.ChunkRef) -> None:
        try:
            await self._fill_chunk(st, index, ref)
        except OSError as exc:
            log.debug("prefetch of chunk %d failed: %s", ref.chunk_id, exc)

    async def _load_chunk(self, st: FileState, index: int, ref: P.ChunkRef) -> bytes | None:
        """The whole chunk, verified and cached: one fetch however many readers (and the prefetcher)
        want it at once. None when it changed meanwhile or the fetch another task was doing failed."""
        loading = st.prefetching.get(index)
        if loading is not None:
            await loading.wait()
            return st.cache.get(index)
        st.prefetching[index] = trio.Event()
        return await self._fill_chunk(st, index, ref)

    async def _fill_chunk(self, st: FileState, index: int, ref: P.ChunkRef) -> bytes | None:
        """Fetch and cache chunk ``index``, claimed by the caller in ``st.prefetching``; wake its waiters."""
        done = st.prefetching[index]
        try:
            data = await self._fetch_chunk(ref)
            if st.ref(index) is not ref:
                return None
            self._cache_put(st, index, data)  # cached buffers are only read, never changed: no copy
            return data
        finally:
            del st.prefetching[index]
            done.set()

    async def _fetch_chunk(self, ref: P.ChunkRef) -> bytes:
        """A whole chunk, verified: from its chunk file on this host when there is one (O_DIRECT, in a
        worker thread). Any failure there goes the general way (``_fetch``), which reads that replica
        again, reports it if it is corrupt and tries the others."""
        local = self.local_chunk(ref)
        if local is not None:
            try:
                view = await run_in_thread(read_chunk_direct, local.path, local.sums_path, ref.chunk_id,
                                           local.address, ref.length, self._local_sums, self._chunk_buffers,
                                           limiter=self._io)
                return view  # type: ignore[return-value]  # a read-only buffer, used as bytes
            except OSError as exc:
                log.debug("direct read of chunk %x failed (%s): reading it the general way", ref.chunk_id, exc)
        data = bytearray(ref.length)
        await self._fetch(ref, 0, memoryview(data))
        return data

    def _cache_put(self, st: FileState, index: int, data: bytes) -> None:
        st.cache[index] = data
        st.cache.move_to_end(index)
        if len(st.cache) <= self.options.cache_chunks:
            return
        # Evict by place, not by arrival: read-ahead chunks land in any order (the reader's own chunk
        # may land after those behind it), so the oldest arrival can be the chunk being read. Chunks
        # behind the reader go first, farthest first, then those farthest ahead.
        reader = max(st.last_read_end, 0) // st.chunk_size
        while len(st.cache) > self.options.cache_chunks:
            victim = max(st.cache, key=lambda i: (i < reader, abs(i - reader)))
            self._chunk_buffers.give(st.cache.pop(victim))
