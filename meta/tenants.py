"""Tenants (issue 13): admin-managed meta state, and each tenant's usage against its quotas.

A tenant is a record ``T<name>`` (records.TenantRecord) naming its root directory (``/tenants/<name>``,
created by ``tenant add``), the uid/gid its clients' files get, and its quotas (bytes, files, KV blocks;
0 = unlimited). Every inode carries the tenant whose tree holds it (``Inode.tenant``, inherited from
the parent at creation; rename and link across tenants are refused), so "is this inode the caller's"
is one point read, never a walk up the tree, and stays true under rename and link.

Usage is counted incrementally as the namespace changes (``charge``, called from namespace.py's
hooks), and rebuilt from the inode and chunk records when meta starts: the records are the truth,
so the counters survive a restart and can never drift from them.

The confinement of a tenant's requests lives in meta/tenant_guard.py; the scope of the request
being served (the caller's tenant) is the context variable here, read by the namespace's path
resolution (``scope_root``).
"""

from __future__ import annotations

import errno
import re
import stat
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvfs import identity
from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta import records as R

if TYPE_CHECKING:
    from kvfs.meta.namespace import Namespace

TENANTS_DIR = "tenants"  # under the root: /tenants/<name>
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# The tenant of the request being served (set by meta/tenant_guard.py), None outside a tenant's request.
scope: ContextVar[R.TenantRecord | None] = ContextVar("kvfs_tenant_scope", default=None)


def scope_root(default: int) -> int:
    """The directory a path of the current request starts from: its tenant's root, else ``default``."""
    s = scope.get()
    return s.root_ino if s is not None else default


def pending_owner() -> str:
    """The owner recorded on a KV_ALLOC chunk: KV_PUBLISH accepts a tenant's chunks only from that tenant."""
    s = scope.get()
    return f"tenant:{s.name}" if s is not None else ""


def require_operator(what: str) -> None:
    """Tenant management is for admins of the whole cluster, not for a tenant's own admin."""
    caller = identity.require_role(identity.ROLE_ADMIN, what=what)
    if caller.tenant:
        raise PermissionError(errno.EACCES, f"{what}: {caller.describe()} is confined to a tenant")


@dataclass
class Usage:
    files: int = 0
    bytes: int = 0
    kv_blocks: int = 0


