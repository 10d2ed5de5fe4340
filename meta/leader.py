"""HA meta on etcd: several meta processes, one leader elected through an etcd lease, fenced writes.

Every process (``kvfs meta --engine etcd://...``) listens and keeps one etcd lease alive (keep-alive
three to four times per TTL) with a presence key ``<prefix>/members/<address>``. Leadership is the key
``<prefix>/leader`` (value: the leader's address), created only when absent and tied to the lease, so
it disappears when the leader dies or is cut off for a TTL. Standbys poll it and campaign when it is
gone.

A new leader takes the namespace from its warm standby copy (meta/etcd_mirror.py: loaded once, then
kept current through etcd's watch; loaded from etcd when the copy cannot catch up) into
``EtcdEngine(pipelined=True)`` (the leader is the only writer, so it serves reads from memory, and its
writes reach etcd by group commit), rebuilds what lived only in the old leader's memory the way a restart
does (write leases of writers with pending chunks, pending chunks from their ``P`` records, id counters
from the reserved blocks in ``N``, chunk locations from chunkservers re-registering), and fences the
engine to its leader key's create revision: every transaction is conditional on that key, so a
deposed leader's writes fail with EIO.

The leader also stops answering as leader as soon as its own view of the lease runs out (last
successful keep-alive sent + TTL - a margin), before etcd expires the key: a leader that was paused
(SIGSTOP, a long GC, a frozen VM) wakes up as a standby and never serves a stale read.

Standbys (and a leader that stepped down) answer every request with ``P.NOT_LEADER`` naming the leader;
clients (``kvfs/meta_router.py``) go there. ``META_HA_STATUS`` is answered by every process.
"""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Callable

import trio
from sortedcontainers import SortedDict

from kvfs import protocol as P
from kvfs.meta.engine_etcd import EtcdClient, EtcdEngine, parse_url
from kvfs.meta.etcd_mirror import Mirror
from kvfs.rpc import NotLeader, RpcServer, ServerLimits
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.meta.leader")

WARMUP_METHODS = frozenset({P.META_REGISTER, P.META_HEARTBEAT})
WARMUP_SECONDS = 3.0  # chunkservers heartbeat every second; one that is not back by then is down
MARGIN = 0.5  # seconds of the lease the leader does not count on (clock-rate differences, scheduling)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Election:
    """The blocking etcd side of leadership (run in worker threads; one EtcdClient per caller task)."""

    def __init__(self, endpoints: list[str], root: bytes, address: str, ttl: int):
        self.endpoints = endpoints
        self.key = root + b"/leader"
        self.members_prefix = root + b"/members/"
        self.address = address
        self.ttl = ttl

    def client(self) -> EtcdClient:
        return EtcdClient(self.endpoints, timeout=max(0.5, min(2.0, self.ttl / 3)))

    def grant(self, c: EtcdClient) -> int:
        lease = int(c.call("/v3/lease/grant", {"TTL": self.ttl})["ID"])
        c.call("/v3/kv/put", {"key": _b64(self.members_prefix + self.address.encode()), "value": _b64(b"1"),
                              "lease": str(lease)})
        return lease

    def keepalive(self, c: EtcdClient, lease: int) -> int:
        """Seconds left on the lease after renewing it (0: it is gone)."""
        return int(c.call("/v3/lease/keepalive", {"ID": str(lease)}).get("result", {}).get("TTL", 0) or 0)

    def leader(self, c: EtcdClient) -> tuple[str, int, int]:
        """(address, create revision, lease) of the leader key; ("", 0, 0) when there is none."""
        kvs = c.range(self.key)
        if not kvs:
            return "", 0, 0
        kv = kvs[0]
        return base64.b64decode(kv.get("value", "")).decode(), int(kv["create_revision"]), int(kv.get("lease", 0))

    def acquire(self, c: EtcdClient, lease: int) -> int:
        """Create the leader key if absent; returns its create revision (0 when another holds it)."""
        key = _b64(self.key)
        reply = c.call("/v3/kv/txn", {
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": _b64(self.address.encode()), "lease": str(lease)}}],
        })
        return int(reply["header"]["revision"]) if reply.get("succeeded") else 0

    def resign(self, c: EtcdClient, revision: int) -> None:
        """Delete the leader key if it is still the one created at ``revision`` (ours)."""
        key = _b64(self.key)
        c.call("/v3/kv/txn", {
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}],
            "success": [{"request_delete_range": {"key": key}}],
        })

    def members(self, c: EtcdClient) -> list[str]:
        end = self.members_prefix[:-1] + bytes([self.members_prefix[-1] + 1])
        return sorted(base64.b64decode(kv["key"])[len(self.members_prefix):].decode()
                      for kv in c.range(self.members_prefix, end, keys_only=True))

    def etcd_health(self, c: EtcdClient) -> list[P.EtcdMemberStatus]:
        out = []
        for endpoint in self.endpoints:
            try:
                s = c.call_one(endpoint, "/v3/maintenance/status", {}, timeout=1.0)
                out.append(P.EtcdMemberStatus(endpoint, True, s.get("leader") == s.get("header", {}).get("member_id"),
                                              s.get("version", ""), int(s.get("dbSize", 0))))
            except Exception as exc:  # OSError or EtcdError: either way this member does not answer
                out.append(P.EtcdMemberStatus(endpoint, False, error=str(exc)[:200]))
        return out


