"""The native KV backend's hot path (``kvfs.kv.native``): a batch of blocks whose chunk maps this client
has cached, and whose chunks all have a replica on this host, read without waiting for meta first and
without the client's event loop; with leased maps, without meta at all.

Why: a ``get_many`` used to cost, before any byte moved, a META_KV_CHUNKS round trip for the batch's
chunk maps, then a trio task and one or two worker-thread hops per block (about 2.5 ms per call on the
GPU host, issue 10). Here:

* the chunk maps come from ``ChunkMapCache``, filled by the META_KV_CHUNKS replies of earlier reads,
  each with the *lease* meta granted on it (meta/kv_leases.py);
* the reads start at once: per chunk one C call (``chunkio.read_chunk_start``: read and checked against
  the chunk checksums with the GIL released) straight into the caller's buffers, the header into a
  small scratch buffer; a chunk's checksums are read once and kept with its map. A batch of less than
  ``MIN_GROUP_BYTES`` is read on the calling thread alone; a bigger one on up to ``threads`` threads,
  the calling one among them;
* with ``payload_digest`` (``KVStore.get_many`` on its verified routes) a block is read instead by one C
  call for all its chunk files (``chunkio.read_files_hashed``), its payload hashed as it lands, in
  cache, and the chunk checksums not checked: the caller compares that digest with the block's own
  payload checksum, so each byte is hashed once, not twice; a block that fails it is read again the
  checked way (``kvfs.kv.device``). A batch's blocks are split over the threads whole (a batch of fewer
  blocks than the threads it would keep busy chunk by chunk is read chunk by chunk, checked as before);
* if every map of the batch is leased, nothing else: no round trip, no other thread. Past half its
  lease a batch's maps are renewed by one META_KV_CHUNKS in the background;
* otherwise one META_KV_CHUNKS round trip for the batch goes to meta through the client's trio thread
  (the *validation*, which also renews the leases), off the readers' path, and a block is settled
  (``on_ready``) once its bytes are in and meta has confirmed that its name still maps to the inode and
  chunk ids the reads used.

Why a cached map needs the validation or a lease: a committed chunk is never rewritten and chunk ids
are never reused, so bytes read from a chunk id are that chunk's bytes. But meta deletes a removed
block's chunk files lazily (the deletions reach the chunkservers with their heartbeats), so for seconds
after a delete + re-put of the same name the old chunk files are still on disk, and their checksums
still match: a map cached before would read the old block. With the validation a get returns what the
name held at some moment during the call. With a lease, meta acknowledges a re-put (or any other
change of what the name reads) only after the lease has ended, so a get that starts within the lease
returns bytes the name held when the lease was granted or later, and never bytes older than a re-put
that was acknowledged before the get started. The one weaker case: a delete is acknowledged at once, so
for up to the lease after it a leased get may still return the deleted bytes (the name held them within
the lease). The client counts a lease from when it *sent* the request, on its own monotonic clock,
minus ``LEASE_MARGIN`` of it (``lease_end``): meta counts from when it answered, later, so clock
offsets do not matter.

Anything else (a read that fails, a chunk no longer local, a map that changed) goes to the backend's
general per-block path with the fresh map (fetched then, for a leased batch), which fails over and
reports bad replicas as before.

Error handling: a failed validation (meta down: the client's RPC timeout bounds it) is that OSError in
every block's slot not already settled; a block never settles on bytes meta did not confirm or lease.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvfs import protocol as P
from kvfs.chunkio import ChecksumError, hashed_reads_in_c, read_chunk_start, read_files_hashed, slice_views
from kvfs.kv.backend import OnReady, ReadResult

CACHE_LIMIT = 65536  # chunk maps kept (a few hundred bytes each)
RENEW_LIMIT = 2048  # maps per background lease renewal (one META_KV_CHUNKS)
MIN_GROUP_BYTES = 256 << 10  # a batch smaller than this is read on the calling thread alone: no hand-off
LEASE_MARGIN = 0.1  # of a lease: kept back for clock rate differences and scheduling


def lease_end(sent: float, seconds: float) -> float:
    """When a lease of ``seconds`` granted in reply to a request sent at ``sent`` (time.monotonic) ends
    for this client: meta counted it from when it answered, later than ``sent``, so offsets between the
    clocks do not matter; the margin covers differences in their rates. 0.0: no lease."""
    return sent + seconds * (1 - LEASE_MARGIN) if seconds > 0 else 0.0


@dataclass
class _Piece:
    """One chunk of a block file, read whole: file bytes [offset, offset + length)."""

    offset: int
    length: int
    path: str
    sums_path: str
    chunk_id: int
    address: str
    sums: bytes | None = None  # its checksums, once read (they never change for a chunk id)


@dataclass
class Plan:
    """A block file's cached chunk map, as reads of it from this host's chunk files."""

    info: P.GetChunksReply
    identity: tuple
    pieces: list[_Piece]
    lease_until: float = 0.0  # time.monotonic until which meta holds back changes to the name (lease_end)
    used: float = 0.0  # time.monotonic of the last read that looked it up (renewals skip plans not read lately)


def identity(info: P.GetChunksReply) -> tuple:
    """What must not have changed for cached reads of a file to be its current bytes."""
    return info.attr.ino, info.attr.size, tuple((c.index, c.chunk_id, c.length) for c in info.chunks)


def make_plan(info: P.GetChunksReply, local_chunk: Any) -> Plan | None:
    """A plan for ``info`` when every byte of the file is in a chunk with a replica on this host
    (``local_chunk``: ``Client.local_chunk``), else None."""
    cs, size = info.chunk_size, info.attr.size
    refs = {c.index: c for c in info.chunks}
    pieces = []
    for index in range((size + cs - 1) // cs):
        ref = refs.get(index)
        if ref is None or ref.length != min(cs, size - index * cs):
            return None  # a hole or a short chunk: the general path zero-fills it
        lc = local_chunk(ref)
        if lc is None:
            return None
        pieces.append(_Piece(index * cs, ref.length, lc.path, lc.sums_path, lc.chunk_id, lc.address))
    return Plan(info, identity(info), pieces)


def _replicas_kept(plan: Plan, info: P.GetChunksReply) -> bool:
    """Whether every replica the plan reads is still one of its chunk's (meta drops a bad one)."""
    replicas = {c.index: c.replicas for c in info.chunks}
    return all(piece.address in replicas.get(piece.offset // info.chunk_size, ()) for piece in plan.pieces)


class ChunkMapCache:
    """Plans by kvfs path, the least recently used dropped past ``limit``. Thread-safe."""

    def __init__(self, limit: int = CACHE_LIMIT):
        self.limit = limit
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._lock = threading.Lock()

    def get_each(self, paths: Sequence[str]) -> list[Plan | None]:
        now = time.monotonic()
        with self._lock:
            plans = []
            for path in paths:
                plan = self._plans.get(path)
                if plan is not None:
                    self._plans.move_to_end(path)
                    plan.used = now
                plans.append(plan)
            return plans

    def renewable(self, now: float, within: float, limit: int) -> list[str]:
        """Up to ``limit`` paths whose lease is still on but ends within ``within`` seconds, of plans read
        in the last ``2 * within`` seconds (maps in use, not every map ever cached)."""
        with self._lock:
            out = []
            for path, plan in reversed(self._plans.items()):  # the most recently used first
                if plan.used < now - 2 * within:
                    break  # LRU order: every plan further on was used earlier still
                if now < plan.lease_until <= now + within:
                    out.append(path)
                    if len(out) >= limit:
                        break
            return out

    def learn(self, path: str, info: P.GetChunksReply | None, local_chunk: Any, lease_until: float = 0.0) -> None:
        """A fresh META_KV_CHUNKS answer for ``path``, leased until ``lease_until``: keep its plan (the
        old one if nothing changed, so its checksums stay), or forget the path."""
        with self._lock:
            old = self._plans.get(path)
        if info is not None and old is not None and old.identity == identity(info) and _replicas_kept(old, info):
            with self._lock:
                old.info = info  # fresh attributes (the access time)
                old.lease_until = max(old.lease_until, lease_until)  # each answer's lease holds on its own
            return
        plan = make_plan(info, local_chunk) if info is not None else None
        with self._lock:
            if plan is None:
                self._plans.pop(path, None)
                return
            plan.lease_until = lease_until
            plan.used = time.monotonic()  # kept at the LRU end: ``renewable`` stops at the first stale plan
            self._plans[path] = plan
            self._plans.move_to_end(path)
            while len(self._plans) > self.limit:
                self._plans.popitem(last=False)

    def drop(self, path: str) -> None:
        with self._lock:
            self._plans.pop(path, None)

    def __len__(self) -> int:
        return len(self._plans)


class _Batch:
    """One cached batch in flight: which blocks have landed, which meta confirmed, which are settled."""

    def __init__(self, n: int, settle: OnReady):
        self.lock = threading.Lock()
        self.settle = settle
        self.landed = [False] * n
        self.failed: list[OSError | None] = [None] * n
        self.verdict: list[str | None] = [None] * n  # "same", "changed", "gone", "error"
        self.done = [False] * n
        self.results: list[ReadResult | None] = [None] * n
        self.closed = False  # the caller took over: nothing more is settled from other threads
        self.groups_left = [0] * n  # per block: read groups holding some of its pieces, not finished

    def group_done(self, i: int) -> None:
        """A group finished its pieces of block ``i``: the block has landed once its last group has."""
        with self.lock:
            self.groups_left[i] -= 1
            last = self.groups_left[i] == 0
        if last:
            self.mark(i, landed=True)

    def mark(self, i: int, *, landed: bool = False, verdict: str | None = None) -> None:
        """Record a landing or meta's verdict; settle the block when both say it is good. Any thread."""
        with self.lock:
            if landed:
                self.landed[i] = True
            if verdict is not None:
                self.verdict[i] = verdict
            ready = (self.landed[i] and self.verdict[i] == "same" and self.failed[i] is None
                     and not self.done[i] and not self.closed)
            if ready:
                self.done[i] = True
        if ready:
            self.settle(i, self.results[i])


class CachedReads:
    """The hot path of one ``NativeBackend``: see the module docstring."""

    def __init__(self, backend: Any, threads: int):
        self.backend = backend
        self.cache = ChunkMapCache()
        # Reads are bound by memory bandwidth and the GIL hand-offs between them: no more threads than cores.
        self.threads = max(1, min(threads, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kvfs-kv-read")
        self.pool = self._pool  # for the backend's other plain-thread reads (``_read_local_checked``)
        self._validator = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvfs-kv-validate")
        self._renewing = threading.Lock()  # held while a background lease renewal is in flight
        self.renewals = 0  # background lease renewals started
        self.waited_fetches = 0  # reads that waited on a META_KV_CHUNKS (maps not cached, or not leased)
        self.lease_seconds = 0.0  # the last lease meta granted (0: none, e.g. an older meta)

    def learn(self, paths: Sequence[str], infos: Sequence[P.GetChunksReply | None], sent: float = 0.0,
              lease_seconds: float = 0.0) -> None:
        """Chunk maps just fetched from meta (the client's trio thread, where ``local_chunk`` runs) by a
        request sent at ``sent`` (time.monotonic), leased for ``lease_seconds`` (0: not leased)."""
        lease_until = lease_end(sent, lease_seconds)
        if lease_seconds > 0:
            self.lease_seconds = lease_seconds
        for path, info in zip(paths, infos):
            self.cache.learn(path, info, self.backend.c.local_chunk, lease_until)

    def _usable(self, jobs: Sequence[tuple]) -> list[Plan | None]:
        """Per job its cached plan, if the file has the size the job expects (else the general path)."""
        plans = self.cache.get_each([j[0] for j in jobs])
        return [plan if plan is not None and plan.info.attr.size == job[1] >= job[2] else None
                for plan, job in zip(plans, jobs)]

    @staticmethod
    def _leased(plans: list[Plan | None], touch_before: list[int]) -> bool:
        """Whether every plan is leased now (so meta need not be asked) and no access is due to be
        recorded (that goes with the round trip)."""
        now = time.monotonic()
        return all(p is not None and p.lease_until > now and p.info.attr.atime_ns >= before
                   for p, before in zip(plans, touch_before))

    def leased_infos(self, jobs: Sequence[tuple]) -> list[P.GetChunksReply] | None:
        """The cached chunk maps of ``jobs`` (their first five fields as ``read_many``'s) when every one is
        leased now, else None (ask meta): the kvikio route's reads (``NativeBackend._read_landed_many``)."""
        plans = self._usable(jobs)
        touch_before = [j[4] for j in jobs]
        if not self._leased(plans, touch_before):
            return None
        self._renew_if_due([j[0] for j in jobs], touch_before, plans)  # type: ignore[arg-type]
        return [p.info for p in plans]  # type: ignore[union-attr]

    def _renew_if_due(self, paths: list[str], touch_before: list[int], plans: list[Plan]) -> None:
        """Past half its lease, renew the batch's maps in the background (one renewal in flight), so a
        block read again and again is never waited on meta for. The renewal also takes every other map
        read lately whose lease is past half (up to RENEW_LIMIT): with one renewal in flight, renewing
        only the batch that found it due left the other batches' leases to run out, and each then
        waited on a META_KV_CHUNKS (0.1-0.2 per get_many on the GPU host, session 9)."""
        now = time.monotonic()
        half = self.lease_seconds / 2
        if min(p.lease_until for p in plans) - now > half:
            return
        if not self._renewing.acquire(blocking=False):
            return
        mine = set(paths)
        others = [p for p in self.cache.renewable(now, half, RENEW_LIMIT) if p not in mine]
        paths, touch_before = list(paths) + others, list(touch_before) + [0] * len(others)
        self.renewals += 1

        def renew() -> None:
            try:
                self.backend._run(self.backend._validate, paths, touch_before)
            except OSError:
                pass  # the next read past the lease asks meta itself and reports the error
            finally:
                self._renewing.release()

        self._validator.submit(renew)

    def read_many(self, jobs: Sequence[tuple], on_ready: OnReady | None,
                  payload_digest: bool = False) -> list[ReadResult | None | OSError]:
        """Plain block reads (``Backend.read_many``'s 5-tuples). With every map cached and leased, meta is
        not asked at all; with every map cached, the reads start at once and meta's check runs beside
        them; otherwise the maps are fetched first (one round trip, as the general path would), and the
        blocks they make local are read here all the same. ``payload_digest`` (and the C helper built):
        each block is read whole by one C call (``chunkio.read_files_hashed``) that hashes its payload as
        it lands instead of checking the chunk checksums (``ReadResult.payload_xxh3``, for the caller to
        check)."""
        n = len(jobs)
        results: list[ReadResult | None | OSError] = [None] * n

        def settle(i: int, res: ReadResult | None | OSError) -> None:
            results[i] = res
            if on_ready is not None:
                on_ready(i, res)

        paths = [j[0] for j in jobs]
        touch_before = [j[4] for j in jobs]
        batch = _Batch(n, settle)
        plans = self._usable(jobs)
        validation: Future | None = None
        fresh: list[P.GetChunksReply | None] | None = None
        error: OSError | None = None
        if self._leased(plans, touch_before):
            batch.verdict = ["same"] * n  # meta acknowledges no change to these names before the leases end
            self._renew_if_due(paths, touch_before, plans)  # type: ignore[arg-type]
        elif all(p is not None for p in plans):
            self.waited_fetches += 1
            validation = self._validator.submit(self._validate, paths, touch_before, plans, batch)
        else:
            self.waited_fetches += 1
            try:
                fresh = self.backend._run(self.backend._validate, paths, touch_before)
            except OSError as exc:
                return [exc] * n
            plans = self._usable(jobs)
            for i, (plan, info) in enumerate(zip(plans, fresh)):
                batch.verdict[i] = ("gone" if info is None else
                                    "same" if plan is not None and plan.identity == identity(info) else "changed")
        heads = [memoryview(bytearray(j[2])) for j in jobs]
        for i, (plan, head) in enumerate(zip(plans, heads)):
            if plan is not None and batch.verdict[i] in (None, "same"):
                batch.results[i] = ReadResult(head, plan.info.attr.size, plan.info.attr.atime_ns, True)
        readable = [p if r is not None else None for p, r in zip(plans, batch.results)]
        if payload_digest and hashed_reads_in_c() and self._whole_blocks_pay(jobs, readable):
            groups, read = self._block_groups(jobs, readable), self._read_blocks
        else:
            groups, read = self._groups(jobs, readable, heads), self._read_group
        for g in groups:
            for i in {r[0] for r in g}:
                batch.groups_left[i] += 1
        futures = [self._pool.submit(read, g, batch) for g in groups[1:]]
        if groups:
            read(groups[0], batch)  # the calling thread reads too: one hop fewer
        for f in futures:
            f.result()
        if validation is not None:
            try:
                fresh = validation.result(timeout=self.backend.c.options.timeout * 2 + 5)
            except OSError as exc:
                error = exc
            except TimeoutError:
                error = OSError(errno.ETIMEDOUT, "KV read: meta did not answer the chunk-map check in time")
        with batch.lock:
            batch.closed = True  # what is not settled now is settled below, whatever comes late
        rest = []
        for i in range(n):
            if batch.done[i]:
                continue
            if batch.failed[i] is not None:
                self.cache.drop(paths[i])  # a bad or vanished local replica: the general path decides
            if error is not None:
                settle(i, error)
            elif batch.verdict[i] == "gone":
                settle(i, None)
            else:
                rest.append(i)  # the map changed, not local, or the read failed: the general path
        if rest and fresh is None:
            # Leased blocks whose read failed (a bad or missing chunk file): their current maps first.
            try:
                maps = self.backend._run(self.backend._validate, [paths[i] for i in rest],
                                         [touch_before[i] for i in rest])
            except OSError as exc:
                for i in rest:
                    settle(i, exc)
                return results
            fresh = [None] * n
            for i, info in zip(rest, maps):
                fresh[i] = info
            for i in [i for i in rest if fresh[i] is None]:
                settle(i, None)  # gone meanwhile: a miss
            rest = [i for i in rest if fresh[i] is not None]
        if rest:
            assert fresh is not None
            self.backend._run(self.backend._read_each, [fresh[i] for i in rest], [jobs[i] for i in rest],
                              lambda k, res: settle(rest[k], res))
        return results

    def _validate(self, paths: list[str], touch_before: list[int], plans: list[Plan],
                  batch: _Batch) -> list[P.GetChunksReply | None]:
        """Meta's current chunk maps for the batch (the validator thread), and each block's verdict."""
        try:
            fresh = self.backend._run(self.backend._validate, paths, touch_before)
        except BaseException:
            for i in range(len(plans)):
                batch.mark(i, verdict="error")
            raise
        for i, (plan, info) in enumerate(zip(plans, fresh)):
            if info is None:
                batch.mark(i, verdict="gone")
            else:
                batch.mark(i, verdict="same" if identity(info) == plan.identity else "changed")
        return fresh

    def _groups(self, jobs: Sequence[tuple], plans: list[Plan | None], heads: list[memoryview]) -> list[list]:
        """Every chunk read of the batch as (block, piece, destination views), in about ``threads``
        groups of equal bytes, each a run of consecutive pieces (a block's pieces mostly in one group)."""
        reads = []
        for i, (job, plan, head) in enumerate(zip(jobs, plans, heads)):
            if plan is None:
                continue
            dests = [head, *job[3]]
            for piece in plan.pieces:
                reads.append((i, piece, slice_views(dests, piece.offset, piece.length)))
        return self._split(reads, [r[1].length for r in reads])

    def _whole_blocks_pay(self, jobs: Sequence[tuple], plans: list[Plan | None]) -> bool:
        """Whether reading the batch block by block (each block by one thread, its bytes hashed once) keeps
        as many threads busy as reading it chunk by chunk (``_groups``) would. A batch of fewer blocks
        than that, e.g. one 32 MiB block of 9 chunks with 8 threads, is read chunk by chunk: spread over
        more threads, though hashed twice (chunk checksums, then the payload checksum from memory)."""
        sizes = [job[1] for job, plan in zip(jobs, plans) if plan is not None]
        pieces = sum(len(plan.pieces) for plan in plans if plan is not None)
        spread = min(self.threads, -(-sum(sizes) // MIN_GROUP_BYTES), pieces)
        return len(sizes) >= spread

    def _block_groups(self, jobs: Sequence[tuple], plans: list[Plan | None]) -> list[list]:
        """``payload_digest`` reads: whole blocks as (block, plan, job), in about ``threads`` groups of
        consecutive blocks (a block's payload is hashed in order, so it is read by one thread)."""
        reads = [(i, plan, job) for i, (job, plan) in enumerate(zip(jobs, plans)) if plan is not None]
        return self._split(reads, [job[1] for _i, _plan, job in reads])

    def _split(self, reads: list, sizes: list[int]) -> list[list]:
        """``reads`` (of ``sizes`` bytes) in order, cut into about ``threads`` groups of equal bytes, none
        smaller than ``MIN_GROUP_BYTES`` but the last."""
        share = max(MIN_GROUP_BYTES, -(-sum(sizes) // self.threads))
        groups: list[list] = []
        size = share
        for r, n in zip(reads, sizes):
            if size >= share:
                groups.append([])
                size = 0
            groups[-1].append(r)
            size += n
        return groups

    @staticmethod
    def _read_blocks(group: list, batch: _Batch) -> None:
        """Each block of ``group``: its chunk files read in one C call into its head and ``out``, the payload
        hashed as it lands (not checked here: ``ReadResult.payload_xxh3``); then the block is settled."""
        for i, plan, job in group:
            res = batch.results[i]
            try:
                got, digest = read_files_hashed([p.path for p in plan.pieces], [p.length for p in plan.pieces],
                                                [res.head, *job[3]], job[2])
                if got < job[1]:
                    raise ChecksumError(errno.EIO, f"KV block {job[0]}: local chunk files short ({got} of "
                                                   f"{job[1]} bytes)")
                res.payload_xxh3 = digest
            except OSError as exc:
                batch.failed[i] = exc
            batch.group_done(i)

    @staticmethod
    def _read_group(group: list, batch: _Batch) -> None:
        pending: dict[int, int] = {}
        for i, _piece, _views in group:
            pending[i] = pending.get(i, 0) + 1
        for i, piece, views in group:
            if batch.failed[i] is None:
                try:
                    piece.sums = read_chunk_start(piece.path, piece.sums_path, piece.chunk_id, piece.address,
                                                  views, piece.sums)
                except OSError as exc:
                    batch.failed[i] = exc
                    piece.sums = None  # they may be what is bad, or come back repaired
            pending[i] -= 1
            if pending[i] == 0:
                batch.group_done(i)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._validator.shutdown(wait=True)
