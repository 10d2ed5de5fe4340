"""Client-side read-through: fetch the missing chunks of a remote-backed file and cache them in kvfs.

``Client`` calls ``fill`` before reading a range. When the range holds chunks the file does not have
yet (inside its size) and meta says the file is a clean copy of a remote object, the chunks are
fetched with parallel ranged GETs (each chunk-aligned, pinned to the object's version with its ETag),
written to chunkservers like any chunk and recorded in meta (``META_REMOTE_FILL_COMMIT``), so later
reads, on this client or any other, are local. Sequential reads also fill a readahead window in the
background, so a large sequential read streams.

Error handling: a remote that is unreachable or too slow gives ``OSError(EIO)`` after the client
timeout, with a log line naming the object; a remote object that changed while being fetched gives
EIO too (the stale copy is never served; reopening the file sees the new version).
"""

from __future__ import annotations

import errno
import logging
import os
import weakref

import trio

from kvfs import protocol as P
from kvfs.client_write import written_ref
from kvfs.errors import error
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.remote")

READAHEAD_BYTES = int(os.environ.get("KVFS_REMOTE_READAHEAD", str(128 << 20)))
PARALLEL_GETS = int(os.environ.get("KVFS_REMOTE_PARALLEL_GETS", "8"))
STREAM_IDLE = 10.0  # seconds a readahead stream waits for its reader before closing
LANDING = 4  # chunks of one readahead stream being written to chunkservers at once
GET_BYTES = int(os.environ.get("KVFS_REMOTE_GET_BYTES", str(16 << 20)))  # consecutive chunks per ranged GET
# Fetched chunks are a cache of the remote object: written without fsync unless asked. A copy torn by
# a machine crash fails its checksums on read and is fetched again (``refill``).
FILL_FSYNC = os.environ.get("KVFS_REMOTE_FILL_FSYNC", "0") == "1"


