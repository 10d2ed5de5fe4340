"""KV map leases (issue 10): a client may use a chunk map it got from META_KV_CHUNKS for ``seconds``
without asking meta again, because meta holds back the acknowledgement of anything that would change
what the name reads until every lease on it has run out.

Why: a batch of KV block reads whose chunk maps a client has cached still cost a META_KV_CHUNKS round
trip to check them (kvfs/kv/native_cached.py: meta deletes a removed block's chunk files lazily, so a
stale map can read a deleted-then-re-put block's old bytes, checksums and all). KV names are content
hashes: re-publishing one is rare, reading one is the hot path. So the rare operation waits, not the
common one.

* A META_KV_CHUNKS request that asks for a lease (``KVChunks.lease``), or a META_KV_LOOKUP (the
  mount's lookup of a KV file: kvfs/leased_lookups.py), gets ``lease_seconds`` in its reply; meta records ``until = now + seconds`` per name (directory inode, entry name) and per inode:
  one dict write each, whoever asked (not per client).
* Operations that bind a leased name to other bytes apply at once but are acknowledged only after the
  lease: KV_PUBLISH, MKNODE, SYMLINK, LINK and RENAME onto the name, COMMIT of the leased inode (an
  in-place rewrite through the mount). A rename of a directory and RMDIR wait for every lease (paths
  below them change). Applying first and acknowledging late means readers renewing a lease cannot
  starve a writer: renewals after the change lease the new map.
* Deletes (unlink, eviction) are not held: a leased reader may read the deleted bytes until its lease
  ends (they were the name's bytes within the lease). The entry outlives the delete, so a re-put of the
  name waits for it.
* The client counts its lease from when it *sent* the request, on its own monotonic clock, minus a
  margin: meta's ``until`` is later in real time, so clock offsets do not matter, only rates.
* A meta that starts (restart, a new HA leader) has no table: if any meta on this engine granted a
  lease before (a flag in the engine, written with the first grant), every binding operation is held
  until ``seconds`` after this meta started (the grace window). The flag is cleared after a grace
  window in which this meta granted nothing.
* Bounded: entries are kept in expiry order and dropped once expired, at every grant and on the
  housekeeping tick, so the table holds only the names leased in the last ``seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from kvfs import protocol as P
from kvfs.meta import records as R
from kvfs.meta.engine import MetaEngine

DEFAULT_SECONDS = 2.0


class KVLeases:
    def __init__(self, engine: MetaEngine, seconds: float = DEFAULT_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.seconds = max(0.0, seconds)
        self.clock = clock
        self._names: dict[tuple[int, str], float] = {}  # (parent ino, name) -> expiry, in expiry order
        self._inos: dict[int, float] = {}  # file inode -> expiry, in expiry order
        self._latest = 0.0  # the latest expiry granted
        self._granted = False  # this meta wrote the engine's flag
        self._flag_seen = engine.get(R.KV_LEASE_FLAG_KEY) is not None
        # Leases a previous meta granted are unknown: hold every binding operation for one lease period.
        self.grace_until = clock() + self.seconds if self._flag_seen else 0.0

    def __len__(self) -> int:
        return len(self._names)

    # ------------------------------------------------------------------ granting

    def grant(self, parent: int, name: str, ino: int) -> None:
        """Lease ``name`` in directory ``parent`` (file inode ``ino``) for ``seconds`` from now."""
        if not self._granted:
            self.engine.write([(R.KV_LEASE_FLAG_KEY, b"")])  # durable before the reply (group commit)
            self._granted = self._flag_seen = True
        now = self.clock()
        until = now + self.seconds
        self._names.pop((parent, name), None)  # re-inserted at the end: the dicts stay in expiry order
        self._names[(parent, name)] = until
        self._inos.pop(ino, None)
        self._inos[ino] = until
        self._latest = until
        self._expire(now)

    def _expire(self, now: float) -> None:
        for table in (self._names, self._inos):
            stale = []
            for key, until in table.items():  # oldest first: stop at the first live one
                if until > now:
                    break
                stale.append(key)
            for key in stale:
                del table[key]

    def tick(self) -> None:
        """Housekeeping: drop expired entries; clear the engine's flag after a grace window that granted nothing."""
        now = self.clock()
        self._expire(now)
        if self._flag_seen and not self._granted and now >= self.grace_until:
            self.engine.write([(R.KV_LEASE_FLAG_KEY, None)])
            self._flag_seen = False

    # ------------------------------------------------------------------ waiting

    def name_until(self, parent: int, name: str) -> float:
        return max(self._names.get((parent, name), 0.0), self.grace_until)

    def ino_until(self, ino: int) -> float:
        return max(self._inos.get(ino, 0.0), self.grace_until)

    def all_until(self) -> float:
        return max(self._latest, self.grace_until)

    async def hold(self, until: float) -> None:
        """Wait until ``until`` (this clock) has passed: the acknowledgement of a change to leased names."""
        delay = until - self.clock()
        if delay > 0:
            await trio.sleep(delay)

    # ------------------------------------------------------------------ handlers

    def wrap(self, handlers: dict, is_dir: Callable[[int, str], bool]) -> dict:
        """``handlers`` with the binding operations' replies held for the leases they break.
        ``is_dir(parent, name)``: whether that entry is a directory now (after a rename)."""
        out = dict(handlers)

        def held(method: int, until_of: Callable) -> None:
            inner = handlers[method]

            async def handler(r, data):
                reply = await inner(r, data)
                await self.hold(until_of(r, reply))
                return reply

            out[method] = handler

        def renamed(r: P.Rename, _reply) -> float:
            if is_dir(r.new_parent, r.new_name):
                return self.all_until()
            return self.name_until(r.new_parent, r.new_name)

        held(P.META_KV_PUBLISH, lambda r, reply: self.name_until(r.parent, r.name) if reply.created else 0.0)
        held(P.META_MKNODE, lambda r, _: self.name_until(r.parent, r.name))
        held(P.META_SYMLINK, lambda r, _: self.name_until(r.parent, r.name))
        held(P.META_LINK, lambda r, _: self.name_until(r.new_parent, r.new_name))
        held(P.META_RENAME, renamed)
        held(P.META_RMDIR, lambda r, _: self.all_until())
        held(P.META_COMMIT, lambda r, _: self.ino_until(r.ino))
        return out
