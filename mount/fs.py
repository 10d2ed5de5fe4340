"""pyfuse3 Operations for kvfs: decode kernel requests, call kvfs.Client, return attributes.

No filesystem logic lives here. What the adapter must own itself (pyfuse3 leaves it to us):
* kernel lookup counts per inode, so an unlinked file is purged only when the kernel forgets it;
* file and directory handles;
* which files may keep the kernel page cache on open (unchanged since this mount last saw them).
Every OSError becomes ``FUSEError(errno)`` in one place (``_errors``).

KV directories: kvfs.kv's layout directories and their fan-out directories (a hash's first two digits)
are made once and never renamed, and a prefix lookup stats each run of the prompt, most in a fan-out
directory of their own. The kernel may keep their names and attributes for ``kv_timeout`` (minutes, not the 1
s of other entries): a lookup then costs one round trip (the run file's leased lookup), not two. The
files themselves keep the short timeout: their lookup brings the chunk map the open uses. Another client
can still remove such a directory (``rm -r``). A getattr or create that then finds its inode gone
answers ESTALE, not ENOENT: the kernel walks the path again with every name revalidated here
(LOOKUP_REVAL), so a stale name costs one retry, not a failed call. The kernel drops a directory's
attributes whenever a file is created or renamed in it here, and asks again at the next walk through it
(its permission check): a fan-out directory's GETATTR is answered from its attributes as last seen,
for ``kv_timeout`` (its mtime then lags; a fan-out directory has no subdirectories, so its link count
does not), or each save of a run would cost the next prefix lookup a meta round trip per fan-out
directory. Layout directories are always asked (their link count counts their fan-out directories).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
import time
from collections import defaultdict
from dataclasses import dataclass

import msgspec
import pyfuse3

from kvfs import protocol as P
from kvfs.client import Client
from kvfs.errors import error
from kvfs.kv.layout import is_layout_name
from kvfs.metrics import FUSE_REQUESTS, status_name

log = logging.getLogger("kvfs.mount")

# The kernel asks for this xattr before every write to a file and caches no answer: answering here,
# without a round trip to meta, keeps it off the write path. kvfs has no file capabilities, so
# setting it fails with ENOTSUP instead of being stored and silently ignored.
_CAPABILITY = b"security.capability"

_FANOUT = re.compile(r"[0-9a-f]{2}")  # kvfs.kv's per-layout fan-out directories: a hash's first two digits


def _errors(fn):
    """Translate errors at the one FUSE boundary: OSError -> its errno, anything else -> EIO; and count
    each request by operation and outcome (``kvfs_fuse_requests_total``, ``kvfs mount --metrics-port``)."""
    answered = FUSE_REQUESTS.labels(fn.__name__, "ok")  # bound once: the read path counts without a lookup

    def failed(code: int) -> pyfuse3.FUSEError:
        FUSE_REQUESTS.labels(fn.__name__, status_name(code)).inc()
        return pyfuse3.FUSEError(code)

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            out = await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            FUSE_REQUESTS.labels(fn.__name__, status_name(exc.errno)).inc()
            raise
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.EIO:
                log.error("%s: %s", fn.__name__, exc)
            raise failed(code) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise failed(errno.EIO) from None
        answered.inc()
        return out

    return wrapper


class _ReplyBuffers:
    """Read reply buffers, reused, for the reads the client does not answer from a cached chunk. A fresh
    ``bytearray`` per 1 MiB read is zero-filled and, once glibc hands large blocks back to the kernel,
    fresh pages to fault in (7% of the mount's CPU in a profile of ``dd bs=1M``). Reuse is safe because
    pyfuse3 copies a read's reply into the kernel right after ``read`` returns, before its task can
    yield (``fuse_read_async``), and a buffer is only written by the task that took it."""

    MIN = 64 << 10  # smaller buffers are cheap to allocate
    KEEP = 8  # per size: the kernel sends a few reads at once (async readahead)

    def __init__(self) -> None:
        self._free: defaultdict[int, list[memoryview]] = defaultdict(list)

    def take(self, size: int) -> memoryview:
        free = self._free.get(size)
        return free.pop() if free else memoryview(bytearray(size))

    def give(self, buf: memoryview) -> None:
        free = self._free[len(buf)]
        if len(buf) >= self.MIN and len(free) < self.KEEP:
            free.append(buf)


@dataclass
class _Handle:
    ino: int
    writable: bool


class KvfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, client: Client, *, attr_timeout: float = 1.0, entry_timeout: float = 1.0,
                 writeback_cache: bool = False, kv_timeout: float = 300.0):
        super().__init__()
        self.client = client
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.kv_timeout = kv_timeout  # for KV directories (module docstring); 0: like any other entry
        self.kv_dirs: set[int] = set()  # directories the kernel holds under a kv_timeout entry
        self.kv_layout_dirs: set[int] = set()  # of those, KV layout directories (their children fan out)
        # Fan-out directories' attributes as last answered, for kv_timeout (module docstring).
        self.fanout_attrs: dict[int, tuple[float, P.Attr]] = {}
        self.enable_writeback_cache = writeback_cache
        self.lookups: defaultdict[int, int] = defaultdict(int)
        self.unlinked: set[int] = set()  # nlink reached 0 while the kernel still knew the inode
        self.handles: dict[int, _Handle] = {}
        self.dir_handles: dict[int, list[P.DirEntry] | None] = {}
        self.dir_inos: dict[int, int] = {}
        self.open_counts: defaultdict[int, int] = defaultdict(int)
        self.seen_version: dict[int, tuple[int, int]] = {}  # ino -> (mtime, size) last served
        self.sent_attrs: dict[int, tuple[int, int]] = {}  # ino -> (mtime, size) in the last attributes sent
        self.reply_buffers = _ReplyBuffers()
        self._next_fh = 1

    # ------------------------------------------------------------------ helpers

    def _k(self, inode: int) -> int:
        """The kvfs inode of a kernel inode: the kernel's root is the client's root (a tenant's root
        directory, or kvfs's own root; tenants never see kvfs inode 1, so nothing else maps to it)."""
        return self.client.root_ino if inode == pyfuse3.ROOT_INODE else inode

    def _entry(self, attr: P.Attr, *, count: bool = True, kv: bool = False) -> pyfuse3.EntryAttributes:
        self.sent_attrs[attr.ino] = (attr.mtime_ns, attr.size)
        if count:
            self.lookups[attr.ino] += 1
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE if attr.ino == self.client.root_ino else attr.ino
        e.generation = attr.generation
        e.entry_timeout = self.kv_timeout if kv else self.entry_timeout
        e.attr_timeout = self.kv_timeout if kv else self.attr_timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = 128 << 10
        e.st_blocks = (attr.size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _maybe_purge(self, ino: int) -> None:
        if ino in self.unlinked and self.lookups.get(ino, 0) <= 0 and self.open_counts.get(ino, 0) <= 0:
            self.unlinked.discard(ino)
            self.lookups.pop(ino, None)
            self.seen_version.pop(ino, None)
            await self.client.purge(ino)

    def _named(self, parent: int, name: str, attr: P.Attr) -> pyfuse3.EntryAttributes:
        """The entry for ``name`` in ``parent`` (kvfs inodes), with the KV timeout for a KV layout
        directory or a fan-out directory in one (module docstring)."""
        kv = False
        if self.kv_timeout > 0 and stat.S_ISDIR(attr.mode):
            if is_layout_name(name):
                self.kv_layout_dirs.add(attr.ino)
                kv = True
            else:
                kv = parent in self.kv_layout_dirs and _FANOUT.fullmatch(name) is not None
            if kv:
                self.kv_dirs.add(attr.ino)
                if attr.ino not in self.kv_layout_dirs:
                    self.fanout_attrs[attr.ino] = (time.monotonic(), attr)
        return self._entry(attr, kv=kv)

    def _stale(self, ino: int, exc: OSError) -> OSError:
        """``exc`` as ESTALE when it says a KV directory the kernel still trusts is gone (module docstring)."""
        if exc.errno == errno.ENOENT and ino in self.kv_dirs:
            return error(errno.ESTALE, f"directory inode {ino} was removed by another client")
        return exc

    async def _after_unlink(self, attr: P.Attr) -> None:
        if attr.nlink <= 0:
            self.unlinked.add(attr.ino)
            await self._maybe_purge(attr.ino)

    # ------------------------------------------------------------------ lookups and attributes

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent, name = self._k(parent_inode), os.fsdecode(name)
        return self._named(parent, name, await self.client.lookup(parent, name))

    async def forget(self, inode_list):
        for fuse_ino, nlookup in inode_list:
            ino = self._k(fuse_ino)
            left = self.lookups.get(ino, 0) - nlookup
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            self.sent_attrs.pop(ino, None)
            self.kv_dirs.discard(ino)
            self.kv_layout_dirs.discard(ino)
            self.fanout_attrs.pop(ino, None)
            try:
                await self._maybe_purge(ino)
            except OSError as exc:  # forget cannot fail; meta purges orphans at startup too
                log.warning("purging inode %d: %s", ino, exc)

    @_errors
    async def getattr(self, inode, ctx=None):
        ino = self._k(inode)
        seen = self.fanout_attrs.get(ino)
        if seen is not None and time.monotonic() - seen[0] < self.kv_timeout:
            return self._entry(msgspec.structs.replace(seen[1]), count=False, kv=True)
        try:
            attr = await self.client.getattr(ino)
        except OSError as exc:
            raise self._stale(ino, exc) from None
        if ino in self.kv_dirs and ino not in self.kv_layout_dirs:
            self.fanout_attrs[ino] = (time.monotonic(), attr)
        return self._entry(attr, count=False, kv=ino in self.kv_dirs)

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        self.fanout_attrs.pop(self._k(inode), None)  # this mount's own change is seen at once
        size = attr.st_size if fields.update_size else None
        attr_out = await self.client.setattr(
            self._k(inode),
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            size=size,
        )
        return self._entry(attr_out, count=False)

    @_errors
    async def readlink(self, inode, ctx):
        return os.fsencode(await self.client.readlink(self._k(inode)))

    @_errors
    async def statfs(self, ctx):
        s = await self.client.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = s.block_size
        out.f_blocks = s.total_bytes // s.block_size
        out.f_bfree = out.f_bavail = s.free_bytes // s.block_size
        out.f_files = s.files + 1_000_000_000
        out.f_ffree = out.f_favail = 1_000_000_000
        out.f_namemax = P.NAME_MAX
        return out

    # ------------------------------------------------------------------ namespace changes

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return await self._make(parent_inode, name, mode, ctx, rdev)

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return await self._make(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx)

    async def _make(self, parent_inode: int, name: bytes, mode: int, ctx, rdev: int = 0) -> pyfuse3.EntryAttributes:
        parent, text = self._k(parent_inode), os.fsdecode(name)
        try:
            attr = await self.client.mknode(parent, text, mode, ctx.uid, ctx.gid, rdev)
        except OSError as exc:
            raise self._stale(parent, exc) from None
        return self._named(parent, text, attr)

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        attr = await self.client.symlink_at(self._k(parent_inode), os.fsdecode(name), os.fsdecode(target), ctx.uid, ctx.gid)
        return self._entry(attr)

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(await self.client.link(self._k(inode), self._k(new_parent_inode), os.fsdecode(new_name)))

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        # Meta purges the inode in the same call unless one of ours has it open (then release does).
        keep = list(set(self.open_counts) | set(self.client.files))
        attr = await self.client.unlink_at(self._k(parent_inode), os.fsdecode(name), keep_open=keep)
        if attr.ino in keep:
            await self._after_unlink(attr)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.client.rmdir_at(self._k(parent_inode), os.fsdecode(name))

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        replaced = await self.client.rename_at(self._k(parent_inode_old), os.fsdecode(name_old), self._k(parent_inode_new),
                                               os.fsdecode(name_new), flags)
        if replaced:
            self.unlinked.add(replaced)
            await self._maybe_purge(replaced)

    # ------------------------------------------------------------------ files

    async def _open(self, ino: int, flags: int, created: P.Attr | None = None,
                    leased: bool = False) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        st = await self.client.open(ino, write=writable, truncate=bool(flags & os.O_TRUNC) and writable,
                                    created=created, leased=leased)
        self.open_counts[ino] += 1
        fh = self._fh()
        self.handles[fh] = _Handle(ino, writable)
        version = (st.attr.mtime_ns, st.attr.size)
        keep = self.seen_version.get(ino) == version and not st.modified
        self.seen_version[ino] = version
        if not st.modified and self.sent_attrs.get(ino, version) != version:
            # Close-to-open: the kernel may still hold (for attr_timeout) attributes of an older
            # version, and would cut reads at that size. Make it fetch them again.
            self.sent_attrs.pop(ino, None)
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:  # the kernel no longer caches the inode: nothing to invalidate
                pass
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_errors
    async def open(self, inode, flags, ctx):
        return await self._open(self._k(inode), flags)

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        # O_TRUNC (open(..., "w"), a shell's ">") says the file is about to be written: take its lease in
        # the create, not in a round trip before the first write. Other creates (touch, lock files,
        # O_EXCL markers) are often closed unwritten: no lease, so nothing to release either.
        lease = bool(flags & os.O_TRUNC)
        parent, text = self._k(parent_inode), os.fsdecode(name)
        try:
            attr = await self.client.mknode(parent, text, stat.S_IFREG | (mode & 0o7777), ctx.uid,
                                            ctx.gid, exclusive=bool(flags & os.O_EXCL), lease=lease)
        except OSError as exc:
            raise self._stale(parent, exc) from None
        info = await self._open(attr.ino, flags | os.O_WRONLY if not flags & os.O_ACCMODE else flags, attr, lease)
        return info, self._named(parent, text, attr)

    @_errors
    async def read(self, fh, off, size):
        # pyfuse3 replies from any buffer: hand it the client's cached chunk or the buffer it filled.
        buf = self.reply_buffers.take(size)
        try:
            return await self.client.read_buffer(self.handles[fh].ino, off, size, buf)
        finally:
            self.reply_buffers.give(buf)  # pyfuse3 is done with it before this task yields again

    @_errors
    async def write(self, fh, off, buf):
        handle = self.handles[fh]
        if not handle.writable:
            raise OSError(errno.EBADF, "not open for writing")
        return await self.client.write(handle.ino, off, buf)

    async def _commit(self, fh: int, *, closing: bool) -> None:
        handle = self.handles[fh]
        if handle.writable:
            # close() of the only handle: the commit drops the write lease too, so the RELEASE that
            # follows costs meta nothing. (FLUSH comes with every close of a dup'ed descriptor too; a
            # write through one still open takes the lease again.)
            attr = await self.client.flush(handle.ino, release=closing and self.open_counts[handle.ino] == 1)
            # Our own writes are already in the kernel page cache: the next open may keep it.
            self.seen_version[handle.ino] = (attr.mtime_ns, attr.size)

    @_errors
    async def flush(self, fh):
        await self._commit(fh, closing=True)

    @_errors
    async def fsync(self, fh, datasync):
        await self._commit(fh, closing=False)

    @_errors
    async def release(self, fh):
        handle = self.handles.pop(fh)
        self.open_counts[handle.ino] -= 1
        try:
            await self.client.release(handle.ino)
        finally:
            if self.open_counts[handle.ino] <= 0:
                self.open_counts.pop(handle.ino, None)
                await self._maybe_purge(handle.ino)

    # ------------------------------------------------------------------ directories

    @_errors
    async def opendir(self, inode, ctx):
        inode = self._k(inode)
        attr = await self.client.getattr(inode)
        if not stat.S_ISDIR(attr.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        fh = self._fh()
        self.dir_handles[fh] = None  # listed on first readdir, then served from this snapshot
        self.dir_inos[fh] = inode
        return fh

    @_errors
    async def readdir(self, fh, start_id, token):
        entries = self.dir_handles[fh]
        if entries is None or start_id == 0:
            entries = []
            after = ""
            while True:
                reply = await self.client.readdir(self.dir_inos[fh], after, 4096)
                entries.extend(reply.entries)
                if not reply.more or not reply.entries:
                    break
                after = reply.entries[-1].name
            self.dir_handles[fh] = entries
        for index in range(start_id, len(entries)):
            entry = entries[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(entry.name), self._entry(entry.attr, count=False), index + 1):
                return
            self.lookups[entry.attr.ino] += 1

    @_errors
    async def releasedir(self, fh):
        self.dir_handles.pop(fh, None)
        self.dir_inos.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        return None

    # ------------------------------------------------------------------ xattrs

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        if name == _CAPABILITY:
            raise OSError(errno.ENOTSUP, "kvfs has no file capabilities")
        await self.client.setxattr(self._k(inode), os.fsdecode(name), bytes(value))

    @_errors
    async def getxattr(self, inode, name, ctx):
        if name == _CAPABILITY:
            raise OSError(errno.ENODATA, "kvfs has no file capabilities")
        return await self.client.getxattr(self._k(inode), os.fsdecode(name))

    @_errors
    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in await self.client.listxattr(self._k(inode))]

    @_errors
    async def removexattr(self, inode, name, ctx):
        await self.client.removexattr(self._k(inode), os.fsdecode(name))
