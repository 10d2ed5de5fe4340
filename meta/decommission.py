"""Decommissioning chunkservers (issue 13; ``kvfs chunkserver decommission ADDRESS``, admin only).

A decommissioned server is *draining*: placement skips it (``Registry.place``), readers try it last,
and its copies do not count towards a chunk's replica count, so the replicator (meta/replication.py)
copies each of its chunks to other live servers. Once every chunk it holds has R copies on live,
non-draining servers it is *decommissioned*: stopping it loses nothing. The drain state is persisted
in its ``ServerRecord`` (a restarted meta keeps draining it); "decommissioned" is persisted too, so a
server already stopped still shows as such after a meta restart. Progress is derived from chunk
locations, never stored: if another server dies, a decommissioned one that is still running goes back
to draining until its chunks are safe again.

Error handling: ``start`` raises ENOENT for an unknown address and ENOSPC when draining the server would
leave fewer live servers than the replication factor. ``forget`` (a decommissioned server that has been
stopped leaves the list) raises EBUSY for any other server.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta.registry import Registry, ServerState

log = logging.getLogger("kvfs.meta")

REFRESH_SECONDS = 2.0  # progress is a scan of every chunk location: at most this often (clients list servers)

DRAINING = "draining"
DECOMMISSIONED = "decommissioned"


class Decommissioner:
    def __init__(self, registry: Registry, replication: int, is_live_chunk: Callable[[int], bool], *,
                 clock=time.monotonic):
        self.registry = registry
        self.replication = replication
        self.is_live_chunk = is_live_chunk
        self.clock = clock
        self._states: dict[int, tuple[str, int]] = {}
        self._states_at = float("-inf")

    def start(self, address: str, cancel: bool = False, forget: bool = False) -> P.ChunkserverInfo:
        reg = self.registry
        state = next((s for s in reg.servers.values() if s.record.address == address), None)
        if state is None:
            raise error(errno.ENOENT, f"no chunkserver at {address} (kvfs status lists them)")
        if forget:
            return self._forget(state)
        if cancel:
            if state.record.drain:
                self._set(state, "")
                log.info("chunkserver %s: decommission cancelled; it takes new chunks again", address)
        elif not state.record.drain:
            others = [s for s in reg.live_servers() if s is not state and not reg.is_draining(s)]
            if len(others) < self.replication:
                raise error(errno.ENOSPC, f"decommissioning {address} would leave {len(others)} live chunkservers "
                            f"for replication {self.replication}; add a chunkserver first")
            self._set(state, DRAINING)
            log.info("chunkserver %s: decommissioning (draining %d chunks)", address, state.chunks)
        return next(i for i in self.info() if i.server_id == state.record.server_id)

    def _forget(self, state: ServerState) -> P.ChunkserverInfo:
        """Drop a decommissioned server that has been stopped from the cluster's list (and its record)."""
        address = state.record.address
        if state.record.drain != DECOMMISSIONED or self.registry.is_alive(state):
            now = "still running" if self.registry.is_alive(state) else f"{state.record.drain or 'not decommissioned'}"
            raise error(errno.EBUSY, f"chunkserver {address} is {now}: only a decommissioned server that has been "
                        "stopped can be forgotten")
        row = next(i for i in self.info() if i.server_id == state.record.server_id)
        self.registry.forget(state)
        self._states_at = float("-inf")
        log.info("chunkserver %s: forgotten (it was decommissioned and stopped)", address)
        row.state = "forgotten"
        return row

    def _set(self, state: ServerState, drain: str) -> None:
        state.record.drain = drain
        self.registry.save(state)
        self._states_at = float("-inf")  # the next look recomputes

    def chunks_left(self) -> dict[int, int]:
        """Draining server id -> how many of its chunks still lack R copies on live, non-draining servers."""
        reg = self.registry
        draining = {sid for sid, s in reg.servers.items() if reg.is_draining(s)}
        if not draining:
            return {}
        good = {sid for sid, s in reg.servers.items() if sid not in draining and reg.is_alive(s)}
        left = dict.fromkeys(draining, 0)
        for chunk_id, holders in reg.locations.items():
            mine = holders & draining
            if mine and len(holders & good) < self.replication and self.is_live_chunk(chunk_id):
                for sid in mine:
                    left[sid] += 1
        return left

    def states(self) -> dict[int, tuple[str, int]]:
        """Draining server id -> (state, chunks left), at most REFRESH_SECONDS old; persists the moves to
        and from "decommissioned"."""
        now = self.clock()
        if now - self._states_at < REFRESH_SECONDS:
            return self._states
        reg = self.registry
        out = {}
        for sid, left in self.chunks_left().items():
            state = reg.servers[sid]
            if state.record.drain == DECOMMISSIONED and not state.registered:
                done = True  # it was done, then stopped (and meta restarted): nothing more to copy from it
            else:
                # Until it registers (after a meta restart) its chunks are unknown: not done yet.
                done = left == 0 and state.registered
            want = DECOMMISSIONED if done else DRAINING
            if state.record.drain != want:
                self._set(state, want)
                log.info("chunkserver %s: %s", state.record.address,
                         "decommissioned (safe to stop)" if done else f"draining again ({left} chunks left)")
            out[sid] = (want, left)
        self._states, self._states_at = out, now
        return out

    def info(self) -> list[P.ChunkserverInfo]:
        return self.registry.info(self.states())
