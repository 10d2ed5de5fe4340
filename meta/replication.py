"""Re-replication: bring chunks that lost replicas (dead chunkservers) back to R copies.

Runs from the meta service's housekeeping loop. A chunk is repaired once a holder has been down for
``delay`` seconds past the heartbeat timeout (a quick restart should not trigger copies): meta picks new
servers with the usual placement and asks one live holder to copy the chunk to them (CHUNK_REPLICATE).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from kvfs import protocol as P
from kvfs.meta.registry import Registry
from kvfs.rpc import RpcClient

log = logging.getLogger("kvfs.meta")


class Replicator:
    def __init__(self, registry: Registry, replication: int, is_live_chunk: Callable[[int], bool], *,
                 delay: float = 30.0, batch: int = 64, clock=time.monotonic):
        self.registry = registry
        self.replication = replication
        self.is_live_chunk = is_live_chunk
        self.delay = delay
        self.batch = batch
        self.clock = clock
        self.repaired = 0
        self._clients: dict[str, RpcClient] = {}

    def plan(self) -> list[tuple[int, str, list[str]]]:
        """(chunk id, live source address, new target addresses) for under-replicated chunks."""
        reg = self.registry
        now = self.clock()
        down_long = {sid for sid, s in reg.servers.items()
                     if not reg.is_alive(s) and now - s.last_heartbeat > reg.heartbeat_timeout + self.delay}
        if not down_long:
            return []
        live = {sid: s for sid, s in reg.servers.items() if reg.is_alive(s)}
        out = []
        for chunk_id, holders in reg.locations.items():
            if len(out) >= self.batch:
                break
            live_holders = [sid for sid in holders if sid in live]
            if not live_holders or len(live_holders) >= self.replication or not holders & down_long:
                continue
            if not self.is_live_chunk(chunk_id):
                continue
            candidates = [s for sid, s in live.items() if sid not in holders and s.capacity - s.used > 0]
            need = self.replication - len(live_holders)
            if not candidates:
                continue
            candidates.sort(key=lambda s: s.used - s.capacity)
            targets = [s.record.address for s in candidates[:need]]
            out.append((chunk_id, live[live_holders[0]].record.address, targets))
        return out

    async def run_once(self) -> int:
        done = 0
        for chunk_id, source, targets in self.plan():
            client = self._clients.get(source)
            if client is None:
                client = self._clients[source] = RpcClient("chunkserver", source, P.CHUNK_METHODS, timeout=60.0)
            try:
                await client.call(P.CHUNK_REPLICATE, P.ReplicateChunk(chunk_id, targets))
            except OSError as exc:
                log.warning("re-replicating chunk %x from %s to %s failed: %s", chunk_id, source, targets, exc)
                continue
            by_address = {s.record.address: sid for sid, s in self.registry.servers.items()}
            self.registry.add_locations(chunk_id, [by_address[a] for a in targets if a in by_address])
            done += 1
        if done:
            self.repaired += done
            log.info("re-replicated %d chunks", done)
        return done

    async def loop(self, interval: float = 2.0) -> None:
        while True:
            await trio.sleep(interval)
            await self.run_once()
