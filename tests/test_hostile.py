"""Hostile and broken peers against real meta and chunkserver processes (issue 13, limits): unknown
methods, oversized and truncated frames, huge declared lengths, slow senders, idle and excess
connections, random bytes. No crash, bounded memory, and well-behaved clients keep being served."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from cluster import Cluster, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfs import protocol as P

LIMITS = ("--idle-timeout", "4", "--frame-timeout", "1.5", "--max-connections-per-peer", "40", "--max-inflight", "48M")
MiB = 1 << 20


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("hostile")), chunkservers=1, replication=1, meta_args=LIMITS,
                chunkserver_args=LIMITS).start()
    try:
        yield c
    finally:
        c.stop()


def targets(cluster) -> dict[str, tuple[tuple[str, int], int]]:
    """service -> ((host, port), pid)"""
    cs = cluster.servers[0]
    cs_port = int(cs.args[cs.args.index("--listen") + 1].rsplit(":", 1)[1])
    return {"meta": (("127.0.0.1", cluster.meta_port), cluster.meta.popen.pid),
            "chunkserver": (("127.0.0.1", cs_port), cs.popen.pid)}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(addr) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.settimeout(10)
    return s


def closed_by_server(s: socket.socket, within: float) -> bool:
    """True when the server closes ``s`` within ``within`` seconds (reading whatever it sent first)."""
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
        return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True
    finally:
        s.close()


def reply_status(s: socket.socket) -> int:
    head = b""
    while len(head) < P.HEADER_SIZE:
        part = s.recv(P.HEADER_SIZE - len(head))
        assert part, "closed without a reply"
        head += part
    return P.unpack_header(head).status


def still_serves(cluster) -> None:
    data = os.urandom(3 * MiB + 5)
    name = f"/ok-{time.monotonic_ns()}"
    with cluster.client(timeout=10) as c:
        c.write_file(name, data)
        assert c.read_file(name) == data


def test_bad_headers_are_refused_before_any_allocation(hardened):
    for service, (addr, pid) in targets(hardened).items():
        before = rss(pid)
        # Unknown method: an error reply, then the connection is closed.
        s = connect(addr)
        s.sendall(P.pack_header(P.KIND_REQUEST, 999, 0, 1, 10, 0) + b"x" * 10)
        assert reply_status(s) == 38  # ENOSYS
        assert closed_by_server(s, 5)
        # Declared sizes beyond the method's limits (60 MiB payload, 200 MiB data on a non-data
        # method, data past the largest chunk): EMSGSIZE at once, nothing read or allocated.
        plain, data_method = (P.META_LOOKUP, P.META_LOOKUP) if service == "meta" else (P.CHUNK_STAT, P.CHUNK_WRITE)
        for method, payload_len, data_len in ((plain, 60 * MiB, 0), (plain, 10, 200 * MiB),
                                              (data_method, 10, P.MAX_CHUNK_SIZE + 1)):
            s = connect(addr)
            s.sendall(P.pack_header(P.KIND_REQUEST, method, 0, 2, payload_len, data_len))
            assert reply_status(s) == 90, (service, method, payload_len, data_len)  # EMSGSIZE
            assert closed_by_server(s, 5)
        # Not a kvfs frame at all, and a truncated header followed by a hang-up.
        s = connect(addr)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_server(s, 5)
        s = connect(addr)
        s.sendall(P.pack_header(P.KIND_REQUEST, 1, 0, 3, 10, 0)[:7])
        assert closed_by_server(s, 5)
        assert rss(pid) - before < 32 * MiB, service
    still_serves(hardened)


def test_slow_idle_and_excess_connections_are_dropped(hardened):
    for service, (addr, _) in targets(hardened).items():
        # Slowloris: a header, then one payload byte and silence: closed after the stall timeout (1.5 s).
        s = connect(addr)
        s.sendall(P.pack_header(P.KIND_REQUEST, P.META_HELLO if service == "meta" else P.CHUNK_STAT, 0, 1, 100, 0))
        s.sendall(b"\x90")
        t0 = time.monotonic()
        assert closed_by_server(s, 10), service
        assert time.monotonic() - t0 < 6
        # A partial header, then nothing.
        s = connect(addr)
        s.sendall(b"\x56\x4b\x01")
        assert closed_by_server(s, 10)
        # Idle: closed after the idle timeout (4 s), not kept forever.
        s = connect(addr)
        assert closed_by_server(s, 15), service
        # More connections than the per-peer cap (40): the extra ones are closed at once.
        held = [connect(addr) for _ in range(40)]
        try:
            time.sleep(0.3)
            assert closed_by_server(connect(addr), 5)
        finally:
            for h in held:
                h.close()
    still_serves(hardened)


def test_declared_bulk_data_is_bounded_by_the_budget(hardened):
    """Many connections each declaring a 40 MiB CHUNK_WRITE and sending nothing more: the server
    reserves at most its in-flight budget (48 MiB), not 20 x 40 MiB; the one holding it is dropped as
    it stalls, the others are refused (EBUSY) once the budget stayed full for the stall timeout. A
    frame larger than the whole budget is refused at once."""
    addr, pid = targets(hardened)["chunkserver"]
    before = rss(pid)
    payload = P.encode(P.WriteChunk(123456, [0], [], True))
    socks = []
    for i in range(20):
        s = connect(addr)
        s.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_WRITE, 0, i, len(payload), 40 * MiB) + payload + b"z" * 1000)
        socks.append(s)
    time.sleep(1.0)
    assert rss(pid) - before < 100 * MiB
    for s in socks:
        assert closed_by_server(s, 15)  # each stalls, and is dropped
    s = connect(addr)
    s.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_WRITE, 0, 99, len(payload), 49 * MiB) + payload)
    assert reply_status(s) == 90  # EMSGSIZE: larger than --max-inflight
    assert closed_by_server(s, 5)
    still_serves(hardened)


frames = st.one_of(
    st.binary(max_size=200),  # garbage
    st.builds(lambda kind, method, payload_len, data_len, body: P.pack_header(kind, method, 0, 7, payload_len, data_len) + body,
              st.integers(0, 3), st.integers(0, 120), st.integers(0, 1 << 32 - 1), st.integers(0, 1 << 40),
              st.binary(max_size=300)),
    st.builds(lambda method, body: P.pack_header(P.KIND_REQUEST, method, 0, 9, len(body), 0) + body,
              st.integers(0, 120), st.binary(max_size=300)),  # a well-framed request with random msgpack
)


def send_and_check_alive(cluster, which: str, data: bytes, before=None) -> None:
    """Send ``data`` to one server (after ``before(socket)``, when given), read whatever it answers
    briefly, and check both servers live on."""
    addr, pid = targets(cluster)[which]
    s = connect(addr)
    try:
        if before is not None:
            before(s)
        s.sendall(data)
        s.settimeout(0.2)
        try:
            s.recv(4096)
        except (TimeoutError, ConnectionResetError):
            pass
    finally:
        s.close()
    assert os.path.exists(f"/proc/{pid}") and cluster.meta.alive() and cluster.servers[0].alive()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames, which=st.sampled_from(["meta", "chunkserver"]), cut=st.integers(0, 300))
def test_fuzzed_frames_never_crash_a_server(hardened, frame, which, cut):
    send_and_check_alive(hardened, which, frame[:cut] if cut < len(frame) else frame)


@pytest.fixture(scope="module")
def served_chunk(hardened):
    """(chunk id, read token, bytes) of a file's first chunk on the hardened chunkserver."""
    data = os.urandom(3 * MiB + 77)
    with hardened.client(timeout=10) as w:
        w.write_file("/threaded", data)
    with hardened.client(timeout=10, local_reads=False) as c:
        ino = c.resolve("/threaded").ino
        c.open(ino)
        ref = c.client.files[ino].chunks[0]
        c.release(ino)
    return ref.chunk_id, ref.token, data[:ref.length]


