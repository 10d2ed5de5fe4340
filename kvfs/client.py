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
  Sequential reads keep the last chunks in a small per-file cache and prefetch the next few chunks.

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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from kvfs import protocol as P
from kvfs.chunkio import ChecksumError as ChecksumError
from kvfs.chunkio import read_local_chunk
from kvfs.chunkio import verify as _verify
from kvfs.dircache import ListingCache
from kvfs.errors import error
from kvfs.meta_router import meta_client
from kvfs.rpc import RpcClient
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.client")

ROOT_INO = 1
BLOCK = P.CHECKSUM_BLOCK


@dataclass
class ClientOptions:
    timeout: float = 30.0  # per RPC; a dead server surfaces as EIO after this
    connect_timeout: float = 5.0
    local_reads: bool = True  # read chunk files directly when the chunkserver is on this machine
    max_upload_inflight: int = 8  # chunks being uploaded at once per client (write backpressure)
    read_cache_chunks: int = 8  # verified chunks kept per open file for small sequential reads
    prefetch: bool = True
    prefetch_chunks: int = 4  # chunks fetched ahead of a sequential reader, concurrently (disk queue depth)
    # Lookup bursts in one directory are answered from one listing for this long (kvfs.dircache);
    # 0 turns it off. Same staleness bound as the mount's attribute cache.
    dir_cache_ttl: float = 1.0
    dir_cache_burst: int = 16  # lookups in one directory within the ttl before it is listed


@dataclass
class _ServerInfo:
    address: str
    data_dir: str
    host_id: str


@dataclass(frozen=True)
class LocalChunk:
    """A replica's chunk file on this host, readable without the chunkserver (short-circuit)."""

    path: str
    sums_path: str
    chunk_id: int
    address: str
    length: int


@dataclass
class FileState:
    """Per-inode state shared by every open handle of this client."""

    ino: int
    attr: P.Attr
    chunks: dict[int, P.ChunkRef]  # committed chunk map as last fetched
    opens: int = 0
    writable: bool = False
    size: int = 0  # current size including uncommitted writes
    dirty: dict[int, bytearray] = field(default_factory=dict)  # chunk index -> whole chunk contents
    uploaded: dict[int, P.ChunkRef] = field(default_factory=dict)  # written to chunkservers, not committed
    modified: bool = False
    version: int = 0  # bumped by every write/truncate, so a flush knows whether writes raced its commit
    uploads: int = 0
    upload_error: OSError | None = None
    upload_done: trio.Event = field(default_factory=trio.Event)
    cache: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    last_read_end: int = -1
    prefetching: dict[int, trio.Event] = field(default_factory=dict)  # chunk index -> set once loaded
    inflight: set[int] = field(default_factory=set)  # chunk indexes being uploaded
    truncated_to: int = -1  # smallest size truncated to since the last commit (-1: none)

    def ref(self, index: int) -> P.ChunkRef | None:
        return self.uploaded.get(index) or self.chunks.get(index)


