"""Serving a connection's bulk reads from a worker thread, with no hop through the event loop per request.

Why (issue 10): on a chunkserver's one trio event loop, each CHUNK_READ cost several hundred
microseconds of Python (the receive wrappers, cancel scopes, a thread hop for ``sendfile`` and back,
metrics): profiles of loopback TCP reads showed the interpreter at about 40% of the chunkserver's CPU,
and one event loop serves every connection in turn. Here a worker thread owns a plaintext connection
while its client streams reads on it: it receives each request (blocking, GIL released while it
waits), runs the method's synchronous handler (token check, locate, dup: microseconds), and sends the
reply header with ``MSG_MORE`` followed by the file range with ``sendfile``, so the header leaves in
the same segment as the data. N connections are served by N threads in parallel.

The event loop stays in charge of the connection: ``RpcServer`` hands it to ``serve_in_thread`` after
a request of a threaded method, and gets it back when the connection goes quiet for
``HANDBACK_IDLE`` (so idle connections never hold threads), when a request of another method
arrives (its header is handed back to be served as usual), or closed on an error. Anything unusual
in a header (an unknown or oversized request) is handed back too, so limits and refusals stay in one
place (``RpcServer._refuse``). TLS connections are never handed over (``sendfile`` cannot encrypt).

Every wait is bounded: a request's frame must arrive within the server's frame timeout, a send that
makes no progress for ``transport.SEND_STALL`` fails, and the thread checks back with the event loop
at least every ``HANDBACK_IDLE`` seconds.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from kvfs import metrics
from kvfs import protocol as P
from kvfs.errors import errno_of
from kvfs.transport import SEND_STALL, _send_file_blocking

log = logging.getLogger(__name__)

HANDBACK_IDLE = 1.0  # seconds without a request before the connection goes back to the event loop
CLOSE = b""  # serve_in_thread's answer when the connection must be closed

# method -> fn(request) -> (reply, FileRange): synchronous, quick (no disk reads: sendfile does those).
ThreadHandler = Callable[[Any], tuple[P.Struct, Any]]


class _Stalled(Exception):
    """The peer sent part of a frame and then nothing within the frame timeout."""


def serve_in_thread(fd: int, service: str, handlers: dict[int, tuple[type[P.Struct], ThreadHandler]],
                    request_limits: dict[int, tuple[int, int]], frame_timeout: float) -> bytes | None:
    """Serve requests of ``handlers``' methods (method -> (request type, handler)) on the connected
    socket ``fd`` (non-blocking, owned by the caller, never closed here) until it goes quiet or
    another request arrives.

    Returns None when no request came for ``HANDBACK_IDLE`` seconds, the header (``P.HEADER_SIZE``
    bytes, already received) of a request the caller must serve itself, or ``CLOSE`` when the
    connection must be closed (end of stream, a stalled or malformed frame, a failed send)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.setblocking(False)
        header = bytearray(P.HEADER_SIZE)
        hview = memoryview(header)
        while True:
            if not _wait_readable(fd, HANDBACK_IDLE):
                return None
            try:
                if not _recv_exactly(sock, fd, hview, time.monotonic() + frame_timeout, first=True):
                    return CLOSE  # end of stream between requests
                frame = P.unpack_header(header)
            except (ValueError, _Stalled) as exc:
                log.warning("%s: dropping a connection: %s", service, exc)
                return CLOSE
            entry = handlers.get(frame.method)
            limit = request_limits.get(frame.method)
            if (entry is None or frame.kind != P.KIND_REQUEST or limit is None or frame.data_len
                    or frame.payload_len > limit[0]):
                return bytes(header)  # the event loop serves (or refuses) it
            if not _serve_one(sock, fd, service, entry[0], entry[1], frame, frame_timeout):
                return CLOSE
    except OSError as exc:
        log.debug("%s: connection error in a serving thread: %s", service, exc)
        return CLOSE
    except Exception:  # a bug here must cost one connection, never the server
        log.exception("%s: serving thread failed", service)
        return CLOSE
    finally:
        sock.detach()


def _serve_one(sock: socket.socket, fd: int, service: str, request_type: type[P.Struct], handler: ThreadHandler,
               frame: P.FrameHeader, frame_timeout: float) -> bool:
    """Receive one request's payload, run ``handler`` and send its reply; False: close the connection."""
    started = time.perf_counter()
    payload = bytearray(frame.payload_len)
    try:
        if payload and not _recv_exactly(sock, fd, memoryview(payload), time.monotonic() + frame_timeout):
            return False
    except _Stalled:
        log.warning("%s: a peer stalled sending a request: closing", service)
        return False
    bulk = None
    try:
        request = _decode(request_type, payload)
        reply, bulk = handler(request)
        status = 0
    except _Malformed as exc:
        status, reply = errno.EINVAL, P.ErrorReply(f"{service}: malformed request: {exc}")
    except OSError as exc:
        status, reply = errno_of(exc), P.ErrorReply(exc.strerror or str(exc))
    except Exception as exc:
        log.exception("%s: method %d failed", service, frame.method)
        status, reply = errno.EIO, P.ErrorReply(f"{service}: internal error: {exc!r}")
    name = metrics.method_name(service, frame.method)
    metrics.RPC_REQUESTS.labels(service, name, metrics.status_name(status)).inc()
    metrics.RPC_SECONDS.labels(service, name).observe(time.perf_counter() - started)
    try:
        body = P.encode(reply)
        length = bulk.length if bulk is not None else 0
        _send_all(sock, fd, P.pack_header(P.KIND_REPLY, frame.method, status, frame.request_id, len(body), length)
                  + body, more=bool(length))
        if length:
            metrics.RPC_BYTES.labels(service, "out").inc(length)
            _send_file_blocking(fd, bulk.fd, bulk.offset, length)
    finally:
        if bulk is not None and bulk.owned:
            os.close(bulk.fd)
    return True


class _Malformed(Exception):
    pass


def _decode(request_type: type[P.Struct], payload: bytearray) -> Any:
    try:
        return P.decode(request_type, payload)
    except Exception as exc:  # msgspec.ValidationError / DecodeError
        raise _Malformed(str(exc)) from None


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _recv_exactly(sock: socket.socket, fd: int, view: memoryview, deadline: float, first: bool = False) -> bool:
    """Fill ``view`` by ``deadline`` (else _Stalled). False: the stream ended before its first byte
    (only when ``first``); ending later is ConnectionResetError."""
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except BlockingIOError:
            if not _wait_readable(fd, deadline - time.monotonic()):
                raise _Stalled(f"partial frame ({got} of {len(view)} bytes) for too long") from None
            continue
        if n == 0:
            if first and got == 0:
                return False
            raise ConnectionResetError(errno.ECONNRESET, "connection closed mid-frame")
        got += n
    return True


def _send_all(sock: socket.socket, fd: int, data: bytes, more: bool) -> None:
    view = memoryview(data)
    flags = socket.MSG_MORE if more else 0
    poller = select.poll()
    poller.register(fd, select.POLLOUT | select.POLLERR | select.POLLHUP)
    while view:
        try:
            view = view[sock.send(view, flags):]
        except BlockingIOError:
            if not poller.poll(SEND_STALL * 1000):
                raise TimeoutError(errno.ETIMEDOUT, f"send: peer took nothing for {SEND_STALL:g}s") from None
