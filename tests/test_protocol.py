"""Malformed requests against a real meta process get errors, and the server keeps serving."""

import socket
import struct

import msgspec
import pytest

from kvfs import protocol as P


def _exchange(address, frame: bytes) -> tuple[P.FrameHeader, bytes] | None:
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(frame)
        head = b""
        while len(head) < P.HEADER_SIZE:
            part = s.recv(P.HEADER_SIZE - len(head))
            if not part:
                return None  # server dropped the connection
            head += part
        hdr = P.unpack_header(head)
        payload = b""
        while len(payload) < hdr.payload_len:
            payload += s.recv(hdr.payload_len - len(payload))
        return hdr, payload


def _request(method: int, payload: bytes) -> bytes:
    return P.pack_header(P.KIND_REQUEST, method, 0, 7, len(payload), 0) + payload


def test_garbage_and_bad_requests_get_errors(cluster):
    addr = cluster.meta_address
    # Bad magic: the server drops the connection instead of guessing.
    assert _exchange(addr, b"\x00" * P.HEADER_SIZE) is None
    # Wrong protocol version: dropped too.
    bad_version = struct.pack("<HBBHHIIQ", P.MAGIC, 99, 0, P.META_HELLO, 0, 1, 0, 0)
    assert _exchange(addr, bad_version) is None
    # Unknown method -> ENOSYS.
    hdr, payload = _exchange(addr, _request(999, P.encode(P.Empty())))
    assert hdr.status == 38 and "unknown method" in msgspec.msgpack.decode(payload)[0]
    # Payload of the wrong shape -> EINVAL with a message.
    hdr, payload = _exchange(addr, _request(P.META_LOOKUP, msgspec.msgpack.encode(["not", "an", "int"])))
    assert hdr.status == 22 and "malformed" in msgspec.msgpack.decode(payload)[0]
    # Oversized frame claim: dropped without allocating.
    huge = P.pack_header(P.KIND_REQUEST, P.META_HELLO, 0, 1, 1 << 31, 0)
    assert _exchange(addr, huge) is None
    # Bad path input -> a proper errno, not a crash.
    hdr, _ = _exchange(addr, _request(P.META_MKNODE, P.encode(P.MkNode(1, "a/b", 0o100644))))
    assert hdr.status == 22
    # And the server still answers normal requests.
    with cluster.client() as c:
        assert c.stat("/").ino == 1


@pytest.mark.parametrize("name", ["", ".", "..", "x" * 256, "a\0b"])
def test_bad_names_rejected_through_the_client(cluster, name):
    with cluster.client() as c:
        with pytest.raises(OSError) as info:
            c.mknode(1, name, 0o100644)
        assert info.value.errno in (22, 36)


def test_meta_exports_prometheus_metrics(make_cluster):
    import urllib.request

    from cluster import free_port

    port = free_port()
    cl = make_cluster(chunkservers=1, replication=1, meta_metrics_port=port)
    with cl.client() as c:
        c.mkdir("/m")
        with pytest.raises(FileExistsError):
            c.mkdir("/m")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'kvfs_rpc_requests_total{method="hello",service="meta",status="ok"}' in text
    assert 'kvfs_rpc_requests_total{method="mknode",service="meta",status="EEXIST"} 1.0' in text
    assert 'kvfs_rpc_requests_total{method="register",service="meta",status="ok"}' in text
