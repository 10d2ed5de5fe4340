"""Lookups through meta for the mount's client: a KV block or run file's chunk map fetched with its
lookup (leased), so the open that follows needs no GET_CHUNKS round trip, and one META request for
concurrent lookups of one name (issue 11: the mount's route of a vLLM prefix hit).

Why: a prefix hit through the mount opens every run file of the prompt (16 for 4,096 tokens) just after
looking it up; each open cost a META_GET_CHUNKS from the mount daemon, because an open refreshes the
chunk map (close-to-open). KV files are named by the hash of their content and never rewritten in
place, so the lookup may carry the map (META_KV_LOOKUP) under a KV map lease (meta/kv_leases.py).

Consistency: the lease rules of the native client's leased maps (kvfs/kv/native_cached.py). While the
lease lasts meta acknowledges nothing that binds the name or its inode to other bytes (a re-put, a
rename onto it, an in-place commit), so an open answered from the map reads bytes the file held when the
lease was granted or later; a delete is not held, so within the lease an open may still read the deleted
bytes. The lease is counted from when the lookup was *sent*, minus a margin (``lease_end``). After it,
the open asks meta again. Only names shaped like KV block or run files take this route
(``is_kv_file_name``); every other file keeps close-to-open with a GET_CHUNKS per open.

Shared lookups: threads that walk one path at once (a KV lookup's 8 ``stat`` threads in a fresh process)
each make the kernel revalidate the same expired directory entries: 4-8 LOOKUPs of one name arrive
together. The first goes to meta; the others wait for its answer, unless this client changed the
namespace since it was sent (then they ask meta themselves).

Batched lookups (``BatchedKVLookups``): the lookups of different KV files that arrive while one request is
in flight go to meta together in the next (META_KV_LOOKUP_MANY), like a group commit: the first waits
for no one, the rest share a round trip. A prefix hit stats 16 runs 8 at a time: 16 meta requests
became 4 or so, and meta serves each batch with one request's overhead.
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Awaitable, Callable

import msgspec
import trio

from kvfs import protocol as P
from kvfs.errors import error

LEASE_MARGIN = 0.1  # of a lease: kept back for clock rate differences and scheduling (as native_cached)
LIMIT = 4096  # maps kept at once (a few hundred bytes each); the oldest go first

# kvfs.kv's file names: a block is its 16-128 lowercase hex hash, a run "<last hash>-<blocks>"
# (kvfs/kv/hashing.py check_hash, kvfs/kv/run.py run_name).
_KV_NAME = re.compile(r"[0-9a-f]{16,128}(-[1-9][0-9]{0,5})?")


def is_kv_file_name(name: str) -> bool:
    return _KV_NAME.fullmatch(name) is not None


def lease_end(sent: float, seconds: float) -> float:
    """Until when (``time.monotonic``) a lease of ``seconds`` granted to a request sent at ``sent`` holds
    here; 0.0 for no lease. Meta counts from its answer, later than ``sent``: clock offsets do not matter."""
    return sent + seconds * (1 - LEASE_MARGIN) if seconds > 0 else 0.0


class LeasedMaps:
    """inode -> (lease end, chunk map) from leased lookups, each used until its lease ends."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, limit: int = LIMIT):
        self.clock = clock
        self.limit = limit
        self._maps: dict[int, tuple[float, P.GetChunksReply]] = {}  # in lease-end order (one lease length)

    def __len__(self) -> int:
        return len(self._maps)

    def store(self, ino: int, until: float, reply: P.GetChunksReply) -> None:
        self._maps.pop(ino, None)  # re-inserted at the end: the dict stays in lease-end order
        self._maps[ino] = (until, reply)
        now = self.clock()
        while self._maps:
            first = next(iter(self._maps))
            if self._maps[first][0] > now and len(self._maps) <= self.limit:
                break
            del self._maps[first]

    def get(self, ino: int) -> P.GetChunksReply | None:
        """The leased map of ``ino`` while its lease holds, else None (and it is dropped)."""
        entry = self._maps.get(ino)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._maps[ino]
            return None
        return entry[1]

    def drop(self, ino: int) -> None:
        """This client changes the file (write open, setattr, unlink): its own change wins over the map."""
        self._maps.pop(ino, None)


class _Pending:
    def __init__(self, seq: int) -> None:
        self.seq = seq  # the client's change count when the request was sent
        self.done = trio.Event()
        self.attr: P.Attr | None = None
        self.error: OSError | None = None