class HaMeta:
    """One meta process of an HA group: serves as leader or standby on one listening socket."""

    def __init__(self, url: str, make_service: Callable[[EtcdEngine], object], *, ttl: int = 5,
                 advertise: str = "", engine_timeout: float = 5.0, limits: ServerLimits | None = None,
                 warm_standby: bool = True):
        self.endpoints, self.root = parse_url(url)
        self.make_service = make_service  # engine -> MetaService (builds the Namespace over the engine)
        self.ttl = max(2, int(ttl))
        self.advertise = advertise
        self.engine_timeout = engine_timeout
        self.limits = limits
        self.warm_standby = warm_standby
        self.address = ""
        self.election: Election | None = None
        self.leader = ""  # last known leader address
        self.lease = 0
        self.term_lease = 0  # the lease our leader key is bound to (while we lead)
        self.valid_until = 0.0  # trio.current_time(): our lease is surely alive until then
        self.leading_revision = 0  # create revision of our leader key while we lead
        self.active: dict | None = None  # the leader's handlers
        self.warming: dict | None = None  # a new leader's handlers while chunkservers re-register
        self.terms = 0  # times this process became leader

    def is_leader(self) -> bool:
        # The lease must still be the one the leader key is bound to: after it expired, a new lease
        # (granted at once) says nothing about the key, which etcd deleted with the old one.
        return ((self.active or self.warming) is not None and self.lease == self.term_lease
                and trio.current_time() < self.valid_until)

    def _not_leader(self) -> NotLeader:
        leader = self.leader if self.leader != self.address else ""
        return NotLeader(f"meta {self.address} is not the leader; "
                         f"{'the leader is ' + leader if leader else 'a leader is being elected'}", leader)

    def _route(self, method: int):
        async def handler(request, data):
            active = self.active
            if active is None and method in WARMUP_METHODS:
                active = self.warming
            if active is None or not self.is_leader():
                raise self._not_leader()
            return await active[method](request, data)

        return handler

    async def _status(self, _request, _data) -> P.HaStatusReply:
        assert self.election is not None
        election = self.election

        def collect():
            c = election.client()
            try:
                try:
                    leader = election.leader(c)[0]
                    members = election.members(c)
                except OSError:  # etcd unreachable or without quorum: nobody can be leading
                    leader, members = "", [self.address]
                return leader, members, election.etcd_health(c)
            finally:
                c.close()

        leader, members, health = await trio.to_thread.run_sync(collect)
        roles = [P.MetaMember(m, "leader" if m == leader else "standby") for m in members]
        return P.HaStatusReply("etcd", self.address, "leader" if self.is_leader() else "standby", leader, roles, health)

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        handlers = {method: self._route(method) for method in P.META_METHODS}
        handlers[P.META_HA_STATUS] = self._status
        server = RpcServer("meta", P.META_METHODS, handlers, self.limits)
        async with open_nursery() as nursery:
            bound = await nursery.start(server.serve, host, port)
            # The address other processes are told (leader key, NOT_LEADER hints): never a wildcard.
            self.address = self.advertise or f"{socket.gethostname() if host in ('', '0.0.0.0', '::') else host}:{bound}"
            self.election = Election(self.endpoints, self.root, self.address, self.ttl)
            nursery.start_soon(self._keep_lease)
            task_status.started(bound)
            log.info("meta %s: standing by (etcd %s, prefix %s)", self.address, ",".join(self.endpoints),
                     self.root.decode())
            while True:
                # A standby keeps a warm copy of the namespace (meta/etcd_mirror.py): taking over
                # is a catch-up to the election's revision, not a load of the whole namespace.
                mirror = Mirror(self.endpoints, self.root, timeout=self.engine_timeout) if self.warm_standby else None
                copy = None
                async with open_nursery() as standby:
                    if mirror is not None:
                        standby.start_soon(self._keep_copy, mirror)
                    revision, self.term_lease = await self._campaign()
                    if mirror is not None:
                        copy = await trio.to_thread.run_sync(mirror.take, revision, max(2.0, self.engine_timeout))
                    standby.cancel_scope.cancel()  # a load still under way finishes alone and is dropped
                await self._lead(revision, copy)

    # ------------------------------------------------------------------ the lease (always, leader or not)

    async def _keep_lease(self) -> None:
        assert self.election is not None
        election = self.election
        c = election.client()
        warned = False
        try:
            while True:
                sent = trio.current_time()
                try:
                    if not self.lease:
                        lease = await trio.to_thread.run_sync(election.grant, c)
                        self.lease, self.valid_until = lease, sent + self.ttl - MARGIN
                    else:
                        left = await trio.to_thread.run_sync(election.keepalive, c, self.lease)
                        if left > 0:
                            self.valid_until = sent + left - MARGIN
                        else:
                            log.warning("meta %s: etcd lease expired", self.address)
                            self.lease, self.valid_until = 0, 0.0
                            continue
                    if warned:
                        log.info("meta %s: etcd reachable again", self.address)
                    warned = False
                except OSError as exc:
                    if not warned:
                        log.warning("meta %s: cannot renew etcd lease (%s)", self.address, exc)
                    warned = True
                await trio.sleep(self.ttl / 4)
        finally:
            c.close()

    # ------------------------------------------------------------------ standby: wait for the leader key

    async def _keep_copy(self, mirror: Mirror) -> None:
        try:
            await trio.to_thread.run_sync(mirror.run, abandon_on_cancel=True)
        except Exception:  # a bug in the copy must not stop the standby: it loads from etcd instead
            log.exception("meta %s: the standby copy of the namespace failed", self.address)

    async def _campaign(self) -> tuple[int, int]:
        """Wait until this process holds the leader key; returns its create revision and its lease."""
        assert self.election is not None
        election = self.election
        c = election.client()
        last_seen = None
        try:
            while True:
                try:
                    leader, revision, lease = await trio.to_thread.run_sync(election.leader, c)
                    if leader and lease == self.lease and leader == self.address:
                        # Our own key, left by a term that ended (engine failure): give it up first.
                        await trio.to_thread.run_sync(election.resign, c, revision)
                        continue
                    self.leader = leader
                    if not leader and self.lease and trio.current_time() < self.valid_until:
                        lease = self.lease
                        revision = await trio.to_thread.run_sync(election.acquire, c, lease)
                        if revision:
                            return revision, lease
                    elif leader and leader != last_seen:
                        log.info("meta %s: standby; leader is %s", self.address, leader)
                        last_seen = leader
                except OSError as exc:
                    log.debug("meta %s: campaign: %s", self.address, exc)
                await trio.sleep(min(0.25, self.ttl / 8))
        finally:
            c.close()

    # ------------------------------------------------------------------ leader

    async def _lead(self, revision: int, copy: SortedDict | None = None) -> None:
        """Serve as the leader until the lease or the engine fails. ``copy``: the standby's warm copy of
        the namespace, current up to ``revision`` (None: load it from etcd)."""
        assert self.election is not None
        election = self.election
        started = time.monotonic()

        def load() -> EtcdEngine:  # the network part (the whole namespace) off the event loop
            engine = EtcdEngine(self.endpoints, self.root, timeout=self.engine_timeout, cache=True, pipelined=True,
                                loaded=copy)
            engine.fence(election.key, revision)
            return engine

        try:
            engine = await trio.to_thread.run_sync(load)
            try:
                service = self.make_service(engine)  # from the in-memory copy; writes the root on a new store
                await trio.to_thread.run_sync(engine.sync)  # what loading wrote (root, orphan purges)
            except BaseException:
                await self._close(engine)
                raise
        except OSError as exc:
            log.error("meta %s: won the election but cannot load the namespace (%s); resigning", self.address, exc)
            await self._resign(revision)
            return
        self.leader = self.address
        self.leading_revision = revision
        self.terms += 1
        handlers, tier = service.build()  # type: ignore[attr-defined]
        log.info("meta %s: leader (term revision %d), namespace %s in %.2fs", self.address, revision,
                 "from the warm standby copy" if copy is not None else "loaded from etcd", time.monotonic() - started)
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(service.run, tier, self.address)  # type: ignore[attr-defined]
                await self._warm_up(service, handlers)
                self.active = handlers
                flushed = trio.current_time()
                while True:
                    if trio.current_time() >= self.valid_until or self.lease != self.term_lease:
                        log.warning("meta %s: lost the etcd lease; stepping down", self.address)
                        break
                    if engine.broken:
                        log.warning("meta %s: %s; stepping down", self.address, engine.broken)
                        break
                    if engine.unsynced and trio.current_time() - flushed > 0.5:
                        # Changes no reply waits for (housekeeping) still reach etcd soon.
                        flushed = trio.current_time()
                        try:
                            await service.commits.wait_durable(engine.writes)  # type: ignore[attr-defined]
                        except OSError:
                            continue  # the engine is broken: the next pass steps down
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        finally:
            self.active = self.warming = None
            self.leading_revision = 0
            service.commits.close("this meta stepped down before the change reached etcd")  # type: ignore[attr-defined]
            if self.leader == self.address:
                self.leader = ""
            with trio.CancelScope(shield=True):
                await self._close(engine)
        await self._resign(revision)

    async def _close(self, engine: EtcdEngine) -> None:
        """Close the engine (sending what is queued, fenced: refused if we no longer lead)."""
        try:
            await engine.aclose()
        except OSError as exc:
            log.warning("meta %s: closing the metadata engine: %s", self.address, exc)

    async def _warm_up(self, service, handlers: dict) -> None:
        """Serve only chunkserver registrations and heartbeats until enough chunkservers are back to
        place new chunks (or a few heartbeat periods passed): clients wait as for the election,
        instead of failing their writes with "no live chunkserver"."""
        registry = service.ns.registry  # type: ignore[attr-defined]
        want = min(service.ns.replication, len(registry.servers))  # type: ignore[attr-defined]
        self.warming = handlers
        with trio.move_on_after(WARMUP_SECONDS):
            while len(registry.live_servers()) < want:
                await trio.sleep(0.05)
        self.warming = None
        log.info("meta %s: serving (%d chunkservers registered)", self.address, len(registry.live_servers()))

    async def _resign(self, revision: int) -> None:
        assert self.election is not None
        election = self.election

        def resign():
            c = election.client()
            try:
                election.resign(c, revision)
            finally:
                c.close()

        with trio.move_on_after(2):
            try:
                await trio.to_thread.run_sync(resign, abandon_on_cancel=True)
            except OSError as exc:
                log.debug("meta %s: resign: %s", self.address, exc)

