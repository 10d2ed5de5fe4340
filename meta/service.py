"""The metadata service: a thin trio server that forwards each RPC in one line to the Namespace."""

from __future__ import annotations

import logging
import stat
import time

import trio

from kvfs import identity
from kvfs import protocol as P
from kvfs.kv.policy import POLICY_XATTRS
from kvfs.meta.bad_chunks import BadChunkChecks
from kvfs.meta.chunk_keys import DEFAULT_ROTATE_SECONDS, DEFAULT_TOKEN_SECONDS, Capabilities, KeyRing
from kvfs.meta.decommission import Decommissioner
from kvfs.meta.durability import GroupCommit
from kvfs.meta.eviction import KVCache
from kvfs.meta.kv_leases import DEFAULT_SECONDS as KV_LEASE_SECONDS
from kvfs.meta.kv_leases import KVLeases
from kvfs.meta.namespace import Namespace
from kvfs.meta.replication import Replicator
from kvfs.meta.tenant_guard import TenantGuard
from kvfs.meta.tenants import pending_owner, tenant_handlers
from kvfs.rpc import RpcServer, ServerLimits
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.meta")
TOUCH_FLUSH_SECONDS = 0.5  # how soon access times answered by KV lookups are written (best effort)


def _policy_needs_admin(xattr: str) -> None:
    """Policies (quotas, TTLs) are an admin's: a client may set any other xattr (protocol.META_ROLES)."""
    if xattr in POLICY_XATTRS:
        identity.require_role(identity.ROLE_ADMIN, what=f"setting or removing the {xattr} xattr")


