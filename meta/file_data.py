"""The namespace's file data (a part of ``Namespace``, meta/namespace.py): write leases, chunk maps,
chunk allocation, commit, KV block publish and the expiry of uncommitted chunks.

A mixin over the namespace's engine, records and helpers (``inode``, ``attr``, ``_put``, ``_charge``,
``pending``, ``registry``), so the tree operations and the data operations live in files of their own
while every change is still one batch through one ``engine.write``.
"""

from __future__ import annotations

import errno
import stat

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.meta.engine import Batch
from kvfs.meta.names import check_name, now_ns


class FileData:
    def _check_lease(self, ino: int, client_id: str) -> None:
        holder = self.leases.get(ino)
        if holder and holder[0] != client_id and holder[1] > self.clock():
            raise error(errno.EBUSY, "file is being written by another client")
        self.leases[ino] = (client_id, self.clock() + self.lease_seconds)

    def open_write(self, ino: int, client_id: str) -> P.LeaseReply:
        node = self.inode(ino)
        if not stat.S_ISREG(node.mode):
            raise error(errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EINVAL, "not a regular file")
        self._check_lease(ino, client_id)
        return P.LeaseReply(self.lease_seconds, self.attr(ino, node))

    def release_write(self, ino: int, client_id: str) -> None:
        holder = self.leases.get(ino)
        if holder and holder[0] == client_id:
            del self.leases[ino]

    def lease_held(self, ino: int, client_id: str) -> bool:
        holder = self.leases.get(ino)
        return holder is not None and holder[0] == client_id and holder[1] > self.clock()

    def renew_leases(self, client_id: str, inos: list[int]) -> P.RenewLeasesReply:
        """Extend (or take again, if nobody else took it meanwhile) the write leases of a client's open
        files. The reply lists the files whose lease is lost: another client has it, or the file is gone."""
        lost = []
        for ino in inos:
            try:
                self.inode(ino)
                self._check_lease(ino, client_id)
            except OSError:
                lost.append(ino)
        return P.RenewLeasesReply(lost, self.lease_seconds)

    def chunks(self, ino: int, first: int, count: int) -> P.GetChunksReply:
        node = self.inode(ino)
        prefix = R.chunk_prefix(ino)
        out = []
        for key, raw in self.engine.scan(prefix, start=R.chunk_key(ino, first)):
            index = R.U64.unpack(key[9:])[0]
            if index >= first + count:
                break
            rec = R.decode_chunk(raw)
            out.append(P.ChunkRef(index, rec.chunk_id, rec.length, self.registry.replicas_of(rec.chunk_id)))
        return P.GetChunksReply(self.attr(ino, node), self.file_chunk_size(node), out)

    def alloc_chunk(self, ino: int, client_id: str, size_hint: int) -> P.AllocChunkReply:
        node = self.inode(ino)
        if not stat.S_ISREG(node.mode):
            raise error(errno.EINVAL, "not a regular file")
        self._check_lease(ino, client_id)
        return self.alloc_pending_chunk(size_hint or self.file_chunk_size(node), ino, client_id)

    def alloc_pending_chunk(self, size_hint: int, ino: int = 0, client_id: str = "") -> P.AllocChunkReply:
        """A new chunk id placed on R servers: pending until a commit or publish names it. One of an
        open file lives as long as its writer's lease; one for a file that does not exist yet
        (KV_PUBLISH, remote fills) for the pending grace period (meta/pending.py)."""
        servers = self.registry.place(self.replication, size_hint or self.chunk_size)
        batch: Batch = []
        chunk_id = self.alloc_chunk_id(batch)
        self.pending.add(batch, chunk_id, ino, client_id)
        self.engine.write(batch)
        self.registry.add_locations(chunk_id, [s.record.server_id for s in servers])
        return P.AllocChunkReply(chunk_id, [s.record.address for s in servers])

    def publish(self, r: P.KVPublish) -> P.KVPublishReply:
        """Create a whole regular file at once from pending chunks; never replaces an existing name
        (its chunks are then dropped). Error handling: EINVAL for chunks that are not this file's
        exact, pending content; ENOENT/ENOTDIR for a bad parent."""
        check_name(r.name)
        pnode = self._dir(r.parent)
        cs = self.split_chunk_size(r.chunk_size)
        count = (r.size + cs - 1) // cs if r.size > 0 else 0
        refs = sorted(r.chunks, key=lambda c: c.index)
        if r.size < 0 or [c.index for c in refs] != list(range(count)) or any(
                c.length != min(cs, r.size - c.index * cs) or not self._unpublished(c.chunk_id) for c in refs):
            raise error(errno.EINVAL, f"{r.name}: chunks do not make up {r.size} bytes of fresh, unpublished chunks")
        existing = self._child(r.parent, r.name)
        batch: Batch = []
        self.pending.settle(batch, [c.chunk_id for c in refs])
        if existing is not None:
            self.engine.write(batch)
            for c in refs:
                self.registry.drop_chunk(c.chunk_id)
            return P.KVPublishReply(False, self.attr(existing))
        ino = self._alloc_ino(batch)
        t = now_ns()
        mode = stat.S_IFREG | (r.mode & 0o7777)
        node = R.Inode(mode, 1, r.uid, r.gid, r.size, t, t, t, 0, parent=0, target="", tenant=pnode.tenant,
                       kv_block=True, chunk_size=cs)
        self._put(batch, ino, node)
        batch.append((R.dentry_key(r.parent, r.name), R.U64.pack(ino)))
        for c in refs:
            batch.append((R.chunk_key(ino, c.index), R.encode(R.ChunkRecord(c.chunk_id, c.length))))
            batch.append((R.live_chunk_key(c.chunk_id), b""))
        pnode.mtime_ns = pnode.ctime_ns = t
        self._put(batch, r.parent, pnode)
        self.engine.write(batch)
        for c in refs:
            self.registry.adopt(c.chunk_id)
        self._charge(node, files=1, nbytes=r.size, kv_blocks=1)
        return P.KVPublishReply(True, self.attr(ino, node))

    def _unpublished(self, chunk_id: int) -> bool:
        """Allocated for a file that does not exist yet and still pending (pending records survive a
        meta restart). A chunk dropped as garbage is refused: it may be gone from the chunkservers."""
        p = self.pending.get(chunk_id)
        return p is not None and p.ino == 0

    def is_live_chunk(self, chunk_id: int) -> bool:
        return chunk_id in self.pending or self.engine.get(R.live_chunk_key(chunk_id)) is not None

    def commit(self, req: P.Commit) -> P.Attr:
        """Publish new chunks and the new size in one batch; dereferenced chunks get deleted."""
        node = self.inode(req.ino)
        if not stat.S_ISREG(node.mode):
            raise error(errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EINVAL, "not a regular file")
        if req.size < 0:
            raise error(errno.EINVAL, "negative size")
        self._check_lease(req.ino, req.client_id)
        cs = self.file_chunk_size(node)
        if (req.chunk_size or self.chunk_size) != cs:
            raise error(errno.EINVAL, f"inode {req.ino} has {cs}-byte chunks, the writer split it by "
                        f"{req.chunk_size or self.chunk_size} (a client too old for per-file chunk sizes?)")
        new_count = (req.size + cs - 1) // cs
        cut = req.size if req.truncated_to < 0 else min(req.truncated_to, req.size)
        incoming: dict[int, P.ChunkRef] = {}
        garbage: list[int] = []  # chunk ids that never get published
        for ref in req.chunks:
            if ref.index < 0 or not 0 <= ref.length <= cs:
                raise error(errno.EINVAL, f"bad chunk ref {ref}")
            if ref.index in incoming:
                garbage.append(incoming[ref.index].chunk_id)
            incoming[ref.index] = ref
        # Records affected: the ones being replaced, and (truncation) the ones at or past the new end.
        existing: dict[int, R.ChunkRecord] = {}
        for index in incoming:
            raw = self.engine.get(R.chunk_key(req.ino, index))
            if raw is not None:
                existing[index] = R.decode_chunk(raw)
        # Every new chunk must still be this writer's pending chunk (or already committed here: a
        # retried commit). One that was dropped as garbage may be gone from the chunkservers:
        # committing it would be a silent hole, so the writer gets an error instead.
        for ref in req.chunks:
            p = self.pending.get(ref.chunk_id)
            owned = p is not None and p.ino == req.ino and p.client_id == req.client_id
            old = existing.get(ref.index)
            if not owned and not (old is not None and old.chunk_id == ref.chunk_id):
                raise error(errno.EIO, f"inode {req.ino}: uploaded chunk {ref.chunk_id} (index {ref.index}) was "
                            "dropped before this commit (write lease lost); the unflushed data is lost")
        first_cut = max((cut + cs - 1) // cs - 1, 0)
        for key, raw in self.engine.scan(R.chunk_prefix(req.ino), start=R.chunk_key(req.ino, first_cut)):
            existing[R.U64.unpack(key[9:])[0]] = R.decode_chunk(raw)
        batch: Batch = []
        dropped: list[int] = []
        delta = 0
        for index in sorted(set(existing) | set(incoming)):
            old, ref = existing.get(index), incoming.get(index)
            new = R.ChunkRecord(ref.chunk_id, ref.length) if ref else old
            if ref is None and new is not None and new.length > cut - index * cs:
                # Truncated to ``cut`` since the last commit (and maybe extended again): those bytes are gone.
                new = R.ChunkRecord(new.chunk_id, cut - index * cs) if index * cs < cut else None
            if index >= new_count:
                new = None
            elif new is not None and new.length > req.size - index * cs:
                # Bytes past a chunk's recorded length are never read (they read as zeros), so
                # shortening the record is the whole truncation.
                new = R.ChunkRecord(new.chunk_id, req.size - index * cs)
            if old is not None:
                delta -= old.length
                if new is None or new.chunk_id != old.chunk_id:
                    dropped.append(old.chunk_id)
                    batch.append((R.live_chunk_key(old.chunk_id), None))
            if ref is not None and (new is None or new.chunk_id != ref.chunk_id):
                garbage.append(ref.chunk_id)
            key = R.chunk_key(req.ino, index)
            if new is None:
                batch.append((key, None))
            else:
                batch.append((key, R.encode(new)))
                batch.append((R.live_chunk_key(new.chunk_id), b""))
                delta += new.length
        t = now_ns()
        node.size = req.size
        node.mtime_ns = req.mtime_ns or t
        node.ctime_ns = t
        self._put(batch, req.ino, node)
        self.pending.settle(batch, [ref.chunk_id for ref in req.chunks])
        self.engine.write(batch)
        for ref in req.chunks:
            self.registry.adopt(ref.chunk_id)
        for chunk_id in dropped + garbage:
            self.registry.drop_chunk(chunk_id)
        self._charge(node, nbytes=delta)
        if req.release:
            self.release_write(req.ino, req.client_id)
        return self.attr(req.ino, node)

    def expire_pending(self) -> int:
        """Pending chunks whose owner is gone (a writer that lost its lease, an unpublished block past
        the grace period) become garbage. Returns how many."""
        expired = self.pending.expired(self.lease_held)
        if not expired:
            return 0
        batch: Batch = []
        self.pending.settle(batch, expired)
        self.engine.write(batch)
        for chunk_id in expired:
            if self.engine.get(R.live_chunk_key(chunk_id)) is None:
                self.registry.drop_chunk(chunk_id)
        return len(expired)
