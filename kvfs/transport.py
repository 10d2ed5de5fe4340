"""The byte streams under ``kvfs.rpc``: a plaintext socket, or the same socket under TLS.

Both offer what the frame loops use: ``recv_into(view) -> n`` (0 at EOF), ``send(view) -> n``,
``send_file(FileRange, head)``, ``looks_closed()``, ``close()``. Plaintext is the trio socket itself (its
bound methods, no wrapper on the hot path) and sends files with ``sendfile``. TLS reads and writes
with ``pread`` + ``send``, since the kernel cannot encrypt what sendfile sends without kTLS.

TLS is the standard library's ``ssl.SSLSocket`` in non-blocking mode, driven by trio's
``wait_readable``/``wait_writable``: ``SSL_read`` decrypts straight into the caller's buffer (no
extra copy, unlike ``trio.SSLStream``, whose ``receive_some`` returns new ``bytes`` through a
MemoryBIO), and a whole chunk is written in one ``SSL_write`` call.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
from typing import TYPE_CHECKING

import trio

from kvfs import identity, tls

if TYPE_CHECKING:
    from kvfs.rpc import FileRange

SEND_FILE_PIECE = 1 << 20  # TLS send_file reads this much of the file at a time
# Plaintext file replies at least this large are sent by a worker thread: sendfile copies the bytes in
# the caller's thread, so on one event loop a chunkserver sends one reply at a time (issue 10).
THREAD_SEND_MIN = 1 << 20
SEND_STALL = 30.0  # a peer that takes no bytes for this long fails the send (the thread never hangs)
LINGER = 1.0  # seconds a refused connection is kept half-open so the peer reads why


async def linger(sock: trio.socket.SocketType | ssl.SSLSocket) -> None:
    """Half-close, then read what the peer still sends for a bounded time: a refusal just written (a TLS
    alert, an error frame) reaches the peer. Closing with its request unread would reset the connection,
    and the peer would see the reset instead of the reason."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(LINGER):
            while True:
                await trio.lowlevel.wait_readable(sock)
                if not os.read(sock.fileno(), 65536):
                    return
    except OSError:
        pass


def _shutdown_write(sock: trio.socket.SocketType | ssl.SSLSocket) -> None:
    """End our side of the stream (what was sent still arrives); a gone peer is no error."""
    try:
        os_sock = socket.socket(fileno=sock.fileno())
        try:
            os_sock.shutdown(socket.SHUT_WR)
        finally:
            os_sock.detach()
    except OSError:
        pass


def _looks_closed(fd: int) -> bool:
    # An idle connection has nothing to read: readable means EOF/reset (or garbage).
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _send_file_blocking(sock_fd: int, file_fd: int, offset: int, remaining: int) -> None:
    """sendfile on a non-blocking socket from a worker thread: wait for room with poll, bounded."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT | select.POLLERR | select.POLLHUP)
    while remaining > 0:
        try:
            sent = os.sendfile(sock_fd, file_fd, offset, remaining)
        except BlockingIOError:
            if not poller.poll(SEND_STALL * 1000):
                raise TimeoutError(errno.ETIMEDOUT, f"sendfile: peer took nothing for {SEND_STALL:g}s") from None
            continue
        if sent == 0:
            raise OSError(errno.EIO, "sendfile: file shorter than expected")
        offset += sent
        remaining -= sent


class Plain:
    """A trio socket; ``recv_into`` and ``send`` are the socket's own methods (the fast path)."""

    peer = identity.INSECURE

    def __init__(self, sock: trio.socket.SocketType):
        self.sock = sock
        self.recv_into = sock.recv_into
        self.send = sock.send
        self.close = sock.close

    async def send_file(self, rng: FileRange, head: bytes = b"") -> None:
        """``head`` (the frame's header and payload), then the file range. MSG_MORE holds the head back
        to leave in the same segment as the first file bytes: the peer wakes once for both."""
        view = memoryview(head)
        while view:
            view = view[await self.sock.send(view, socket.MSG_MORE if rng.length else 0):]
        if rng.length >= THREAD_SEND_MIN:
            await trio.to_thread.run_sync(_send_file_blocking, self.sock.fileno(), rng.fd, rng.offset, rng.length)
            return
        offset, remaining = rng.offset, rng.length
        while remaining > 0:
            await trio.lowlevel.wait_writable(self.sock)
            try:
                sent = os.sendfile(self.sock.fileno(), rng.fd, offset, remaining)
            except BlockingIOError:
                continue
            if sent == 0:
                raise OSError(errno.EIO, "sendfile: file shorter than expected")
            offset += sent
            remaining -= sent

    def looks_closed(self) -> bool:
        return _looks_closed(self.sock.fileno())

    def shutdown_write(self) -> None:
        _shutdown_write(self.sock)


