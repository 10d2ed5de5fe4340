"""Reads over TCP (``local_reads=False``), on both receive paths: large ranges in worker threads on
blocking sockets (kvfs/rpc_blocking.py) and small ones on the event loop. Same bytes either way; a
corrupt or truncated replica is never returned; a dead server is an error, not a hang; a restarted
server's stale pooled connections are replaced."""

from __future__ import annotations

import errno
import glob
import os
import socket

import pytest
from cluster import Cluster, wait_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cl = Cluster(str(tmp_path_factory.mktemp("tcp")), chunkservers=1, replication=1, chunk_size="4M").start()
    yield cl
    cl.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def chunk_files(cl: Cluster) -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(cl.root, "cs0", "chunks", "*", "*")) if not f.endswith(".sum"))


@pytest.mark.parametrize("thread_read_min", [1 << 20, 0], ids=["threads", "event-loop"])
def test_tcp_reads_match_on_both_paths(cluster, thread_read_min):
    data = os.urandom(10 * MiB + 12345)
    with cluster.client() as w:
        w.write_file(f"/same-{thread_read_min}", data)
    with cluster.client(local_reads=False, thread_read_min=thread_read_min) as c:
        ino = c.resolve(f"/same-{thread_read_min}").ino
        c.open(ino)
        try:
            assert c.read(ino, 0, len(data)) == data  # whole chunks, several at once
            for offset, size in [(1, 3 * MiB), (4 * MiB - 7, 2 * MiB + 9), (len(data) - 100, 4096), (5, 17)]:
                assert c.read(ino, offset, size) == data[offset:offset + size], (offset, size)
        finally:
            c.release(ino)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_replica_is_an_error_on_the_thread_path(cluster, damage):
    data = os.urandom(4 * MiB)
    before = set(chunk_files(cluster))
    with cluster.client() as w:
        w.write_file(f"/damaged-{damage}", data)
    [path] = set(chunk_files(cluster)) - before
    with open(path, "r+b") as f:
        if damage == "flip":
            f.seek(2 * MiB + 5)
            byte = f.read(1)
            f.seek(2 * MiB + 5)
            f.write(bytes([byte[0] ^ 0xFF]))
        else:
            f.truncate(3 * MiB)
    with cluster.client(local_reads=False) as c:
        ino = c.resolve(f"/damaged-{damage}").ino
        c.open(ino)
        try:
            with pytest.raises(OSError) as exc:
                c.read(ino, 0, len(data))
            assert exc.value.errno == errno.EIO
        finally:
            c.release(ino)


def test_dead_server_is_an_error_and_a_restarted_one_serves_again(tmp_path):
    cl = Cluster(str(tmp_path / "c"), chunkservers=1, replication=1, chunk_size="4M").start()
    try:
        data = os.urandom(8 * MiB)
        with cl.client() as w:
            w.write_file("/f", data)
        with cl.client(local_reads=False, timeout=5.0) as c:
            ino = c.resolve("/f").ino
            c.open(ino)
            try:
                assert c.read(ino, 0, len(data)) == data  # leaves pooled blocking connections behind
                cl.kill_chunkserver(0)
                with pytest.raises(OSError) as exc:
                    c.read(ino, 0, len(data))
                assert exc.value.errno == errno.EIO
                cl.start_chunkserver(0)
                port = int(cl.servers[0].args[cl.servers[0].args.index("--listen") + 1].rsplit(":", 1)[1])
                wait_for(lambda: _listening(port), 20, "the chunkserver to listen again")
                assert c.read(ino, 0, len(data)) == data
            finally:
                c.release(ino)
    finally:
        cl.stop()


def test_loader_reader_reads_chunks_over_tcp_from_its_own_threads(cluster):
    """``kvfs.models``' ``ClientFileReader`` without short-circuit reads: each large chunk range goes over
    TCP straight from the calling thread (no hop through the client's event loop), verified; ranges the
    direct path cannot take (small or unaligned pieces) and any failure use the client's path. A
    corrupt replica is never returned, on either path."""
    from concurrent.futures import ThreadPoolExecutor

    from kvfs.models.reader import ClientFileReader

    data = os.urandom(10 * MiB + 12345)
    before = set(chunk_files(cluster))
    with cluster.client() as w:
        w.write_file("/loader-tcp", data)
    [*new] = sorted(set(chunk_files(cluster)) - before)
    with cluster.client(local_reads=False) as c:
        reader = ClientFileReader(c, "/loader-tcp")
        assert reader._remote is not None and len(reader._remote) == 3
        via_client = []
        real = reader._read_via_client
        reader._read_via_client = lambda off, bufs: (via_client.append(off), real(off, bufs))[1]

        def span(i: int) -> bytes:
            n = min(4 * MiB, len(data) - i * 4 * MiB)
            buf = memoryview(bytearray(n))
            reader.readv_into(i * 4 * MiB, [buf])
            return bytes(buf)

        with ThreadPoolExecutor(3) as pool:
            assert b"".join(pool.map(span, range(3))) == data
        assert via_client == []  # every chunk came over the direct path
        for offset, size in [(1, 3 * MiB), (4 * MiB - 7, 2 * MiB + 9), (len(data) - 100, 100), (5, 17)]:
            bufs = [memoryview(bytearray(size // 2)), memoryview(bytearray(size - size // 2))]
            reader.readv_into(offset, bufs)
            assert b"".join(bytes(b) for b in bufs) == data[offset:offset + size], (offset, size)
        # A corrupt replica (the only one): the direct read refuses it, the client's path too: EIO.
        victim = next(p for p in new if os.path.getsize(p) == 4 * MiB)
        with open(victim, "r+b") as f:
            f.seek(MiB + 3)
            byte = f.read(1)
            f.seek(MiB + 3)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(OSError) as exc:
            for i in range(3):
                span(i)
        assert exc.value.errno == errno.EIO
        reader.close()


def test_a_peer_that_stalls_mid_data_times_out(tmp_path):
    """A hostile or hung peer that announces 4 MiB of chunk data, sends part of it and stops: the
    blocking receive gives up at the client's timeout with EIO, never hangs."""
    import threading
    import time

    from kvfs import protocol as P
    from kvfs.rpc_blocking import BlockingChunkClient

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    release = threading.Event()

    def stall() -> None:
        conn, _ = listener.accept()
        with conn:
            header = P.unpack_header(conn.recv(P.HEADER_SIZE, socket.MSG_WAITALL))
            conn.recv(header.payload_len, socket.MSG_WAITALL)
            reply = P.encode(P.ReadChunkReply(0, [], 4 * MiB))
            conn.sendall(P.pack_header(P.KIND_REPLY, P.CHUNK_READ, 0, header.request_id, len(reply), 4 * MiB) + reply)
            conn.sendall(os.urandom(MiB))  # a quarter of what was announced, then nothing
            release.wait(30)

    server = threading.Thread(target=stall, daemon=True)
    server.start()
    client = BlockingChunkClient(f"127.0.0.1:{port}", timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        client.read(P.ReadChunk(1, 0, 4 * MiB), memoryview(bytearray(4 * MiB)))
    assert exc.value.errno == errno.EIO and "timed out" in str(exc.value)
    assert time.monotonic() - t0 < 10
    release.set()
    client.close()
    listener.close()