class Client:
    def __init__(self, meta_address: str, options: ClientOptions | None = None, *, client_id: str | None = None):
        self.options = options or ClientOptions()
        # One meta, or the leader of several (HA on etcd: kvfs/meta_router.py).
        self.meta = meta_client(meta_address, timeout=self.options.timeout, connect_timeout=self.options.connect_timeout)
        self.client_id = client_id or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.chunk_size = 4 << 20
        self.files: dict[int, FileState] = {}
        self.listings = ListingCache(self.options.dir_cache_ttl, self.options.dir_cache_burst)
        self._ns_changes = 0  # this client's namespace changes: a listing fetched across one is not kept
        self._servers: dict[str, _ServerInfo] = {}
        self._chunk_clients: dict[str, RpcClient] = {}
        self._upload_slots = trio.Semaphore(self.options.max_upload_inflight)
        self._host_id = ""
        self._nursery: trio.Nursery | None = None
        self._io = trio.CapacityLimiter(16)

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, nursery: trio.Nursery) -> None:
        """Handshake with meta. ``nursery`` owns background uploads and prefetches."""
        from kvfs.chunkserver.store import host_id

        self._nursery = nursery
        reply = await self.meta.request(P.META_HELLO, P.Hello(P.PROTOCOL_VERSION))
        self.chunk_size = reply.chunk_size
        self._host_id = host_id()
        await self.refresh_servers()
        nursery.start_soon(self._renew_leases, reply.lease_seconds)

    async def _renew_leases(self, lease_seconds: float) -> None:
        """Keep the write leases of open files alive, three renewals per lease period: meta keeps a
        writer's uploaded, uncommitted chunks only while it holds the lease (a slow writer loses nothing)."""
        outage = False
        while True:
            await trio.sleep(max(lease_seconds / 3, 0.1))
            inos = [ino for ino, st in self.files.items() if st.writable]
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
                if st is not None and st.writable and st.upload_error is None:
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

    def _chunkserver(self, address: str) -> RpcClient:
        c = self._chunk_clients.get(address)
        if c is None:
            c = self._chunk_clients[address] = RpcClient(
                "chunkserver", address, P.CHUNK_METHODS, timeout=self.options.timeout,
                connect_timeout=self.options.connect_timeout)
        return c

    # ------------------------------------------------------------------ namespace (inode level)

    async def lookup(self, parent: int, name: str) -> P.Attr:
        # Overlaid like getattr: the kernel takes a lookup's attributes as the inode's too, and a
        # committed size there would cut this client's own pending writes off (reads hit "EOF").
        attr = self.listings.get(parent, name)
        if attr is None:
            attr = await self.meta.request(P.META_LOOKUP, P.Lookup(parent, name))
            if self.listings.wants_listing(parent):
                if self._nursery is not None:
                    self._nursery.start_soon(self._list_dir, parent)  # this lookup need not wait for it
                else:
                    await self._list_dir(parent)
        return self._overlay(attr)

    async def _list_dir(self, parent: int) -> None:
        """Fetch a whole directory listing (attributes included) for ``self.listings``."""
        loaded, changes = self.listings.clock(), self._ns_changes
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
            if changes == self._ns_changes:
                self.listings.store(parent, loaded, entries)
        except OSError:
            pass  # only an optimisation: lookups go on to meta
        finally:
            self.listings.loading.discard(parent)

    def _changed(self, ino: int) -> None:
        self._ns_changes += 1
        self.listings.changed(ino)

    async def getattr(self, ino: int) -> P.Attr:
        attr = self.listings.dir_attr(ino)
        if attr is None:
            attr = await self.meta.request(P.META_GETATTR, P.GetAttr(ino))
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
                     exclusive: bool = True, lease: bool = False) -> P.Attr:
        """Create a node; ``lease`` also takes the write lease (a create that is about to be written)."""
        self._ns_changes += 1
        attr = await self.meta.request(P.META_MKNODE, P.MkNode(
            parent, name, mode, uid, gid, rdev, exclusive, self.client_id if lease else ""))
        self.listings.added(parent, name, attr)
        self.listings.dir_touched(parent, 1 if stat.S_ISDIR(attr.mode) else 0)
        return self._overlay(attr)

    async def unlink_at(self, parent: int, name: str, keep_open: list[int] | None = None) -> P.Attr:
        """Remove a name; ``keep_open``: see P.Unlink (None: the caller purges the inode later)."""
        self._ns_changes += 1
        self.listings.removed(parent, name)
        attr = await self.meta.request(P.META_UNLINK, P.Unlink(parent, name, keep_open))
        self.listings.dir_touched(parent)
        if attr.nlink > 0:
            self.listings.changed(attr.ino)  # other names of it: their link count changed
        return attr

    async def rmdir_at(self, parent: int, name: str) -> None:
        self._ns_changes += 1
        self.listings.removed(parent, name)
        await self.meta.request(P.META_RMDIR, P.Unlink(parent, name))
        self.listings.dir_touched(parent, -1)

    async def rename_at(self, parent: int, name: str, new_parent: int, new_name: str, flags: int = 0) -> int:
        self._ns_changes += 1
        for d in (parent, new_parent):
            self.listings.forget_dir(d)
            self.listings.changed(d)  # its attributes too (a moved directory changes link counts)
        reply = await self.meta.request(P.META_RENAME, P.Rename(parent, name, new_parent, new_name, flags))
        return reply.replaced_ino

    async def link(self, ino: int, new_parent: int, new_name: str) -> P.Attr:
        self._changed(ino)
        attr = await self.meta.request(P.META_LINK, P.Link(ino, new_parent, new_name))
        self.listings.added(new_parent, new_name, attr)
        self.listings.dir_touched(new_parent)
        return self._overlay(attr)

    async def symlink_at(self, parent: int, name: str, target: str, uid: int = 0, gid: int = 0) -> P.Attr:
        self._ns_changes += 1
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
        await self.meta.request(P.META_SETXATTR, P.SetXattr(ino, name, value, flags))

    async def getxattr(self, ino: int, name: str) -> bytes:
        return (await self.meta.request(P.META_GETXATTR, P.GetXattr(ino, name))).value

    async def listxattr(self, ino: int) -> list[str]:
        return (await self.meta.request(P.META_LISTXATTR, P.GetAttr(ino))).names

    async def removexattr(self, ino: int, name: str) -> None:
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

    async def create(self, path: str, mode: int = 0o644, *, exclusive: bool = False) -> P.Attr:
        parent, name = await self._parent_of(path)
        return await self.mknode(parent, name, stat.S_IFREG | mode, os.getuid(), os.getgid(), exclusive=exclusive)

    async def write_file(self, path: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> P.Attr:
        """Create or replace ``path`` with ``data`` and commit it (visible to all clients on return)."""
        attr = await self.create(path, exclusive=exclusive)
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
                   created: P.Attr | None = None) -> FileState:
        """Open a regular file. The chunk map is refreshed on every first open (close-to-open).
        ``created``: the attributes of a file this client just created with ``mknode(lease=True)``: no
        chunk map to fetch if it is empty, and the write lease is already held."""
        if write:
            self._changed(ino)  # its size and times are about to change
        st = self.files.get(ino)
        if st is None and created is not None and created.size == 0:
            st = self.files[ino] = FileState(ino, created, {}, size=0)
        elif st is None or (st.opens == 0 and not st.modified):
            reply = await self.meta.request(P.META_GET_CHUNKS, P.GetChunks(ino))
            if stat.S_ISDIR(reply.attr.mode):
                raise error(errno.EISDIR, "is a directory")
            chunks = {c.index: c for c in reply.chunks}
            # Look again after the await: a concurrent release may have dropped the state, or a
            # concurrent open created one (the kernel sends release asynchronously).
            st = self.files.get(ino)
            if st is None:
                st = self.files[ino] = FileState(ino, reply.attr, chunks, size=reply.attr.size)
            elif st.opens == 0 and not st.modified:
                if st.chunks != chunks or st.attr.size != reply.attr.size:
                    st.cache.clear()
                st.attr, st.chunks, st.size = reply.attr, chunks, reply.attr.size
        st.opens += 1  # counted before the next await, so a concurrent release keeps this state
        if write and created is not None:
            st.writable = True  # mknode(lease=True) took the lease
        try:
            if write and not st.writable:
                await self.meta.request(P.META_OPEN_WRITE, P.OpenWrite(ino, self.client_id))
                st.writable = True
            if truncate:
                await self._truncate_state(st, 0)
            elif write and not st.modified and st.size:
                await self._fill_remote(st, 0, (st.size - 1) // self.chunk_size)  # writes build on the whole file
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
                await self.flush(ino)
        finally:
            if st.opens <= 0:
                if st.writable:
                    st.writable = False
                    try:
                        await self.meta.request(P.META_RELEASE_WRITE, P.ReleaseWrite(ino, self.client_id))
                    except OSError as exc:
                        log.warning("releasing write lease of inode %d: %s", ino, exc)
                # Re-check after the awaits: the kernel sends release asynchronously, so the next
                # open of this inode may have arrived meanwhile and must keep its state.
                if st.opens <= 0 and self.files.get(ino) is st:
                    if st.modified:
                        # The last handle is gone and its commit failed (close() got the error): drop
                        # the uncommitted writes, so this client sees what every other client sees.
                        log.warning("inode %d: discarding writes that could not be committed", ino)
                    self.files.pop(ino, None)

    def cached_state(self, ino: int) -> FileState | None:
        return self.files.get(ino)

    def local_chunks(self, ino: int) -> tuple[int, dict[int, LocalChunk | None]] | None:
        """For short-circuit readers in other threads (kvfs.models): the open file's committed chunks as
        (chunk size, index -> LocalChunk, or None for a chunk with no replica on this host). None when
        the file has uncommitted writes in this client (its bytes are not all in chunk files)."""
        from kvfs.chunkserver.store import SUM_SUFFIX, chunk_path

        st = self.files.get(ino)
        if st is None or st.modified or st.dirty or st.uploaded:
            return None
        out: dict[int, LocalChunk | None] = {}
        for index, ref in st.chunks.items():
            out[index] = None
            for address in self._order_replicas(list(ref.replicas)):
                info = self._servers.get(address)
                if info is not None and self._is_local(info):
                    path = chunk_path(info.data_dir, ref.chunk_id)
                    out[index] = LocalChunk(path, path + SUM_SUFFIX, ref.chunk_id, address, ref.length)
                break
        return self.chunk_size, out

    # ------------------------------------------------------------------ reads

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        st = self._state(ino)
        end = min(offset + size, st.size)
        if end <= offset:
            return b""
        buf = bytearray(end - offset)
        await self._read_range(st, offset, memoryview(buf))
        return bytes(buf)

    async def read_into(self, ino: int, offset: int, into: memoryview) -> int:
        """Read into ``into`` (any writable buffer); returns bytes read (short at end of file)."""
        st = self._state(ino)
        view = memoryview(into).cast("B")
        n = max(0, min(len(view), st.size - offset))
        if n:
            await self._read_range(st, offset, view[:n])
        return n

    def _state(self, ino: int) -> FileState:
        st = self.files.get(ino)
        if st is None:
            raise error(errno.EBADF, f"inode {ino} is not open")
        return st

    async def _fill_remote(self, st: FileState, first: int, last: int, sequential: bool = False) -> None:
        """Chunks missing inside the file's size may live in a remote store: fetch them (kvfs.remote)."""
        if not st.modified:
            from kvfs.remote.fill import fill

            await fill(self, st, first, last, sequential)

    async def _read_range(self, st: FileState, offset: int, out: memoryview) -> None:
        cs = self.chunk_size
        end = offset + len(out)
        await self._fill_remote(st, offset // cs, (end - 1) // cs, offset == st.last_read_end)
        pieces = []
        pos = offset
        while pos < end:
            index = pos // cs
            in_chunk = pos - index * cs
            n = min(cs - in_chunk, end - pos)
            pieces.append((index, in_chunk, out[pos - offset: pos - offset + n]))
            pos += n
        sequential = offset == st.last_read_end
        st.last_read_end = end
        if len(pieces) == 1:
            # Whole-chunk fetch pays off for sequential small reads, not for random ones.
            await self._read_piece(st, *pieces[0], small=len(out) < cs and (sequential or pieces[0][1] == 0))
        else:
            async with open_nursery() as nursery:
                for piece in pieces:
                    nursery.start_soon(self._read_piece, st, *piece, False)
        if sequential and self.options.prefetch and len(out) < cs and self._nursery is not None:
            # Several chunks ahead at once: a cold chunk file is one synchronous disk read each, so
            # sequential throughput comes from having a few in flight.
            first = end // cs + (1 if end % cs else 0)
            for nxt in range(first, min(first + self.options.prefetch_chunks, (st.size + cs - 1) // cs)):
                if nxt not in st.cache and nxt not in st.prefetching and nxt not in st.dirty \
                        and nxt not in st.inflight:
                    ref = st.ref(nxt)
                    if ref is not None:
                        self._nursery.start_soon(self._prefetch, st, nxt, ref)

    async def _prefetch(self, st: FileState, index: int, ref: P.ChunkRef) -> None:
        try:
            await self._load_chunk(st, index, ref)
        except OSError as exc:
            log.debug("prefetch of chunk %d failed: %s", ref.chunk_id, exc)

    async def _load_chunk(self, st: FileState, index: int, ref: P.ChunkRef) -> bytes | None:
        """The whole chunk, verified and cached: one fetch however many readers (and the prefetcher)
        want it at once. None when it changed meanwhile or the fetch another task was doing failed."""
        loading = st.prefetching.get(index)
        if loading is not None:
            await loading.wait()
            return st.cache.get(index)
        done = st.prefetching[index] = trio.Event()
        try:
            data = bytearray(ref.length)
            await self._fetch(ref, 0, memoryview(data))
            if st.ref(index) is not ref:
                return None
            self._cache_put(st, index, data)  # cached buffers are only read, never resized: no copy
            return data
        finally:
            del st.prefetching[index]
            done.set()

    def _cache_put(self, st: FileState, index: int, data: bytes) -> None:
        st.cache[index] = data
        st.cache.move_to_end(index)
        while len(st.cache) > self.options.read_cache_chunks:
            st.cache.popitem(last=False)

    async def _refill_remote(self, st: FileState, index: int, ref: P.ChunkRef) -> bool:
        """A fetched copy of a remote object's chunk could not be read: fetch it again (kvfs.remote)."""
        if st.modified:
            return False
        from kvfs.remote.fill import refill

        return await refill(self, st, index, ref)

    async def _read_piece(self, st: FileState, index: int, in_chunk: int, out: memoryview, small: bool,
                          retry: bool = True) -> None:
        while index in st.inflight:  # its new contents are being uploaded: neither dirty nor a ref yet
            await st.upload_done.wait()
        buf = st.dirty.get(index)
        if buf is not None:
            _copy_with_zeros(buf, in_chunk, out)
            return
        cached = st.cache.get(index)
        if cached is not None:
            _copy_with_zeros(cached, in_chunk, out)
            return
        ref = st.ref(index)
        if ref is None or in_chunk >= ref.length:
            out[:] = bytes(len(out))
            return
        try:
            if small or index in st.prefetching:
                # Small reads: fetch the whole chunk once, verified, and serve the following reads from it.
                data = await self._load_chunk(st, index, ref)
                if data is not None:
                    _copy_with_zeros(data, in_chunk, out)
                    return
            n = min(len(out), ref.length - in_chunk)
            await self._fetch(ref, in_chunk, out[:n])
        except OSError:
            # A clean copy of a remote object re-fetches what it cannot read (evicted, torn, lost);
            # any other file may have been rewritten by another client meanwhile.
            if not retry or not (await self._refill_remote(st, index, ref)
                                 or await self._refresh_after_rewrite(st, index, ref)):
                raise
            await self._read_piece(st, index, in_chunk, out, small, retry=False)
            return
        if n < len(out):
            out[n:] = bytes(len(out) - n)

    async def _refresh_after_rewrite(self, st: FileState, index: int, ref: P.ChunkRef) -> bool:
        """A committed chunk could not be read. If another client replaced the file since this one
        opened it (the old chunks get deleted), adopt the new chunk map and return True: a reader
        then sees the newer version (close-to-open promises no snapshot), instead of EIO."""
        if st.modified or st.chunks.get(index) is not ref:
            return False
        reply = await self.meta.request(P.META_GET_CHUNKS, P.GetChunks(st.ino))
        chunks = {c.index: c for c in reply.chunks}
        new = chunks.get(index)
        if (new is not None and new.chunk_id == ref.chunk_id) or st.modified or st.chunks.get(index) is not ref:
            return False
        log.info("inode %d changed under an open handle: reading the new version", st.ino)
        st.attr, st.chunks, st.size = reply.attr, chunks, reply.attr.size
        st.cache.clear()
        return True

    async def _fetch(self, ref: P.ChunkRef, offset: int, out: memoryview) -> None:
        """Read ``len(out)`` bytes of a chunk at ``offset`` from some replica, verified."""
        replicas = list(ref.replicas)
        if not replicas:
            replicas = await self._locate(ref.chunk_id)
        tried: set[str] = set()
        while True:
            last = await self._fetch_from(ref, offset, out, [a for a in self._order_replicas(replicas)
                                                             if a not in tried], tried)
            if last is None:
                return
            # Every replica this client knew failed. The chunk map may be older than meta's view (a
            # holder came back, a copy was re-replicated elsewhere): ask meta where it is now.
            try:
                reply = await self.meta.request(P.META_CHUNK_LOCATIONS, P.ChunkLocations([ref.chunk_id]))
            except OSError:
                break
            replicas = [a for a in reply.replicas[0] if a not in tried]
            if not replicas:
                break
        if last.errno != errno.EIO:  # e.g. ENOENT: the chunk is gone from a server
            last = error(errno.EIO, f"chunk {ref.chunk_id:x}: {last.strerror or last}")
        raise last

    async def _fetch_from(self, ref: P.ChunkRef, offset: int, out: memoryview, replicas: list[str],
                          tried: set[str]) -> OSError | None:
        """Try ``replicas`` in order; None once one served the range, else the last error."""
        last: OSError | None = None
        for address in replicas:
            tried.add(address)
            try:
                info = self._servers.get(address)
                if info is not None and self._is_local(info):
                    await self._fetch_local(info, ref, offset, out)
                else:
                    await self._fetch_remote(address, ref, offset, out)
                return None
            except ChecksumError as exc:
                log.error("%s", exc)
                last = error(errno.EIO, str(exc))
                try:
                    await self.meta.request(P.META_REPORT_BAD_CHUNK, P.ReportBadChunk(ref.chunk_id, address, str(exc)))
                except OSError:
                    pass
            except OSError as exc:
                log.warning("reading chunk %x from %s: %s", ref.chunk_id, address, exc)
                last = exc
        return last if last is not None else error(errno.EIO, f"chunk {ref.chunk_id:x}: no replica available")

    async def _locate(self, chunk_id: int) -> list[str]:
        """Replica addresses when meta has none yet (it restarted and servers are re-registering)."""
        deadline = trio.current_time() + min(self.options.timeout, 15.0)
        while True:
            reply = await self.meta.request(P.META_CHUNK_LOCATIONS, P.ChunkLocations([chunk_id]))
            if reply.replicas[0]:
                await self.refresh_servers()
                return reply.replicas[0]
            if trio.current_time() > deadline:
                raise error(errno.EIO, f"chunk {chunk_id:x}: no live replica")
            await trio.sleep(0.25)

    def _is_local(self, info: _ServerInfo) -> bool:
        return self.options.local_reads and info.host_id == self._host_id and os.path.isdir(info.data_dir)

    def _order_replicas(self, replicas: list[str]) -> list[str]:
        local = [a for a in replicas if (i := self._servers.get(a)) is not None and self._is_local(i)]
        return local + [a for a in replicas if a not in local]

    async def _fetch_remote(self, address: str, ref: P.ChunkRef, offset: int, out: memoryview) -> None:
        start = offset // BLOCK * BLOCK
        aligned = start == offset and (len(out) % BLOCK == 0 or offset + len(out) >= ref.length)
        into = out if aligned else memoryview(bytearray(offset + len(out) - start + BLOCK))
        reply, data = await self._chunkserver(address).call(
            P.CHUNK_READ, P.ReadChunk(ref.chunk_id, offset, len(out)), into=into)
        data = data if data is not None else memoryview(b"")
        _verify(ref.chunk_id, address, data, reply.data_offset, reply.checksums, reply.chunk_length)
        skip = offset - reply.data_offset
        if len(data) - skip < len(out):
            raise error(errno.EIO, f"chunk {ref.chunk_id:x} on {address}: short read")
        if not aligned:
            out[:] = data[skip: skip + len(out)]

    async def _fetch_local(self, info: _ServerInfo, ref: P.ChunkRef, offset: int, out: memoryview) -> None:
        """Short-circuit read of a chunk file on this host, straight into ``out`` (kvfs.chunkio)."""
        from kvfs.chunkserver.store import SUM_SUFFIX, chunk_path

        path = chunk_path(info.data_dir, ref.chunk_id)

        def work() -> None:
            read_local_chunk(path, path + SUM_SUFFIX, ref.chunk_id, info.address, offset, [out])

        try:
            if len(out) >= 1 << 20:
                await trio.to_thread.run_sync(work, limiter=self._io)
            else:
                work()
        except FileNotFoundError:
            raise error(errno.EIO, f"chunk {ref.chunk_id:x} missing from {info.data_dir}") from None

    # ------------------------------------------------------------------ writes

    async def write(self, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        st = self._state(ino)
        if not st.writable:
            raise error(errno.EBADF, "file not open for writing")
        if st.upload_error is not None:
            exc, st.upload_error = st.upload_error, None
            raise exc
        view = memoryview(data).cast("B")
        cs = self.chunk_size
        pos = offset
        end = offset + len(view)
        while pos < end:
            index = pos // cs
            in_chunk = pos - index * cs
            n = min(cs - in_chunk, end - pos)
            buf = await self._dirty_chunk(st, index, in_chunk == 0 and n == cs)
            if len(buf) < in_chunk:
                buf.extend(bytes(in_chunk - len(buf)))
            buf[in_chunk: in_chunk + n] = view[pos - offset: pos - offset + n]
            pos += n
            st.size = max(st.size, pos)
            if in_chunk + n == cs:
                # The chunk is written to its end: upload it now so large writes stream.
                await self._start_upload(st, index)
        st.modified = True
        st.version += 1
        st.cache.clear()
        return len(view)

    async def _dirty_chunk(self, st: FileState, index: int, whole: bool) -> bytearray:
        buf = st.dirty.get(index)
        if buf is not None:
            return buf
        while index in st.inflight:  # its new contents are being uploaded: build on them
            await st.upload_done.wait()
        buf = st.dirty.get(index)
        if buf is not None:
            return buf
        buf = bytearray()
        ref = st.ref(index)
        if ref is not None and not whole and ref.length:
            base = bytearray(min(ref.length, max(st.size - index * self.chunk_size, 0)))
            if base:
                await self._fetch(ref, 0, memoryview(base))
                # A copy: a worker thread of the fetch may still hold a view of ``base`` for a moment,
                # and a dirty buffer must stay resizable (BufferError on extend/truncate otherwise).
                base = bytearray(base)
                if index in st.dirty or index in st.inflight or st.ref(index) is not ref:
                    # A concurrent write to this chunk (the kernel sends several at once with
                    # --writeback-cache) loaded it meanwhile: build on its buffer, not on our stale base.
                    return await self._dirty_chunk(st, index, whole)
            buf = base
        st.dirty[index] = buf
        return buf

    async def _start_upload(self, st: FileState, index: int) -> None:
        buf = st.dirty.pop(index)
        st.inflight.add(index)
        await self._upload_slots.acquire()
        st.uploads += 1
        if st.upload_done.is_set():
            st.upload_done = trio.Event()

        async def run() -> None:
            try:
                ref = await self._upload(st.ino, index, buf)
                if index not in st.dirty and index * self.chunk_size < st.size:
                    st.uploaded[index] = ref
                    st.cache.pop(index, None)  # a read during the upload may have cached the old chunk
            except OSError as exc:
                st.upload_error = exc
                st.dirty.setdefault(index, buf)  # keep the data: a later flush retries
            finally:
                st.inflight.discard(index)
                self._upload_slots.release()
                st.uploads -= 1
                if st.uploads == 0:
                    st.upload_done.set()

        assert self._nursery is not None, "Client.connect() was not called"
        self._nursery.start_soon(run)

    async def _upload(self, ino: int, index: int, data: bytearray | bytes) -> P.ChunkRef:
        """Write one immutable chunk of open file ``ino`` to a fresh replica chain."""
        return await self.upload_chunk(index, data, P.META_ALLOC_CHUNK, P.AllocChunk(ino, self.client_id, len(data)))

    async def write_chunk(self, alloc: P.AllocChunkReply, data: bytearray | bytes | memoryview,
                          sums: list[int] | None = None, durable: bool = True) -> None:
        """Write an allocated chunk down its replica chain (acked once every replica has it);
        ``durable=False`` for a cache of data that lives elsewhere (P.WriteChunk)."""
        from kvfs.chunkserver.store import block_checksums

        await self._chunkserver(alloc.replicas[0]).call(P.CHUNK_WRITE, P.WriteChunk(
            alloc.chunk_id, block_checksums(data) if sums is None else sums, alloc.replicas[1:], durable), data)

    async def upload_chunk(self, index: int, data: bytearray | bytes | memoryview, alloc_method: int,
                           alloc_request: Any) -> P.ChunkRef:
        """Allocate a chunk with ``alloc_method`` (META_ALLOC_CHUNK for an open file, META_KV_ALLOC for
        a file published later) and write ``data`` to its replica chain; on a failure, retries on a
        new chain (a few times, backing off). Error handling: ENOSPC at once; else the last OSError."""
        from kvfs.chunkserver.store import block_checksums

        sums = block_checksums(data)
        last: OSError | None = None
        for attempt in range(5):
            if attempt:
                await trio.sleep(0.5 * attempt)  # let meta notice a dead server before re-placing
            alloc = await self.meta.request(alloc_method, alloc_request)
            try:
                await self.write_chunk(alloc, data, sums)
                return P.ChunkRef(index, alloc.chunk_id, len(data), alloc.replicas)
            except OSError as exc:
                last = exc
                if exc.errno == errno.ENOSPC:
                    raise
                log.warning("chunk upload to %s failed (%s); retrying on a new chain", alloc.replicas, exc)
        assert last is not None
        raise last

    async def flush(self, ino: int) -> P.Attr:
        """Upload buffered data and commit size + chunk map: afterwards every client sees it."""
        st = self._state(ino)
        if not st.modified:
            return st.attr
        while st.uploads:
            await st.upload_done.wait()
        for index in sorted(st.dirty):
            if index * self.chunk_size < st.size:
                await self._start_upload(st, index)
            else:
                del st.dirty[index]
        while st.uploads:
            await st.upload_done.wait()
        if st.upload_error is not None:
            exc, st.upload_error = st.upload_error, None
            raise exc
        # Writes may arrive while the commit is in flight (another handle): commit a snapshot and
        # stay dirty unless nothing changed meanwhile.
        version, cut, committed = st.version, st.truncated_to, dict(st.uploaded)
        refs = [P.ChunkRef(i, r.chunk_id, r.length, []) for i, r in sorted(committed.items())]
        attr = await self.meta.request(P.META_COMMIT, P.Commit(ino, self.client_id, st.size, refs, time.time_ns(),
                                                               cut))
        self._changed(ino)
        if st.truncated_to == cut:
            st.truncated_to = -1
        for i, r in committed.items():
            st.chunks[i] = r
            if st.uploaded.get(i) is r:
                del st.uploaded[i]
        st.chunks = {i: r for i, r in st.chunks.items() if i * self.chunk_size < st.size}
        if st.version == version and not st.dirty and not st.uploaded and not st.uploads:
            st.modified = False
        st.attr = attr
        return attr

    fsync = flush

    async def truncate(self, ino: int, size: int) -> P.Attr:
        st = await self.open(ino, write=True)
        try:
            await self._truncate_state(st, size)
            return await self.flush(ino)
        finally:
            await self.release(ino)

    async def _truncate_state(self, st: FileState, size: int) -> None:
        if size < 0:
            raise error(errno.EINVAL, "negative size")
        while st.uploads:
            await st.upload_done.wait()
        cs = self.chunk_size
        if size < st.size and size % cs:
            index = size // cs
            if index in st.dirty:
                del st.dirty[index][size - index * cs:]
            elif st.ref(index) is not None:
                # Zero the tail of the new last chunk, so a later extension reads zeros.
                buf = await self._dirty_chunk(st, index, False)
                del buf[size - index * cs:]
        for index in [i for i in st.dirty if i * cs >= size]:
            del st.dirty[index]
        for index in [i for i in st.uploaded if i * cs >= size]:
            del st.uploaded[index]
        if size < st.size:
            st.truncated_to = size if st.truncated_to < 0 else min(st.truncated_to, size)
            # Committed chunks past the new end read as zeros from now on; the commit drops them.
            for index in [i for i in st.chunks if i * cs >= size]:
                del st.chunks[index]
        st.size = size
        st.modified = True
        st.version += 1
        st.cache.clear()


def _copy_with_zeros(src: bytes | bytearray, offset: int, out: memoryview) -> None:
    avail = max(0, min(len(out), len(src) - offset))
    if avail:
        out[:avail] = memoryview(src)[offset: offset + avail]
    if avail < len(out):
        out[avail:] = bytes(len(out) - avail)


# --------------------------------------------------------------------------- blocking facade


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
