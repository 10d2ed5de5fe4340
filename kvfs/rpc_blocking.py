"""Bulk chunk reads over TCP in worker threads: blocking sockets, one exchange per thread.

Why: the trio client receives every byte on its one event-loop thread, so a reader that pulls chunks
from several chunkservers at once is capped by that one core (about 2-3 GB/s on loopback, issue 10).
A reply's chunk data is received and verified in one C call without the GIL
(``kvfs._blockhash.recv_verify``: each 64 KiB block is hashed right after it lands, while it is in
the CPU cache), so N threads receive and verify N chunks in parallel with no Python step per
arriving segment. Frames are the same as ``kvfs.rpc``'s (``kvfs.protocol``), to the same
chunkserver port; only the client side differs.

The trio path stays the default for small reads and for anything but ``CHUNK_READ``; ``Client`` sends
reads of at least ``ClientOptions.thread_read_min`` bytes here (see kvfs/client_read.py).

Error handling: as ``kvfs.rpc.RpcClient``: errno replies raise the matching OSError; a refused, reset
or timed-out connection raises ``TransportError(EIO)`` naming the server. Every socket operation runs
under the client's timeout, so a worker thread never blocks for longer than that per call.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import struct
import threading
import time

import msgspec

from kvfs import identity, tls
from kvfs import protocol as P
from kvfs.chunkio import ChecksumError, verify
from kvfs.chunkio import recv_verify as _RECV_VERIFY
from kvfs.errors import error
from kvfs.protocol import CHECKSUM_BLOCK as BLOCK
from kvfs.rpc import SOCKET_BUFFER, ConnectError, TransportError, parse_address


class BlockingChunkClient:
    """A thread-safe pool of blocking connections to one chunkserver, for CHUNK_READ only."""

    def __init__(self, address: str, *, timeout: float = 30.0, connect_timeout: float = 5.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.address = address
        self.ssl_context = ssl_context  # mutual TLS (kvfs.tls), as the trio client uses
        self.host, self.port = parse_address(address)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self._closed = False  # after close(), a read still in flight closes its socket instead of pooling it

    def _fail(self, what: str) -> TransportError:
        return TransportError(errno.EIO, f"chunkserver {self.address}: {what}")

    def _connect(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConnectError(errno.EIO, f"chunkserver {self.address}: cannot connect "
                               f"({exc.strerror or exc})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        if self.ssl_context is None:
            return sock
        try:  # the handshake runs under the connect timeout still set on the socket
            tls_sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            peer = tls.peer_from_cert(tls_sock.getpeercert() or {})
        except OSError as exc:
            sock.close()
            code = errno.EACCES if isinstance(exc, ssl.SSLCertVerificationError) else errno.EIO
            raise error(code, f"chunkserver {self.address}: TLS handshake failed ({exc.strerror or exc})") from None
        if peer.role != identity.ROLE_CHUNKSERVER:
            tls_sock.close()
            raise error(errno.EACCES, f"chunkserver {self.address}: its certificate is {peer.describe()}, "
                        "not a chunkserver")
        return tls_sock

    def _take(self) -> tuple[socket.socket, int]:
        with self._lock:
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            request_id = self._next_id
            sock = None
            while self._idle and sock is None:
                sock = self._idle.pop()
                if _looks_closed(sock):  # the server closed it while idle (restart, idle timeout)
                    sock.close()
                    sock = None
        return (sock if sock is not None else self._connect()), request_id

    def read(self, request: P.ReadChunk, into: memoryview) -> tuple[P.ReadChunkReply, memoryview]:
        """One CHUNK_READ into ``into``: returns the reply and the data (a view of ``into``), verified
        against the reply's block checksums while it arrived.

        Error handling: ``ChecksumError`` (EIO) when the data does not match its checksums (a corrupt
        replica: the caller reports it); ``TransportError`` (EIO) for a reply larger than ``into``, a
        malformed or truncated one, a reset or a timeout; errno replies raise their OSError."""
        sock, request_id = self._take()
        deadline = time.monotonic() + self.timeout
        data = into[:0]
        try:
            payload = P.encode(request)
            sock.settimeout(self.timeout)
            sock.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_READ, 0, request_id, len(payload), 0) + payload)
            header = bytearray(P.HEADER_SIZE)
            _recv_into(sock, memoryview(header), deadline)
            frame = P.unpack_header(header)
            if frame.request_id != request_id:
                raise ValueError("reply does not match request")
            if frame.data_len > len(into) or (frame.status and frame.data_len):
                raise ValueError(f"{frame.data_len} bytes of data for a {len(into)}-byte read")
            reply_payload = bytearray(frame.payload_len)
            _recv_into(sock, memoryview(reply_payload), deadline)
            if not frame.status:
                reply: P.ReadChunkReply = P.decode(P.ReadChunkReply, reply_payload)  # type: ignore[assignment]
                data = into[:frame.data_len]
                _receive_verified(sock, data, reply, request.chunk_id, self.address, deadline)
        except ChecksumError:
            sock.close()  # the rest of the reply is still on the wire
            raise
        except TimeoutError:
            sock.close()
            raise self._fail(f"request timed out after {self.timeout:g}s") from None
        except (ValueError, msgspec.DecodeError) as exc:  # a malformed header or payload
            sock.close()
            raise self._fail(f"bad reply: {exc}") from None
        except OSError as exc:
            sock.close()
            raise self._fail(f"connection failed ({exc.strerror or exc})") from None
        except BaseException:
            sock.close()
            raise
        with self._lock:
            if self._closed:
                sock.close()
            else:
                self._idle.append(sock)
        if frame.status:
            raise error(frame.status, P.decode(P.ErrorReply, reply_payload).message)  # type: ignore[attr-defined]
        return reply, data

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for sock in self._idle:
                sock.close()
            self._idle.clear()


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed by peer")
        got += n


def _receive_verified(sock: socket.socket, data: memoryview, reply: P.ReadChunkReply, chunk_id: int, where: str,
                      deadline: float) -> None:
    """Receive a reply's chunk data into ``data`` and check it against ``reply.checksums``: in one C call
    that hashes each block as it lands (kvfs._blockhash.recv_verify, no GIL) on plaintext sockets,
    else received, then verified (TLS, or no C helper). Error handling: ChecksumError for data that
    does not match or is not covered by exactly its checksums; TimeoutError past ``deadline``;
    ConnectionResetError when the peer ends the stream early."""
    if reply.data_offset % BLOCK or len(reply.checksums) != (len(data) + BLOCK - 1) // BLOCK:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: {len(reply.checksums)} checksums for "
                                       f"{len(data)} bytes at offset {reply.data_offset} (bad reply)")
    if _RECV_VERIFY is None or isinstance(sock, ssl.SSLSocket):
        _recv_into(sock, data, deadline)
        verify(chunk_id, where, data, reply.data_offset, reply.checksums, reply.chunk_length)
        return
    sums = struct.pack(f"<{len(reply.checksums)}Q", *reply.checksums)
    got, bad = _RECV_VERIFY(sock.fileno(), [data], sums, BLOCK, max(0.0, deadline - time.monotonic()))
    if got < len(data) and not 0 <= bad < got // BLOCK:
        raise ConnectionResetError(errno.ECONNRESET, f"connection closed by peer after {got} of {len(data)} bytes")
    if bad >= 0:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: checksum mismatch at block "
                                       f"{reply.data_offset // BLOCK + bad} (corrupt replica)")


def _looks_closed(sock: socket.socket) -> bool:
    # An idle connection has nothing to read: readable means EOF, reset or garbage. (TLS servers
    # send no session tickets, kvfs.tls, so an idle TLS connection has nothing pending either.)
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))
