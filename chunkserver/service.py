"""The chunkserver service: a thin trio server over ChunkStore, plus registration and heartbeats.

Every chunk operation needs a capability token signed by meta (kvfs/captoken.py) for that chunk and
operation; the keys to check them arrive in meta's register and heartbeat replies. Deletes listed in
heartbeat replies come from meta itself and need none."""

from __future__ import annotations

import errno
import logging
import os

import trio

from kvfs import protocol as P
from kvfs.captoken import Verifier
from kvfs.chunkserver.store import ChunkStore, block_checksums, host_id
from kvfs.meta_router import meta_client
from kvfs.rpc import FileRange, RpcClient, RpcServer, ServerLimits
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.chunkserver")


class ChunkService:
    def __init__(self, store: ChunkStore, meta_address: str, *, heartbeat_interval: float = 1.0,
                 rpc_timeout: float = 30.0, disk_threads: int = 8):
        self.store = store
        self.meta = meta_client(meta_address, timeout=rpc_timeout, connect_timeout=2.0)
        self.heartbeat_interval = heartbeat_interval
        self.rpc_timeout = rpc_timeout
        self.address = ""
        self.server_id = 0
        self.host_id = host_id()
        self._peers: dict[str, RpcClient] = {}
        self._disk = trio.CapacityLimiter(disk_threads)
        self.tokens = Verifier()

    def _peer(self, address: str) -> RpcClient:
        client = self._peers.get(address)
        if client is None:
            client = self._peers[address] = RpcClient("chunkserver", address, P.CHUNK_METHODS, timeout=self.rpc_timeout)
        return client

    def check_write(self, req: P.WriteChunk) -> None:
        """CHUNK_WRITE's token, checked by RpcServer before the chunk's data is received (a refused write
        costs no transfer and no buffer)."""
        self.tokens.check(req.token, req.chunk_id, P.TOKEN_WRITE)

    async def write(self, req: P.WriteChunk, data: memoryview | None) -> P.Empty:
        # The token was checked before the data arrived (check_write, a pre-check in serve).
        data = data if data is not None else memoryview(b"")

        async def local() -> None:
            await trio.to_thread.run_sync(self.store.write, req.chunk_id, data, req.checksums, req.durable,
                                          limiter=self._disk)

        if not req.chain:
            await local()
            return P.Empty()
        # Chain replication: store locally while forwarding to the next replica; ack when both have it.
        async with open_nursery() as nursery:
            nursery.start_soon(local)
            nursery.start_soon(self._forward, req, data)
        return P.Empty()

    async def _forward(self, req: P.WriteChunk, data: memoryview) -> None:
        nxt, rest = req.chain[0], req.chain[1:]
        await self._peer(nxt).call(P.CHUNK_WRITE, P.WriteChunk(req.chunk_id, req.checksums, rest, req.durable,
                                                              req.token), data)

    async def read(self, req: P.ReadChunk, _data) -> tuple[P.ReadChunkReply, FileRange]:
        return self.read_now(req)

    def read_now(self, req: P.ReadChunk) -> tuple[P.ReadChunkReply, FileRange]:
        """CHUNK_READ without awaiting (no disk I/O: sendfile reads the file as it sends), so a serving
        thread can run it too (kvfs.rpc_threaded)."""
        self.tokens.check(req.token, req.chunk_id, P.TOKEN_READ)
        loc = self.store.locate(req.chunk_id, req.offset, req.length)
        # A dup keeps the file readable even if the chunk is deleted while the reply is in flight.
        rng = FileRange(os.dup(loc.fd), loc.data_offset, loc.data_length, owned=True)
        return P.ReadChunkReply(loc.data_offset, loc.checksums, loc.chunk_length), rng

    async def replicate(self, req: P.ReplicateChunk, _data) -> P.Empty:
        self.tokens.check(req.token, req.chunk_id, P.TOKEN_REPLICATE)
        if not req.targets:
            return P.Empty()

        def load() -> tuple[bytes, list[int]]:
            data, sums = self._load_verified(req.chunk_id)
            if data is None:
                raise OSError(errno.EIO, f"chunk {req.chunk_id:x}: local copy is corrupt; not replicating it")
            return data, sums

        data, sums = await trio.to_thread.run_sync(load, limiter=self._disk)
        await self._peer(req.targets[0]).call(
            P.CHUNK_WRITE, P.WriteChunk(req.chunk_id, sums, req.targets[1:], token=req.write_token), data)
        return P.Empty()

    def _load_verified(self, chunk_id: int) -> tuple[bytes | None, list[int]]:
        """The whole chunk and its stored block checksums; data None when they disagree (a disk thread).
        Error handling: ENOENT when the chunk is not here; other OSErrors from the disk."""
        loc = self.store.locate(chunk_id, 0, 1 << 62)
        fd = os.dup(loc.fd)
        try:
            data = os.pread(fd, loc.data_length, 0)
        finally:
            os.close(fd)
        return (data if block_checksums(data) == loc.checksums else None), loc.checksums

    async def verify(self, req: P.VerifyChunk, _data) -> P.VerifyChunkReply:
        """Meta asks before it drops this copy on a client's bad-chunk report (meta/bad_chunks.py)."""
        try:
            data, _ = await trio.to_thread.run_sync(self._load_verified, req.chunk_id, limiter=self._disk)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return P.VerifyChunkReply(False, "missing")
            return P.VerifyChunkReply(False, f"unreadable: {exc.strerror or exc}")
        return P.VerifyChunkReply(True) if data is not None else P.VerifyChunkReply(False, "checksum mismatch")

    async def delete(self, req: P.DeleteChunks, _data) -> P.Empty:
        if len(req.tokens) != len(req.chunk_ids):
            raise PermissionError(errno.EACCES, "delete needs one capability token per chunk")
        for chunk_id, token in zip(req.chunk_ids, req.tokens):
            self.tokens.check(token, chunk_id, P.TOKEN_DELETE)
        await trio.to_thread.run_sync(self.store.delete, req.chunk_ids, limiter=self._disk)
        return P.Empty()

    async def stat(self, _req, _data) -> P.ChunkserverStat:
        return P.ChunkserverStat(self.store.capacity, self.store.used, len(self.store), self.store.data_dir,
                                 self.host_id)

    async def serve(self, host: str, port: int, advertise: str | None = None, *, limits: ServerLimits | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        server = RpcServer("chunkserver", P.CHUNK_METHODS, {
            P.CHUNK_WRITE: self.write, P.CHUNK_READ: self.read, P.CHUNK_DELETE: self.delete, P.CHUNK_STAT: self.stat,
            P.CHUNK_REPLICATE: self.replicate, P.CHUNK_VERIFY: self.verify,
        }, limits, prechecks={P.CHUNK_WRITE: self.check_write}, thread_handlers={P.CHUNK_READ: self.read_now})
        async with open_nursery() as nursery:
            bound = await nursery.start(server.serve, host, port)
            self.address = advertise or f"{host}:{bound}"
            nursery.start_soon(self._heartbeat_loop)
            task_status.started(bound)

    async def _register(self) -> None:
        reply = await self.meta.request(P.META_REGISTER, P.RegisterChunkserver(
            self.store.node_id, self.address, self.store.data_dir, self.host_id,
            self.store.capacity, self.store.used, self.store.chunk_ids()))
        self.server_id = reply.server_id
        self.tokens.set_keys(reply.keys)
        log.info("registered with meta %s as server %d (%s)", self.meta.address, self.server_id, self.address)

    async def _heartbeat_loop(self) -> None:
        """Register, then heartbeat forever; re-register whenever meta forgets us (it restarted)."""
        warned = False
        while True:
            try:
                if not self.server_id:
                    await self._register()
                    warned = False
                reply = await self.meta.request(P.META_HEARTBEAT, P.Heartbeat(
                    self.server_id, self.store.capacity, self.store.used, len(self.store)), timeout=5.0)
                if not reply.known:
                    self.server_id = 0
                    continue
                self.tokens.set_keys(reply.keys)
                if reply.delete_chunk_ids:
                    await trio.to_thread.run_sync(self.store.delete, reply.delete_chunk_ids, limiter=self._disk)
            except OSError as exc:
                if not warned:
                    log.warning("meta unreachable (%s); retrying", exc)
                    warned = True
                self.server_id = 0
            await trio.sleep(self.heartbeat_interval)
