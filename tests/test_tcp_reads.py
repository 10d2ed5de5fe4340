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

from kvfs.chunkio import block_checksums

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
                registered = cl.servers[0].log().count("registered with meta")
                cl.kill_chunkserver(0)
                with pytest.raises(OSError) as exc:
                    c.read(ino, 0, len(data))
                assert exc.value.errno == errno.EIO
                cl.start_chunkserver(0)
                port = int(cl.servers[0].args[cl.servers[0].args.index("--listen") + 1].rsplit(":", 1)[1])
                wait_for(lambda: _listening(port), 20, "the chunkserver to listen again")
                # It refuses reads (EAGAIN) until meta has sent it the capability keys: wait for that,
                # not just for the port (on a loaded machine registration can lag the listen).
                wait_for(lambda: cl.servers[0].log().count("registered with meta") > registered, 20,
                         "the chunkserver to register again")
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


class FakeChunkserver:
    """A plain-socket peer that answers one CHUNK_READ the way ``reply(conn, request_id)`` does (broken or
    hostile on purpose), then holds the connection open until the test ends."""

    def __init__(self, reply):
        import threading

        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.release = threading.Event()
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from kvfs import protocol as P

        conn, _ = self.listener.accept()
        with conn:
            header = P.unpack_header(conn.recv(P.HEADER_SIZE, socket.MSG_WAITALL))
            conn.recv(header.payload_len, socket.MSG_WAITALL)
            try:
                self.reply(conn, header.request_id)
            except OSError:
                pass
            self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.thread.join(5)
        self.listener.close()


def _send_reply(conn, request_id: int, data: bytes, *, announce: int | None = None, sums: list[int] | None = None,
                send: int | None = None) -> None:
    """A CHUNK_READ reply for ``data`` at chunk offset 0: ``announce`` bytes declared (default all),
    ``sums`` as checksums (default the right ones), only the first ``send`` bytes sent (default all)."""
    from kvfs import protocol as P

    reply = P.encode(P.ReadChunkReply(0, block_checksums(data) if sums is None else sums, len(data)))
    conn.sendall(P.pack_header(P.KIND_REPLY, P.CHUNK_READ, 0, request_id, len(reply),
                               len(data) if announce is None else announce) + reply)
    conn.sendall(data[:len(data) if send is None else send])