def read_chunk(s: socket.socket, chunk_id: int, token: bytes, request_id: int) -> tuple[int, bytes]:
    """One CHUNK_READ of the whole chunk on ``s``: (status, data)."""
    payload = P.encode(P.ReadChunk(chunk_id, 0, 1 << 30, token))
    s.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_READ, 0, request_id, len(payload), 0) + payload)
    head = s.recv(P.HEADER_SIZE, socket.MSG_WAITALL)
    frame = P.unpack_header(head)
    assert frame.request_id == request_id
    s.recv(frame.payload_len, socket.MSG_WAITALL) if frame.payload_len else b""
    data = b""
    while len(data) < frame.data_len:
        part = s.recv(frame.data_len - len(data))
        assert part, "closed mid-reply"
        data += part
    return frame.status, data


def test_a_connection_served_by_a_thread_keeps_every_rule(hardened, served_chunk):
    """After a CHUNK_READ a plaintext connection is served by a worker thread while reads keep coming
    (kvfs.rpc_threaded): reads back to back are right; another method in between is handed back to the
    event loop and answered; a bad token or a malformed request gets its errno; unknown methods,
    garbage, partial headers and stalled payloads close the connection within the frame timeout; a
    quiet connection is still closed at the idle timeout."""
    chunk_id, token, data = served_chunk
    addr, _ = targets(hardened)["chunkserver"]
    s = connect(addr)
    for i in range(1, 4):  # the first on the event loop, the next ones in the serving thread
        assert read_chunk(s, chunk_id, token, i) == (0, data)
    stat = P.encode(P.Empty())
    s.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_STAT, 0, 9, len(stat), 0) + stat)
    head = s.recv(P.HEADER_SIZE, socket.MSG_WAITALL)
    frame = P.unpack_header(head)
    assert (frame.status, frame.request_id) == (0, 9)
    assert P.decode(P.ChunkserverStat, s.recv(frame.payload_len, socket.MSG_WAITALL)).chunks >= 1
    assert read_chunk(s, chunk_id, token, 10) == (0, data)
    assert read_chunk(s, chunk_id, b"forged" * 5, 11) == (13, b"")  # EACCES, and the connection lives on
    junk = b"\xc1" * 8  # never valid msgpack
    s.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_READ, 0, 12, len(junk), 0) + junk)
    assert reply_status(s) == 22  # EINVAL
    s.recv(65536)  # the error message
    assert read_chunk(s, chunk_id, token, 13) == (0, data)
    s.close()
    for after in (P.pack_header(P.KIND_REQUEST, 999, 0, 5, 10, 0) + b"x" * 10,  # unknown method
                  b"GET / HTTP/1.1\r\n\r\n",  # not a frame
                  P.pack_header(P.KIND_REQUEST, P.CHUNK_READ, 0, 5, 100, 0) + b"\x94",  # a stalled payload
                  P.pack_header(P.KIND_REQUEST, P.CHUNK_READ, 0, 5, 10, 0)[:9],  # a partial header
                  P.pack_header(P.KIND_REQUEST, P.CHUNK_READ, 0, 5, 60 * MiB, 0)):  # an oversized payload
        s = connect(addr)
        assert read_chunk(s, chunk_id, token, 1) == (0, data)
        s.sendall(after)
        t0 = time.monotonic()
        assert closed_by_server(s, 10), after[:20]
        assert time.monotonic() - t0 < 6
    s = connect(addr)
    assert read_chunk(s, chunk_id, token, 1) == (0, data)
    time.sleep(1.5)  # quiet: the thread hands the connection back; the idle timeout (4 s) still applies
    assert read_chunk(s, chunk_id, token, 2) == (0, data)
    t0 = time.monotonic()
    assert closed_by_server(s, 15)
    assert 3 < time.monotonic() - t0 < 10
    still_serves(hardened)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames, cut=st.integers(0, 300))
