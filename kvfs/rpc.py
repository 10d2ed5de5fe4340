"""Framed RPC over TCP with trio: a server loop that dispatches numbered methods to a handler object,
and a pooled client. Message types and framing come from ``kvfs.protocol``; nothing is declared here.

Bulk data is received with ``recv_into`` straight into the caller's buffer and sent either from memory
or with ``os.sendfile`` from an open file (``FileRange``).

Error handling: a handler raising ``OSError`` sends its errno and message back; any other exception
is logged and sent as EIO. On the client, every call runs under a timeout; a timeout, a refused or
reset connection become ``OSError(EIO, "<service> <addr>: ...")`` so callers (and the FUSE mount)
never hang and always get an errno.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from kvfs import metrics
from kvfs import protocol as P
from kvfs.errors import errno_of, error
from kvfs.tasks import open_nursery

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 << 20


@dataclass
class FileRange:
    """Bulk reply data to send with sendfile from an open file descriptor."""

    fd: int
    offset: int
    length: int
    owned: bool = False  # close fd once sent (the sender holds a dup so the file can't vanish mid-send)


Bulk = bytes | bytearray | memoryview | FileRange | None
Handler = Callable[[Any, memoryview | None], Awaitable[Any]]


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def _tune(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


async def _recv_exactly_into(sock: trio.socket.SocketType, view: memoryview) -> None:
    got = 0
    total = len(view)
    while got < total:
        n = await sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed by peer")
        got += n


async def _recv_exactly(sock: trio.socket.SocketType, size: int) -> bytearray:
    buf = bytearray(size)
    if size:
        await _recv_exactly_into(sock, memoryview(buf))
    return buf


async def _send_all(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _send_file(sock: trio.socket.SocketType, rng: FileRange) -> None:
    offset, remaining = rng.offset, rng.length
    while remaining > 0:
        await trio.lowlevel.wait_writable(sock)
        try:
            sent = os.sendfile(sock.fileno(), rng.fd, offset, remaining)
        except BlockingIOError:
            continue
        if sent == 0:
            raise OSError(errno.EIO, "sendfile: file shorter than expected")
        offset += sent
        remaining -= sent


async def _send_frame(
    sock: trio.socket.SocketType, kind: int, method: int, status: int, request_id: int, msg: P.Struct, bulk: Bulk
) -> None:
    payload = P.encode(msg)
    if isinstance(bulk, FileRange):
        data_len = bulk.length
    elif bulk is None:
        data_len = 0
    else:
        data_len = memoryview(bulk).nbytes
    head = P.pack_header(kind, method, status, request_id, len(payload), data_len)
    if bulk is not None and not isinstance(bulk, FileRange) and data_len <= 64 << 10:
        await _send_all(sock, head + payload + bytes(bulk))  # one syscall for small frames
        return
    await _send_all(sock, head + payload)
    if isinstance(bulk, FileRange):
        await _send_file(sock, bulk)
    elif bulk is not None and data_len:
        await _send_all(sock, bulk)


# --------------------------------------------------------------------------- server


class RpcServer:
    """Serves one service: ``handlers`` maps method numbers to ``async fn(request, data) -> reply``.

    A handler returns a reply struct, or ``(reply, bulk)`` to send bulk data after it.
    """

    def __init__(self, name: str, methods: dict[int, tuple[type[P.Struct], type[P.Struct]]],
                 handlers: dict[int, Handler]):
        missing = set(methods) - set(handlers)
        if missing:
            raise ValueError(f"{name}: no handler for methods {sorted(missing)}")
        self.name = name
        self.methods = methods
        self.handlers = handlers

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(512)
        bound_port = listener.getsockname()[1]
        try:
            async with open_nursery() as nursery:
                task_status.started(bound_port)
                while True:
                    try:
                        conn, _ = await listener.accept()
                    except OSError as exc:
                        # Transient accept errors (fd exhaustion, aborted handshakes): keep serving.
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED):
                            log.warning("%s: accept failed: %s", self.name, exc)
                            await trio.sleep(0.05)
                            continue
                        raise
                    _tune(conn)
                    nursery.start_soon(self._serve_connection, conn)
        finally:
            listener.close()

    async def _serve_connection(self, sock: trio.socket.SocketType) -> None:
        header = bytearray(P.HEADER_SIZE)
        hview = memoryview(header)
        try:
            while True:
                try:
                    await _recv_exactly_into(sock, hview)
                except ConnectionResetError:
                    return
                try:
                    frame = P.unpack_header(header)
                except ValueError as exc:
                    log.warning("%s: dropping connection: %s", self.name, exc)
                    return
                payload = await _recv_exactly(sock, frame.payload_len)
                data = None
                if frame.data_len:
                    buf = bytearray(frame.data_len)
                    data = memoryview(buf)
                    await _recv_exactly_into(sock, data)
                await self._dispatch(sock, frame, payload, data)
        except OSError as exc:
            log.debug("%s: connection error: %s", self.name, exc)
        finally:
            sock.close()

    async def _dispatch(self, sock: trio.socket.SocketType, frame: P.FrameHeader, payload: bytearray,
                        data: memoryview | None) -> None:
        method = frame.method
        types = self.methods.get(method)
        bulk: Bulk = None
        started = time.perf_counter()
        if frame.kind != P.KIND_REQUEST or types is None:
            status, reply = errno.ENOSYS, P.ErrorReply(f"{self.name}: unknown method {method}")
        else:
            try:
                request = P.decode(types[0], payload)
            except Exception as exc:  # msgspec.ValidationError / DecodeError
                status, reply = errno.EINVAL, P.ErrorReply(f"{self.name}: malformed request: {exc}")
            else:
                try:
                    result = await self.handlers[method](request, data)
                    if isinstance(result, tuple):
                        reply, bulk = result
                    else:
                        reply = result
                    status = 0
                except OSError as exc:
                    status, reply = errno_of(exc), P.ErrorReply(exc.strerror or str(exc), getattr(exc, "leader", ""))
                except Exception as exc:
                    log.exception("%s: method %d failed", self.name, method)
                    status, reply = errno.EIO, P.ErrorReply(f"{self.name}: internal error: {exc!r}")
        name = metrics.method_name(self.name, method)
        metrics.RPC_REQUESTS.labels(self.name, name, metrics.status_name(status)).inc()
        metrics.RPC_SECONDS.labels(self.name, name).observe(time.perf_counter() - started)
        if data is not None:
            metrics.RPC_BYTES.labels(self.name, "in").inc(len(data))
        if isinstance(bulk, FileRange):
            metrics.RPC_BYTES.labels(self.name, "out").inc(bulk.length)
        try:
            await _send_frame(sock, P.KIND_REPLY, method, status, frame.request_id, reply, bulk)
        finally:
            if isinstance(bulk, FileRange) and bulk.owned:
                os.close(bulk.fd)


# --------------------------------------------------------------------------- client


class TransportError(OSError):
    """EIO from the transport (refused, reset, timed out): the server may or may not have run the request."""


class ConnectError(TransportError):
    """EIO before anything was sent: the request never reached the server (safe to send elsewhere)."""


class NotLeader(OSError):
    """A standby meta's reply (``P.NOT_LEADER``): the request was not run; ``leader`` may name the leader."""

    def __init__(self, message: str, leader: str = ""):
        super().__init__(P.NOT_LEADER, message)
        self.leader = leader