def _corrupt(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[3 * MiB + 11] ^= 0x40
    return bytes(bad)


HOSTILE_REPLIES = {
    # announces 4 MiB, sends a quarter, then nothing: the receive gives up at the timeout
    "stalls mid-data": (lambda c, rid, d: _send_reply(c, rid, d, send=MiB), "timed out"),
    # sends part of the data, then closes the connection
    "closes mid-data": (lambda c, rid, d: (_send_reply(c, rid, d, send=MiB + 5), c.shutdown(socket.SHUT_RDWR)),
                        "closed by peer"),
    # every byte arrives, one of them wrong for its checksum
    "corrupt data": (lambda c, rid, d: _send_reply(c, rid, _corrupt(d), sums=block_checksums(d)),
                     "checksum mismatch at block 48"),
    # more data than the read asked for (and than the caller's buffer holds)
    "too much data": (lambda c, rid, d: _send_reply(c, rid, d + d[:64 << 10]), "bad reply"),
    # checksums that do not cover the data
    "too few checksums": (lambda c, rid, d: _send_reply(c, rid, d, sums=[1, 2, 3]), "checksums for"),
    # a reply to another request
    "wrong request id": (lambda c, rid, d: _send_reply(c, rid + 1, d), "does not match"),
}


@pytest.mark.parametrize("behaviour", list(HOSTILE_REPLIES))
@pytest.mark.parametrize("receive", ["c-helper", "python"])
def test_a_broken_or_hostile_peer_gives_eio_in_bounded_time(behaviour, receive, monkeypatch):
    """A peer that stalls, hangs up, corrupts, over-sends or mislabels a chunk read's reply: the blocking
    read raises EIO within the client's timeout, names the reason, never returns the bytes, never hangs,
    and does not pool the connection. Both receive paths: the C helper (plaintext) and the Python one
    (TLS, or no C helper)."""
    import time

    from kvfs import protocol as P
    from kvfs import rpc_blocking
    from kvfs.chunkio import recv_verify

    assert recv_verify is not None, "kvfs._blockhash lacks recv_verify"
    if receive == "python":
        monkeypatch.setattr(rpc_blocking, "_RECV_VERIFY", None)
    data = os.urandom(4 * MiB)
    reply, reason = HOSTILE_REPLIES[behaviour]
    server = FakeChunkserver(lambda conn, rid: reply(conn, rid, data))
    client = rpc_blocking.BlockingChunkClient(server.address, timeout=1.5)
    buf = memoryview(bytearray(4 * MiB))
    t0 = time.monotonic()
    try:
        with pytest.raises(OSError) as exc:
            client.read(P.ReadChunk(1, 0, 4 * MiB), buf)
        assert exc.value.errno == errno.EIO and reason in str(exc.value), str(exc.value)
        assert time.monotonic() - t0 < 10
        assert client._idle == []  # a connection left mid-reply is never reused
    finally:
        server.close()
        client.close()


def test_an_honest_peer_is_read_and_verified_on_both_receive_paths(monkeypatch):
    """The fake peer sending a correct reply: the same bytes on both receive paths (the negative tests
    above are meaningful only if this one passes)."""
    from kvfs import protocol as P
    from kvfs import rpc_blocking

    data = os.urandom(4 * MiB - 1000)  # a short last block
    for helper in (rpc_blocking._RECV_VERIFY, None):
        monkeypatch.setattr(rpc_blocking, "_RECV_VERIFY", helper)
        server = FakeChunkserver(lambda conn, rid: _send_reply(conn, rid, data))
        client = rpc_blocking.BlockingChunkClient(server.address, timeout=5)
        try:
            reply, got = client.read(P.ReadChunk(1, 0, len(data)), memoryview(bytearray(4 * MiB)))
            assert bytes(got) == data and reply.chunk_length == len(data)
            assert len(client._idle) == 1  # a complete exchange returns its connection to the pool
        finally:
            server.close()
            client.close()


def test_a_read_in_flight_at_close_does_not_pool_its_connection():
    """``close()`` while another thread's read is still receiving: the read completes, and its socket is
    closed rather than put back into a pool nobody will close again (it would leak until GC)."""
    import threading

    from kvfs import protocol as P
    from kvfs import rpc_blocking

    data = os.urandom(MiB)
    asked, go = threading.Event(), threading.Event()
    server = FakeChunkserver(lambda conn, rid: (asked.set(), go.wait(10), _send_reply(conn, rid, data)))
    client = rpc_blocking.BlockingChunkClient(server.address, timeout=10)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(bytes(client.read(
        P.ReadChunk(1, 0, len(data)), memoryview(bytearray(MiB)))[1])))
    try:
        reader.start()
        assert asked.wait(10)
        client.close()  # the read has sent its request and is waiting for the reply
        go.set()
        reader.join(10)
        assert got == [data]
        assert client._idle == []
    finally:
        go.set()
        server.close()


def test_reader_threads_asking_at_once_share_one_connection_pool(cluster, monkeypatch):
    """Several reader threads asking for the same chunkserver's blocking pool at the same moment get one
    pool: a second one would hold connections that ``Client.close`` never closes."""
    import threading
    import time

    import kvfs.client
    from kvfs.rpc_blocking import BlockingChunkClient

    class SlowToBuild(BlockingChunkClient):
        def __init__(self, *args, **kwargs):
            time.sleep(0.05)  # widens the window two unsynchronised askers would both fall into
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kvfs.client, "BlockingChunkClient", SlowToBuild)
    with cluster.client(local_reads=False) as c:
        address = c.client._servers and next(iter(c.client._servers)) or "127.0.0.1:1"
        start = threading.Barrier(6)
        pools = []

        def ask():
            start.wait(5)
            pools.append(c.client._thread_chunkserver(address))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(pools) == 6 and len({id(p) for p in pools}) == 1
        assert list(c.client._thread_clients.values()) == [pools[0]]