def test_fuzzed_frames_to_a_thread_served_connection_never_crash_a_chunkserver(hardened, served_chunk, frame, cut):
    chunk_id, token, data = served_chunk

    def read_first(s: socket.socket) -> None:  # the connection is then served by a thread
        assert read_chunk(s, chunk_id, token, 1) == (0, data)

    send_and_check_alive(hardened, "chunkserver", frame[:cut] if cut < len(frame) else frame, read_first)


def test_after_fuzzing_memory_is_bounded_and_clients_are_served(hardened):
    for _, pid in targets(hardened).values():
        assert rss(pid) < 400 * MiB
    wait_for(lambda: hardened.live_servers() == 1, 10, "the chunkserver to stay registered")
    still_serves(hardened)
    assert "Traceback" not in hardened.meta.log() and "Traceback" not in hardened.servers[0].log()


def test_request_limits_cover_every_method():
    for methods in (P.META_METHODS, P.CHUNK_METHODS):
        limits = P.request_limits(methods)
        assert set(limits) == set(methods)
        assert all(0 < payload <= P.MAX_PAYLOAD and data <= P.MAX_CHUNK_SIZE for payload, data in limits.values())
    assert P.request_limits(P.CHUNK_METHODS)[P.CHUNK_WRITE][1] == P.MAX_CHUNK_SIZE
    assert P.request_limits(P.META_METHODS)[P.META_LOOKUP] == (P.REQUEST_PAYLOAD, 0)
    assert struct.calcsize("<HBBHHIIQ") == P.HEADER_SIZE


# --------------------------------------------------------------------------- a TLS server (issue 13)


@pytest.fixture(scope="module")
def hardened_tls(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("hostile-tls")), chunkservers=1, replication=1, meta_args=LIMITS,
                chunkserver_args=LIMITS, tls=True).start()
    try:
        yield c
    finally:
        c.stop()


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


HELLO = client_hello()
tls_bytes = st.one_of(
    frames,  # plaintext frames and garbage where a handshake should be
    st.builds(lambda cut: HELLO[:cut], st.integers(0, len(HELLO))),  # a truncated ClientHello
    st.builds(lambda at, junk: HELLO[:at] + junk, st.integers(0, len(HELLO)), st.binary(min_size=1, max_size=200)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=tls_bytes, which=st.sampled_from(["meta", "chunkserver"]))
def test_fuzzed_handshakes_never_crash_a_tls_server(hardened_tls, data, which):
    send_and_check_alive(hardened_tls, which, data)


def test_stalled_tls_handshakes_are_dropped_and_clients_are_served(hardened_tls):
    for service, (addr, pid) in targets(hardened_tls).items():
        # Connects and never starts, or stops halfway through its ClientHello: dropped after the frame
        # timeout (1.5 s), long before the idle timeout (4 s).
        for first in (b"", HELLO[: len(HELLO) // 2]):
            s = connect(addr)
            s.sendall(first)
            t0 = time.monotonic()
            assert closed_by_server(s, 10), service
            assert time.monotonic() - t0 < 3.5, service
        assert rss(pid) < 400 * MiB
    still_serves(hardened_tls)
    assert "Traceback" not in hardened_tls.meta.log() and "Traceback" not in hardened_tls.servers[0].log()
