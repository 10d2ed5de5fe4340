"""The namespace: inodes, directory entries, xattrs, as a plain class (its file data: leases, chunk
maps, commit and KV publish, are the ``FileData`` part in meta/file_data.py).

Every mutating operation builds one batch and applies it with a single ``engine.write``, so a crash
leaves either the whole change or none of it. The service calls these methods from one trio thread,
so operations never interleave (no locks needed). Errors are ``OSError(errno)``.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.meta.engine import Batch, MetaEngine
from kvfs.meta.file_data import FileData
from kvfs.meta.layouts import Layouts, is_layout_xattr
from kvfs.meta.names import check_name, now_ns
from kvfs.meta.pending import PendingChunks
from kvfs.meta.registry import Registry, new_cluster_id
from kvfs.meta.tenants import Tenants, scope_root

ROOT_INO = 1
XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 << 10
ID_BLOCK = 4096  # ids are reserved in blocks so allocation rarely writes the counters


class Namespace(FileData, Layouts):
    def __init__(self, engine: MetaEngine, *, chunk_size: int = 4 << 20, replication: int = 1,
                 lease_seconds: float = 60.0, pending_grace: float = 120.0, registry: Registry | None = None,
                 clock=time.monotonic):
        self.engine = engine
        # Bumped by every rmdir and rename: whoever caches path -> directory inode (KVCache's block
        # lookups) drops its cache when this changes. Creating directories needs no bump.
        self.dir_epoch = 0
        self.chunk_size = chunk_size
        self.replication = replication
        self.lease_seconds = lease_seconds
        self.clock = clock
        raw = engine.get(R.COUNTERS_KEY)
        self.counters = R.decode_counters(raw) if raw else R.Counters(cluster_id=new_cluster_id())
        # Reserve id blocks ahead: after a crash, ids restart past everything ever handed out.
        self._ino_limit = self.counters.next_ino
        self._chunk_limit = self.counters.next_chunk_id
        self.registry = registry or Registry(engine, self.counters)
        self.leases: dict[int, tuple[str, float]] = {}  # ino -> (client id, expiry on self.clock)
        self.pending = PendingChunks(engine, clock, grace=pending_grace)
        # A writer with uploaded, uncommitted chunks keeps its lease across a meta restart: it gets a
        # full lease period from now to renew it.
        for ino, client_id in self.pending.writers():
            self.leases[ino] = (client_id, clock() + lease_seconds)
        if engine.get(R.inode_key(ROOT_INO)) is None:
            t = now_ns()
            root = R.Inode(stat.S_IFDIR | 0o755, 2, 0, 0, 0, t, t, t, parent=ROOT_INO)
            engine.write([(R.inode_key(ROOT_INO), R.encode(root)), (R.COUNTERS_KEY, R.encode(self.counters))])
        self.files = sum(1 for _ in engine.scan(b"A"))
        self.used_bytes = 0
        for _, raw in engine.scan(b"C"):
            self.used_bytes += R.decode_chunk(raw).length
        self.tenants = Tenants(self)

    def _charge(self, node: R.Inode, *, files: int = 0, nbytes: int = 0, kv_blocks: int = 0) -> None:
        """Usage changed: the cluster's totals, and the tenant's whose tree holds ``node``."""
        self.files += files
        self.used_bytes += nbytes
        if node.tenant:
            self.tenants.charge(node.tenant, files=files, nbytes=nbytes, kv_blocks=kv_blocks)

    def charge_bytes(self, ino: int, nbytes: int) -> None:
        """File data of ``ino`` was added or dropped outside the namespace's own calls (remote fills)."""
        raw = self.engine.get(R.inode_key(ino))
        if raw is None:
            self.used_bytes += nbytes
        else:
            self._charge(R.decode_inode(raw), nbytes=nbytes)

    # ------------------------------------------------------------------ helpers

    def _alloc_ino(self, batch: Batch) -> int:
        ino = self.counters.next_ino
        self.counters.next_ino += 1
        if self.counters.next_ino > self._ino_limit:
            self._ino_limit = self.counters.next_ino + ID_BLOCK
            batch.append((R.COUNTERS_KEY, R.encode(self._reserved_counters())))
        return ino

    def _reserved_counters(self) -> R.Counters:
        return R.Counters(self._ino_limit, self._chunk_limit, self.counters.next_server_id, self.counters.cluster_id)

    def alloc_chunk_id(self, batch: Batch) -> int:
        chunk_id = self.counters.next_chunk_id
        self.counters.next_chunk_id += 1
        if self.counters.next_chunk_id > self._chunk_limit:
            self._chunk_limit = self.counters.next_chunk_id + ID_BLOCK
            batch.append((R.COUNTERS_KEY, R.encode(self._reserved_counters())))
        return chunk_id

    def inode(self, ino: int) -> R.Inode:
        raw = self.engine.get(R.inode_key(ino))
        if raw is None:
            raise error(errno.ENOENT, f"no inode {ino}")
        return R.decode_inode(raw)

    def attr(self, ino: int, node: R.Inode | None = None) -> P.Attr:
        n = node or self.inode(ino)
        return P.Attr(ino, n.mode, n.nlink, n.uid, n.gid, n.size, n.atime_ns, n.mtime_ns, n.ctime_ns, n.rdev,
                      n.generation, self.file_chunk_size(n) if stat.S_ISREG(n.mode) else 0)

    def _dir(self, ino: int) -> R.Inode:
        node = self.inode(ino)
        if not stat.S_ISDIR(node.mode):
            raise error(errno.ENOTDIR, "not a directory")
        return node

    def _child(self, parent: int, name: str) -> int | None:
        raw = self.engine.get(R.dentry_key(parent, name))
        return R.U64.unpack(raw)[0] if raw is not None else None

    def _put(self, batch: Batch, ino: int, node: R.Inode) -> None:
        batch.append((R.inode_key(ino), R.encode(node)))

    def _dir_empty(self, ino: int) -> bool:
        return next(iter(self.engine.scan(R.dentry_prefix(ino), limit=1)), None) is None

    # ------------------------------------------------------------------ lookups

    def lookup(self, parent: int, name: str) -> P.Attr:
        self._dir(parent)
        if name == ".":
            return self.attr(parent)
        if name == "..":
            if parent == scope_root(ROOT_INO):  # a tenant's root is its "/": ".." stays there
                return self.attr(parent)
            return self.attr(self.inode(parent).parent or ROOT_INO)
        if len(name.encode("utf-8", "surrogateescape")) > P.NAME_MAX:
            raise error(errno.ENAMETOOLONG, "file name too long")
        ino = self._child(parent, name)
        if ino is None:
            raise error(errno.ENOENT, f"{name}: no such file or directory")
        return self.attr(ino)

    def resolve(self, path: str) -> P.Attr:
        """Walk an absolute path (no symlink following) in one call."""
        if len(path) > P.PATH_MAX:
            raise error(errno.ENAMETOOLONG, "path too long")
        ino = scope_root(ROOT_INO)
        for part in path.split("/"):
            if part in ("", "."):
                continue
            ino = self.lookup(ino, part).ino
        return self.attr(ino)

    def exists_many(self, paths: list[str]) -> P.ExistsManyReply:
        exists = []
        for path in paths:
            try:
                self.resolve(path)
                exists.append(True)
            except OSError:
                exists.append(False)
        leading = next((i for i, e in enumerate(exists) if not e), len(exists))
        return P.ExistsManyReply(exists, leading)

    def readdir(self, ino: int, after: str, limit: int) -> P.ReadDirReply:
        self._dir(ino)
        limit = max(1, min(limit, 4096))
        prefix = R.dentry_prefix(ino)
        start = prefix + after.encode("utf-8", "surrogateescape") + b"\0" if after else None
        entries = []
        more = False
        for key, raw in self.engine.scan(prefix, start=start):
            if len(entries) >= limit:
                more = True
                break
            child = R.U64.unpack(raw)[0]
            entries.append(P.DirEntry(key[len(prefix):].decode("utf-8", "surrogateescape"), self.attr(child)))
        return P.ReadDirReply(entries, more)

    def readlink(self, ino: int) -> str:
        node = self.inode(ino)
        if not stat.S_ISLNK(node.mode):
            raise error(errno.EINVAL, "not a symbolic link")
        return node.target

    # ------------------------------------------------------------------ creation

    def mknode(self, parent: int, name: str, mode: int, uid: int, gid: int, rdev: int = 0,
               exclusive: bool = True, target: str = "", lease_client: str = "", tenant: str | None = None,
               chunk_size: int = 0) -> P.Attr:
        """Create a node. ``chunk_size``: a new regular file's (0: inherited, meta/layouts.py); an existing
        file returned by a non-exclusive create keeps its own."""
        check_name(name)
        pnode = self._dir(parent)
        existing = self._child(parent, name)
        if existing is not None:
            node = self.inode(existing)
            if not exclusive and stat.S_ISREG(node.mode) and stat.S_ISREG(mode):
                if lease_client:
                    self._check_lease(existing, lease_client)
                return self.attr(existing, node)
            raise error(errno.EEXIST, f"{name}: file exists")
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode) or stat.S_ISFIFO(mode)
                or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise error(errno.EINVAL, "unsupported file type")
        file_chunk_size = self.new_file_chunk_size(parent, pnode, chunk_size) if stat.S_ISREG(mode) else 0
        batch: Batch = []
        ino = self._alloc_ino(batch)
        t = now_ns()
        is_dir = stat.S_ISDIR(mode)
        node = R.Inode(mode, 2 if is_dir else 1, uid, gid, len(target.encode()) if target else 0, t, t, t, rdev,
                       parent=parent if is_dir else 0, target=target,
                       tenant=pnode.tenant if tenant is None else tenant,
                       chunk_size=file_chunk_size)
        self._put(batch, ino, node)
        batch.append((R.dentry_key(parent, name), R.U64.pack(ino)))
        pnode.mtime_ns = pnode.ctime_ns = t
        if is_dir:
            pnode.nlink += 1
        self._put(batch, parent, pnode)
        self.engine.write(batch)
        self._charge(node, files=1)
        if lease_client and stat.S_ISREG(mode):
            self._check_lease(ino, lease_client)
        return self.attr(ino, node)

    def symlink(self, parent: int, name: str, target: str, uid: int, gid: int) -> P.Attr:
        if not target or len(target) > P.PATH_MAX:
            raise error(errno.ENAMETOOLONG if target else errno.ENOENT, "bad symlink target")
        return self.mknode(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def link(self, ino: int, new_parent: int, new_name: str) -> P.Attr:
        check_name(new_name)
        node = self.inode(ino)
        if stat.S_ISDIR(node.mode):
            raise error(errno.EPERM, "hard links to directories are not allowed")
        pnode = self._dir(new_parent)
        _same_tenant(node, pnode)
        if self._child(new_parent, new_name) is not None:
            raise error(errno.EEXIST, f"{new_name}: file exists")
        t = now_ns()
        node.nlink += 1
        node.ctime_ns = t
        pnode.mtime_ns = pnode.ctime_ns = t
        batch: Batch = [(R.dentry_key(new_parent, new_name), R.U64.pack(ino)), (R.orphan_key(ino), None)]
        self._put(batch, ino, node)
        self._put(batch, new_parent, pnode)
        self.engine.write(batch)
        return self.attr(ino, node)

    # ------------------------------------------------------------------ removal

    def _drop_link(self, batch: Batch, ino: int, node: R.Inode, t: int) -> bool:
        """Remove one link of a non-directory; returns True if that was the last one."""
        node.nlink -= 1
        node.ctime_ns = t
        self._put(batch, ino, node)
        if node.nlink <= 0:
            batch.append((R.orphan_key(ino), R.U64.pack(t)))
            return True
        return False

    def unlink(self, parent: int, name: str, keep_open: list[int] | None = None) -> P.Attr:
        """Remove a name. The inode outlives its last name as an orphan until ``purge``, which happens
        here at once when ``keep_open`` is a list that does not hold it (P.Unlink)."""
        pnode = self._dir(parent)
        ino = self._child(parent, name)
        if ino is None:
            raise error(errno.ENOENT, f"{name}: no such file or directory")
        node = self.inode(ino)
        if stat.S_ISDIR(node.mode):
            raise error(errno.EISDIR, f"{name}: is a directory")
        t = now_ns()
        batch: Batch = [(R.dentry_key(parent, name), None)]
        self._drop_link(batch, ino, node, t)
        pnode.mtime_ns = pnode.ctime_ns = t
        self._put(batch, parent, pnode)
        self.engine.write(batch)
        attr = self.attr(ino, node)
        if node.nlink <= 0 and keep_open is not None and ino not in keep_open:
            self.purge(ino)
        return attr

    def rmdir(self, parent: int, name: str) -> None:
        if name == ".":
            raise error(errno.EINVAL, "cannot remove '.'")
        if name == "..":
            raise error(errno.ENOTEMPTY, "cannot remove '..'")
        pnode = self._dir(parent)
        ino = self._child(parent, name)
        if ino is None:
            raise error(errno.ENOENT, f"{name}: no such file or directory")
        node = self.inode(ino)
        if not stat.S_ISDIR(node.mode):
            raise error(errno.ENOTDIR, f"{name}: not a directory")
        if not self._dir_empty(ino):
            raise error(errno.ENOTEMPTY, f"{name}: directory not empty")
        if self.tenants.is_root(ino):
            raise error(errno.EBUSY, f"{name}: the root of a tenant (kvfs tenant remove)")
        t = now_ns()
        pnode.nlink -= 1
        pnode.mtime_ns = pnode.ctime_ns = t
        batch: Batch = [(R.dentry_key(parent, name), None), (R.inode_key(ino), None)]
        batch.extend((k, None) for k, _ in self.engine.scan(R.xattr_prefix(ino)))
        self._put(batch, parent, pnode)
        self.engine.write(batch)
        self._charge(node, files=-1)
        self.dir_epoch += 1

    def purge(self, ino: int) -> None:
        """Delete an unlinked inode and its chunks once no client has it open any more."""
        raw = self.engine.get(R.inode_key(ino))
        if raw is None:
            return
        node = R.decode_inode(raw)
        if node.nlink > 0 or stat.S_ISDIR(node.mode):
            return
        batch: Batch = [(R.inode_key(ino), None), (R.orphan_key(ino), None)]
        dropped = []
        for key, craw in self.engine.scan(R.chunk_prefix(ino)):
            rec = R.decode_chunk(craw)
            batch.append((key, None))
            batch.append((R.live_chunk_key(rec.chunk_id), None))
            dropped.append(rec)
        batch.extend((k, None) for k, _ in self.engine.scan(R.xattr_prefix(ino)))
        self.engine.write(batch)
        self._charge(node, files=-1, nbytes=-sum(rec.length for rec in dropped), kv_blocks=-int(node.kv_block))
        for rec in dropped:
            self.registry.drop_chunk(rec.chunk_id)
        self.leases.pop(ino, None)

    def purge_orphans(self, older_than_ns: int) -> int:
        """Purge orphans left by crashed clients (called at startup)."""
        victims = [R.U64.unpack(k[1:])[0] for k, v in self.engine.scan(b"O") if R.U64.unpack(v)[0] < older_than_ns]
        for ino in victims:
            self.purge(ino)
        return len(victims)

    # ------------------------------------------------------------------ rename

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        seen = 0
        while ino != ROOT_INO and seen < 10000:
            if ino == ancestor:
                return True
            ino = self.inode(ino).parent or ROOT_INO
            seen += 1
        return ancestor == ROOT_INO

    def rename(self, parent: int, name: str, new_parent: int, new_name: str, flags: int) -> P.RenameReply:
        check_name(new_name)
        self.dir_epoch += 1  # a directory may move: path -> directory caches start over
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise error(errno.EINVAL, "unsupported rename flags")
        src_parent_node = self._dir(parent)
        dst_parent_node = self._dir(new_parent) if new_parent != parent else src_parent_node
        _same_tenant(src_parent_node, dst_parent_node)
        src = self._child(parent, name)
        if src is None:
            raise error(errno.ENOENT, f"{name}: no such file or directory")
        snode = self.inode(src)
        src_is_dir = stat.S_ISDIR(snode.mode)
        dst = self._child(new_parent, new_name)
        if src_is_dir and new_parent != parent and self._is_ancestor(src, new_parent):
            raise error(errno.EINVAL, "cannot move a directory into itself")
        if dst == src:
            return P.RenameReply()
        t = now_ns()
        batch: Batch = []
        replaced = 0
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise error(errno.ENOENT, f"{new_name}: no such file or directory")
            dnode = self.inode(dst)
            dst_is_dir = stat.S_ISDIR(dnode.mode)
            if dst_is_dir and parent != new_parent and self._is_ancestor(dst, parent):
                raise error(errno.EINVAL, "cannot move a directory into itself")
            batch.append((R.dentry_key(parent, name), R.U64.pack(dst)))
            batch.append((R.dentry_key(new_parent, new_name), R.U64.pack(src)))
            if src_is_dir:
                snode.parent = new_parent
            if dst_is_dir:
                dnode.parent = parent
            if src_is_dir != dst_is_dir and parent != new_parent:
                delta = 1 if dst_is_dir else -1
                src_parent_node.nlink += delta
                dst_parent_node.nlink -= delta
            snode.ctime_ns = dnode.ctime_ns = t
            self._put(batch, dst, dnode)
        else:
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise error(errno.EEXIST, f"{new_name}: file exists")
                dnode = self.inode(dst)
                if stat.S_ISDIR(dnode.mode):
                    if not src_is_dir:
                        raise error(errno.EISDIR, f"{new_name}: is a directory")
                    if not self._dir_empty(dst):
                        raise error(errno.ENOTEMPTY, f"{new_name}: directory not empty")
                    if self.tenants.is_root(dst):
                        raise error(errno.EBUSY, f"{new_name}: the root of a tenant")
                    batch.append((R.inode_key(dst), None))
                    dst_parent_node.nlink -= 1
                    self._charge(dnode, files=-1)
                else:
                    if src_is_dir:
                        raise error(errno.ENOTDIR, f"{new_name}: not a directory")
                    if self._drop_link(batch, dst, dnode, t):
                        replaced = dst
            batch.append((R.dentry_key(parent, name), None))
            batch.append((R.dentry_key(new_parent, new_name), R.U64.pack(src)))
            if src_is_dir:
                snode.parent = new_parent
                if parent != new_parent:
                    src_parent_node.nlink -= 1
                    dst_parent_node.nlink += 1
            snode.ctime_ns = t
        src_parent_node.mtime_ns = src_parent_node.ctime_ns = t
        dst_parent_node.mtime_ns = dst_parent_node.ctime_ns = t
        self._put(batch, src, snode)
        self._put(batch, parent, src_parent_node)
        if new_parent != parent:
            self._put(batch, new_parent, dst_parent_node)
        self.engine.write(batch)
        return P.RenameReply(replaced)

    # ------------------------------------------------------------------ attributes and xattrs

    def setattr(self, req: P.SetAttr) -> P.Attr:
        node = self.inode(req.ino)
        if req.mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (req.mode & 0o7777)
        if req.uid is not None:
            node.uid = req.uid
        if req.gid is not None:
            node.gid = req.gid
        if req.atime_ns is not None:
            node.atime_ns = req.atime_ns
        if req.mtime_ns is not None:
            node.mtime_ns = req.mtime_ns
        node.ctime_ns = now_ns()
        batch: Batch = []
        self._put(batch, req.ino, node)
        self.engine.write(batch)
        return self.attr(req.ino, node)

    def setxattr(self, ino: int, name: str, value: bytes, flags: int) -> None:
        node = self.inode(ino)
        if is_layout_xattr(name):
            return self.layout_setxattr(ino, node, bytes(value))
        if not name or len(name.encode()) > XATTR_NAME_MAX:
            raise error(errno.ERANGE, "bad xattr name")
        if len(value) > XATTR_SIZE_MAX:
            raise error(errno.E2BIG, "xattr value too large")
        exists = self.engine.get(R.xattr_key(ino, name)) is not None
        if flags & XATTR_CREATE and exists:
            raise error(errno.EEXIST, f"xattr {name} exists")
        if flags & XATTR_REPLACE and not exists:
            raise error(errno.ENODATA, f"no xattr {name}")
        self.engine.write([(R.xattr_key(ino, name), bytes(value))])

    def getxattr(self, ino: int, name: str) -> bytes:
        node = self.inode(ino)
        if is_layout_xattr(name):
            return self.layout_getxattr(ino, node)
        raw = self.engine.get(R.xattr_key(ino, name))
        if raw is None:
            raise error(errno.ENODATA, f"no xattr {name}")
        return raw

    def listxattr(self, ino: int) -> list[str]:
        self.inode(ino)
        prefix = R.xattr_prefix(ino)
        return [k[len(prefix):].decode("utf-8", "surrogateescape") for k, _ in self.engine.scan(prefix)]

    def removexattr(self, ino: int, name: str) -> None:
        if is_layout_xattr(name):
            return self.layout_setxattr(ino, self.inode(ino), None)
        self.getxattr(ino, name)
        self.engine.write([(R.xattr_key(ino, name), None)])

    def statfs(self) -> P.StatFsReply:
        live = self.registry.live_servers()
        total = sum(s.capacity for s in live)
        free = sum(max(s.capacity - s.used, 0) for s in live) // max(self.replication, 1)
        return P.StatFsReply(4096, total // max(self.replication, 1), free, self.files)


def _same_tenant(a: R.Inode, b: R.Inode) -> None:
    """Nothing moves or links across tenants (admins included): an inode's tenant never changes."""
    if a.tenant != b.tenant:
        raise error(errno.EXDEV, "cannot rename or link across tenants")


def default_uid_gid() -> tuple[int, int]:
    return os.getuid(), os.getgid()