class Tenants:
    def __init__(self, ns: Namespace):
        self.ns = ns
        self.records = {rec.name: rec for rec in (R.decode_tenant(raw) for _, raw in ns.engine.scan(R.TENANT_PREFIX))}
        self.usage: dict[str, Usage] = {}
        if self.records:  # clusters without tenants pay nothing at start-up
            self._rebuild_usage()

    def _rebuild_usage(self) -> None:
        owner: dict[int, str] = {}
        for key, raw in self.ns.engine.scan(b"A"):
            node = R.decode_inode(raw)
            if node.tenant:
                owner[R.U64.unpack(key[1:])[0]] = node.tenant
                self.charge(node.tenant, files=1, kv_blocks=int(node.kv_block))
        if owner:
            for key, raw in self.ns.engine.scan(b"C"):
                tenant = owner.get(R.U64.unpack(key[1:9])[0])
                if tenant:
                    self.charge(tenant, nbytes=R.decode_chunk(raw).length)

    def charge(self, tenant: str, *, files: int = 0, nbytes: int = 0, kv_blocks: int = 0) -> None:
        u = self.usage.get(tenant)
        if u is None:
            u = self.usage[tenant] = Usage()
        u.files += files
        u.bytes += nbytes
        u.kv_blocks += kv_blocks

    def of(self, name: str) -> Usage:
        return self.usage.get(name) or Usage()

    def is_root(self, ino: int) -> bool:
        return any(rec.root_ino == ino for rec in self.records.values())

    # ------------------------------------------------------------------ quotas

    def check_quota(self, rec: R.TenantRecord, *, files: int = 0, nbytes: int = 0, kv_blocks: int = 0) -> None:
        """EDQUOT if adding this much would pass one of the tenant's quotas."""
        u = self.of(rec.name)
        for want, used, quota, what in ((files, u.files, rec.quota_files, "files"),
                                        (nbytes, u.bytes, rec.quota_bytes, "bytes"),
                                        (kv_blocks, u.kv_blocks, rec.quota_kv_blocks, "KV blocks")):
            if want > 0 and quota and used + want > quota:
                raise error(errno.EDQUOT, f"tenant {rec.name}: {what} quota exceeded ({used} of {quota} used)")

    # ------------------------------------------------------------------ admin operations (META_TENANT_*)

    def add(self, spec: P.TenantSpec) -> R.TenantRecord:
        """Create the tenant and its root directory ``/tenants/<name>`` (owned by its uid/gid). A root
        left by an add that crashed before its record was written (empty, tagged) is adopted."""
        from kvfs.meta.namespace import ROOT_INO

        if not NAME_RE.fullmatch(spec.name):
            raise error(errno.EINVAL, f"bad tenant name {spec.name!r} (letters, digits, '.', '_', '-'; at most 64)")
        if spec.name in self.records:
            raise error(errno.EEXIST, f"tenant {spec.name} exists")
        ns = self.ns
        if ns._child(ROOT_INO, TENANTS_DIR) is None:
            top = ns.mknode(ROOT_INO, TENANTS_DIR, stat.S_IFDIR | 0o755, 0, 0)
        else:
            top = ns.lookup(ROOT_INO, TENANTS_DIR)
        if not stat.S_ISDIR(top.mode):
            raise error(errno.ENOTDIR, f"/{TENANTS_DIR} is not a directory")
        rec = R.TenantRecord(spec.name, 0)
        _apply(rec, spec)
        existing = ns._child(top.ino, spec.name)
        if existing is None:
            root = ns.mknode(top.ino, spec.name, stat.S_IFDIR | 0o755, rec.uid, rec.gid, tenant=spec.name)
            rec.root_ino = root.ino
        else:
            node = ns.inode(existing)
            if node.tenant != spec.name or not stat.S_ISDIR(node.mode) or not ns._dir_empty(existing):
                raise error(errno.EEXIST, f"/{TENANTS_DIR}/{spec.name} exists and is not an empty root of this tenant")
            rec.root_ino = existing
        self._store(rec)
        return rec

    def set(self, spec: P.TenantSpec) -> R.TenantRecord:
        rec = self.get(spec.name)
        _apply(rec, spec)
        self._store(rec)
        return rec

    def remove(self, name: str) -> None:
        """Forget a tenant and remove its root. Refused (ENOTEMPTY) while its root holds anything."""
        rec = self.get(name)
        ns = self.ns
        try:
            node = ns.inode(rec.root_ino)
        except FileNotFoundError:
            node = None
        if node is not None and not ns._dir_empty(rec.root_ino):
            raise error(errno.ENOTEMPTY, f"tenant {name}: its root directory is not empty; remove its files first")
        ns.engine.write([(R.tenant_key(name), None)])
        del self.records[name]
        if node is not None and ns._child(node.parent, name) == rec.root_ino:
            ns.rmdir(node.parent, name)

    def get(self, name: str) -> R.TenantRecord:
        rec = self.records.get(name)
        if rec is None:
            raise error(errno.ENOENT, f"no tenant {name!r}")
        return rec

    def _store(self, rec: R.TenantRecord) -> None:
        self.ns.engine.write([(R.tenant_key(rec.name), R.encode(rec))])
        self.records[rec.name] = rec

    def info(self, rec: R.TenantRecord, root_path: str) -> P.TenantInfo:
        u = self.of(rec.name)
        return P.TenantInfo(rec.name, rec.root_ino, root_path, rec.uid, rec.gid, rec.quota_bytes, rec.quota_files,
                            rec.quota_kv_blocks, u.bytes, u.files, u.kv_blocks)


def _apply(rec: R.TenantRecord, spec: P.TenantSpec) -> None:
    for name in ("uid", "gid", "quota_bytes", "quota_files", "quota_kv_blocks"):
        value = getattr(spec, name)
        if value is not None:
            if value < 0:
                raise error(errno.EINVAL, f"{name} must not be negative")
            setattr(rec, name, value)


def tenant_handlers(tenants: Tenants, path_of) -> dict:
    """META_TENANT_* handlers. ``path_of``: inode -> absolute path (for the listing)."""

    def info(rec: R.TenantRecord) -> P.TenantInfo:
        try:
            root_path = path_of(rec.root_ino)
        except OSError:
            root_path = ""  # removed from under the tenant by hand
        return tenants.info(rec, root_path)

    async def add(r: P.TenantSpec, _) -> P.TenantInfo:
        require_operator("tenant add")
        return info(tenants.add(r))

    async def set_(r: P.TenantSpec, _) -> P.TenantInfo:
        require_operator("tenant set")
        return info(tenants.set(r))

    async def list_(r: P.Empty, _) -> P.TenantListReply:
        caller = identity.peer()  # a tenant's client sees its own row only
        recs = [tenants.get(caller.tenant)] if caller.tenant else sorted(tenants.records.values(), key=lambda t: t.name)
        return P.TenantListReply([info(rec) for rec in recs])

    async def remove(r: P.TenantName, _) -> P.Empty:
        require_operator("tenant remove")
        tenants.remove(r.name)
        return P.Empty()

    return {P.META_TENANT_ADD: add, P.META_TENANT_SET: set_, P.META_TENANT_LIST: list_, P.META_TENANT_REMOVE: remove}
