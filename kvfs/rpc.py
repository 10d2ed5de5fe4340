"""Framed RPC over TCP with trio: a server loop that dispatches numbered methods to a handler object,
and a pooled client. Message types and framing come from ``kvfs.protocol``; nothing is declared here.

Bulk data is received with ``recv_into`` straight into the caller's buffer and sent either from memory
or with ``os.sendfile`` from an open file (``FileRange``).

TLS (``kvfs.tls``): with a server context, every connection starts with a mutual-TLS handshake
(within the frame timeout); the verified certificate becomes ``kvfs.identity.current_peer`` for the
connection's task, and each request's method is checked against ``protocol.method_roles`` before
anything else of the frame is read. The streams (plaintext or TLS) are in ``kvfs.transport``.

Error handling: a handler raising ``OSError`` sends its errno and message back; any other exception
is logged and sent as EIO. On the client, every call runs under a timeout; a timeout, a refused or
reset connection become ``OSError(EIO, "<service> <addr>: ...")`` so callers (and the FUSE mount)
never hang and always get an errno.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from kvfs import identity, metrics, tls
from kvfs import protocol as P
from kvfs.errors import errno_of, error
from kvfs.tasks import open_nursery
from kvfs.rpc_threaded import CLOSE, ThreadHandler, serve_in_thread
from kvfs.transport import Plain, Tls, accept_tls, connect_tls, linger

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
Stream = Plain | Tls
Handler = Callable[[Any, memoryview | None], Awaitable[Any]]
Precheck = Callable[[Any], None]


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


async def _timely(receive: Awaitable[None], deadline: float) -> bool:
    """Await a receive under a deadline; False when it ran out, or a stall check inside it fired."""
    try:
        with trio.move_on_after(deadline) as scope:
            await receive
    except trio.TooSlowError:
        return False
    return not scope.cancelled_caught


def _peer_of(sock: trio.socket.SocketType) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _tune(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


async def _recv_exactly_into(sock: Stream, view: memoryview, stall: float | None = None) -> None:
    """Fill ``view``. ``stall``: fail with trio.TooSlowError when no byte arrives for that long."""
    got = 0
    total = len(view)
    while got < total:
        if stall is None:
            n = await sock.recv_into(view[got:])
        else:
            with trio.fail_after(stall):
                n = await sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed by peer")
        got += n


async def _recv_exactly(sock: Stream, size: int, stall: float | None = None) -> bytearray:
    buf = bytearray(size)
    if size:
        await _recv_exactly_into(sock, memoryview(buf), stall)
    return buf


async def _send_all(sock: Stream, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _send_frame(
    sock: Stream, kind: int, method: int, status: int, request_id: int, msg: P.Struct, bulk: Bulk
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
    if isinstance(bulk, FileRange):
        await sock.send_file(bulk, head + payload)
        return
    await _send_all(sock, head + payload)
    if bulk is not None and data_len:
        await _send_all(sock, bulk)


# --------------------------------------------------------------------------- server


@dataclass
class ServerLimits:
    """What one peer may cost a server. Sizes per method come from ``protocol.request_limits``."""

    idle_timeout: float = 600.0  # a connection with no request in progress is closed after this
    # A request's frame must arrive within this (plus 1 s per MB of bulk data), and never stall longer.
    frame_timeout: float = 30.0
    connections_per_peer: int = 1024  # concurrent connections from one IP address
    inflight_bytes: int = 4 << 30  # bulk data buffers being received, all connections together


class ByteBudget:
    """A counting semaphore over bytes: receivers wait for room before they allocate a buffer."""

    def __init__(self, limit: int):
        self.limit = limit
        self.free = limit
        self._changed = trio.Event()

    async def acquire(self, n: int) -> int:
        """Wait until ``n`` bytes (at most the whole budget: RpcServer refuses larger frames) are free."""
        n = min(n, self.limit)
        while self.free < n:
            await self._changed.wait()
        self.free -= n
        return n

    def release(self, n: int) -> None:
        self.free += n
        self._changed.set()
        self._changed = trio.Event()


class RpcServer:
    """Serves one service: ``handlers`` maps method numbers to ``async fn(request, data) -> reply``.

    A handler returns a reply struct, or ``(reply, bulk)`` to send bulk data after it.

    Hostile or broken peers: a header naming an unknown method or declaring more payload or bulk data
    than the method allows is answered with an error and the connection closed, before anything is
    allocated; bulk buffers wait for room in a shared byte budget; idle connections and frames that
    trickle in (slowloris) time out; connections per peer address are capped.
    """

    def __init__(self, name: str, methods: dict[int, tuple[type[P.Struct], type[P.Struct]]],
                 handlers: dict[int, Handler], limits: ServerLimits | None = None, *,
                 ssl_context: ssl.SSLContext | None | bool = True, prechecks: dict[int, Precheck] | None = None,
                 thread_handlers: dict[int, ThreadHandler] | None = None, serving_threads: int = 64):
        """``ssl_context``: True takes the process's (``kvfs.tls.server_context()``, None when it has no
        TLS material); None or False serves plaintext.

        ``prechecks``: method -> ``fn(request)`` run on the decoded request before its bulk data is
        received (e.g. a chunk write's capability token). Raising ``OSError`` refuses the request with
        that errno; the data still on the wire is never read, so the connection is then closed.

        ``thread_handlers``: method -> ``fn(request) -> (reply, FileRange)``, synchronous and quick. After
        such a request, a plaintext connection is served by a worker thread (at most
        ``serving_threads`` at once) while its peer keeps sending those requests (kvfs.rpc_threaded):
        no event-loop hop per request. The async handler of the same method serves the rest."""
        missing = set(methods) - set(handlers)
        if missing:
            raise ValueError(f"{name}: no handler for methods {sorted(missing)}")
        self.name = name
        self.methods = methods
        self.handlers = handlers
        self.prechecks = prechecks or {}
        self.limits = limits or ServerLimits()
        self.request_limits = P.request_limits(methods)
        self.roles = P.method_roles(methods)
        self.ssl_context = tls.server_context() if ssl_context is True else (ssl_context or None)
        self.budget = ByteBudget(self.limits.inflight_bytes)
        self.thread_handlers = {m: (methods[m][0], fn) for m, fn in (thread_handlers or {}).items()}
        self._serving_threads = trio.CapacityLimiter(max(1, serving_threads))
        self.peers: dict[str, int] = {}  # peer address -> open connections

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(512)
        bound_port = listener.getsockname()[1]
        if self.ssl_context is None and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("%s: serving plaintext without authentication on %s:%d (--insecure): any host that "
                        "reaches this port may call any method", self.name, host or "*", bound_port)
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
                    peer = _peer_of(conn)
                    if self.peers.get(peer, 0) >= self.limits.connections_per_peer:
                        log.warning("%s: refusing a connection from %s: %d already open", self.name, peer,
                                    self.peers[peer])
                        conn.close()
                        continue
                    self.peers[peer] = self.peers.get(peer, 0) + 1
                    _tune(conn)
                    nursery.start_soon(self._serve_connection, conn, peer)
        finally:
            listener.close()

    async def _secure(self, raw: trio.socket.SocketType, peer: str) -> Stream | None:
        """The connection's stream, after a TLS handshake when this server requires one (None: refused)."""
        if self.ssl_context is None:
            return Plain(raw)
        with trio.move_on_after(self.limits.frame_timeout):
            try:
                first = await raw.recv(1, socket.MSG_PEEK)
                if not first:  # connected and hung up (a port probe)
                    return None
                if first[0] == P.MAGIC & 0xFF:
                    await self._refuse_plaintext(Plain(raw), peer)
                    return None
                stream = await accept_tls(raw, self.ssl_context)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.warning("%s: TLS handshake with %s failed: %s", self.name, peer, exc)
                return None
            identity.current_peer.set(stream.peer)
            return stream
        log.warning("%s: %s did not complete a TLS handshake in %gs: closing", self.name, peer, self.limits.frame_timeout)
        return None

    async def _refuse_plaintext(self, stream: Plain, peer: str) -> None:
        """A kvfs frame where a TLS handshake should be: answer in plaintext, so the client says why."""
        header = bytearray(P.HEADER_SIZE)
        await _recv_exactly_into(stream, memoryview(header))
        frame = P.unpack_header(header)
        await _send_frame(stream, P.KIND_REPLY, frame.method, errno.EACCES, frame.request_id, P.ErrorReply(
            f"{self.name}: this server requires TLS (a client certificate: --tls-dir or KVFS_TLS_DIR)"), None)
        await linger(stream.sock)
        log.warning("%s: refused a plaintext connection from %s", self.name, peer)

    async def _serve_connection(self, raw: trio.socket.SocketType, peer: str = "") -> None:
        header = bytearray(P.HEADER_SIZE)
        hview = memoryview(header)
        limits = self.limits
        sock: Stream | None = None
        try:
            sock = await self._secure(raw, peer)
            if sock is None:
                return
            carried: bytes | None = None  # a header a serving thread received and handed back
            while True:
                if carried is not None:
                    header[:] = carried
                    carried = None
                else:
                    # Idle until the first byte of a request; then the whole header within the frame timeout.
                    with trio.move_on_after(limits.idle_timeout) as idle:
                        first = await sock.recv_into(hview[:1])
                    if idle.cancelled_caught or first == 0:
                        return
                    with trio.move_on_after(limits.frame_timeout) as slow:
                        await _recv_exactly_into(sock, hview[1:])
                    if slow.cancelled_caught:
                        log.warning("%s: %s sent a partial header for %gs: closing", self.name, peer,
                                    limits.frame_timeout)
                        return
                try:
                    frame = P.unpack_header(header)
                except ValueError as exc:
                    log.warning("%s: dropping connection from %s: %s", self.name, peer, exc)
                    return
                refused = self._refuse(frame)
                if refused is not None:
                    # The rest of the frame is still on the wire and is not read: answer, then close.
                    await _send_frame(sock, P.KIND_REPLY, frame.method, refused[0], frame.request_id,
                                      P.ErrorReply(refused[1]), None)
                    log.warning("%s: %s from %s", self.name, refused[1], peer)
                    return
                if not await self._receive_and_dispatch(sock, frame, peer):
                    return
                if (frame.method in self.thread_handlers and isinstance(sock, Plain)
                        and self._serving_threads.available_tokens):
                    # Its peer streams these requests: serve them from a thread until it pauses.
                    carried = await trio.to_thread.run_sync(
                        serve_in_thread, sock.sock.fileno(), self.name, self.thread_handlers, self.request_limits,
                        limits.frame_timeout, limiter=self._serving_threads)
                    if carried == CLOSE:
                        return
        except OSError as exc:
            log.debug("%s: connection error: %s", self.name, exc)
        finally:
            if sock is not None:
                sock.close()
            raw.close()  # a no-op once TLS took its descriptor
            self.peers[peer] = self.peers.get(peer, 1) - 1
            if self.peers[peer] <= 0:
                self.peers.pop(peer, None)

    def _refuse(self, frame: P.FrameHeader) -> tuple[int, str] | None:
        """(errno, message) when the header alone disqualifies the request."""
        if frame.kind != P.KIND_REQUEST or frame.method not in self.request_limits:
            return errno.ENOSYS, f"{self.name}: unknown method {frame.method}"
        max_payload, max_data = self.request_limits[frame.method]
        max_data = min(max_data, self.budget.limit)  # a buffer never exceeds the whole in-flight budget
        if frame.payload_len > max_payload or frame.data_len > max_data:
            return errno.EMSGSIZE, (f"{self.name}: request too large for method {frame.method} (payload "
                                    f"{frame.payload_len} > {max_payload} or data {frame.data_len} > {max_data})")
        caller = identity.current_peer.get()
        if caller is not identity.INSECURE and caller.role not in self.roles[frame.method]:
            return errno.EACCES, (f"{self.name}: {metrics.method_name(self.name, frame.method)} needs role "
                                  f"{' or '.join(sorted(self.roles[frame.method]))}; {caller.describe()} may not")
        return None

    async def _receive_and_dispatch(self, sock: Stream, frame: P.FrameHeader, peer: str) -> bool:
        """Receive the frame's payload and data and dispatch it; False when the peer stalled or was too
        slow (the caller then closes the connection)."""
        stall = self.limits.frame_timeout
        deadline = stall + frame.data_len / 1e6
        payload = bytearray(frame.payload_len)
        if not await _timely(_recv_exactly_into(sock, memoryview(payload), stall), deadline):
            log.warning("%s: %s stalled sending a request: closing", self.name, peer)
            return False
        request: Any = None
        precheck = self.prechecks.get(frame.method)
        if precheck is not None and frame.kind == P.KIND_REQUEST:
            request, refusal = self._precheck(precheck, frame.method, payload)
            if refusal is not None:
                # Refused before the bulk data: none of it is received or buffered.
                await self._reply(sock, frame, refusal[0], P.ErrorReply(refusal[1]), None, time.perf_counter())
                if frame.data_len:
                    log.warning("%s: refused a %d-byte request from %s before its data: %s", self.name,
                                frame.data_len, peer, refusal[1])
                    sock.shutdown_write()  # the reply, then end of stream: the unread data resets the connection
                    return False
                return True
        # Room for the bulk data first (a budget shared by every connection), then the buffer. A server
        # whose budget stays full (slow or stalled senders holding it) refuses rather than queueing.
        reserved = 0
        if frame.data_len:
            with trio.move_on_after(stall):
                reserved = await self.budget.acquire(frame.data_len)
            if not reserved:
                await _send_frame(sock, P.KIND_REPLY, frame.method, errno.EBUSY, frame.request_id,
                                  P.ErrorReply(f"{self.name}: busy (request data budget full); retry"), None)
                log.warning("%s: data budget full: refused a %d-byte request from %s", self.name, frame.data_len, peer)
                return False
        try:
            data = memoryview(bytearray(frame.data_len)) if frame.data_len else None
            if data is not None and not await _timely(_recv_exactly_into(sock, data, stall), deadline):
                log.warning("%s: %s stalled sending %d bytes of data: closing", self.name, peer, frame.data_len)
                return False
            await self._dispatch(sock, frame, payload, data, request)
            return True
        finally:
            if reserved:
                self.budget.release(reserved)

    def _decode(self, method: int, payload: bytearray) -> tuple[Any, tuple[int, str] | None]:
        try:
            return P.decode(self.methods[method][0], payload), None
        except Exception as exc:  # msgspec.ValidationError / DecodeError
            return None, (errno.EINVAL, f"{self.name}: malformed request: {exc}")

    def _precheck(self, precheck: Precheck, method: int, payload: bytearray) -> tuple[Any, tuple[int, str] | None]:
        """(decoded request, None) when ``precheck`` lets it through, else (None, (errno, message))."""
        request, refusal = self._decode(method, payload)
        if refusal is None:
            try:
                precheck(request)
            except OSError as exc:
                refusal = errno_of(exc), exc.strerror or str(exc)
        return request, refusal

    async def _dispatch(self, sock: Stream, frame: P.FrameHeader, payload: bytearray,
                        data: memoryview | None, request: Any = None) -> None:
        """Run the handler (``request``: already decoded by a pre-check) and send its reply."""
        method = frame.method
        types = self.methods.get(method)
        bulk: Bulk = None
        started = time.perf_counter()
        if frame.kind != P.KIND_REQUEST or types is None:
            status, reply = errno.ENOSYS, P.ErrorReply(f"{self.name}: unknown method {method}")
        else:
            refusal = None
            if request is None:
                request, refusal = self._decode(method, payload)
            if refusal is not None:
                status, reply = refusal[0], P.ErrorReply(refusal[1])
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
        if data is not None:
            metrics.RPC_BYTES.labels(self.name, "in").inc(len(data))
        await self._reply(sock, frame, status, reply, bulk, started)

    async def _reply(self, sock: Stream, frame: P.FrameHeader, status: int, reply: P.Struct, bulk: Bulk,
                     started: float) -> None:
        name = metrics.method_name(self.name, frame.method)
        metrics.RPC_REQUESTS.labels(self.name, name, metrics.status_name(status)).inc()
        metrics.RPC_SECONDS.labels(self.name, name).observe(time.perf_counter() - started)
        if isinstance(bulk, FileRange):
            metrics.RPC_BYTES.labels(self.name, "out").inc(bulk.length)
        try:
            await _send_frame(sock, P.KIND_REPLY, frame.method, status, frame.request_id, reply, bulk)
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
    def __init__(self, sock: Stream):
        self.sock = sock
        self.header = bytearray(P.HEADER_SIZE)


class RpcClient:
    """A pool of connections to one server; each call takes a connection for its whole exchange."""

    def __init__(self, service: str, address: str, methods: dict[int, tuple[type[P.Struct], type[P.Struct]]],
                 *, timeout: float = 30.0, connect_timeout: float = 5.0, max_connections: int = 64,
                 ssl_context: ssl.SSLContext | None | bool = True):
        """``ssl_context``: True takes the process's (``kvfs.tls.client_context()``: plaintext when it has
        no TLS material); None or False connects in plaintext."""
        self.service = service
        self.ssl_context = tls.client_context() if ssl_context is True else (ssl_context or None)
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
        if self.ssl_context is None:
            return _Connection(Plain(sock))
        try:
            with trio.fail_after(self.connect_timeout):
                return _Connection(await connect_tls(sock, self.ssl_context, self.host, self.service))
        except trio.TooSlowError:
            raise ConnectError(errno.EIO, f"{self.service} {self.address}: TLS handshake timed out after "
                               f"{self.connect_timeout:g}s") from None
        except OSError as exc:
            raise self._tls_error(exc) from None
        finally:
            sock.close()  # a no-op once TLS took its descriptor

    def _tls_error(self, exc: OSError) -> OSError:
        """A TLS failure as one line naming the server: EACCES when a certificate was refused (by either
        side), EIO otherwise (the server hung up: it may speak plaintext)."""
        if isinstance(exc, (PermissionError, ssl.SSLCertVerificationError)) or (
                isinstance(exc, ssl.SSLError) and "ALERT" in (exc.reason or "")):
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"the server's certificate is not trusted ({exc.verify_message})"
            else:
                reason = exc.strerror or str(exc)
            return error(errno.EACCES, f"{self.service} {self.address}: TLS refused: {reason}")
        return ConnectError(errno.EIO, f"{self.service} {self.address}: TLS handshake failed "
                            f"({exc.strerror or exc}); does the server speak TLS?")

    async def _get(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.sock.looks_closed():
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
            refused_early: OSError | None = None
            try:
                with trio.fail_after(limit):
                    conn = await self._get()
                    try:
                        await _send_frame(conn.sock, P.KIND_REQUEST, method, 0, request_id, request, data)
                    except OSError as exc:
                        if data is None:
                            raise
                        # A server may refuse a request before its bulk data (RpcServer prechecks), answer
                        # and close: its reply is then waiting, and says why better than the broken pipe.
                        refused_early = exc
                    try:
                        await _recv_exactly_into(conn.sock, memoryview(conn.header))
                    except OSError:
                        if refused_early is not None:
                            raise refused_early from None
                        raise
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
                if exc.errno in (errno.EIO, errno.EACCES) and self.address in str(exc):
                    raise
                if isinstance(exc, ssl.SSLError):  # TLS 1.3: the server judges our certificate after we sent
                    raise self._tls_error(exc) from None
                raise self._fail(f"connection failed ({exc.strerror or exc})") from None
            except BaseException:
                if conn is not None:
                    conn.sock.close()
                raise
            if refused_early is None:
                self._idle.append(conn)
            else:
                conn.sock.close()
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