class _Connection:
    def __init__(self, sock: trio.socket.SocketType):
        self.sock = sock
        self.header = bytearray(P.HEADER_SIZE)

    def looks_closed(self) -> bool:
        """True when the peer closed this idle connection (e.g. the server restarted)."""
        # An idle connection has nothing to read: readable means EOF/reset (or garbage): drop it.
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))


class RpcClient:
    """A pool of connections to one server; each call takes a connection for its whole exchange."""

    def __init__(self, service: str, address: str, methods: dict[int, tuple[type[P.Struct], type[P.Struct]]],
                 *, timeout: float = 30.0, connect_timeout: float = 5.0, max_connections: int = 64):
        self.service = service
        self.address = address
        self.host, self.port = parse_address(address)
        self.methods = methods
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._limit = trio.CapacityLimiter(max_connections)
        self._next_id = 0

    def _fail(self, what: str) -> OSError:
        return TransportError(errno.EIO, f"{self.service} {self.address}: {what}")

    async def _connect(self) -> _Connection:
        sock = trio.socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            with trio.fail_after(self.connect_timeout):
                await sock.connect((self.host, self.port))
        except trio.TooSlowError:
            sock.close()
            raise ConnectError(errno.EIO, f"{self.service} {self.address}: connect timed out after "
                               f"{self.connect_timeout:g}s") from None
        except OSError as exc:
            sock.close()
            raise ConnectError(errno.EIO, f"{self.service} {self.address}: cannot connect ({exc.strerror or exc})") from None
        _tune(sock)
        return _Connection(sock)

    async def _get(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.looks_closed():
                return conn
            conn.sock.close()
        return await self._connect()

    async def call(self, method: int, request: P.Struct, data: Bulk = None, *,
                   into: memoryview | None = None, timeout: float | None = None) -> tuple[Any, memoryview | None]:
        """Send one request and wait for its reply.

        Returns ``(reply, data)``; ``data`` is the bulk data (a view of ``into`` when given).
        Error handling: errno replies raise the matching OSError; transport failures and timeouts
        raise ``OSError(EIO)`` naming the server.
        """
        reply_type = self.methods[method][1]
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        request_id = self._next_id
        limit = self.timeout if timeout is None else timeout
        async with self._limit:
            conn: _Connection | None = None
            try:
                with trio.fail_after(limit):
                    conn = await self._get()
                    await _send_frame(conn.sock, P.KIND_REQUEST, method, 0, request_id, request, data)
                    await _recv_exactly_into(conn.sock, memoryview(conn.header))
                    frame = P.unpack_header(conn.header)
                    payload = await _recv_exactly(conn.sock, frame.payload_len)
                    bulk: memoryview | None = None
                    if frame.data_len:
                        if into is not None and len(into) >= frame.data_len:
                            bulk = into[: frame.data_len]
                        else:
                            bulk = memoryview(bytearray(frame.data_len))
                        await _recv_exactly_into(conn.sock, bulk)
                if frame.request_id != request_id:
                    raise self._fail("reply does not match request (protocol error)")
            except trio.TooSlowError:
                if conn is not None:
                    conn.sock.close()
                raise self._fail(f"request timed out after {limit:g}s") from None
            except ValueError as exc:
                if conn is not None:
                    conn.sock.close()
                raise self._fail(f"bad reply: {exc}") from None
            except OSError as exc:
                if conn is not None:
                    conn.sock.close()
                if exc.errno == errno.EIO and self.address in str(exc):
                    raise
                raise self._fail(f"connection failed ({exc.strerror or exc})") from None
            except BaseException:
                if conn is not None:
                    conn.sock.close()
                raise
            self._idle.append(conn)
        if frame.status:
            err = P.decode(P.ErrorReply, payload)
            if frame.status == P.NOT_LEADER:
                raise NotLeader(err.message, err.leader)  # type: ignore[attr-defined]
            raise error(frame.status, err.message)  # type: ignore[attr-defined]
        return P.decode(reply_type, payload), bulk

    async def request(self, method: int, request: P.Struct, *, timeout: float | None = None) -> Any:
        """``call`` for methods without bulk data: returns the reply struct."""
        reply, _ = await self.call(method, request, timeout=timeout)
        return reply

    def close(self) -> None:
        for conn in self._idle:
            conn.sock.close()
        self._idle.clear()
