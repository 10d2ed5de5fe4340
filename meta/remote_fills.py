"""Read-through fills and eviction of the remote tier (a part of ``RemoteTier``, meta/remote.py).

Clients fetch a clean file's missing chunks from the remote and record them here (``fill_alloc`` /
``fill_commit``); chunks they cannot read are forgotten so the next read fetches them again
(``refill``); clean data is dropped under capacity pressure or on request (eviction).
"""

from __future__ import annotations

import errno
import logging
import stat

import trio

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.meta.engine import Batch
from kvfs.meta.remote_records import (
    CLEAN,
    _dec_file,
)

log = logging.getLogger("kvfs.meta.remote")


class RemoteFills:
    """Mixed into RemoteTier: uses its namespace (``self.ns``), options and file records."""

    # ------------------------------------------------------------------ read-through fills

    def info(self, ino: int) -> P.RemoteInfoReply:
        found = self.binding_of_file(ino)
        if found is None:
            raise error(errno.ENODATA, f"inode {ino} is not backed by a remote store")
        b, rec = found
        node = self.ns.inode(ino)
        fillable = rec.state == CLEAN and bool(rec.etag) and node.size == rec.size
        return P.RemoteInfoReply(b.url, rec.key, b.mode, rec.state, rec.etag, rec.size, rec.mtime_ns, fillable,
                                 rec.error)

    def fill_alloc(self, r: P.RemoteFillAlloc) -> P.RemoteFillAllocReply:
        if not self.info(r.ino).fillable:
            raise error(errno.ESTALE, f"inode {r.ino}: no clean remote copy to fill from")
        return P.RemoteFillAllocReply([self.ns.alloc_pending_chunk(r.size_hint)
                                       for _ in range(max(1, min(r.count, 1024)))])

    def fill_commit(self, r: P.RemoteFillCommit) -> P.RemoteFillCommitReply:
        info = self.info(r.ino)
        batch: Batch = []
        # Only chunks still pending (not dropped as garbage meanwhile) may be committed.
        fresh = {ref.chunk_id for ref in r.chunks if self.ns._unpublished(ref.chunk_id)}
        self.ns.pending.settle(batch, fresh)
        if not info.fillable or info.etag != r.etag:
            self.ns.engine.write(batch)
            for ref in r.chunks:
                self.ns.registry.drop_chunk(ref.chunk_id)
            raise error(errno.ESTALE, f"{info.key}: the remote object changed while it was being fetched")
        cs = self.ns.file_chunk_size(self.ns.inode(r.ino))
        if (r.chunk_size or self.ns.chunk_size) != cs:
            self.ns.engine.write(batch)
            for ref in r.chunks:
                self.ns.registry.drop_chunk(ref.chunk_id)
            raise error(errno.EINVAL, f"inode {r.ino} has {cs}-byte chunks, the filler split it by "
                        f"{r.chunk_size or self.ns.chunk_size}")
        out = []
        garbage = []
        for ref in r.chunks:
            raw = self.ns.engine.get(R.chunk_key(r.ino, ref.index))
            expect = min(cs, info.size - ref.index * cs)
            if raw is not None or ref.length != expect or expect <= 0 or ref.chunk_id not in fresh:
                garbage.append(ref.chunk_id)  # filled by someone else first, or bogus
                if raw is not None:
                    rec = R.decode_chunk(raw)
                    out.append(P.ChunkRef(ref.index, rec.chunk_id, rec.length, self.ns.registry.replicas_of(rec.chunk_id)))
                continue
            batch.append((R.chunk_key(r.ino, ref.index), R.encode(R.ChunkRecord(ref.chunk_id, ref.length))))
            batch.append((R.live_chunk_key(ref.chunk_id), b""))
            self.ns.charge_bytes(r.ino, ref.length)
            out.append(P.ChunkRef(ref.index, ref.chunk_id, ref.length, self.ns.registry.replicas_of(ref.chunk_id)))
        if batch:
            self.ns.engine.write(batch)
        for chunk_id in garbage:
            self.ns.registry.drop_chunk(chunk_id)
        return P.RemoteFillCommitReply(out)

    def refill(self, r: P.RemoteRefill) -> None:
        """Forget fetched chunks a client could not read, so the next read fetches them again."""
        info = self.info(r.ino)
        if not info.fillable or info.etag != r.etag:
            raise error(errno.ESTALE, f"{info.key}: not a clean copy of this remote version")
        batch: Batch = []
        dropped = []
        for ref in r.chunks:
            raw = self.ns.engine.get(R.chunk_key(r.ino, ref.index))
            if raw is None:
                continue
            rec = R.decode_chunk(raw)
            if rec.chunk_id != ref.chunk_id:
                continue  # already refilled by another client
            batch.append((R.chunk_key(r.ino, ref.index), None))
            batch.append((R.live_chunk_key(rec.chunk_id), None))
            dropped.append(rec)
        if batch:
            self.ns.engine.write(batch)
            self._release_chunks(r.ino, dropped)
            log.warning("%s/%s: %d fetched chunk(s) unreadable; fetching them again", info.url, info.key,
                        len(dropped))

    # ------------------------------------------------------------------ eviction

    def evict_file(self, ino: int) -> int:
        """Drop the local chunks of a clean file (they are re-fetched on demand). Dirty data never goes."""
        rec = self.file(ino)
        if rec is None or rec.state != CLEAN or not rec.etag or self.ns.inode(ino).size != rec.size:
            return 0
        batch: Batch = []
        dropped = self._drop_chunks(batch, ino)
        if not dropped:
            return 0
        self.ns.engine.write(batch)
        self._release_chunks(ino, dropped)
        return sum(c.length for c in dropped)

    async def evict_path(self, path: str) -> P.RemoteEvictReply:
        attr = await self.resolve(path)
        files = freed = 0
        stack = [attr.ino]
        while stack:
            ino = stack.pop()
            if stat.S_ISDIR(self.ns.inode(ino).mode):
                stack.extend(R.U64.unpack(v)[0] for _, v in self.ns.engine.scan(R.dentry_prefix(ino)))
                continue
            n = self.evict_file(ino)
            if n:
                files += 1
                freed += n
        return P.RemoteEvictReply(files, freed)

    def _over_watermark(self) -> int:
        """Bytes to free so every chunkserver above the high watermark gets under the low one."""
        need = 0
        for s in self.ns.registry.live_servers():
            if s.capacity and s.used > self.opts.high_watermark * s.capacity:
                need += int(s.used - self.opts.low_watermark * s.capacity)
        return need

    async def _evictor(self) -> None:
        while True:
            await trio.sleep(2.0)
            need = self._over_watermark()
            if need <= 0 or not self.bindings:
                continue
            now = trio.current_time()
            candidates = []
            for key, raw in self.ns.engine.scan(b"rf"):
                rec = _dec_file(raw)
                ino = R.U64.unpack(key[2:])[0]
                last = self._access.get(ino, 0.0)
                if rec.state == CLEAN and rec.etag and now - last >= self.opts.evict_min_age:
                    candidates.append((last, ino))
            candidates.sort()
            freed = 0
            # Replicated chunks free `replication` times their length across servers.
            for _, ino in candidates:
                if freed >= need:
                    break
                freed += self.evict_file(ino) * max(self.ns.replication, 1)
            if freed:
                log.info("capacity above %.0f%%: evicted %d bytes of clean remote-backed data",
                         self.opts.high_watermark * 100, freed)
                await trio.sleep(5.0)  # let chunkservers delete and report before judging again
