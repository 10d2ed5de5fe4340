"""etcd's JSON gateway spoken on the trio event loop: the meta leader's transactions without threads.

The leader's group commit sends one etcd transaction per round (meta/durability.py). Sent from a
worker thread (``EtcdClient``), every round paid a hand-off to the thread and back (~0.3 ms measured
on the 2-CPU VM, next to a ~1.7 ms transaction); here the request goes out on a keep-alive trio TCP
stream (TCP_NODELAY) from the event loop, which serves other requests while etcd answers.

Only what the gateway's unary calls need of HTTP/1.1: a POST with Content-Length, a reply with
Content-Length or chunked encoding. Endpoints are tried in turn exactly as ``EtcdClient.call`` does
(same time slices, same transient errors), so the two clients fail over alike.

Error handling: as ``EtcdClient.call``: OSError(EIO) naming the endpoints when none answered in time,
OSError(EIO) with etcd's message when etcd refused the request for good. A call cancelled from outside
may have reached etcd: the caller treats its outcome as unknown.
"""

from __future__ import annotations

import errno
import json

import trio

from kvfs.meta.engine_etcd import EtcdError, parse_reply, retry_slices, unavailable

MAX_HEADER = 64 << 10


class _Conn:
    """One keep-alive HTTP/1.1 connection to one etcd member."""

    def __init__(self, stream: trio.SocketStream, host: str):
        self.stream = stream
        self.host = host
        self.buf = bytearray()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(1 << 16)
        if not data:
            raise OSError(errno.ECONNRESET, "connection closed by etcd")
        self.buf += data

    async def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_HEADER:
                raise OSError(errno.EPROTO, "reply header too long")
            await self._fill()
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    async def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def post(self, path: str, payload: bytes) -> tuple[int, bytes, bool]:
        """(status, body, keep the connection) of one POST."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        await self.stream.send_all(head + payload)  # one segment: no Nagle/delayed-ACK stall
        status_line = await self._line()
        try:
            status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise OSError(errno.EPROTO, f"bad status line {status_line[:80]!r}") from None
        headers: dict[bytes, bytes] = {}
        while line := await self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while size := int((await self._line()).split(b";")[0], 16):
                parts.append(await self._exact(size))
                await self._line()
            while await self._line():  # trailers, then the blank line
                pass
            body = b"".join(parts)
        else:
            body = await self._exact(int(headers.get(b"content-length", b"0")))
        return status, body, headers.get(b"connection") != b"close"


class AsyncEtcdClient:
    """``EtcdClient.call`` for trio tasks (one request at a time per client: the group commit's syncer)."""

    def __init__(self, endpoints: list[str], *, timeout: float = 2.0):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._conns: dict[str, _Conn] = {}
        self._current = 0

    async def _drop(self, endpoint: str) -> None:
        conn = self._conns.pop(endpoint, None)
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.stream.aclose()

    async def call_one(self, endpoint: str, path: str, payload: bytes) -> dict:
        """One request to one endpoint (the caller bounds its time). Error handling: OSError, EtcdError."""
        try:
            conn = self._conns.get(endpoint)
            if conn is None:
                host, _, port = endpoint.rpartition(":")
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
                conn = self._conns[endpoint] = _Conn(stream, endpoint)
            status, data, keep = await conn.post(path, payload)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as exc:
            await self._drop(endpoint)
            raise OSError(errno.EIO, f"etcd {endpoint}: {exc or type(exc).__name__}") from None
        except BaseException:  # cancelled mid-exchange: the connection's state is unknown
            await self._drop(endpoint)
            raise
        try:
            reply = parse_reply(endpoint, status, data)
        except OSError:
            keep = False
            raise
        finally:
            if not keep:
                await self._drop(endpoint)
        return reply

    async def call(self, path: str, body: dict, *, timeout: float | None = None) -> dict:
        """Try the endpoints in turn, as ``EtcdClient.call`` (see there: only for requests safe to repeat)."""
        payload = json.dumps(body).encode()
        errors: dict[str, str] = {}
        total = timeout or self.timeout
        for i, per_try in retry_slices(len(self.endpoints), total):
            if per_try is None:
                await trio.sleep(0.05)
                continue
            endpoint = self.endpoints[(self._current + i) % len(self.endpoints)]
            try:
                with trio.fail_after(per_try):
                    reply = await self.call_one(endpoint, path, payload)
            except EtcdError as exc:
                if not exc.transient:
                    raise OSError(errno.EIO, str(exc)) from None
                errors[endpoint] = str(exc)
            except trio.TooSlowError:
                await self._drop(endpoint)
                errors[endpoint] = f"etcd {endpoint}: no reply in {per_try:.2g}s"
            except OSError as exc:
                errors[endpoint] = exc.strerror or str(exc)
            else:
                self._current = (self._current + i) % len(self.endpoints)
                return reply
        raise unavailable(total, errors)

    async def aclose(self) -> None:
        for endpoint in list(self._conns):
            await self._drop(endpoint)