class Tls:
    """An ``ssl.SSLSocket`` (non-blocking) after a completed handshake; ``peer`` is who it verified."""

    def __init__(self, ssock: ssl.SSLSocket, peer: identity.Peer):
        self.ssock = ssock
        self.peer = peer

    async def recv_into(self, view: memoryview) -> int:
        # SSL_read returns at most one record (16 KiB): take every record already here in one call.
        await trio.lowlevel.checkpoint_if_cancelled()
        got, total = 0, len(view)
        while got < total:
            try:
                n = self.ssock.recv_into(view[got:] if got else view)
            except ssl.SSLWantReadError:
                if got:
                    break
                await trio.lowlevel.wait_readable(self.ssock)
                continue
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.ssock)
                continue
            if n == 0:  # EOF
                break
            got += n
        await trio.lowlevel.cancel_shielded_checkpoint()
        return got

    async def send(self, view: memoryview) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            # After SSLWantWrite OpenSSL must be called again with the same data: it may hold part of it.
            try:
                n = self.ssock.send(view)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.ssock)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.ssock)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return n

    async def send_file(self, rng: FileRange, head: bytes = b"") -> None:
        view = memoryview(head)
        while view:
            view = view[await self.send(view):]
        offset, remaining = rng.offset, rng.length
        while remaining > 0:
            piece = os.pread(rng.fd, min(remaining, SEND_FILE_PIECE), offset)
            if not piece:
                raise OSError(errno.EIO, "send_file: file shorter than expected")
            view = memoryview(piece)
            while view:
                n = await self.send(view)
                view = view[n:]
            offset += len(piece)
            remaining -= len(piece)

    def looks_closed(self) -> bool:
        return self.ssock.pending() > 0 or _looks_closed(self.ssock.fileno())

    def shutdown_write(self) -> None:
        # The TCP half-close only: SSLSocket.shutdown would also drop the TLS state.
        _shutdown_write(self.ssock)

    def close(self) -> None:
        if self.ssock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.ssock)
        self.ssock.close()


async def _handshake(ssock: ssl.SSLSocket) -> None:
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(ssock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(ssock)


def _wrap(sock: trio.socket.SocketType, ctx: ssl.SSLContext, **kw) -> ssl.SSLSocket:
    raw = socket.socket(sock.family, sock.type, fileno=sock.detach())
    raw.setblocking(False)
    try:
        return ctx.wrap_socket(raw, do_handshake_on_connect=False, **kw)
    except BaseException:
        raw.close()
        raise


async def accept_tls(sock: trio.socket.SocketType, ctx: ssl.SSLContext) -> Tls:
    """The server's half of a handshake (callers bound it with a timeout). Error handling: ssl.SSLError
    / OSError when the peer is not a TLS client with a certificate from the cluster CA;
    PermissionError when its certificate names no kvfs role."""
    ssock = _wrap(sock, ctx, server_side=True)
    try:
        await _handshake(ssock)
        return Tls(ssock, tls.peer_from_cert(ssock.getpeercert() or {}))
    except OSError:
        await linger(ssock)  # the alert saying why (no certificate, unknown CA) reaches the client
        ssock.close()
        raise
    except BaseException:
        ssock.close()
        raise


async def connect_tls(sock: trio.socket.SocketType, ctx: ssl.SSLContext, host: str, service: str) -> Tls:
    """The client's half: the server must present a certificate for ``host`` with role ``service``.

    Error handling: ssl.SSLError / OSError from the handshake; PermissionError(EACCES) when the
    server's certificate has another role."""
    ssock = _wrap(sock, ctx, server_side=False, server_hostname=host)
    try:
        await _handshake(ssock)
        peer = tls.peer_from_cert(ssock.getpeercert() or {})
        if service in identity.ROLES and peer.role != service:
            raise PermissionError(errno.EACCES, f"its certificate is {peer.describe()}, not a {service}")
        return Tls(ssock, peer)
    except BaseException:
        ssock.close()
        raise
