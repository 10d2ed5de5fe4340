"""Talk to the leader of several meta processes (HA meta on etcd), with the interface of one ``RpcClient``.

``meta_client("h1:9400,h2:9400")`` returns a ``MetaRouter``; a single address keeps the plain
``RpcClient`` (one meta on RocksDB, as before).

The router sends each request to the meta it believes leads. A standby answers ``NOT_LEADER`` naming
the leader (the request was not run): the router goes there. When the leader cannot be reached:

* a request that never left (connection refused or timed out) goes to the next address;
* a request that was sent but got no reply may or may not have run. Idempotent methods
  (``P.META_IDEMPOTENT``: reads, lease renewals, commits of the same chunks, ...) are sent again
  to whichever meta leads now; any other (create, unlink, rename, publish, ...) fails at once with
  EIO saying its outcome is unknown, so it never runs twice.

It keeps trying for ``failover_timeout`` seconds (a new leader takes over within the leader TTL plus
a namespace load), then raises the last error. A leader that is paused or cut off rather than dead
neither answers nor fails a request: an idempotent request is sent in growing slices of the timeout,
and between them the router asks the other metas whether one of them leads now (``_watched_call``).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import trio

from kvfs import metrics
from kvfs import protocol as P
from kvfs.errors import error
from kvfs.rpc import Bulk, ConnectError, NotLeader, RpcClient, TransportError

log = logging.getLogger(__name__)


def meta_addresses(address: str) -> list[str]:
    return [a.strip() for a in address.split(",") if a.strip()]


def meta_client(address: str, *, timeout: float = 30.0, connect_timeout: float = 5.0,
                failover_timeout: float = 20.0, ssl_context: Any = True) -> RpcClient | MetaRouter:
    """The client for ``--meta``/``KVFS_META``: one address or a comma-separated list.
    ``ssl_context``: as ``RpcClient``'s (True: the process's TLS material, if any)."""
    addresses = meta_addresses(address)
    if len(addresses) == 1:
        return RpcClient("meta", addresses[0], P.META_METHODS, timeout=timeout, connect_timeout=connect_timeout,
                         ssl_context=ssl_context)
    return MetaRouter(addresses, timeout=timeout, connect_timeout=connect_timeout, failover_timeout=failover_timeout,
                      ssl_context=ssl_context)


class LeaderMoved(TransportError):
    """No reply from the meta we sent to, and ``leader`` says it leads now (outcome unknown)."""

    def __init__(self, code: int, message: str, leader: str):
        super().__init__(code, message)
        self.leader = leader


class MetaRouter:
    service = "meta"

    def __init__(self, addresses: list[str], *, timeout: float = 30.0, connect_timeout: float = 5.0,
                 failover_timeout: float = 20.0, suspect_after: float = 2.0, ssl_context: Any = True):
        if not addresses:
            raise ValueError("no meta addresses")
        self.addresses = list(addresses)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.failover_timeout = failover_timeout
        self.suspect_after = suspect_after  # a call this slow makes the router check who leads
        self.ssl_context = ssl_context
        self.leader: str | None = None
        self._clients: dict[str, RpcClient] = {}
        self._next = 0  # where the search for a leader goes on

    @property
    def address(self) -> str:
        return self.leader or ",".join(self.addresses)

    def _client(self, address: str) -> RpcClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = RpcClient("meta", address, P.META_METHODS, timeout=self.timeout,
                                                   connect_timeout=self.connect_timeout, ssl_context=self.ssl_context)
        return c

    def _candidate(self) -> str:
        if self.leader is not None:
            return self.leader
        address = self.addresses[self._next % len(self.addresses)]
        self._next += 1
        return address

    async def call(self, method: int, request: P.Struct, data: Bulk = None, *,
                   into: memoryview | None = None, timeout: float | None = None) -> tuple[Any, memoryview | None]:
        """``RpcClient.call`` on the leader. Error handling: as RpcClient; EIO when no leader answers
        within ``failover_timeout``, or when a non-idempotent request's outcome is unknown."""
        deadline = trio.current_time() + self.failover_timeout
        misses = 0  # addresses tried since the last useful answer
        while True:
            address = self._candidate()
            try:
                result = await self._watched_call(address, method, request, data, into, timeout)
            except NotLeader as exc:
                # Not run: go to the leader it names, or keep looking while one is elected.
                hint = exc.leader or None
                if hint is not None and hint not in self.addresses:
                    self.addresses.append(hint)
                self.leader = hint if hint != address else None
                last: OSError = exc
            except ConnectError as exc:
                self.leader = None
                last = exc
            except TransportError as exc:
                self.leader = exc.leader if isinstance(exc, LeaderMoved) else None
                if not P.is_idempotent(method, request):
                    name = metrics.method_name("meta", method)
                    raise error(errno.EIO, f"meta {address} failed during {name} ({exc.strerror}); whether it "
                                "took effect is unknown (meta failover): check before retrying") from None
                last = exc
            else:
                if self.leader != address:
                    if self.leader is None and misses:
                        log.info("meta leader is %s", address)
                    self.leader = address
                return result
            misses += 1
            if trio.current_time() >= deadline:
                if isinstance(last, NotLeader):  # standbys answer, nobody leads (etcd lost its quorum?)
                    raise error(errno.EIO, f"no meta leader within {self.failover_timeout:g}s ({last.strerror})")
                raise last
            if misses % len(self.addresses) == 0:
                await trio.sleep(0.2)  # nobody leads yet: an election takes up to the leader TTL

    async def _watched_call(self, address: str, method: int, request: P.Struct, data: Bulk,
                            into: memoryview | None, timeout: float | None) -> tuple[Any, memoryview | None]:
        """The call to ``address``. A leader that is paused or cut off (not dead) neither answers nor
        fails: an idempotent request is therefore sent in growing time slices (``suspect_after``, then
        twice as long, ...); between slices the other metas are asked whether one of them leads now,
        and if one does the request goes there (``LeaderMoved``) instead of waiting for the whole
        timeout. A request that is merely slow is sent again, to the same meta, with a longer slice.
        Other requests wait for the whole timeout (nothing else is safe). Fast calls cost nothing extra."""
        client = self._client(address)
        total = client.timeout if timeout is None else timeout
        if not P.is_idempotent(method, request) or total <= self.suspect_after or len(self.addresses) < 2:
            return await client.call(method, request, data, into=into, timeout=timeout)
        deadline = trio.current_time() + total
        slice_ = self.suspect_after
        while True:
            left = deadline - trio.current_time()
            try:
                return await client.call(method, request, data, into=into, timeout=min(slice_, left))
            except ConnectError:
                raise
            except TransportError:
                if trio.current_time() >= deadline:
                    raise
            leader = await self._leader_elsewhere(address)
            if leader:
                raise LeaderMoved(errno.EIO, f"meta {address}: no reply while {leader} took over as leader", leader)
            slice_ *= 2

    async def _leader_elsewhere(self, address: str) -> str | None:
        """Another meta that says it leads now (any meta answers META_HA_STATUS, leader or not)."""
        for other in list(self.addresses):
            if other == address:
                continue
            try:
                st = await self._client(other).request(P.META_HA_STATUS, P.Empty(), timeout=2.0)
            except OSError:
                continue
            if st.role == "leader":
                return other
        return None

    async def request(self, method: int, request: P.Struct, *, timeout: float | None = None) -> Any:
        reply, _ = await self.call(method, request, timeout=timeout)
        return reply

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
