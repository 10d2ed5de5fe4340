"""Confine a tenant's requests to its tree: one wrapper around every meta handler (issue 13).

For a caller with no tenant (admins, services, plaintext peers) the wrapper only reads the peer and
calls through. For a tenant's caller, before the handler runs:

1. The tenant must exist (``kvfs tenant add``), else EACCES, on HELLO and every other method.
2. Only the methods a mount or native client needs are allowed (``TENANT_METHODS``; everything else,
   remote attach/detach/sync/evict, eviction passes, chunkserver registration, tenant management, is
   EACCES): a method added later is refused to tenants until it is listed here.
3. Every inode the request names (fields ``ino``, ``parent``, ``new_parent``, ``inos``, ``parents``) must carry the
   caller's tenant; another tenant's inode, or one outside any tenant, is ENOENT as if it did not exist.
   Children carry their parent's tenant (meta/tenants.py), so names looked up under a checked
   directory need no further check; rename and link across tenants are EXDEV in the namespace.
4. Paths (RESOLVE, EXISTS_MANY, KV_EXISTS, KV_CHUNKS, remote fills) start at the tenant's root:
   the request's scope is set (``tenants.scope``) and the namespace reads it; ``..`` at the root stays.
5. uid/gid come from the tenant's record, not the request: creates get them; a chown to anything
   else is EPERM.
6. Quotas: files on create, bytes on chunk allocation, commit growth and publish, KV blocks on
   publish: EDQUOT before anything changes, so nothing already acknowledged is lost.

Replies that describe the whole cluster are narrowed to the tenant (STATFS, LIST_CHUNKSERVERS totals,
KV_STATUS rows, REMOTE_LIST). Chunk reads and writes on chunkservers are protected by signed chunk
tokens (issue 13, chunk capabilities) that meta hands out only in replies that passed these checks.
"""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Callable
from typing import Any

from kvfs import identity
from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.meta.namespace import Namespace
from kvfs.meta.tenants import pending_owner, scope

log = logging.getLogger("kvfs.meta.tenants")

TENANT_METHODS = frozenset({
    P.META_HELLO, P.META_LOOKUP, P.META_GETATTR, P.META_SETATTR, P.META_MKNODE, P.META_UNLINK, P.META_RMDIR,
    P.META_RENAME, P.META_LINK, P.META_SYMLINK, P.META_READLINK, P.META_READDIR, P.META_STATFS,
    P.META_SETXATTR, P.META_GETXATTR, P.META_LISTXATTR, P.META_REMOVEXATTR, P.META_RESOLVE, P.META_EXISTS_MANY,
    P.META_OPEN_WRITE, P.META_RELEASE_WRITE, P.META_GET_CHUNKS, P.META_ALLOC_CHUNK, P.META_COMMIT, P.META_PURGE,
    P.META_RENEW_LEASES, P.META_LIST_CHUNKSERVERS, P.META_REPORT_BAD_CHUNK, P.META_CHUNK_LOCATIONS,
    P.META_KV_EXISTS, P.META_KV_STATUS, P.META_KV_CHUNKS, P.META_KV_ALLOC, P.META_KV_PUBLISH, P.META_KV_LOOKUP,
    P.META_KV_LOOKUP_MANY,
    P.META_REMOTE_LIST, P.META_REMOTE_INFO, P.META_REMOTE_FILL_ALLOC, P.META_REMOTE_FILL_COMMIT,
    P.META_REMOTE_REFILL, P.META_HA_STATUS, P.META_TENANT_LIST,
})
INODE_FIELDS = ("ino", "parent", "new_parent")

Handler = Callable[[Any, Any], Any]


