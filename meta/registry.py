"""Chunkserver registry: identities, liveness, placement of new chunks and where each chunk lives.

Chunk locations are not persisted (as in GFS): they are rebuilt from what chunkservers report when
they register, plus the chains handed out for new chunks. Deletions of dereferenced chunks are queued
per server and delivered in heartbeat replies.
"""

from __future__ import annotations

import errno
import random
import time
import uuid
from dataclasses import dataclass, field

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.meta.engine import MetaEngine


@dataclass
class ServerState:
    record: R.ServerRecord
    capacity: int = 0
    used: int = 0
    chunks: int = 0
    last_heartbeat: float = 0.0
    registered: bool = False
    pending_deletes: set[int] = field(default_factory=set)


class Registry:
    def __init__(self, engine: MetaEngine, counters: R.Counters, *, heartbeat_timeout: float = 10.0,
                 orphan_grace: float = 120.0, clock=time.monotonic):
        self.engine = engine
        self.counters = counters
        self.heartbeat_timeout = heartbeat_timeout
        self.orphan_grace = orphan_grace
        self.clock = clock
        self.servers: dict[int, ServerState] = {}
        self.by_node: dict[str, int] = {}
        self.locations: dict[int, set[int]] = {}  # chunk id -> server ids
        # Chunks that lost a copy to a confirmed bad-chunk report -> the servers whose copy was bad: the
        # replicator brings them back to R copies elsewhere (a bad server still has the file until its
        # delete lands, and would take a write of the same checksums as already done).
        self.degraded: dict[int, set[int]] = {}
        # Chunks a server reported that no file references: deleted after a grace period, since a
        # client may still be about to commit a chunk it wrote just before meta restarted.
        self.suspects: dict[tuple[int, int], float] = {}
        self.started = clock()
        for key, raw in engine.scan(b"S"):
            rec = R.decode_server(raw)
            self.by_node[key[1:].decode()] = rec.server_id
            self.servers[rec.server_id] = ServerState(rec)

    # ------------------------------------------------------------------ membership

    def is_alive(self, state: ServerState) -> bool:
        return state.registered and self.clock() - state.last_heartbeat < self.heartbeat_timeout

    @staticmethod
    def is_draining(state: ServerState) -> bool:
        """Being (or done being) decommissioned: serves reads, gets no new chunks, its copies don't count."""
        return bool(state.record.drain)

    def save(self, state: ServerState) -> None:
        """Persist a server's record (identity and drain state)."""
        node_id = next(n for n, sid in self.by_node.items() if sid == state.record.server_id)
        self.engine.write([(R.server_key(node_id), R.encode(state.record))])

    def forget(self, state: ServerState) -> None:
        """Remove a server from the cluster: its record, and it as a holder of any chunk. If it ever
        registers again it is a new server, and its chunk files are judged like any server's."""
        sid = state.record.server_id
        node_id = next(n for n, i in self.by_node.items() if i == sid)
        self.engine.write([(R.server_key(node_id), None)])
        del self.by_node[node_id]
        del self.servers[sid]
        for holders in self.locations.values():
            holders.discard(sid)
        for bad in self.degraded.values():
            bad.discard(sid)
        self.suspects = {k: t for k, t in self.suspects.items() if k[0] != sid}

    def register(self, req: P.RegisterChunkserver, is_live_chunk) -> P.RegisterReply:
        server_id = self.by_node.get(req.node_id)
        if server_id is None:
            server_id = self.counters.next_server_id
            self.counters.next_server_id += 1
            self.by_node[req.node_id] = server_id
        old = self.servers.get(server_id)
        record = R.ServerRecord(server_id, req.address, req.data_dir, req.host_id, old.record.drain if old else "")
        # Persist only the server id counter. The stored inode/chunk counters are the namespace's
        # reserved limits, ahead of the in-memory ones: writing those back would let a restarted
        # meta hand out inode and chunk ids again (overwriting files and chunks).
        raw = self.engine.get(R.COUNTERS_KEY)
        stored = R.decode_counters(raw) if raw else R.Counters(cluster_id=self.counters.cluster_id)
        stored.next_server_id = max(stored.next_server_id, self.counters.next_server_id)
        self.engine.write([(R.server_key(req.node_id), R.encode(record)), (R.COUNTERS_KEY, R.encode(stored))])
        state = self.servers.get(server_id)
        if state is None:
            state = self.servers[server_id] = ServerState(record)
        state.record = record
        state.capacity, state.used, state.chunks = req.capacity, req.used, len(req.chunk_ids)
        state.last_heartbeat = self.clock()
        state.registered = True
        # Forget what we believed this server held; its report is the truth now.
        for holders in self.locations.values():
            holders.discard(server_id)
        now = self.clock()
        for chunk_id in req.chunk_ids:
            if is_live_chunk(chunk_id):
                self.locations.setdefault(chunk_id, set()).add(server_id)
            else:
                self.suspects.setdefault((server_id, chunk_id), now)
        return P.RegisterReply(server_id, [], 0)

    def heartbeat(self, req: P.Heartbeat, is_live_chunk) -> P.HeartbeatReply:
        state = self.servers.get(req.server_id)
        if state is None or not state.registered:
            return P.HeartbeatReply([], known=False)
        state.capacity, state.used, state.chunks = req.capacity, req.used, req.chunks
        state.last_heartbeat = self.clock()
        now = self.clock()
        for key, first_seen in list(self.suspects.items()):
            if key[0] != req.server_id or now - first_seen < self.orphan_grace:
                continue
            del self.suspects[key]
            if not is_live_chunk(key[1]):
                state.pending_deletes.add(key[1])
            else:
                self.locations.setdefault(key[1], set()).add(key[0])
        deletes = sorted(state.pending_deletes)[:10000]
        state.pending_deletes.difference_update(deletes)
        return P.HeartbeatReply(deletes)

    def address_of(self, server_id: int) -> str | None:
        state = self.servers.get(server_id)
        return state.record.address if state else None

    def live_servers(self) -> list[ServerState]:
        return [s for s in self.servers.values() if self.is_alive(s)]

    # ------------------------------------------------------------------ placement and locations

    def place(self, replication: int, size_hint: int) -> list[ServerState]:
        """Pick ``replication`` distinct live servers, weighted towards free space."""
        alive = [s for s in self.live_servers() if not self.is_draining(s)]
        if not alive:
            # Not a full disk: none is reachable (or none has re-registered since meta restarted).
            # EIO, which writers retry, not ENOSPC, which tells a user to delete data.
            raise error(errno.EIO, f"no live chunkserver ({len(self.servers)} known, none heartbeating)")
        live = [s for s in alive if s.capacity - s.used > max(size_hint, 1)]
        if not live:
            raise error(errno.ENOSPC, "no live chunkserver has free space")
        if len(live) < replication:
            raise error(errno.EIO, f"need {replication} live chunkservers for a new chunk, have {len(live)}")
        chosen: list[ServerState] = []
        pool = list(live)
        for _ in range(replication):
            weights = [max(s.capacity - s.used, 1) for s in pool]
            pick = random.choices(range(len(pool)), weights=weights)[0]
            chosen.append(pool.pop(pick))
        return chosen

    def adopt(self, chunk_id: int) -> None:
        """``chunk_id`` was just committed: servers that reported it while no file referenced it (a client
        wrote it before meta restarted, committed after) hold it, so they become its locations."""
        if not self.suspects:
            return
        for key in [k for k in self.suspects if k[1] == chunk_id]:
            del self.suspects[key]
            self.locations.setdefault(chunk_id, set()).add(key[0])

    def add_locations(self, chunk_id: int, server_ids: list[int]) -> None:
        self.locations.setdefault(chunk_id, set()).update(server_ids)

    def replicas_of(self, chunk_id: int) -> list[str]:
        """Addresses of live servers holding ``chunk_id``, most free space first."""
        holders = [self.servers[sid] for sid in self.locations.get(chunk_id, ()) if sid in self.servers]
        live = [s for s in holders if self.is_alive(s)]
        live.sort(key=lambda s: (self.is_draining(s), s.used - s.capacity))  # draining servers: a last resort
        return [s.record.address for s in live]

    def drop_chunk(self, chunk_id: int) -> None:
        """The chunk is no longer referenced: delete it from every server that holds it."""
        for sid in self.locations.pop(chunk_id, ()):
            state = self.servers.get(sid)
            if state is not None:
                state.pending_deletes.add(chunk_id)

    def holder_at(self, chunk_id: int, address: str) -> int | None:
        """The id of the server at ``address`` if meta believes it holds ``chunk_id``."""
        for sid in self.locations.get(chunk_id, ()):
            state = self.servers.get(sid)
            if state is not None and state.record.address == address:
                return sid
        return None

    def drop_replica(self, chunk_id: int, server_id: int) -> None:
        """That copy is bad (its server confirmed it): forget it, delete it, and copy the chunk again."""
        holders = self.locations.get(chunk_id)
        state = self.servers.get(server_id)
        if holders is None or server_id not in holders or state is None:
            return
        holders.discard(server_id)
        state.pending_deletes.add(chunk_id)
        self.degraded.setdefault(chunk_id, set()).add(server_id)

    def info(self, drain_states: dict[int, tuple[str, int]] | None = None) -> list[P.ChunkserverInfo]:
        """One row per server; ``drain_states``: server id -> (state, chunks left) of draining servers."""
        now = time.time()
        mono = self.clock()
        out = []
        for sid, s in sorted(self.servers.items()):
            age = mono - s.last_heartbeat if s.registered else float("inf")
            alive = self.is_alive(s)
            state, left = (drain_states or {}).get(sid, ("live" if alive else "dead", 0))
            out.append(P.ChunkserverInfo(sid, s.record.address, s.record.data_dir, s.record.host_id,
                                         s.capacity, s.used, s.chunks, alive,
                                         now - age if age != float("inf") else 0.0, state, left))
        return out


def new_cluster_id() -> str:
    return uuid.uuid4().hex
