"""Chunks allocated but not yet referenced by any file: who owns each one, and when it becomes garbage.

A writer uploads chunks first and commits them at close/fsync, which can be minutes later for a slow
writer (a checkpoint streamed as it is produced). Each pending chunk is persisted (``P`` records), so
a meta restart forgets none of them, and is tied to its owner:

* a chunk of an open file (``ino`` and ``client_id``) lives as long as that client holds the file's
  write lease; the client renews the lease in the background while it has the file open, so only a
  dead or partitioned writer loses its chunks;
* a chunk with no file yet (``ino == 0``: a KV block before ``KV_PUBLISH``, a remote fill before its
  commit) lives ``grace`` seconds from its allocation (or from meta's start, after a restart).

Only chunks that no file references are ever dropped. A commit names its chunks, and the namespace
refuses one that is no longer pending here (EIO to the writer, never a silent hole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvfs.meta import records as R
from kvfs.meta.engine import Batch, MetaEngine


@dataclass
class Pending:
    ino: int  # 0: no file yet
    client_id: str
    allocated_at: float  # meta's monotonic clock (meta's start for records loaded after a restart)


class PendingChunks:
    def __init__(self, engine: MetaEngine, clock: Callable[[], float], *, grace: float = 120.0):
        self.engine = engine
        self.clock = clock
        self.grace = grace
        self._chunks: dict[int, Pending] = {}
        now = clock()
        for key, raw in engine.scan(R.PENDING_PREFIX):
            rec = R.decode_pending(raw)
            self._chunks[R.U64.unpack(key[1:])[0]] = Pending(rec.ino, rec.client_id, now)

    def __contains__(self, chunk_id: int) -> bool:
        return chunk_id in self._chunks

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, chunk_id: int) -> Pending | None:
        return self._chunks.get(chunk_id)

    def writers(self) -> set[tuple[int, str]]:
        """(ino, client) of every writer with uploaded, uncommitted chunks (their leases survive a restart)."""
        return {(p.ino, p.client_id) for p in self._chunks.values() if p.ino}

    def add(self, batch: Batch, chunk_id: int, ino: int = 0, client_id: str = "") -> None:
        """Record a new chunk in ``batch`` (the caller writes it); tracked from now on."""
        batch.append((R.pending_key(chunk_id), R.encode(R.PendingRecord(ino, client_id))))
        self._chunks[chunk_id] = Pending(ino, client_id, self.clock())

    def settle(self, batch: Batch, chunk_ids) -> None:
        """The chunks were committed (or dropped) in ``batch``: no longer pending once it is written."""
        for chunk_id in chunk_ids:
            if self._chunks.pop(chunk_id, None) is not None:
                batch.append((R.pending_key(chunk_id), None))

    def expired(self, lease_held: Callable[[int, str], bool]) -> list[int]:
        """Chunks whose owner is gone: a file writer that lost its lease, or an unowned chunk past the grace."""
        cutoff = self.clock() - self.grace
        return [chunk_id for chunk_id, p in self._chunks.items()
                if (not lease_held(p.ino, p.client_id) if p.ino else p.allocated_at < cutoff)]