class TenantGuard:
    def __init__(self, ns: Namespace, path_of: Callable[[int], str]):
        self.ns = ns
        self.tenants = ns.tenants
        self.path_of = path_of  # inode -> its absolute path (KVCache.path_of)
        self._before: dict[int, Callable[[R.TenantRecord, Any], None]] = {
            P.META_MKNODE: self._create, P.META_SYMLINK: self._create, P.META_SETATTR: self._setattr,
            P.META_KV_PUBLISH: self._publish, P.META_ALLOC_CHUNK: self._alloc, P.META_KV_ALLOC: self._alloc,
            P.META_COMMIT: self._commit,
        }
        self._after: dict[int, Callable[[R.TenantRecord, Any], Any]] = {
            P.META_HELLO: self._hello, P.META_STATFS: self._statfs, P.META_LIST_CHUNKSERVERS: self._servers,
            P.META_KV_STATUS: self._kv_status, P.META_REMOTE_LIST: lambda rec, reply: P.RemoteListReply([]),
        }

    def wrap(self, handlers: dict[int, Handler]) -> dict[int, Handler]:
        return {method: self._guarded(method, h) for method, h in handlers.items()}

    def _guarded(self, method: int, handler: Handler) -> Handler:
        before, after = self._before.get(method), self._after.get(method)
        allowed = method in TENANT_METHODS

        async def guarded(r, data):
            caller = identity.peer()
            if not caller.tenant:
                return await handler(r, data)
            rec = self.tenants.records.get(caller.tenant)
            if rec is None:
                raise PermissionError(errno.EACCES, f"tenant {caller.tenant!r} of {caller.describe()} does not exist "
                                      "on this cluster (kvfs tenant add)")
            if not allowed:
                raise PermissionError(errno.EACCES, f"method {method} is not open to tenants ({caller.describe()})")
            token = scope.set(rec)
            try:
                self._check_inodes(rec, r)
                if before is not None:
                    before(rec, r)
                reply = await handler(r, data)
                return after(rec, reply) if after is not None else reply
            finally:
                scope.reset(token)

        return guarded

    # ------------------------------------------------------------------ checks before the handler

    def _visible(self, rec: R.TenantRecord, ino: int) -> R.Inode | None:
        """The inode if it is the tenant's; ENOENT if it is someone else's; None if it does not exist
        (the handler then answers as it would for anyone)."""
        raw = self.ns.engine.get(R.inode_key(ino))
        if raw is None:
            return None
        node = R.decode_inode(raw)
        if node.tenant != rec.name:
            raise error(errno.ENOENT, f"no inode {ino}")
        return node

    def _check_inodes(self, rec: R.TenantRecord, r: Any) -> None:
        for name in INODE_FIELDS:
            ino = getattr(r, name, None)
            if isinstance(ino, int):
                self._visible(rec, ino)
        for field in ("inos", "parents"):
            for ino in getattr(r, field, None) or ():
                self._visible(rec, ino)

    def _create(self, rec: R.TenantRecord, r: P.MkNode | P.Symlink) -> None:
        r.uid, r.gid = rec.uid, rec.gid
        if self.ns._child(r.parent, r.name) is None:
            self.tenants.check_quota(rec, files=1)

    def _setattr(self, rec: R.TenantRecord, r: P.SetAttr) -> None:
        if r.uid not in (None, rec.uid) or r.gid not in (None, rec.gid):
            raise error(errno.EPERM, f"tenant {rec.name}: files belong to uid {rec.uid}, gid {rec.gid}")

    def _publish(self, rec: R.TenantRecord, r: P.KVPublish) -> None:
        r.uid, r.gid = rec.uid, rec.gid
        owner = pending_owner()
        for c in r.chunks:
            p = self.ns.pending.get(c.chunk_id)
            if p is not None and p.client_id != owner:  # another tenant's block, not yet published
                raise error(errno.EINVAL, f"chunk {c.chunk_id} was not allocated by tenant {rec.name}")
        if self.ns._child(r.parent, r.name) is None:
            self.tenants.check_quota(rec, files=1, nbytes=r.size, kv_blocks=1)

    def _alloc(self, rec: R.TenantRecord, r: P.AllocChunk | P.KVAlloc) -> None:
        ino = getattr(r, "ino", 0)  # KVAlloc: a block not yet published, sized by its hint
        nbytes = r.size_hint or (self.ns.file_chunk_size(self.ns.inode(ino)) if ino else self.ns.chunk_size)
        self.tenants.check_quota(rec, nbytes=nbytes)

    def _commit(self, rec: R.TenantRecord, r: P.Commit) -> None:
        node = self._visible(rec, r.ino)
        if node is not None and stat.S_ISREG(node.mode) and r.size > node.size:
            self.tenants.check_quota(rec, nbytes=r.size - node.size)

    # ------------------------------------------------------------------ replies narrowed to the tenant

    def _hello(self, rec: R.TenantRecord, reply: P.HelloReply) -> P.HelloReply:
        reply.root_ino, reply.tenant = rec.root_ino, rec.name
        return reply

    def _statfs(self, rec: R.TenantRecord, reply: P.StatFsReply) -> P.StatFsReply:
        u = self.tenants.of(rec.name)
        reply.files = u.files
        if rec.quota_bytes:
            reply.total_bytes = min(reply.total_bytes, rec.quota_bytes)
            reply.free_bytes = min(reply.free_bytes, max(rec.quota_bytes - u.bytes, 0))
        return reply

    def _servers(self, rec: R.TenantRecord, reply: P.ListChunkserversReply) -> P.ListChunkserversReply:
        u = self.tenants.of(rec.name)
        reply.files, reply.used_bytes = u.files, u.bytes
        return reply

    def _kv_status(self, rec: R.TenantRecord, reply: P.KVStatusReply) -> P.KVStatusReply:
        root = self.path_of(rec.root_ino).rstrip("/")
        rows = []
        for row in reply.dirs:
            if row.path == root or row.path.startswith(root + "/"):
                row.path = row.path[len(root):] or "/"
                rows.append(row)
        reply.dirs = rows
        return reply