class SharedLookups:
    """One meta request for concurrent lookups of one (directory, name), or getattrs of one inode: a
    path walk after the attribute timeout sends the kernel's GETATTR and LOOKUP of each directory
    on the way from every thread walking it (8 at once for a KV prefix lookup)."""

    def __init__(self) -> None:
        self._pending: dict[tuple[int, str | None], _Pending] = {}

    async def lookup(self, parent: int, name: str, seq: int, fetch: Callable[[], Awaitable[P.Attr]]) -> P.Attr:
        """``fetch()``'s answer, or that of the same lookup already in flight and sent at change count
        ``seq`` (a copy: callers overlay their own sizes on it). Error handling: ``fetch``'s OSError."""
        return await self._shared((parent, name), seq, fetch)

    async def getattr(self, ino: int, seq: int, fetch: Callable[[], Awaitable[P.Attr]]) -> P.Attr:
        """As ``lookup``, for the attributes of inode ``ino``."""
        return await self._shared((ino, None), seq, fetch)

    async def _shared(self, key: tuple[int, str | None], seq: int, fetch: Callable[[], Awaitable[P.Attr]]) -> P.Attr:
        pending = self._pending.get(key)
        if pending is not None and pending.seq == seq:
            await pending.done.wait()
            if pending.error is not None:
                raise OSError(pending.error.errno, pending.error.strerror)
            if pending.attr is not None:
                return msgspec.structs.replace(pending.attr)
            return await fetch()  # it failed otherwise (cancelled): ask ourselves
        mine = self._pending[key] = _Pending(seq)
        try:
            mine.attr = await fetch()
            return msgspec.structs.replace(mine.attr)
        except OSError as exc:
            mine.error = exc
            raise
        finally:
            mine.done.set()
            if self._pending.get(key) is mine:
                del self._pending[key]


class _Slot:
    """One lookup waiting in ``BatchedKVLookups``: woken with its answer, or to send the next batch."""

    def __init__(self, parent: int, name: str, touch_before_ns: int) -> None:
        self.parent, self.name, self.touch_before_ns = parent, name, touch_before_ns
        self.ready = trio.Event()
        self.lead = False  # woken to send the next batch
        self.reply: P.KVLookupReply | None = None
        self.error: OSError | None = None
        self.sent = 0.0  # time.monotonic() when its batch was sent (a lease counts from there)


class BatchedKVLookups:
    """META_KV_LOOKUP_MANY for the KV lookups asked for at once (module docstring). At most one batch is in
    flight; the caller that finds none sends its own lookup at once, and hands the next batch to the
    first caller that queued meanwhile. Error handling: a lookup's own errno (ENOENT, ...) is raised for
    that lookup only; a failed request (meta unreachable, timeout) fails every lookup in its batch."""

    def __init__(self, send: Callable[[P.KVLookupMany], Awaitable[P.KVLookupManyReply]],
                 limit: int = P.KV_LOOKUP_MANY_MAX) -> None:
        self._send = send
        self.limit = limit
        self._queue: list[_Slot] = []
        self._busy = False  # a batch is in flight, or its next sender has been woken
        self.batches = 0  # requests sent

    async def lookup(self, parent: int, name: str, touch_before_ns: int = 0) -> tuple[P.KVLookupReply, float]:
        """The KV_LOOKUP answer for ``name`` in ``parent`` and when its request was sent (``time.monotonic``)."""
        slot = _Slot(parent, name, touch_before_ns)
        self._queue.append(slot)
        if self._busy:
            try:
                await slot.ready.wait()
            except BaseException:  # cancelled: leave the queue, and pass on a turn handed to us
                if slot in self._queue:
                    self._queue.remove(slot)
                if slot.lead:
                    self._hand_on()
                raise
            if not slot.lead:
                return self._answer(slot)
        self._busy = True
        batch, self._queue = self._queue[:self.limit], self._queue[self.limit:]
        try:
            await self._run(batch)
        finally:
            for other in batch:
                if other.reply is None and other.error is None:
                    other.error = OSError(errno.EIO, "KV lookup batch was cancelled")
                other.ready.set()
            self._hand_on()
        return self._answer(slot)

    def _hand_on(self) -> None:
        if self._queue:
            nxt = self._queue[0]
            nxt.lead = True
            nxt.ready.set()
        else:
            self._busy = False

    async def _run(self, batch: list[_Slot]) -> None:
        sent = time.monotonic()
        request = P.KVLookupMany([s.parent for s in batch], [s.name for s in batch], lease=True,
                                 touch_before_ns=max(s.touch_before_ns for s in batch))
        self.batches += 1
        try:
            reply = await self._send(request)
        except OSError as exc:
            for s in batch:
                s.error = exc
            return
        if len(reply.replies) != len(batch) or len(reply.errors) != len(batch):
            for s in batch:
                s.error = OSError(errno.EIO, f"meta answered {len(reply.replies)} KV lookups for {len(batch)}")
            return
        for s, one, code in zip(batch, reply.replies, reply.errors):
            s.sent = sent
            if one is not None and not code:
                s.reply = one
            else:
                s.error = error(code or errno.EIO, f"{s.name}: no such file or directory"
                                if code == errno.ENOENT else s.name)

    @staticmethod
    def _answer(slot: _Slot) -> tuple[P.KVLookupReply, float]:
        if slot.error is not None:
            raise OSError(slot.error.errno, slot.error.strerror)  # a copy: each caller's own traceback
        assert slot.reply is not None
        return slot.reply, slot.sent
