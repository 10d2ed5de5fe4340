"""Chunk capability keys and tokens on meta's side (issue 13; the token itself: kvfs/captoken.py).

Keys live in the meta engine (``H <key_id>``), so a restarted meta, or an HA standby that takes over
on etcd, signs and accepts the same tokens. Each key signs from its ``active_from`` until the next
key's. The next key is made one rotation ahead and handed to chunkservers at once (heartbeats), so
by the time it signs, every chunkserver knows it. A key is dropped once its successor has signed for
longer than a token lives: every token it signed has expired.

``Capabilities.wrap`` stamps tokens into every reply that hands out chunk locations (found by reply
type, so a new method returning chunk refs is covered; a reply type that nests maps, KV_CHUNKS's,
KV_LOOKUP's and KV_LOOKUP_MANY's, is listed in ``stamp``) and the keys into chunkserver registrations
and heartbeats.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kvfs import captoken, identity
from kvfs import protocol as P
from kvfs.meta import records as R
from kvfs.meta.engine import Batch, MetaEngine

log = logging.getLogger("kvfs.meta")

SECRET_BYTES = 32
DEFAULT_TOKEN_SECONDS = 600.0
DEFAULT_ROTATE_SECONDS = 24 * 3600.0
REUSE_SECONDS = 60.0  # at most this much of a token's life may have passed when it is handed out again
ISSUED_LIMIT = 65536  # tokens remembered for reuse (about 100 bytes each)
READ_WRITE = P.TOKEN_READ | P.TOKEN_WRITE  # a writer may read back what it wrote before committing


class KeyRing:
    def __init__(self, engine: MetaEngine, *, token_seconds: float = DEFAULT_TOKEN_SECONDS,
                 rotate_seconds: float = DEFAULT_ROTATE_SECONDS, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.token_seconds = token_seconds
        self.rotate_seconds = rotate_seconds
        self.clock = clock
        self.records = sorted((R.decode_token_key(raw) for _, raw in engine.scan(R.TOKEN_KEY_PREFIX)),
                              key=lambda r: r.active_from)
        self._next_check = 0.0
        # Tokens handed out again while young (``issue``): a reused token lives at least
        # token_seconds - reuse_seconds from when it is handed out.
        self.reuse_seconds = min(REUSE_SECONDS, token_seconds / 10)
        self._issued: dict[tuple[int, int], tuple[int, int, bytes]] = {}  # (chunk, ops) -> (key id, expires, token)
        self.maintain()

    def maintain(self) -> None:
        """Make the first and the next key, drop keys whose tokens have all expired (cheap when nothing is due)."""
        now = self.clock()
        if now < self._next_check:
            return
        batch: Batch = []
        if not self.records:
            self._add(batch, now)
        if self.records[-1].active_from <= now:
            # The next key, known to chunkservers well before it signs (at most a minute early after a
            # long outage, when the current key is already overdue).
            self._add(batch, max(self.records[-1].active_from + self.rotate_seconds,
                                 now + min(self.rotate_seconds, 60.0)))
        while len(self.records) > 2 and self.records[1].active_from + self.token_seconds + 1 < now:
            old = self.records.pop(0)
            batch.append((R.token_key_key(old.key_id), None))
            log.info("chunk capability key %d retired", old.key_id)
        if batch:
            self.engine.write(batch)  # made durable by group commit (or the HA leader's flush) with the reply
        due = [self.records[-1].active_from]  # the next key starts signing then: nothing changes before
        if len(self.records) > 2:
            due.append(self.records[1].active_from + self.token_seconds + 1)
        self._next_check = min(due)
        self._signing = next(r for r in reversed(self.records) if r.active_from <= now)

    def _add(self, batch: Batch, active_from: float) -> None:
        key_id = (self.records[-1].key_id + 1) if self.records else 1
        record = R.TokenKeyRecord(key_id, secrets.token_bytes(SECRET_BYTES), active_from)
        self.records.append(record)
        batch.append((R.token_key_key(key_id), R.encode(record)))
        log.info("chunk capability key %d made (signs from %.0f)", key_id, active_from)

    def signing_key(self) -> R.TokenKeyRecord:
        self.maintain()
        return self._signing

    def issue(self, chunk_id: int, ops: int) -> bytes:
        """A token for ``ops`` on ``chunk_id``. One signed a moment ago for the same chunk and operations
        is handed out again while it still has all but ``reuse_seconds`` of a token's life left: a KV
        lookup stamps 16 chunk maps and the same runs are looked up again and again, and signing was a
        tenth of meta's time per lookup (py-spy, session 11)."""
        key = self.signing_key()
        now = self.clock()
        cached = self._issued.get((chunk_id, ops))
        if cached is not None and cached[0] == key.key_id and cached[1] >= now + self.token_seconds - self.reuse_seconds:
            return cached[2]
        expires = math.ceil(now + self.token_seconds)
        token = captoken.sign(key.key_id, key.secret, chunk_id, ops, expires)
        if len(self._issued) >= ISSUED_LIMIT:
            self._issued.clear()  # simpler than LRU order; refilled by the next lookups
        self._issued[(chunk_id, ops)] = (key.key_id, expires, token)
        return token

    def accepted(self) -> list[P.ChunkKey]:
        """Every key a chunkserver must accept: the signing one, older ones still in use, the next one."""
        self.maintain()
        return [P.ChunkKey(r.key_id, r.secret) for r in self.records]


Handler = Callable[[Any, Any], Awaitable[Any]]


class Capabilities:
    """Puts tokens into meta's replies (see the module docstring)."""

    def __init__(self, ring: KeyRing):
        self.ring = ring

    def wrap(self, handlers: dict[int, Handler]) -> dict[int, Handler]:
        return {method: self._wrap(method, h) for method, h in handlers.items()}

    def _wrap(self, method: int, handler: Handler) -> Handler:
        keys_to_chunkservers = method in (P.META_REGISTER, P.META_HEARTBEAT)

        async def stamped(request, data):
            if keys_to_chunkservers:
                identity.require_role(identity.ROLE_CHUNKSERVER, what="chunkserver registration")
            reply = await handler(request, data)
            self.stamp(reply, request)
            return reply

        return stamped

    def stamp(self, reply: Any, request: Any = None) -> None:
        issue = self.ring.issue
        if isinstance(reply, (P.GetChunksReply, P.RemoteFillCommitReply)):  # committed chunks: read
            for ref in reply.chunks:
                ref.token = issue(ref.chunk_id, P.TOKEN_READ)
        elif isinstance(reply, P.AllocChunkReply):  # a new chunk: write, and read back
            reply.token = issue(reply.chunk_id, READ_WRITE)
        elif isinstance(reply, P.KVLookupReply):  # the map a mount's open of a KV file reads with
            if reply.file is not None:
                self.stamp(reply.file)
        elif isinstance(reply, (P.KVChunksReply, P.KVLookupManyReply, P.RemoteFillAllocReply)):
            for part in getattr(reply, "files", None) or getattr(reply, "replies", None) or getattr(reply, "chunks", []):
                if part is not None:
                    self.stamp(part)
        elif isinstance(reply, P.ChunkLocationsReply) and isinstance(request, P.ChunkLocations):
            reply.tokens = [issue(c, P.TOKEN_READ) for c in request.chunk_ids]
        elif isinstance(reply, (P.RegisterReply, P.HeartbeatReply)) and getattr(reply, "known", True):
            reply.keys = self.ring.accepted()
