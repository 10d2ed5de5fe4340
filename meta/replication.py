"""Re-replication: bring chunks that lost replicas (dead chunkservers) back to R copies, and trim the
extra copies once such a server comes back.

Runs from the meta service's housekeeping loop. A chunk is repaired once a holder has been down for
``delay`` seconds past the heartbeat timeout (a quick restart should not trigger copies): meta picks new
servers with the usual placement and asks one live holder to copy the chunk to them (CHUNK_REPLICATE).
When the dead server returns, its report (registration) makes those chunks R+1 copies: with every
holder alive, the copies beyond R on the fullest servers are deleted (heartbeat delete lists), so
capacity is not leaked to failures that healed.

The same repair copies the chunks of a draining server (meta/decommission.py: its copies don't count,
it is never trimmed) and chunks whose copy a chunkserver confirmed bad (meta/bad_chunks.py).
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
    def __init__(self, registry: Registry, replication: int, is_live_chunk: Callable[[int], bool],
                 issue_token: Callable[[int, int], bytes], *, delay: float = 30.0, batch: int = 64,
                 clock=time.monotonic):
        self.registry = registry
        self.issue_token = issue_token  # (chunk id, P.TOKEN_* bits) -> capability (meta/chunk_keys.py)
        self.replication = replication
        self.is_live_chunk = is_live_chunk
        self.delay = delay
        self.batch = batch
        self.clock = clock
        self.repaired = 0
        self.trimmed = 0
        self._clients: dict[str, RpcClient] = {}

    def client(self, address: str) -> RpcClient:
        """Meta's pooled connection to a chunkserver (shared with meta/bad_chunks.py)."""
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = RpcClient("chunkserver", address, P.CHUNK_METHODS, timeout=60.0)
        return client

    def plan(self) -> list[tuple[int, str, list[str]]]:
        """(chunk id, live source address, new target addresses) for under-replicated chunks: those with
        a copy on a server down for long, on a draining server (meta/decommission.py), or that lost a
        copy to a confirmed bad-chunk report (``Registry.degraded``). Only copies on live, non-draining
        servers count; a draining server may be the source."""
        reg = self.registry
        now = self.clock()
        down_long = {sid for sid, s in reg.servers.items()
                     if not reg.is_alive(s) and now - s.last_heartbeat > reg.heartbeat_timeout + self.delay}
        draining = {sid for sid, s in reg.servers.items() if reg.is_draining(s)}
        if not down_long and not draining and not reg.degraded:
            return []
        suspect = down_long | draining
        live = {sid: s for sid, s in reg.servers.items() if reg.is_alive(s)}
        # Only the degraded chunks need a look unless a server is gone or draining (no full scan).
        chunks = reg.locations.items() if suspect else [(c, reg.locations.get(c, set())) for c in list(reg.degraded)]
        out = []
        for chunk_id, holders in chunks:
            if len(out) >= self.batch:
                break
            sources = [sid for sid in holders if sid in live]
            counted = [sid for sid in sources if sid not in draining]
            if not sources or len(counted) >= self.replication:
                reg.degraded.pop(chunk_id, None)  # nothing to copy from, or whole again
                continue
            if chunk_id not in reg.degraded and not holders & suspect:
                continue
            if not self.is_live_chunk(chunk_id):
                reg.degraded.pop(chunk_id, None)
                continue
            bad = reg.degraded.get(chunk_id, ())
            candidates = [s for sid, s in live.items()
                          if sid not in holders and sid not in draining and sid not in bad and s.capacity - s.used > 0]
            need = self.replication - len(counted)
            if not candidates:
                continue
            candidates.sort(key=lambda s: s.used - s.capacity)
            targets = [s.record.address for s in candidates[:need]]
            source = (counted or sources)[0]  # spare a draining server's disk when another copy serves
            out.append((chunk_id, live[source].record.address, targets))
        return out

    def plan_trims(self) -> list[tuple[int, int]]:
        """(chunk id, server id) copies to delete: committed chunks held by more than R live servers,
        only while every holder is alive (a dead holder may come back; a new copy may be in flight)."""
        reg = self.registry
        out = []
        for chunk_id, holders in reg.locations.items():
            if len(holders) <= self.replication:
                continue
            states = [reg.servers.get(sid) for sid in holders]
            # A draining server's copies neither count nor get trimmed (it serves reads until stopped);
            # a dead one's may come back, unless it was draining.
            if any(s is None or not (reg.is_alive(s) or reg.is_draining(s)) for s in states):
                continue
            counted = [s for s in states if s is not None and not reg.is_draining(s)]
            if len(counted) <= self.replication or not self.is_live_chunk(chunk_id):
                continue
            fullest_first = sorted(counted, key=lambda s: s.capacity - s.used)
            out += [(chunk_id, s.record.server_id) for s in fullest_first[:len(counted) - self.replication]]
            if len(out) >= self.batch:
                break
        return out

    def trim(self) -> int:
        trims = self.plan_trims()
        for chunk_id, server_id in trims:
            self.registry.locations[chunk_id].discard(server_id)
            self.registry.servers[server_id].pending_deletes.add(chunk_id)
        if trims:
            self.trimmed += len(trims)
            log.info("trimmed %d extra chunk copies", len(trims))
        return len(trims)

    async def run_once(self) -> int:
        self.trim()
        done = 0
        for chunk_id, source, targets in self.plan():
            try:
                # The source may push this chunk only; the targets may store only it.
                await self.client(source).call(P.CHUNK_REPLICATE, P.ReplicateChunk(
                    chunk_id, targets, self.issue_token(chunk_id, P.TOKEN_REPLICATE),
                    self.issue_token(chunk_id, P.TOKEN_WRITE)))
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