class MetaService:
    def __init__(self, ns: Namespace, *, rereplicate_delay: float = 30.0, remote_allow: tuple[str, ...] | None = None,
                 token_seconds: float = DEFAULT_TOKEN_SECONDS, key_rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
                 kv_lease_seconds: float = KV_LEASE_SECONDS):
        self.ns = ns
        self.remote_allow = remote_allow  # None: KVFS_REMOTE_ALLOW (kvfs.remote.allow)
        # Chunk capabilities (issue 13): keys in the engine, tokens in every reply with chunk locations.
        self.keys = KeyRing(ns.engine, token_seconds=token_seconds, rotate_seconds=key_rotate_seconds)
        self.capabilities = Capabilities(self.keys)
        self.replicator = Replicator(ns.registry, ns.replication, ns.is_live_chunk, self.keys.issue,
                                     delay=rereplicate_delay)
        self.decommissioner = Decommissioner(ns.registry, ns.replication, ns.is_live_chunk)
        self.bad_chunks = BadChunkChecks(ns.registry, self.replicator.client)
        self.kv = KVCache(ns)
        self.kv_leases = KVLeases(ns.engine, kv_lease_seconds)  # KV map leases: replies held while they last
        self.commits = GroupCommit(ns.engine)

    def handlers(self):
        ns = self.ns
        E = P.Empty()

        async def hello(r, _):
            return P.HelloReply(P.PROTOCOL_VERSION, ns.chunk_size, ns.counters.cluster_id, ns.lease_seconds, kv_lookup=True,
                                per_file_chunk_size=True, kv_lookup_many=True)

        async def setxattr(r, _):
            _policy_needs_admin(r.name)
            ns.setxattr(r.ino, r.name, r.value, r.flags)
            return E

        async def removexattr(r, _):
            _policy_needs_admin(r.name)
            ns.removexattr(r.ino, r.name)
            return E

        async def rmdir(r, _):
            ns.rmdir(r.parent, r.name)
            return E

        async def release_write(r, _):
            ns.release_write(r.ino, r.client_id)
            return E

        async def purge(r, _):
            ns.purge(r.ino)
            return E

        async def report_bad(r, _):
            self.bad_chunks.report(r, identity.peer().describe())  # verified with the server before acting
            return E

        async def list_servers(r, _):
            return P.ListChunkserversReply(self.decommissioner.info(), ns.chunk_size, ns.replication, ns.files,
                                           ns.used_bytes)

        return {
            P.META_HELLO: hello,
            P.META_LOOKUP: lambda r, _: _now(ns.lookup(r.parent, r.name)),
            P.META_GETATTR: lambda r, _: _now(ns.attr(r.ino)),
            P.META_SETATTR: lambda r, _: _now(ns.setattr(r)),
            P.META_MKNODE: lambda r, _: _now(ns.mknode(r.parent, r.name, r.mode, r.uid, r.gid, r.rdev, r.exclusive,
                                                               lease_client=r.lease_client, chunk_size=r.chunk_size)),
            P.META_UNLINK: lambda r, _: _now(ns.unlink(r.parent, r.name, r.keep_open)),
            P.META_RMDIR: rmdir,
            P.META_RENAME: lambda r, _: _now(ns.rename(r.parent, r.name, r.new_parent, r.new_name, r.flags)),
            P.META_LINK: lambda r, _: _now(ns.link(r.ino, r.new_parent, r.new_name)),
            P.META_SYMLINK: lambda r, _: _now(ns.symlink(r.parent, r.name, r.target, r.uid, r.gid)),
            P.META_READLINK: lambda r, _: _now(P.ReadLinkReply(ns.readlink(r.ino))),
            P.META_READDIR: lambda r, _: _now(ns.readdir(r.ino, r.after, r.limit)),
            P.META_STATFS: lambda r, _: _now(ns.statfs()),
            P.META_SETXATTR: setxattr,
            P.META_GETXATTR: lambda r, _: _now(P.XattrValue(ns.getxattr(r.ino, r.name))),
            P.META_LISTXATTR: lambda r, _: _now(P.ListXattrReply(ns.listxattr(r.ino))),
            P.META_REMOVEXATTR: removexattr,
            P.META_RESOLVE: lambda r, _: _now(ns.resolve(r.path)),
            P.META_EXISTS_MANY: lambda r, _: _now(ns.exists_many(r.paths)),
            P.META_OPEN_WRITE: lambda r, _: _now(ns.open_write(r.ino, r.client_id)),
            P.META_RELEASE_WRITE: release_write,
            P.META_RENEW_LEASES: lambda r, _: _now(ns.renew_leases(r.client_id, r.inos)),
            P.META_GET_CHUNKS: lambda r, _: _now(ns.chunks(r.ino, r.first, r.count)),
            P.META_ALLOC_CHUNK: lambda r, _: _now(ns.alloc_chunk(r.ino, r.client_id, r.size_hint)),
            P.META_COMMIT: lambda r, _: _now(ns.commit(r)),
            P.META_PURGE: purge,
            P.META_REGISTER: lambda r, _: _now(_register(ns, r)),
            P.META_HEARTBEAT: lambda r, _: _now(ns.registry.heartbeat(r, ns.is_live_chunk)),
            P.META_LIST_CHUNKSERVERS: list_servers,
            P.META_REPORT_BAD_CHUNK: report_bad,
            P.META_DECOMMISSION: lambda r, _: _now(self.decommissioner.start(r.address, r.cancel, r.forget)),
            P.META_CHUNK_LOCATIONS: lambda r, _: _now(
                P.ChunkLocationsReply([ns.registry.replicas_of(c) for c in r.chunk_ids])),
            P.META_KV_EXISTS: lambda r, _: _now(self.kv.exists_under(r.base, r.names, r.leading_only)),
            P.META_KV_STATUS: lambda r, _: _now(self.kv.status()),
            P.META_KV_EVICT: lambda r, _: _now(self.kv.run_once()),
            P.META_KV_CHUNKS: lambda r, _: _now(self.kv.chunks_many(r.paths, self.kv_leases if r.lease else None,
                                                                  r.touch_before_ns)),
            P.META_KV_ALLOC: lambda r, _: _now(ns.alloc_pending_chunk(r.size_hint, 0, pending_owner())),
            P.META_KV_PUBLISH: lambda r, _: _now(ns.publish(r)),
            P.META_KV_LOOKUP: lambda r, _: _now(self.kv.lookup_chunks(r.parent, r.name, self.kv_leases if r.lease else None,
                                                                     r.touch_before_ns)),
            P.META_KV_LOOKUP_MANY: lambda r, _: _now(self.kv.lookup_chunks_many(
                r.parents, r.names, self.kv_leases if r.lease else None, r.touch_before_ns)),
            # A lone meta (RocksDB); meta/leader.py answers this for an HA group on etcd.
            P.META_HA_STATUS: lambda r, _: _now(P.HaStatusReply("rocksdb", "", "single", "", [], [])),
            **tenant_handlers(ns.tenants, self.kv.path_of),
        }

    def build(self):
        """The RPC handlers (remote tier layered over the namespace's, replies held for durability) and
        the remote tier whose background work ``run`` owns."""
        from kvfs.meta.remote import RemoteTier, TierOptions

        options = TierOptions() if self.remote_allow is None else TierOptions(allow=self.remote_allow)
        tier = RemoteTier(self.ns, options)  # remote capacity tier (issue 3): layers over the namespace handlers
        # Innermost: a change to a leased KV name is applied at once, acknowledged after the lease.
        leased = self.kv_leases.wrap(self.handlers(), self._is_dir)
        handlers = {method: self.commits.wrap(h)
                    for method, h in self.capabilities.wrap(tier.wrap(leased)).items()}
        # Outermost: a tenant's request is checked and scoped before the tier or the namespace sees it,
        # so chunk tokens only go out in replies that passed the tenant checks.
        return TenantGuard(self.ns, self.kv.path_of).wrap(handlers), tier

    async def run(self, tier, meta_address: str) -> None:
        """Background work of a serving meta: group commit, housekeeping, re-replication, remote uploads."""
        async with open_nursery() as nursery:
            nursery.start_soon(self.commits.run)
            nursery.start_soon(self._housekeeping)
            nursery.start_soon(self._record_kv_touches)
            nursery.start_soon(self.replicator.loop)
            nursery.start_soon(self.bad_chunks.run)
            nursery.start_soon(tier.run, meta_address)

    async def serve(self, host: str, port: int, *, limits: ServerLimits | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        handlers, tier = self.build()
        server = RpcServer("meta", P.META_METHODS, handlers, limits)
        async with open_nursery() as nursery:
            bound = await nursery.start(server.serve, host, port)
            nursery.start_soon(self.run, tier, f"{'127.0.0.1' if host in ('', '0.0.0.0', '::') else host}:{bound}")
            task_status.started(bound)

    async def _housekeeping(self) -> None:
        while True:
            # Often enough that expiry is never much later than its deadline (short graces in tests).
            await trio.sleep(min(5.0, self.ns.pending.grace / 4, self.ns.lease_seconds / 4))
            expired = self.ns.expire_pending()
            if expired:
                log.info("dropped %d uncommitted chunk(s) of writers that are gone", expired)
            self.kv.tick()
            self.kv_leases.tick()

    async def _record_kv_touches(self) -> None:
        """Write the access times KV lookups answered with (``KVCache.flush_touches``), a moment after: out
        of the lookups' replies, so they wait for no disk sync, and many lookups' in one go."""
        while True:
            await trio.sleep(TOUCH_FLUSH_SECONDS)
            try:
                self.kv.flush_touches()
            except OSError as exc:  # e.g. the engine refuses writes: recency is best effort
                log.warning("recording KV access times: %s", exc)

    def _is_dir(self, parent: int, name: str) -> bool:
        try:
            return stat.S_ISDIR(self.ns.lookup(parent, name).mode)
        except OSError:
            return False


def _register(ns: Namespace, r: P.RegisterChunkserver) -> P.RegisterReply:
    reply = ns.registry.register(r, ns.is_live_chunk)
    reply.chunk_size = ns.chunk_size
    log.info("chunkserver %d registered at %s (%d chunks)", reply.server_id, r.address, len(r.chunk_ids))
    return reply


async def _now(value):
    return value


def orphan_cutoff_ns(age_seconds: float = 3600) -> int:
    return time.time_ns() - int(age_seconds * 1e9)
