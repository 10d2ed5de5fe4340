"""Bad-chunk reports (META_REPORT_BAD_CHUNK), verified before a replica is dropped (issue 13).

A reader that finds a checksum mismatch reports the chunk and the server it read from. Acting on the
report alone would let any client (or tenant) delete replicas of any chunk, so meta asks that server
to re-read its copy against its stored block checksums (CHUNK_VERIFY, meta's role only) and drops the
replica only when the server confirms it is bad or missing; the replicator then copies the chunk
again from a good holder. The only copy of a chunk is never dropped: it stays, so the blocks that are
still good can be read (reads of the bad ones fail with EIO). A server that cannot be reached keeps its replica: if it stays down, the
dead-server handling (meta/replication.py) applies.

Reports are checked one at a time from a bounded queue, each (chunk, server) once while queued, so a
flood of false reports costs at most one chunk read each and is dropped beyond the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from kvfs import protocol as P
from kvfs.meta.registry import Registry
from kvfs.rpc import RpcClient

log = logging.getLogger("kvfs.meta")

MAX_QUEUED = 1024


class BadChunkChecks:
    def __init__(self, registry: Registry, client: Callable[[str], RpcClient], *, max_queued: int = MAX_QUEUED,
                 timeout: float = 60.0):
        self.registry = registry
        self.client = client  # address -> meta's RpcClient to that chunkserver
        self.timeout = timeout
        self._send, self._receive = trio.open_memory_channel[tuple[int, int]](max_queued)
        self._queued: set[tuple[int, int]] = set()
        self.confirmed = 0  # replicas dropped
        self.refuted = 0  # reports whose copy checked out fine
        self.kept_last = 0  # confirmed bad, but kept: no other copy anywhere

    def report(self, req: P.ReportBadChunk, who: str) -> None:
        """Queue a check of the copy ``req`` names (nothing when meta knows no such copy)."""
        log.warning("chunk %x on %s reported bad by %s: %s", req.chunk_id, req.address, who, req.reason)
        sid = self.registry.holder_at(req.chunk_id, req.address)
        if sid is None or (req.chunk_id, sid) in self._queued:
            return
        try:
            self._send.send_nowait((req.chunk_id, sid))
        except trio.WouldBlock:
            log.warning("too many bad-chunk reports queued (%d): ignored the one for chunk %x",
                        len(self._queued), req.chunk_id)
            return
        self._queued.add((req.chunk_id, sid))

    async def run(self) -> None:
        async for chunk_id, sid in self._receive:
            try:
                await self.check(chunk_id, sid)
            finally:
                self._queued.discard((chunk_id, sid))

    async def check(self, chunk_id: int, sid: int) -> None:
        address = self.registry.address_of(sid)
        if address is None or self.registry.holder_at(chunk_id, address) != sid:
            return  # dropped or deleted meanwhile
        try:
            reply = await self.client(address).request(P.CHUNK_VERIFY, P.VerifyChunk(chunk_id), timeout=self.timeout)
        except OSError as exc:
            log.warning("could not verify chunk %x on %s (%s): replica kept", chunk_id, address, exc)
            return
        if reply.ok:
            self.refuted += 1
            log.warning("chunk %x on %s checked out fine: bad-chunk report ignored", chunk_id, address)
            return
        self.confirmed += 1
        if not any(other != sid for other in self.registry.locations.get(chunk_id, ())):
            # The only copy: dropping it would lose its good blocks too (and there is nothing to copy it
            # from). Kept: reads of its bad blocks fail with EIO, the rest stay readable.
            self.kept_last += 1
            log.error("chunk %x on %s confirmed bad (%s), but it is the only copy: kept, so its good "
                      "blocks stay readable", chunk_id, address, reply.reason)
            return
        log.warning("chunk %x on %s confirmed bad (%s): replica dropped, re-replicating", chunk_id, address,
                    reply.reason)
        self.registry.drop_replica(chunk_id, sid)