class _Filler:
    def __init__(self, client) -> None:
        self.client = client
        self.info: dict[int, tuple[tuple[int, int], P.RemoteInfoReply | None]] = {}
        self.inflight: dict[tuple[int, int], trio.Event] = {}
        self.gets = trio.CapacityLimiter(PARALLEL_GETS)
        self.streams: dict[int, _Sequential] = {}

    async def remote_info(self, st) -> P.RemoteInfoReply | None:
        stamp = (st.attr.mtime_ns, st.attr.size)
        hit = self.info.get(st.ino)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            info = await self.client.meta.request(P.META_REMOTE_INFO, P.RemoteInfo(st.ino))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            info = None
        if info is not None and (not info.fillable or info.size != st.size):
            info = None
        self.info[st.ino] = (stamp, info)
        return info

    async def fetch(self, st, info: P.RemoteInfoReply, indexes: list[int], *, cache: bool) -> None:
        from kvfs.remote import open_store
        from kvfs.remote.store import read_range

        client = self.client
        cs = st.chunk_size
        events = {}
        for i in indexes:
            events[i] = self.inflight[(st.ino, i)] = trio.Event()
        try:
            alloc = await client.meta.request(P.META_REMOTE_FILL_ALLOC, P.RemoteFillAlloc(st.ino, len(indexes), cs))
            store = open_store(info.url)
            got: dict[int, tuple[P.ChunkRef, memoryview]] = {}
            failures: list[OSError] = []

            async def store_chunk(index: int, a: P.AllocChunkReply, data: memoryview) -> None:
                try:
                    await client.write_chunk(a, data, durable=FILL_FSYNC)
                    got[index] = (written_ref(index, a, len(data)), data)
                except OSError as exc:
                    failures.append(exc)

            async def one_get(run: list[tuple[int, P.AllocChunkReply]]) -> None:
                # One ranged GET for a run of consecutive chunks: per-request cost dominates small GETs.
                start = run[0][0] * cs
                length = min(cs * len(run), info.size - start)
                buf = memoryview(bytearray(length))
                try:
                    async with self.gets:
                        with trio.fail_after(client.options.timeout):
                            n = await trio.to_thread.run_sync(read_range, store, info.key, start, buf, info.etag,
                                                              abandon_on_cancel=True)
                    if n != length:
                        raise error(errno.EIO, f"{info.url}/{info.key}: short read at {start} "
                                               f"({n} of {length} bytes): the object changed?")
                    async with open_nursery() as writes:
                        for index, a in run:
                            off = index * cs - start
                            writes.start_soon(store_chunk, index, a, buf[off: off + min(cs, length - off)])
                except trio.TooSlowError:
                    failures.append(error(errno.EIO, f"{info.url}/{info.key}: no answer within "
                                                     f"{client.options.timeout:g}s"))
                except OSError as exc:
                    failures.append(exc)

            per_get = max(1, GET_BYTES // cs)
            runs: list[list[tuple[int, P.AllocChunkReply]]] = []
            for index, a in zip(indexes, alloc.chunks, strict=True):
                if runs and runs[-1][-1][0] == index - 1 and len(runs[-1]) < per_get:
                    runs[-1].append((index, a))
                else:
                    runs.append([(index, a)])
            async with open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(one_get, run)
            if got:
                reply = await client.meta.request(P.META_REMOTE_FILL_COMMIT, P.RemoteFillCommit(
                    st.ino, info.etag, [ref for ref, _ in got.values()], cs))
                for ref in reply.chunks:
                    if not st.modified and st.ref(ref.index) is None:
                        st.chunks[ref.index] = ref
                        if cache and ref.index in got and ref.chunk_id == got[ref.index][0].chunk_id:
                            client._cache_put(st, ref.index, bytes(got[ref.index][1]))
            if failures:
                raise failures[0]
        except OSError as exc:
            self.info.pop(st.ino, None)
            if exc.errno == errno.ESTALE:
                log.error("%s/%s changed remotely while being read: not serving the stale copy", info.url, info.key)
                raise error(errno.EIO, f"{info.url}/{info.key}: changed remotely; reopen the file") from None
            log.error("cold read of %s/%s failed: %s", info.url, info.key, exc)
            raise error(errno.EIO, f"cold read of {info.url}/{info.key} failed: {exc.strerror or exc}") from None
        finally:
            for i, ev in events.items():
                self.inflight.pop((st.ino, i), None)
                ev.set()

    async def stream(self, st, info: P.RemoteInfoReply, seq: _Sequential) -> None:
        """Sequential readahead: ONE ranged GET from ``seq.start`` to the end of the object, each chunk
        stored and recorded as it arrives, staying at most a window ahead of the reader (the GET is
        paused by TCP flow control meanwhile) and abandoned when the reader goes away."""
        from kvfs.remote import open_store
        from kvfs.remote.store import read_full

        client = self.client
        cs = st.chunk_size
        count = (info.size + cs - 1) // cs
        window = max(1, READAHEAD_BYTES // cs)
        events = seq.events

        def register(upto: int) -> None:
            for i in range(seq.next, min(count, upto + 1)):
                if st.ref(i) is None and (st.ino, i) not in self.inflight:
                    events[i] = self.inflight[(st.ino, i)] = trio.Event()

        def done(i: int) -> None:
            ev = events.pop(i, None)
            if ev is not None:
                self.inflight.pop((st.ino, i), None)
                ev.set()

        async def may_read(index: int) -> bool:
            """Flow control, run in trio for the worker: wait until ``index`` is within the window."""
            seq.next = index
            while seq.alive and not st.modified:
                if index <= seq.reader + window:
                    register(seq.reader + window)
                    return True
                seq.progress = trio.Event()
                with trio.move_on_after(STREAM_IDLE) as idle:
                    await seq.progress.wait()
                if idle.cancelled_caught:
                    break  # the reader stopped: close the stream
            seq.alive = False
            return False

        async def land(index: int, a: P.AllocChunkReply, data: bytearray) -> None:
            try:
                if st.ref(index) is None:
                    await client.write_chunk(a, data, durable=FILL_FSYNC)
                    reply = await client.meta.request(P.META_REMOTE_FILL_COMMIT, P.RemoteFillCommit(
                        st.ino, info.etag, [P.ChunkRef(index, a.chunk_id, len(data), a.replicas)], cs))
                    for ref in reply.chunks:
                        if not st.modified and st.ref(ref.index) is None:
                            st.chunks[ref.index] = ref
                            if ref.chunk_id == a.chunk_id and index <= seq.reader + client.options.read_cache_chunks // 2:
                                # The reader is waiting for this chunk (or nearly): hand it the bytes in
                                # hand instead of reading them back from the chunkserver.
                                client._cache_put(st, index, data)
            finally:
                done(index)

        try:
            store = open_store(info.url)
            start = seq.start * cs
            token = trio.lowlevel.current_trio_token()
            landing = trio.Semaphore(LANDING)  # chunks received, being stored: the GET keeps streaming
            failures: list[OSError] = []
            allocs: list[P.AllocChunkReply] = []

            async def next_alloc() -> P.AllocChunkReply:
                if not allocs:
                    reply = await client.meta.request(P.META_REMOTE_FILL_ALLOC, P.RemoteFillAlloc(st.ino, 8, cs))
                    allocs.extend(reply.chunks)
                return allocs.pop(0)

            async with open_nursery() as nursery:

                async def land_one(index: int, a: P.AllocChunkReply, data: bytearray) -> None:
                    try:
                        await land(index, a, data)
                    except OSError as exc:
                        failures.append(exc)
                        seq.alive = False
                    finally:
                        landing.release()

                async def hand_over(index: int, data: bytearray) -> None:
                    a = await next_alloc()
                    await landing.acquire()
                    nursery.start_soon(land_one, index, a, data)

                def worker() -> None:
                    body = store.open_range(info.key, start, info.size - start, info.etag)
                    try:
                        for index in range(seq.start, count):
                            if failures or not trio.from_thread.run(may_read, index, trio_token=token):
                                return
                            buf = bytearray(min(cs, info.size - index * cs))
                            if read_full(body, memoryview(buf)) != len(buf):
                                raise error(errno.EIO, f"{info.url}/{info.key}: short read at {index * cs}")
                            trio.from_thread.run(hand_over, index, buf, trio_token=token)
                    finally:
                        body.close()

                await trio.to_thread.run_sync(worker, abandon_on_cancel=True)
            if failures:
                raise failures[0]
        except (OSError, trio.RunFinishedError) as exc:
            # Readers fetch what they need on demand (slower: ranged GETs); say so once per stream.
            log.warning("remote readahead of %s/%s stopped: %s", info.url, info.key, exc)
        finally:
            seq.alive = False
            for i in list(events):
                done(i)


class _Sequential:
    """One file's sequential readahead stream."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.next = start
        self.reader = start
        self.alive = True
        self.progress = trio.Event()
        self.events: dict[int, trio.Event] = {}  # chunks this stream will deliver: set when landed or abandoned

    def advance(self, last: int) -> None:
        if last > self.reader:
            self.reader = last
            self.progress.set()


_fillers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def fill(client, st, first: int, last: int, sequential: bool) -> None:
    """Make chunks ``first..last`` of open file ``st`` present if they only exist remotely."""
    cs = st.chunk_size
    count = (st.size + cs - 1) // cs
    last = min(last, count - 1)

    def missing(i: int) -> bool:
        return st.ref(i) is None and i not in st.dirty

    need = [i for i in range(first, last + 1) if missing(i)]
    sequential = sequential or first == 0  # a read from the start of a file is how whole-file reads begin
    f = _filler(client)
    seq = f.streams.get(st.ino)
    if seq is not None and seq.alive:
        seq.advance(last)
        if first > seq.next + max(1, READAHEAD_BYTES // cs):
            seq.alive = False  # the reader jumped far ahead of the stream: start over from there
            seq = None
    begin = None
    if sequential and (seq is None or not seq.alive):
        # Only a hole within the readahead window starts a stream now (a farther one starts it once the
        # reader comes near): looking to the end of the file on every read made reading a whole
        # file quadratic in its chunks.
        window = min(count, last + 1 + max(1, READAHEAD_BYTES // cs))
        begin = first if need else next((i for i in range(_checked(st, last + 1), window) if missing(i)), None)
        if begin is None:
            st.holes_checked = (st.chunks, len(st.chunks), st.version, st.size, window)
    if not need and begin is None:
        return
    info = await f.remote_info(st)
    if info is None:
        return  # not remote-backed: missing chunks are holes and read as zeros
    if begin is not None and client._nursery is not None:
        seq = f.streams[st.ino] = _Sequential(begin)
        seq.advance(last)
        for i in range(begin, last + 1):  # the chunks needed now come first in the stream: wait for them
            if missing(i) and (st.ino, i) not in f.inflight:
                seq.events[i] = f.inflight[(st.ino, i)] = trio.Event()
        client._nursery.start_soon(f.stream, st, info, seq)
    for attempt in range(2):
        todo = [i for i in need if missing(i) and (st.ino, i) not in f.inflight]
        waits = [f.inflight[(st.ino, i)] for i in need if (st.ino, i) in f.inflight]
        if todo:
            await f.fetch(st, info, todo, cache=True)
        for ev in waits:
            await ev.wait()
        need = [i for i in need if missing(i)]  # a background fill we waited for may have failed
        if not need:
            return
    raise error(errno.EIO, f"{info.url}/{info.key}: chunks {need[:4]} could not be fetched")


def _checked(st, start: int) -> int:
    """Where a look for holes from ``start`` on must begin: past the chunks already found present, while
    the file's chunk map, version and size are the ones they were found in."""
    seen = st.holes_checked
    if seen is not None and seen[0] is st.chunks and seen[1:4] == (len(st.chunks), st.version, st.size):
        return max(start, seen[4])
    return start


async def refill(client, st, index: int, ref: P.ChunkRef) -> bool:
    """Chunk ``index`` of clean remote-backed file ``st`` could not be read from any replica: have meta
    forget it and fetch it from the remote again. False when the file is not a clean remote copy."""
    f = _filler(client)
    try:
        info = await f.remote_info(st)
    except OSError:
        return False
    if info is None:
        return False
    if st.chunks.get(index) is ref:  # else: replaced meanwhile (by a fill); just read again
        log.warning("%s/%s: cached chunk %d unreadable; fetching it from the remote again", info.url, info.key,
                    index)
        try:
            await client.meta.request(P.META_REMOTE_REFILL, P.RemoteRefill(st.ino, info.etag, [ref]))
        except OSError:
            return False
        st.chunks.pop(index, None)
        st.cache.pop(index, None)
    await fill(client, st, index, index, False)
    return st.ref(index) is not None


def _filler(client) -> _Filler:
    f = _fillers.get(client)
    if f is None:
        f = _fillers[client] = _Filler(client)
    return f
