"""KV block files through the kvfs client library (``kvfs.SyncClient``): the fast path.

Puts and namespace calls run as coroutines in the client's trio thread; batches run there concurrently
under a limiter. Plain block reads mostly run on threads of their own (``kvfs.kv.native_cached``).

* put: the block's chunks are written to fresh chunk ids (META_KV_ALLOC), then META_KV_PUBLISH creates
  the file whole under its final name, never replacing one: a reader resolves either nothing or the
  whole block; the loser of a race gets "existed" and its chunks are dropped. Four round trips (lookup,
  alloc, chunk write, publish). In a remote-bound directory (meta answers EXDEV) the general path:
  create ``.<hash>.<random>.tmp``, write, commit, ``rename(RENAME_NOREPLACE)`` into place.
* read (``kvfs.kv.native_cached``): chunk maps of blocks read before are cached with the lease meta
  granted on them (meta/kv_leases.py); a batch whose maps are all cached starts reading at once, one
  verified C call per chunk straight into the caller's buffers, and needs no meta at all while the
  leases last; past them one META_KV_CHUNKS round trip beside the reads checks the maps are still
  current (and renews the leases). Otherwise that round trip comes first and the blocks whose
  chunks are on this host are read the same way. The rest (a chunk elsewhere, a failed read, a changed
  map) goes block by block through the client, which fails over and reports bad replicas.
* read with a lookup's chunk maps (``locate_many``, ``read_many(locations=...)``; KV runs, which the caller
  verifies byte for byte), no META_KV_CHUNKS round trip of their own: with ``payload_sums`` each run's
  local chunk file is read straight into ``out``, its blocks checked against the run's own sums as they
  land, in the calling thread and the read pool (``_read_local_checked``: no trio hop); else mapped
  (``_map_many_local``).
* kvikio route (``_read_landed``): the head is read here, the payload by the caller from the chunk files.
* exists_many: one META_KV_EXISTS round trip for a whole prompt (meta resolves the layout directory
  once, then one directory-entry lookup per block). locate_many: one META_KV_CHUNKS round trip, which
  also returns the files' chunk maps.

Error handling: OSErrors with errnos from the client; a missing block reads as None. A block evicted
between resolve and the chunk reads surfaces as a miss (the caller re-checks), never as partial data.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import trio

from kvfs import protocol as P
from kvfs.chunkfiles import ChunkFiles
from kvfs.chunkio import map_local_chunk, read_local_chunk
from kvfs.kv.backend import (SCRATCH, OnReady, PayloadSums, ReadResult, copy_into, in_parts, read_run_checked,
                              split_into)
from kvfs.kv.native_cached import CachedReads
from kvfs.tasks import open_nursery

GROUP_BYTES = 8 << 20  # map_local: about this many bytes of files mapped per worker-thread hop

RENAME_NOREPLACE = 1


class NativeBackend:
    def __init__(self, sync_client: Any, concurrency: int = 8):
        self.sync = sync_client
        self.c = sync_client.client  # the async kvfs.Client driven by sync_client's trio thread
        self.concurrency = concurrency
        self._dirs: dict[str, int] = {}  # directory path -> inode
        self._one_step = True  # META_KV_PUBLISH puts; off after meta refuses one (remote-bound directory)
        self._map_refused = False  # mlock refused once (RLIMIT_MEMLOCK without CAP_IPC_LOCK): read instead
        self._cached = CachedReads(self, concurrency)

    def _run(self, fn, *args):
        return self.sync.call(fn, *args)

    # ------------------------------------------------------------------ helpers (trio thread)

    async def _dir(self, path: str, create: bool) -> int:
        ino = self._dirs.get(path)
        if ino is None:
            if create:
                attr = await self.c.mkdir(path, parents=True, exist_ok=True)
            else:
                attr = await self.c.resolve(path)
            ino = self._dirs[path] = attr.ino
        return ino

    async def _unlink(self, parent: int, name: str) -> None:
        try:
            await self.c.unlink_at(parent, name, keep_open=list(self.c.files))  # purged in the same call
        except FileNotFoundError:
            return

    # ------------------------------------------------------------------ put

    def put(self, directory: str, name: str, header: bytes, payload: Sequence[memoryview],
            check_existing: bool) -> bool:
        return self._run(self._put, directory, name, header, payload, check_existing)

    async def _put(self, directory: str, name: str, header: bytes, payload: Sequence[memoryview],
                   check_existing: bool) -> bool:
        try:
            return await self._put_once(directory, name, header, payload, check_existing)
        except FileNotFoundError:
            # The cached directory inode went away (someone removed the directory): look it up again.
            self._dirs.pop(directory, None)
            return await self._put_once(directory, name, header, payload, check_existing)

    async def _put_once(self, directory: str, name: str, header: bytes, payload: Sequence[memoryview],
                        check_existing: bool) -> bool:
        d = await self._dir(directory, True)
        if check_existing:
            try:
                await self.c.lookup(d, name)
                return False
            except FileNotFoundError:
                pass
        if self._one_step:
            try:
                return await self._publish(d, name, header, payload)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._one_step = False  # a remote-bound directory: the general path below
        tmp = f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        attr = await self.c.mknode(d, tmp, stat.S_IFREG | 0o644, os.getuid(), os.getgid(), exclusive=True)
        published = False
        try:
            await self.c.open(attr.ino, write=True)
            try:
                await self.c.write(attr.ino, 0, header)
                pos = len(header)
                for view in payload:
                    await self.c.write(attr.ino, pos, view)
                    pos += len(view)
                await self.c.flush(attr.ino)
            finally:
                await self.c.release(attr.ino)
            try:
                await self.c.rename_at(d, tmp, d, name, RENAME_NOREPLACE)
                published = True
                return True
            except FileExistsError:
                return False
        finally:
            if not published:
                with trio.CancelScope(shield=True):
                    await self._unlink(d, tmp)

    async def _publish(self, d: int, name: str, header: bytes, payload: Sequence[memoryview]) -> bool:
        """The one-step put: chunks written to fresh pending chunk ids, then META_KV_PUBLISH creates the
        file whole under its final name (no temp file, no open/commit/rename), or reports it existed."""
        cs = self.c.chunk_size  # KV blocks are split by the cluster's chunk size (recorded with the file)
        # One copy of the block: the header and the tensor planes are separate buffers.
        whole = memoryview(b"".join([header, *(memoryview(v).cast("B") for v in payload)]))
        size = len(whole)
        chunks = [whole[start:start + cs] for start in range(0, size, cs)]
        refs: list[P.ChunkRef | None] = [None] * len(chunks)

        async def upload(i: int) -> None:
            refs[i] = await self.c.upload_chunk(i, chunks[i], P.META_KV_ALLOC, P.KVAlloc(len(chunks[i])))

        if len(chunks) == 1:
            await upload(0)
        else:
            async with open_nursery() as nursery:
                for i in range(len(chunks)):
                    nursery.start_soon(upload, i)
        reply = await self.c.meta.request(P.META_KV_PUBLISH, P.KVPublish(
            d, name, 0o644, os.getuid(), os.getgid(), size,
            [P.ChunkRef(r.index, r.chunk_id, r.length, []) for r in refs if r is not None], cs))
        return reply.created

    # ------------------------------------------------------------------ read

    def read(self, path: str, expect_size: int, header_len: int, out: Sequence[memoryview],
             touch_before_ns: int) -> ReadResult | None:
        res = self.read_many([(path, expect_size, header_len, out, touch_before_ns)])[0]
        if isinstance(res, OSError):
            raise res
        return res

    def read_many(self, jobs: Sequence[tuple], on_ready: OnReady | None = None,
                  map_local: bool = False, caller_verifies: bool = False,
                  locations: Sequence[Any] | None = None,
                  payload_digest: bool = False,
                  payload_sums: PayloadSums | None = None) -> list[ReadResult | None | OSError]:
        """``Backend.read_many``. ``locations``: ``locate_many``'s answers for the jobs' files (their chunk
        maps, fetched by a lookup moments ago, maybe by another client): with ``map_local`` and
        ``caller_verifies`` the files are mapped from them without asking meta again (a KV run is
        immutable and checked byte for byte against its own header and block sums by the caller, so a
        map meta has since replaced can only yield that run's verified bytes or a failed map); otherwise
        they seed the cached maps, so the reads start while meta confirms them. ``payload_digest``: blocks read
        from this host's chunk files come back hashed once, unchecked (``kvfs.kv.native_cached``)."""
        if not jobs:
            return []
        if locations is not None and (len(locations) != len(jobs)
                                      or not all(isinstance(loc, P.GetChunksReply) for loc in locations)):
            locations = None
        results: list[ReadResult | None | OSError] = [None] * len(jobs)

        def settle_from(idx: list[int]) -> OnReady:
            def settle(k: int, res: ReadResult | None | OSError) -> None:  # any thread
                results[idx[k]] = res
                if on_ready is not None:
                    on_ready(idx[k], res)
            return settle

        if map_local and all(len(j) == 5 for j in jobs):
            known = locations if caller_verifies else None  # else meta is asked again: its answer is relied on
            mapped = self._run(self._map_many_local, jobs, not caller_verifies, known)
            if mapped is None and known is not None:  # e.g. a chunk file gone: the run changed since the lookup
                mapped = self._run(self._map_many_local, jobs, not caller_verifies)
            if mapped is not None:
                everyone = list(range(len(jobs)))
                for i, res in enumerate(mapped):
                    settle_from(everyone)(i, res)
                return results
        if payload_sums is not None and caller_verifies and locations is not None and all(len(j) == 5 for j in jobs):
            checked = self._read_local_checked(jobs, locations, payload_sums)
            if checked is not None:
                return checked
        landed = [i for i, j in enumerate(jobs) if len(j) > 5]  # kvikio route: payload read by the caller
        plain = [i for i, j in enumerate(jobs) if len(j) <= 5]
        if landed:
            self._run(self._read_landed_many, [jobs[i] for i in landed], settle_from(landed))
        if plain:
            if locations is not None:
                self._run(self._learn, [jobs[i][0] for i in plain], [locations[i] for i in plain])
            # kvfs.kv.native_cached: cached chunk maps, reads on plain threads, meta's check beside them.
            self._cached.read_many([jobs[i] for i in plain], settle_from(plain), payload_digest)
        return results

    async def _validate(self, paths: list[str], touch_before: list[int]) -> list[P.GetChunksReply | None]:
        """One META_KV_CHUNKS round trip: the files' current chunk maps, remembered for the next reads
        with the lease meta granted on them (counted from now, before the request is sent: see
        kvfs/kv/native_cached.py); then an access recorded, in the background (``_touch_all``), on the
        blocks whose access time is older than asked (at most once per touch interval per block)."""
        sent = time.monotonic()
        reply = await self.c.meta.request(P.META_KV_CHUNKS, P.KVChunks(paths, lease=True))
        self._cached.learn(paths, reply.files, sent, reply.lease_seconds)
        await self._touch_all([(info.attr, before) for info, before in zip(reply.files, touch_before)
                               if info is not None])
        return reply.files

    async def _learn(self, paths: list[str], infos: list[P.GetChunksReply]) -> None:
        self._cached.learn(paths, infos)  # here: local_chunk runs in the client's thread

    async def _read_landed_many(self, jobs: Sequence[tuple], settle: OnReady) -> None:
        """The kvikio route's blocks (``_read_landed``): with the cached maps when every one is leased
        (kvfs/kv/native_cached.py), else after one META_KV_CHUNKS round trip. A block whose leased read
        fails is read again with its fresh map: its chunk files may be gone (deleted within the lease)."""
        paths, touch_before = [j[0] for j in jobs], [0] * len(jobs)
        leased = self._cached.leased_infos(jobs)
        if leased is None:
            await self._read_each(await self._validate(paths, touch_before), jobs, settle)
            return
        failed: list[int] = []

        def first(i: int, res: ReadResult | None | OSError) -> None:
            if isinstance(res, OSError):
                failed.append(i)
            else:
                settle(i, res)

        await self._read_each(leased, jobs, first)
        if failed:
            fresh = await self._validate([paths[i] for i in failed], [0] * len(failed))
            await self._read_each(fresh, [jobs[i] for i in failed], lambda k, res: settle(failed[k], res))

    async def _read_each(self, infos: Sequence[P.GetChunksReply | None], jobs: Sequence[tuple],
                         settle: OnReady) -> None:
        """Blocks one by one through the client (``infos``: their chunk maps, just fetched), which handles
        misses, failover and bad replicas; an OSError is settled in the block's slot."""
        limiter = trio.CapacityLimiter(self.concurrency)

        async def one(i: int) -> None:
            async with limiter:
                try:
                    read = self._read_landed if len(jobs[i]) > 5 else self._read_file
                    res: ReadResult | None | OSError = await read(infos[i], *jobs[i])
                except OSError as exc:
                    res = exc
            settle(i, res)

        async with open_nursery() as nursery:
            for i in range(len(jobs)):
                nursery.start_soon(one, i)

    async def _read_landed(self, info: P.GetChunksReply | None, path: str, expect_size: int, header_len: int,
                           out: Sequence[memoryview], touch_before_ns: int, land: Callable) -> ReadResult | None:
        """The kvikio route (kvfs.kv.device): the head is read and verified here, the payload is left to
        ``land(chunks, header_len)`` with the block's chunk files on this host (``kvfs.chunkfiles``:
        not checked against the chunk checksums), which returns the bytes it put in place. ENXIO when a
        chunk has no replica on this host."""
        if info is None:
            return None
        attr = info.attr
        head = memoryview(bytearray(min(attr.size, max(SCRATCH, header_len))))
        if attr.size != expect_size or len(head) < header_len:
            await self._fetch_ranges(info, [(0, head)])
            return ReadResult(head, attr.size, attr.atime_ns, False)
        local = {c.index: self.c.local_chunk(c) for c in info.chunks}
        chunks = ChunkFiles(path, info.chunk_size, local, attr.size)
        head_pieces = self._local_pieces(_merge_pieces(_split_at_chunks(info, [(0, head)])))

        def work() -> int | None:
            # One thread hop for the head (read and verified here) and the payload (``land``).
            if head_pieces is not None:
                try:
                    for lc, in_chunk, dests, _n in head_pieces:
                        read_local_chunk(lc.path, lc.sums_path, lc.chunk_id, lc.address, in_chunk, dests)
                except OSError:
                    return None  # the client's path below fails over and reports the replica
            return land(chunks, header_len)

        try:
            got = await trio.to_thread.run_sync(work, limiter=self.c._io) if head_pieces is not None else None
            if got is None:
                await self._fetch_ranges(info, [(0, head)])
                got = await trio.to_thread.run_sync(land, chunks, header_len, limiter=self.c._io)
        finally:
            chunks.close()
        if got != expect_size - header_len:
            raise OSError(errno.EIO, f"{path}: short read of the payload ({got} of {expect_size - header_len} bytes)")
        await self._touch(attr, touch_before_ns)
        return ReadResult(head, attr.size, attr.atime_ns, True)

    def _whole_local_chunk(self, info: P.GetChunksReply, expect_size: int) -> Any:
        """The file's one chunk, on this host (``Client.local_chunk``), if the file is exactly that chunk
        and ``expect_size`` bytes; else None."""
        ref = info.chunks[0] if len(info.chunks) == 1 else None
        if info.attr.size != expect_size or ref is None or ref.index != 0 or ref.length != expect_size:
            return None
        return self.c.local_chunk(ref)

    def _read_local_checked(self, jobs: Sequence[tuple], infos: Sequence[P.GetChunksReply],
                            payload_sums: PayloadSums) -> list[ReadResult | None | OSError] | None:
        """Every file is one chunk with a replica on this host (``infos``: a lookup's chunk maps): read
        each chunk file's head, then its payload into the job's ``out``, checked block by block against
        ``payload_sums`` as it lands (``read_run_checked``). In the calling thread and the read pool,
        with no trip through the client's trio thread (none at all unless an access time is due). None
        when that cannot be done (a file not one local chunk, a chunk file gone or unreadable: the run
        may have changed since the lookup): the caller takes another route, which asks meta."""
        plans: list[tuple[P.Attr, Any] | None] = []
        for info, job in zip(infos, jobs):
            if info is None:
                plans.append(None)
                continue
            lc = self._whole_local_chunk(info, job[1])
            if lc is None:
                return None
            plans.append((info.attr, lc))

        def one(i: int) -> ReadResult | None | OSError:
            plan, (_path, expect_size, header_len, out, _touch) = plans[i], jobs[i]
            if plan is None:
                return None
            attr, lc = plan
            try:
                fd = os.open(lc.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    return read_run_checked(fd, i, attr.size, attr.atime_ns, expect_size, header_len, out,
                                            payload_sums)
                finally:
                    os.close(fd)
            except OSError as exc:
                return exc

        results = in_parts(self._cached.pool, one, range(len(jobs)), self._cached.threads)
        if any(isinstance(r, OSError) for r in results):
            return None
        due = [(plan[0], job[4]) for plan, job in zip(plans, jobs) if plan is not None and plan[0].atime_ns < job[4]]
        if due:
            self._run(self._touch_all, due)
        return results

    async def _map_many_local(self, jobs: Sequence[tuple], verify: bool = True,
                              known: Sequence[P.GetChunksReply] | None = None) -> list[ReadResult | None] | None:
        """Every file is one chunk with a replica on this host: map the chunk files (locked, and verified
        unless ``verify`` is False: kvfs.chunkio.map_local_chunk) instead of copying them. None when that
        cannot be done (a file in several chunks or not local, an odd size, a failed map or lock): the
        caller reads instead. ``known``: the files' chunk maps from a lookup (``read_many``'s
        ``locations``), used instead of a META_KV_CHUNKS round trip."""
        if self._map_refused:
            return None
        if known is not None:
            infos: Sequence[P.GetChunksReply | None] = known
            self._cached.learn([j[0] for j in jobs], known)
        else:
            infos = await self._validate([j[0] for j in jobs], [0] * len(jobs))
        plans: list = []
        for info, (_path, expect_size, *_rest) in zip(infos, jobs):
            if info is None:
                plans.append(None)
                continue
            lc = self._whole_local_chunk(info, expect_size)
            if lc is None:
                return None
            plans.append((info.attr, lc))
        views: list[memoryview | None] = [None] * len(plans)
        todo = [i for i, plan in enumerate(plans) if plan is not None]
        failed = False

        def work(part: list[int]) -> None:
            for i in part:
                lc = plans[i][1]
                views[i] = map_local_chunk(lc.path, lc.sums_path, lc.chunk_id, lc.address, lc.length, verify)

        async def run(part: list[int]) -> None:
            nonlocal failed
            try:
                await trio.to_thread.run_sync(work, part, limiter=self.c._io)
            except OSError as exc:
                failed = True
                if exc.errno in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
                    self._map_refused = True  # the lock limit will not grow: stop trying

        per = max(1, GROUP_BYTES // max(1, jobs[0][1]))  # files per thread hop
        async with open_nursery() as nursery:
            for k in range(0, len(todo), per):
                nursery.start_soon(run, todo[k:k + per])
        if failed:
            return None
        results: list[ReadResult | None] = []
        for plan, view, job in zip(plans, views, jobs):
            if plan is None or view is None:
                results.append(None)
                continue
            attr = plan[0]
            results.append(ReadResult(view[:max(SCRATCH, job[2])], attr.size, attr.atime_ns, True, mapped=view))
        await self._touch_all([(plan[0], job[4]) for plan, view, job in zip(plans, views, jobs)
                               if plan is not None and view is not None])
        return results

    async def _touch_all(self, items: list[tuple[P.Attr, int]]) -> None:
        """``_touch`` each (attributes, touch_before_ns) that is due, concurrently and in the background
        (the client's nursery): recency is best effort, and a load must not wait for a metadata write
        per run it read (a prompt's 16 runs first hit after the touch interval cost a load 10-20 ms)."""
        due = [(attr, before) for attr, before in items if attr.atime_ns < before]
        if not due:
            return

        async def touch_due() -> None:
            async with open_nursery() as nursery:
                for attr, before in due:
                    nursery.start_soon(self._touch, attr, before)

        if not self.c.start_best_effort(touch_due):
            await touch_due()

    async def _touch(self, attr: P.Attr, touch_before_ns: int) -> None:
        """Record an access (the eviction engine's recency), at most once per touch interval."""
        if attr.atime_ns < touch_before_ns:
            try:
                await self.c.setattr(attr.ino, atime_ns=time.time_ns())
            except OSError:
                pass  # evicted meanwhile: recency is best effort

    async def _read_file(self, info: P.GetChunksReply | None, path: str, expect_size: int, header_len: int,
                         out: Sequence[memoryview], touch_before_ns: int) -> ReadResult | None:
        if info is None:
            return None
        attr, size = info.attr, info.attr.size
        head = memoryview(bytearray(min(size, max(SCRATCH, header_len))))
        ranges: list[tuple[int, memoryview]] = [(0, head)]
        full = size == expect_size and len(head) >= header_len
        if full:
            ranges += [(header_len + off, v) for off, v in split_into(out, len(head) - header_len)]
        try:
            await self._fetch_ranges(info, ranges)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENOENT):
                # A chunk deleted under us means the block was evicted (or is being): a miss.
                try:
                    await self.c.resolve(path)
                except FileNotFoundError:
                    return None
            raise
        if full:
            copy_into(out, head[header_len:])  # the payload bytes that came in with the scratch read
            await self._touch(attr, touch_before_ns)
        return ReadResult(head, size, attr.atime_ns, full)

    async def _fetch_ranges(self, info: P.GetChunksReply, ranges: list[tuple[int, memoryview]]) -> None:
        """Fetch file byte ranges into views, split at chunk boundaries, all concurrently."""
        pieces = _split_at_chunks(info, ranges)
        if await self._read_local([(ref, in_chunk, [view]) for ref, in_chunk, view in pieces]):
            return

        async def one(ref: P.ChunkRef | None, in_chunk: int, dest: memoryview) -> None:
            if ref is None or in_chunk >= ref.length:
                dest[:] = bytes(len(dest))
                return
            n = min(len(dest), ref.length - in_chunk)
            # Client._fetch: one verified ranged read of a chunk from the best replica (its file, when
            # the chunkserver is on this host), straight into ``dest`` when the range is aligned.
            await self.c._fetch(ref, in_chunk, dest[:n])
            if n < len(dest):
                dest[n:] = bytes(len(dest) - n)

        if len(pieces) == 1:
            await one(*pieces[0])
            return
        async with open_nursery() as nursery:
            for piece in pieces:
                nursery.start_soon(one, *piece)

    def _local_pieces(self, pieces: list) -> list | None:
        """``pieces`` (chunk ref, offset in the chunk, destination views) as (local chunk, offset, views,
        bytes) when every piece's chunk has a replica on this host, else None."""
        local = []
        for ref, in_chunk, dests in pieces:
            n = sum(len(d) for d in dests)
            lc = self.c.local_chunk(ref) if ref is not None and in_chunk + n <= ref.length else None
            if lc is None:
                return None
            local.append((lc, in_chunk, dests, n))
        return local

    async def _read_local(self, pieces: list) -> bool:
        """One block's pieces, all local: read them in one worker thread, verified (kvfs.chunkio).
        False (nothing to rely on) when a chunk is not local or a read fails: the caller then reads
        through the client, which fails over and reports bad replicas."""
        local = self._local_pieces(pieces)
        if local is None:
            return False

        def work() -> None:
            for lc, in_chunk, dests, _n in local:
                read_local_chunk(lc.path, lc.sums_path, lc.chunk_id, lc.address, in_chunk, dests)

        try:
            await trio.to_thread.run_sync(work, limiter=self.c._io)
        except OSError:
            return False
        return True

    # ------------------------------------------------------------------ namespace

    def exists_many(self, base: str, names: list[str], leading_only: bool) -> tuple[list[bool], int]:
        if not names:
            return [], 0
        reply = self._run(self.c.meta.request, P.META_KV_EXISTS, P.KVExists(base, names, leading_only))
        return list(reply.exists), reply.leading

    def locate_many(self, base: str, names: list[str], leading_only: bool,
                    touch_before_ns: int = 0) -> tuple[list[Any], int]:
        """``Backend.locate_many``: one META_KV_CHUNKS round trip; a file's location is its chunk map
        (``P.GetChunksReply``), which ``read_many(locations=...)`` maps or reads without asking again.
        Meta records the accesses asked for (``touch_before_ns``) in the same round trip."""
        if not names:
            return [], 0
        reply = self._run(self.c.meta.request, P.META_KV_CHUNKS,
                          P.KVChunks([f"{base}/{n}" for n in names], touch_before_ns=touch_before_ns))
        found = list(reply.files)
        leading = next((i for i, f in enumerate(found) if f is None), len(found))
        return found, leading

    def remove(self, path: str) -> None:
        self._cached.cache.drop(path)
        self._run(self.c.unlink, path)

    def set_xattr(self, path: str, name: str, value: bytes) -> None:
        async def run() -> None:
            attr = await self.c.resolve(path)
            await self.c.setxattr(attr.ino, name, value)

        self._run(run)

    def get_xattr(self, path: str, name: str) -> bytes | None:
        async def run() -> bytes | None:
            try:
                attr = await self.c.resolve(path)
                return await self.c.getxattr(attr.ino, name)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOENT):
                    return None
                raise

        return self._run(run)

    def put_many(self, jobs: Sequence[tuple]) -> list[bool | OSError]:
        return self._run(self._gather, self._put, jobs)

    async def _gather(self, fn, jobs: Sequence[tuple]) -> list:
        results: list[Any] = [None] * len(jobs)
        limiter = trio.CapacityLimiter(self.concurrency)

        async def one(i: int, args: tuple) -> None:
            async with limiter:
                try:
                    results[i] = await fn(*args)
                except OSError as exc:
                    results[i] = exc

        async with open_nursery() as nursery:
            for i, args in enumerate(jobs):
                nursery.start_soon(one, i, args)
        return results

    def close(self) -> None:
        self._cached.close()


def _split_at_chunks(info: P.GetChunksReply, ranges: list[tuple[int, memoryview]]) -> list[tuple]:
    """File byte ranges as (chunk ref or None, offset in the chunk, view) pieces, split at chunk ends."""
    cs = info.chunk_size
    refs = {c.index: c for c in info.chunks}
    pieces = []
    for offset, view in ranges:
        pos = 0
        while pos < len(view):
            index, in_chunk = divmod(offset + pos, cs)
            n = min(cs - in_chunk, len(view) - pos)
            pieces.append((refs.get(index), in_chunk, view[pos:pos + n]))
            pos += n
    return pieces


def _merge_pieces(pieces: list[tuple]) -> list[tuple]:
    """Consecutive pieces of the same chunk as one (ref, offset, [views]): one verified read each."""
    merged: list[tuple] = []
    for ref, in_chunk, view in pieces:
        if merged and ref is not None and merged[-1][0] is ref and merged[-1][1] + merged[-1][3] == in_chunk:
            prev = merged[-1]
            merged[-1] = (ref, prev[1], prev[2] + [view], prev[3] + len(view))
        else:
            merged.append((ref, in_chunk, [view], len(view)))
    return [(ref, in_chunk, views) for ref, in_chunk, views, _n in merged]
