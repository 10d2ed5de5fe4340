"""kvfs.Client: the one client library. The FUSE mount, the model loaders and the KV API all use it.

``Client`` is async (trio). ``SyncClient`` runs one in a background trio thread for blocking callers.

Data path:
* Writes are buffered per chunk (read-modify-write of an existing chunk when only part of it is
  written). A chunk buffer that has been written to its end is uploaded right away in the background
  (bounded in flight), so large sequential writes stream; the rest go on flush. Nothing is visible to
  other clients until ``flush``/``fsync``/``release`` commit the new chunk map and size to meta in one
  step (close-to-open consistency). Chunks are immutable: a rewrite is a new chunk id.
* Reads fetch block-aligned ranges from a replica and verify the per-block checksums end to end; a
  corrupt replica is reported to meta and the next one tried. When the replica is a chunkserver on
  this machine, its chunk file is read directly (short-circuit read), still checksum-verified.
  Small sequential reads are served from a small per-file cache of whole chunks, with the next few
  chunks read ahead (kvfs/client_prefetch.py; chunk files on this host with O_DIRECT).

Error handling: every method raises ``OSError`` with the right errno (ENOENT, EEXIST, ...); dead or
slow servers raise ``OSError(EIO)`` after the configured timeout, never hang.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from kvfs import protocol as P
from kvfs import tls
from kvfs.chunk_buffers import ChunkBuffers
from kvfs.chunkio import ChecksumError as ChecksumError
from kvfs.chunkio import ChunkSums
from kvfs.client_prefetch import ClientPrefetch
from kvfs.client_read import ClientReads
from kvfs.client_types import BLOCK as BLOCK
from kvfs.client_types import ClientOptions as ClientOptions
from kvfs.client_types import FileState as FileState
from kvfs.client_types import LocalChunk as LocalChunk
from kvfs.client_types import _ServerInfo
from kvfs.client_write import ClientWrites
from kvfs.dircache import ChangeLog, ListingCache
from kvfs.errors import error
from kvfs.leased_lookups import BatchedKVLookups, LeasedMaps, SharedLookups, is_kv_file_name, lease_end
from kvfs.meta_router import meta_client
from kvfs.rpc import RpcClient
from kvfs.rpc_blocking import BlockingChunkClient
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.client")

ROOT_INO = 1


class Client(ClientReads, ClientPrefetch, ClientWrites):
    def __init__(self, meta_address: str, options: ClientOptions | None = None, *, client_id: str | None = None):
        self.options = options or ClientOptions()
        # One meta, or the leader of several (HA on etcd: kvfs/meta_router.py).
        self._tls = tls.load(self.options.tls_dir).client if self.options.tls_dir else True
        self.meta = meta_client(meta_address, timeout=self.options.timeout, connect_timeout=self.options.connect_timeout,
                                ssl_context=self._tls)
        self.client_id = client_id or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.chunk_size = 4 << 20  # the cluster's: files made before per-file chunk sizes use it
        self.per_file_chunk_size = False  # meta records each file's own (HelloReply)
        self.root_ino, self.tenant = ROOT_INO, ""
        self.files: dict[int, FileState] = {}
        self.listings = ListingCache(self.options.dir_cache_ttl, self.options.dir_cache_burst)
        self._changes = ChangeLog()  # this client's namespace changes: a listing fetched across one is not kept
        self.leased_maps = LeasedMaps()  # KV files' chunk maps from leased lookups, for their next open
        self._shared_lookups = SharedLookups()  # concurrent lookups of one name: one meta request
        self._directories: set[int] = set()  # inodes getattr saw as directories (an inode keeps its type)
        self._kv_lookup = False  # META_KV_LOOKUP for KV files' lookups: asked for and served (connect)
        # Concurrent KV lookups in one META_KV_LOOKUP_MANY, where meta serves it (connect).
        self._kv_lookups: BatchedKVLookups | None = None
        self._servers: dict[str, _ServerInfo] = {}
        self._chunk_clients: dict[str, RpcClient] = {}
        self._thread_clients: dict[str, BlockingChunkClient] = {}  # bulk reads in worker threads
        self._thread_clients_lock = threading.Lock()
        self._read_threads = trio.CapacityLimiter(max(1, self.options.read_threads))
        self._upload_slots = trio.Semaphore(self.options.max_upload_inflight)
        self._host_id = ""
        self._nursery: trio.Nursery | None = None
        self._io = trio.CapacityLimiter(16)
        self._local_sums = ChunkSums()  # checksums of local chunk files being read (short-circuit)
        self._chunk_buffers = ChunkBuffers()  # memory of whole local chunks read with O_DIRECT, reused

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, nursery: trio.Nursery) -> None:
        """Handshake with meta. ``nursery`` owns background uploads and prefetches."""
        from kvfs.chunkserver.store import host_id

        self._nursery = nursery
        reply = await self.meta.request(P.META_HELLO, P.Hello(P.PROTOCOL_VERSION))
        self.chunk_size = reply.chunk_size
        self.per_file_chunk_size = reply.per_file_chunk_size
        # A tenant's credential confines it to its tenant's root: that directory is this client's "/"
        # (paths are resolved there by meta; the mount maps its root inode to it).
        self.root_ino, self.tenant = reply.root_ino or ROOT_INO, reply.tenant
        self._kv_lookup = self.options.kv_lookup_leases and reply.kv_lookup
        if self._kv_lookup and reply.kv_lookup_many:
            self._kv_lookups = BatchedKVLookups(lambda req: self.meta.request(P.META_KV_LOOKUP_MANY, req))
        self._host_id = host_id()
        await self.refresh_servers()
        nursery.start_soon(self._renew_leases, reply.lease_seconds)

    def start_best_effort(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run ``fn(*args)`` in the background, owned by the client's nursery (cancelled at close), for
        work nobody waits for, like recording an access time. Its OSErrors are dropped; other errors
        are logged, never raised into the nursery. From the trio thread; False (nothing started) before
        ``connect``."""
        if self._nursery is None:
            return False

        async def run() -> None:
            try:
                await fn(*args)
            except OSError:
                pass
            except Exception:
                log.exception("background %s failed", getattr(fn, "__name__", fn))

        self._nursery.start_soon(run)
        return True

    async def _renew_leases(self, lease_seconds: float) -> None:
        """Keep the write leases of open files alive, three renewals per lease period: meta keeps a
        writer's uploaded, uncommitted chunks only while it holds the lease (a slow writer loses nothing)."""
        outage = False
        while True:
            await trio.sleep(max(lease_seconds / 3, 0.1))
            inos = [ino for ino, st in self.files.items() if st.leased]
            if not inos:
                continue
            try:
                reply = await self.meta.request(P.META_RENEW_LEASES, P.RenewLeases(self.client_id, inos))
            except OSError as exc:
                if not outage:  # one line per outage, not one per attempt
                    log.warning("cannot renew write leases (%s); retrying", exc)
                outage = True
                continue
            if outage:
                log.info("write leases renewed again")
            outage = False
            lease_seconds = reply.expires_in
            for ino in reply.lost:
                st = self.files.get(ino)
                if st is not None and st.leased and st.upload_error is None:
                    # The next write, flush or close reports it: uncommitted data cannot be committed now.
                    st.upload_error = error(errno.EIO, f"inode {ino}: write lease lost to another writer; "
                                            "unflushed data cannot be committed")

    async def refresh_servers(self) -> P.ListChunkserversReply:
        reply = await self.meta.request(P.META_LIST_CHUNKSERVERS, P.Empty())
        self._servers = {s.address: _ServerInfo(s.address, s.data_dir, s.host_id) for s in reply.servers}
        return reply

    def close(self) -> None:
        self.meta.close()
        for c in self._chunk_clients.values():
            c.close()
        for b in self._thread_clients.values():
            b.close()

    def _thread_chunkserver(self, address: str) -> BlockingChunkClient:
        """The pool of blocking connections to ``address``; called from reader threads, so two threads
        asking at once must get the same pool (a second one would hold sockets close() never sees)."""
        b = self._thread_clients.get(address)
        if b is None:
            with self._thread_clients_lock:
                b = self._thread_clients.get(address)
                if b is None:
                    b = self._thread_clients[address] = BlockingChunkClient(
                        address, timeout=self.options.timeout, connect_timeout=self.options.connect_timeout,
                        ssl_context=tls.client_context() if self._tls is True else (self._tls or None))
        return b

    def _chunkserver(self, address: str) -> RpcClient:
        c = self._chunk_clients.get(address)
        if c is None:
            c = self._chunk_clients[address] = RpcClient(
                "chunkserver", address, P.CHUNK_METHODS, timeout=self.options.timeout,
                connect_timeout=self.options.connect_timeout, ssl_context=self._tls)
        return c

    # ------------------------------------------------------------------ namespace (inode level)

    async def lookup(self, parent: int, name: str) -> P.Attr:
        # Overlaid like getattr: the kernel takes a lookup's attributes as the inode's too, and a
        # committed size there would cut this client's own pending writes off (reads hit "EOF").
        attr = self.listings.get(parent, name)
        if attr is None:
            attr = await self._shared_lookups.lookup(parent, name, self._changes.seq,
                                                     lambda: self._lookup_meta(parent, name))
            if self.listings.wants_listing(parent):
                if self._nursery is not None:
                    self._nursery.start_soon(self._list_dir, parent)  # this lookup need not wait for it
                else:
                    await self._list_dir(parent)
        return self._overlay(attr)

    async def _lookup_meta(self, parent: int, name: str) -> P.Attr:
        """META_LOOKUP; for a KV block or run file, META_KV_LOOKUP, which brings its chunk map under a
        lease for the open that follows, batched with the others asked for meanwhile where meta serves
        META_KV_LOOKUP_MANY (kvfs/leased_lookups.py)."""
        if not (self._kv_lookup and is_kv_file_name(name)):
            return await self.meta.request(P.META_LOOKUP, P.Lookup(parent, name))
        sent = time.monotonic()  # the lease counts from here (LeasedMaps' clock)
        interval = self.options.kv_lookup_touch_interval
        touch = time.time_ns() - int(interval * 1e9) if interval >= 0 else 0
        if self._kv_lookups is not None:
            reply, sent = await self._kv_lookups.lookup(parent, name, touch)
        else:
            reply = await self.meta.request(P.META_KV_LOOKUP, P.KVLookup(parent, name, lease=True,
                                                                         touch_before_ns=touch))
        until = lease_end(sent, reply.lease_seconds)
        if reply.file is not None and until and reply.attr.ino not in self.files:
            self.leased_maps.store(reply.attr.ino, until, reply.file)
        return reply.attr

    async def _list_dir(self, parent: int) -> None:
        """Fetch a whole directory listing (attributes included) for ``self.listings``."""
        loaded, changes = self.listings.clock(), self._changes.seq
        entries: list[P.DirEntry] = []
        after = ""
        try:
            while True:
                reply = await self.meta.request(P.META_READDIR, P.ReadDir(parent, after, 4096))
                entries.extend(reply.entries)
                if len(entries) > self.listings.max_entries:
                    self.listings.store(parent, loaded, None)
                    return
                if not reply.more or not reply.entries:
                    break
                after = reply.entries[-1].name
            if not self._changes.touched_since(changes, parent, {e.attr.ino for e in entries}):
                self.listings.store(parent, loaded, entries)
        except OSError:
            pass  # only an optimisation: lookups go on to meta
        finally:
            self.listings.loading.discard(parent)

    def _changed(self, ino: int) -> None:
        self._changes.note(ino=ino)
        self.listings.changed(ino)
        self.leased_maps.drop(ino)

    async def getattr(self, ino: int) -> P.Attr:
        attr = self.listings.dir_attr(ino)
        if attr is None:
            fetch = lambda: self.meta.request(P.META_GETATTR, P.GetAttr(ino))  # noqa: E731
            # A directory's GETATTRs come in storms (every thread walking through it after the attribute
            # timeout) and share one request. A file's do not: one sent before an open may predate the
            # version that open fetched, and its size would cut the reads after it (close-to-open).
            if ino in self._directories:
                attr = await self._shared_lookups.getattr(ino, self._changes.seq, fetch)
            else:
                attr = await fetch()
                if stat.S_ISDIR(attr.mode):
                    if len(self._directories) >= 65536:
                        self._directories.clear()
                    self._directories.add(ino)
            self.listings.saw_dir_attr(attr)
        return self._overlay(attr)

    def _overlay(self, attr: P.Attr) -> P.Attr:
        """A file with uncommitted writes in this client shows its pending size."""
        st = self.files.get(attr.ino)
        if st is not None and st.modified:
            attr.size = st.size
        return attr

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None, size: int | None = None) -> P.Attr:
        self._changed(ino)
        if size is not None:
            await self.truncate(ino, size)
        if any(v is not None for v in (mode, uid, gid, atime_ns, mtime_ns)):
            attr = await self.meta.request(P.META_SETATTR, P.SetAttr(ino, mode, uid, gid, atime_ns, mtime_ns))
            return self._overlay(attr)
        return await self.getattr(ino)

    async def mknode(self, parent: int, name: str, mode: int, uid: int = 0, gid: int = 0, rdev: int = 0,
                     exclusive: bool = True, lease: bool = False, chunk_size: int = 0) -> P.Attr:
        """Create a node; ``lease`` also takes the write lease (a create about to be written; without it,
        ``open(created=...)`` takes a new file's lease at its first write). ``chunk_size``: a new regular
        file's (kvfs/layout.py; 0: its directory's policy, else the cluster's). Error handling: EINVAL
        for a bad size; EOPNOTSUPP for an explicit size a meta without per-file sizes would ignore."""
        if chunk_size and not self.per_file_chunk_size and chunk_size != self.chunk_size:
            raise error(errno.EOPNOTSUPP, "meta is too old for per-file chunk sizes")
        self._changes.note(directory=parent)
        attr = await self.meta.request(P.META_MKNODE, P.MkNode(
            parent, name, mode, uid, gid, rdev, exclusive, self.client_id if lease else "", chunk_size))
        self.listings.added(parent, name, attr)
        self.listings.dir_touched(parent, 1 if stat.S_ISDIR(attr.mode) else 0)
        return self._overlay(attr)

    async def unlink_at(self, parent: int, name: str, keep_open: list[int] | None = None) -> P.Attr:
        """Remove a name; ``keep_open``: see P.Unlink (None: the caller purges the inode later)."""
        self._changes.note(directory=parent)
        self.listings.removed(parent, name)
        attr = await self.meta.request(P.META_UNLINK, P.Unlink(parent, name, keep_open))
        self.listings.dir_touched(parent)
        if attr.nlink > 0:
            self._changed(attr.ino)  # other names of it: their link count changed
        return attr

    async def rmdir_at(self, parent: int, name: str) -> None:
        self._changes.note(directory=parent)
        self.listings.removed(parent, name)
        await self.meta.request(P.META_RMDIR, P.Unlink(parent, name))
        self.listings.dir_touched(parent, -1)

    async def rename_at(self, parent: int, name: str, new_parent: int, new_name: str, flags: int = 0) -> int:
        self._changes.note()  # anything: a moved directory changes paths and link counts elsewhere
        for d in (parent, new_parent):
            self.listings.forget_dir(d)
            self.listings.changed(d)  # its attributes too (a moved directory changes link counts)
        reply = await self.meta.request(P.META_RENAME, P.Rename(parent, name, new_parent, new_name, flags))
        return reply.replaced_ino

    async def link(self, ino: int, new_parent: int, new_name: str) -> P.Attr:
        self._changes.note(directory=new_parent)
        self._changed(ino)
        attr = await self.meta.request(P.META_LINK, P.Link(ino, new_parent, new_name))
        self.listings.added(new_parent, new_name, attr)
        self.listings.dir_touched(new_parent)
        return self._overlay(attr)

    async def symlink_at(self, parent: int, name: str, target: str, uid: int = 0, gid: int = 0) -> P.Attr:
        self._changes.note(directory=parent)
        attr = await self.meta.request(P.META_SYMLINK, P.Symlink(parent, name, target, uid, gid))
        self.listings.added(parent, name, attr)
        self.listings.dir_touched(parent)
        return attr

    async def readlink(self, ino: int) -> str:
        return (await self.meta.request(P.META_READLINK, P.GetAttr(ino))).target

    async def readdir(self, ino: int, after: str = "", limit: int = 1024) -> P.ReadDirReply:
        reply = await self.meta.request(P.META_READDIR, P.ReadDir(ino, after, limit))
        for entry in reply.entries:
            self._overlay(entry.attr)
        return reply

    async def statfs(self) -> P.StatFsReply:
        return await self.meta.request(P.META_STATFS, P.Empty())

    async def setxattr(self, ino: int, name: str, value: bytes, flags: int = 0) -> None:
        self._changed(ino)  # kvfs.chunk_size changes an empty file's attributes (kvfs/layout.py)
        await self.meta.request(P.META_SETXATTR, P.SetXattr(ino, name, value, flags))

    async def getxattr(self, ino: int, name: str) -> bytes:
        return (await self.meta.request(P.META_GETXATTR, P.GetXattr(ino, name))).value

    async def listxattr(self, ino: int) -> list[str]:
        return (await self.meta.request(P.META_LISTXATTR, P.GetAttr(ino))).names

    async def removexattr(self, ino: int, name: str) -> None:
        self._changed(ino)
        await self.meta.request(P.META_REMOVEXATTR, P.GetXattr(ino, name))

    async def purge(self, ino: int) -> None:
        await self.meta.request(P.META_PURGE, P.Purge(ino))

    async def chunk_map(self, ino: int) -> P.GetChunksReply:
        """The committed chunk map of a file, with live replica addresses (for tools and tests)."""
        return await self.meta.request(P.META_GET_CHUNKS, P.GetChunks(ino))

    async def exists_many(self, paths: list[str]) -> P.ExistsManyReply:
        return await self.meta.request(P.META_EXISTS_MANY, P.ExistsMany(paths))

    # ------------------------------------------------------------------ namespace (path level)

    async def resolve(self, path: str) -> P.Attr:
        return self._overlay(await self.meta.request(P.META_RESOLVE, P.ResolvePath(path)))

    stat = resolve

    async def _parent_of(self, path: str) -> tuple[int, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        if not name:
            raise error(errno.EINVAL, f"{path!r}: not a file path")
        parent = await self.resolve(head or "/")
        if not stat.S_ISDIR(parent.mode):
            raise error(errno.ENOTDIR, f"{head}: not a directory")
        return parent.ino, name

    async def mkdir(self, path: str, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> P.Attr:
        try:
            parent, name = await self._parent_of(path)
        except FileNotFoundError:
            if not parents:
                raise
            head = path.rstrip("/").rpartition("/")[0]
            await self.mkdir(head, mode, parents=True, exist_ok=True)
            parent, name = await self._parent_of(path)
        try:
            return await self.mknode(parent, name, stat.S_IFDIR | mode, os.getuid(), os.getgid())
        except FileExistsError:
            if exist_ok:
                attr = await self.resolve(path)
                if stat.S_ISDIR(attr.mode):
                    return attr
            raise

    async def listdir(self, path: str) -> list[str]:
        attr = await self.resolve(path)
        names: list[str] = []
        after = ""
        while True:
            reply = await self.readdir(attr.ino, after, 4096)
            names.extend(e.name for e in reply.entries)
            if not reply.more or not reply.entries:
                return names
            after = reply.entries[-1].name

    async def unlink(self, path: str) -> None:
        parent, name = await self._parent_of(path)
        await self.unlink_at(parent, name, keep_open=list(self.files))  # purged at once unless open here

    async def rmdir(self, path: str) -> None:
        parent, name = await self._parent_of(path)
        await self.rmdir_at(parent, name)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        p1, n1 = await self._parent_of(old)
        p2, n2 = await self._parent_of(new)
        replaced = await self.rename_at(p1, n1, p2, n2, flags)
        if replaced and replaced not in self.files:
            await self.purge(replaced)

    async def create(self, path: str, mode: int = 0o644, *, exclusive: bool = False, chunk_size: int = 0) -> P.Attr:
        """Create ``path`` (or, not ``exclusive``, return the existing file, whose chunk size stays)."""
        parent, name = await self._parent_of(path)
        return await self.mknode(parent, name, stat.S_IFREG | mode, os.getuid(), os.getgid(), exclusive=exclusive,
                                 chunk_size=chunk_size)

    async def create_replacing(self, path: str, *, exclusive: bool = False, chunk_size: int = 0) -> P.Attr:
        """``create`` for a writer about to replace the whole file: an existing file with another chunk
        size than an explicit ``chunk_size`` is unlinked and made anew (a new inode), since a file's
        chunk size never changes once it has data."""
        attr = await self.create(path, exclusive=exclusive, chunk_size=chunk_size)
        if chunk_size and self.file_chunk_size(attr) != chunk_size:
            await self.unlink(path)
            attr = await self.create(path, exclusive=True, chunk_size=chunk_size)
        return attr

    async def write_file(self, path: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False,
                         chunk_size: int = 0) -> P.Attr:
        """Create or replace ``path`` with ``data`` and commit it (visible to all clients on return).
        ``chunk_size``: the file's (kvfs/layout.py; see ``create_replacing``)."""
        attr = await self.create_replacing(path, exclusive=exclusive, chunk_size=chunk_size)
        await self.open(attr.ino, write=True, truncate=True)
        try:
            await self.write(attr.ino, 0, data)
            return await self.flush(attr.ino)
        finally:
            await self.release(attr.ino)

    async def read_file(self, path: str) -> bytes:
        attr = await self.resolve(path)
        if stat.S_ISDIR(attr.mode):
            raise error(errno.EISDIR, f"{path}: is a directory")
        await self.open(attr.ino)
        try:
            st = self.files[attr.ino]
            buf = bytearray(st.size)
            await self.read_into(attr.ino, 0, memoryview(buf))
            return bytes(buf)
        finally:
            await self.release(attr.ino)

    # ------------------------------------------------------------------ open / release

    async def open(self, ino: int, *, write: bool = False, truncate: bool = False,
                   created: P.Attr | None = None, leased: bool = False) -> FileState:
        """Open a regular file. The chunk map is refreshed on every first open (close-to-open), and an
        open for writing takes the write lease (EBUSY while another client writes the file).
        ``created``: the attributes of a file this client just created (``mknode``): when it is empty,
        there is no chunk map to fetch and no lease to take yet: its first write takes the lease
        (``_lease``), so a file created and closed unwritten costs no lease round trip. ``leased``: its
        ``mknode(lease=True)`` took the lease already."""
        if write:
            self._changed(ino)  # its size and times are about to change
        st = self.files.get(ino)
        fresh = st is None and created is not None and created.size == 0
        if fresh:
            assert created is not None
            st = self.files[ino] = FileState(ino, created, {}, size=0, born_mtime_ns=created.mtime_ns,
                                             born_at=time.monotonic(), chunk_size=self.file_chunk_size(created))
        elif st is None or (st.opens == 0 and not st.modified):
            # A KV file's map from its leased lookup (a write open dropped it in _changed above).
            reply = self.leased_maps.get(ino) or await self.meta.request(P.META_GET_CHUNKS, P.GetChunks(ino))
            if stat.S_ISDIR(reply.attr.mode):
                raise error(errno.EISDIR, "is a directory")
            chunks = {c.index: c for c in reply.chunks}
            # Look again after the await: a concurrent release may have dropped the state, or a
            # concurrent open created one (the kernel sends release asynchronously).
            st = self.files.get(ino)
            if st is None:
                st = self.files[ino] = FileState(ino, reply.attr, chunks, size=reply.attr.size,
                                                 chunk_size=reply.chunk_size)
            elif st.opens == 0 and not st.modified:
                if st.chunks != chunks or st.attr.size != reply.attr.size:
                    st.cache.clear()
                st.attr, st.chunks, st.size = reply.attr, chunks, reply.attr.size
                st.chunk_size = reply.chunk_size  # set on an empty file since (kvfs.chunk_size xattr)
        st.opens += 1  # counted before the next await, so a concurrent release keeps this state
        if leased:
            st.leased = True
        try:
            if write and not fresh and not st.leased:
                await self._lease(st)
            if write:
                st.writable = True
            if truncate and not fresh:  # a file this open created is empty already
                await self._truncate_state(st, 0)
            elif write and not st.modified and st.size:
                await self._fill_remote(st, 0, (st.size - 1) // st.chunk_size)  # writes build on the whole file
        except BaseException:
            st.opens -= 1
            if st.opens <= 0 and not st.modified and self.files.get(ino) is st:
                self.files.pop(ino, None)
            raise
        return st

    async def release(self, ino: int) -> None:
        """Close one handle: the last close commits pending writes and drops the write lease."""
        st = self.files.get(ino)
        if st is None:
            return
        st.opens -= 1
        if st.opens > 0:
            return
        try:
            if st.modified:
                await self.flush(ino, release=True)  # the commit drops the lease too
        finally:
            if st.opens <= 0:
                st.writable = False
                if st.leased:  # nothing committed (no writes, or the commit failed): release it alone
                    await self.drop_write_lease(st)
                # Re-check after the awaits: the kernel sends release asynchronously, so the next
                # open of this inode may have arrived meanwhile and must keep its state.
                if st.opens <= 0 and self.files.get(ino) is st:
                    if st.modified:
                        # The last handle is gone and its commit failed (close() got the error): drop
                        # the uncommitted writes, so this client sees what every other client sees.
                        log.warning("inode %d: discarding writes that could not be committed", ino)
                    self.files.pop(ino, None)

    def file_chunk_size(self, attr: P.Attr) -> int:
        """A regular file's chunk size from its attributes (a meta before per-file sizes: the cluster's)."""
        return attr.chunk_size or self.chunk_size

    def cached_state(self, ino: int) -> FileState | None:
        return self.files.get(ino)


class SyncClient:
    """A Client driven from ordinary threads: a background thread runs trio; calls block.

    Use as a context manager. Any ``Client`` coroutine method is available with the same name and
    arguments, e.g. ``c.read_file("/a")``, ``c.mkdir("/d", parents=True)``.
    """

    def __init__(self, meta_address: str, options: ClientOptions | None = None, *, client_id: str | None = None):
        self._client = Client(meta_address, options, client_id=client_id)
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvfs-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @property
    def client(self) -> Client:
        return self._client

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with open_nursery() as nursery:
                try:
                    await self._client.connect(nursery)
                except BaseException as exc:
                    self._error = exc
                    self._ready.set()
                    nursery.cancel_scope.cancel()
                    return
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
            self._client.close()

        try:
            trio.run(main)
        except BaseException as exc:  # pragma: no cover - surfaced via _error
            self._error = exc
            self._ready.set()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            return await fn(*args, **kwargs)

        return trio.from_thread.run(run, trio_token=self._token)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self.call(attr, *args, **kwargs)

        return blocking

    def close(self) -> None:
        if self._stop is not None and self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(timeout=10)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
