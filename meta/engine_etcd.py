"""etcd v3 metadata engine: the namespace in a replicated store, so meta survives losing its node.

``etcd://h1:2379,h2:2379,h3:2379/prefix`` names the cluster and the key prefix (default ``/kvfs``).
Namespace keys live under ``<prefix>/m/``; ``meta/leader.py`` keeps the leader key and the list of
meta processes under ``<prefix>/leader`` and ``<prefix>/members/``.

Client: etcd's own gRPC JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/*``), documented
and served by every etcd >= 3.4 on the client port, spoken with the standard library's
``http.client`` over keep-alive connections. The namespace calls the engine synchronously on the trio
thread, so the calls are plain blocking HTTP with a timeout (one loopback round trip is well under a
millisecond); no gRPC stack, protobuf pins or threads are needed.

Batches: one batch is one etcd transaction (``Txn`` of puts and deletes), so it is atomic. etcd
bounds a transaction by ``--max-txn-ops`` (default 128) and ``--max-request-bytes`` (default
1.5 MiB); a namespace batch (the commit of a file with thousands of chunks) can exceed the defaults,
and splitting it would break atomicity. kvfs therefore requires etcd started with the limits
``ETCD_FLAGS`` below (documented in docs/architecture.md) and refuses a larger batch before sending
it, with EFBIG and a message naming the flags; etcd refusing a batch (members started with the
defaults) is EIO naming the same flags.

Fencing: ``fence(key, create_revision)`` makes every later write conditional on the leader key
still being the one this process created; a write refused by that condition raises EIO
(``Fenced``), so a deposed leader can never change the namespace.

Read cache (``cache=True``, what the meta leader uses): the leader is the only writer, so it loads
the whole namespace once and serves ``get``/``scan`` from memory; writes go to etcd first and are
applied to the copy only when etcd acknowledged them. A write whose outcome is unknown (every
endpoint failed) leaves the copy untrusted: the engine then refuses everything (``broken``) and the
leader steps down and reloads (meta/leader.py). A standby hands its warm copy in instead (``loaded``,
meta/etcd_mirror.py), so taking over needs no load.

Durability: etcd replies to a transaction only after a quorum of members has it in its fsynced raft
log. A plain engine sends each write as it comes (``durable`` False: nothing left for group commit to
wait for). The leader runs it ``pipelined``: a write is applied to the in-memory copy at once and
queued; group commit (meta/durability.py) awaits ``sync_async()``, which sends everything queued, in
order, whole batches merged into as few transactions as the limits allow, from the event loop itself
(meta/etcd_async.py: no worker-thread hand-off), and replies wait for it. The event loop then never
blocks on etcd, and concurrent clients share a raft round, as they share an
fsync on RocksDB. As there, another client can read a change before it is acknowledged; if the leader
dies in that window the change is gone, but no acknowledged change ever is.

Error handling: every call has a timeout and tries the endpoints in turn; when none answers, the
call raises ``OSError(EIO)`` naming the endpoints.
"""

from __future__ import annotations

import base64
import errno
import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from sortedcontainers import SortedDict

from kvfs.meta.engine import Batch

log = logging.getLogger("kvfs.meta.etcd")

# What kvfs needs of every etcd member (the defaults are 128 ops and 1.5 MiB per transaction).
MAX_TXN_OPS = 16384
MAX_REQUEST_BYTES = 8 << 20
ETCD_FLAGS = (f"--max-txn-ops {MAX_TXN_OPS}", f"--max-request-bytes {MAX_REQUEST_BYTES}")
# etcd keeps every old revision until it is compacted; without this its database grows with every
# metadata change until the space quota stops all writes. kvfs never reads old revisions.
ETCD_COMPACTION_FLAGS = ("--auto-compaction-mode periodic", "--auto-compaction-retention 5m")
PAGE = 1000  # keys per range request of a scan
# Keys per range request when a leader loads the whole namespace: etcd 3.4 counts every key left in
# the range on each request, so small pages make the load quadratic (200,000 keys: 7.0 s in pages
# of 1,000, 2.8 s in pages of 10,000, 3.3 s in pages of 50,000, one member on this VM).
LOAD_PAGE = 10000
GET_BATCH = 128  # point reads per transaction in get_many (fits etcd's default limit too)


class Fenced(OSError):
    """A write refused because this process is no longer the leader that the engine is fenced to."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix`` (etcd's range_end)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"  # every key


def parse_url(url: str) -> tuple[list[str], bytes]:
    """``etcd://h1:2379,h2:2379/prefix`` -> (["h1:2379", "h2:2379"], b"/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ValueError(f"bad etcd url {url!r}: expected etcd://host:port[,host:port...][/prefix]")
    endpoints = [e.strip() for e in parts.netloc.split(",") if e.strip()]
    for e in endpoints:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad etcd endpoint {e!r} in {url!r}: expected host:port")
    prefix = (parts.path.rstrip("/") or "/kvfs").encode()
    return endpoints, prefix


def parse_reply(endpoint: str, status: int, data: bytes) -> dict:
    """The gateway's JSON reply. Error handling: EtcdError (etcd said no), OSError(EIO) (not JSON)."""
    try:
        reply = json.loads(data) if data else {}
    except ValueError:
        raise OSError(errno.EIO, f"etcd {endpoint}: bad reply (HTTP {status})") from None
    if status != 200 or "error" in reply:
        raise EtcdError(endpoint, status, reply)
    return reply


def retry_slices(n: int, total: float) -> Iterator[tuple[int, float | None]]:
    """The tries of one call over ``n`` endpoints within ``total`` seconds: (try number, its time), and
    (try number, None) after each round, where the caller pauses 50 ms. Each try gets a slice of the time
    (a raft leader election takes a second or two: a member without a leader holds requests), then the
    next member is asked, round after round."""
    deadline = time.monotonic() + total
    per_try = max(0.5, total / 4)
    i = 0
    while (left := deadline - time.monotonic()) > 0:
        yield i, min(left, per_try)
        i += 1
        if i % n == 0:
            yield i, None


def unavailable(total: float, errors: dict[str, str]) -> OSError:
    return OSError(errno.EIO, f"etcd unavailable for {total:g}s ({'; '.join(errors.values()) or 'timed out'})")


class EtcdClient:
    """Blocking JSON-gateway client over keep-alive HTTP connections, one per endpoint (not thread-safe:
    each thread that talks to etcd uses its own client)."""

    def __init__(self, endpoints: list[str], *, timeout: float = 2.0):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._current = 0  # the endpoint that answered last: tried first next time

    def _conn(self, endpoint: str, timeout: float) -> http.client.HTTPConnection:
        conn = self._conns.get(endpoint)
        if conn is None:
            host, _, port = endpoint.rpartition(":")
            conn = self._conns[endpoint] = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, endpoint: str) -> None:
        conn = self._conns.pop(endpoint, None)
        if conn is not None:
            conn.close()

    def call_one(self, endpoint: str, path: str, body: dict, timeout: float | None = None) -> dict:
        """One request to one endpoint. Error handling: OSError (transport), EtcdError (etcd said no)."""
        conn = self._conn(endpoint, timeout or self.timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop(endpoint)
            raise OSError(errno.EIO, f"etcd {endpoint}: {exc or type(exc).__name__}") from None
        try:
            return parse_reply(endpoint, resp.status, data)
        except OSError:
            self._drop(endpoint)
            raise

    def call(self, path: str, body: dict, *, timeout: float | None = None) -> dict:
        """``call_one`` on the endpoints in turn until one answers, for about ``timeout`` in all
        (``retry_slices``). Only use it for requests that are safe to repeat (reads, and meta's writes: see ``write``).
        Error handling: OSError(EIO) naming the endpoints when none answered in time; OSError(EIO)
        with etcd's message when etcd refused the request for good."""
        total = timeout or self.timeout
        errors: dict[str, str] = {}
        for i, per_try in retry_slices(len(self.endpoints), total):
            if per_try is None:
                time.sleep(0.05)
                continue
            endpoint = self.endpoints[(self._current + i) % len(self.endpoints)]
            try:
                reply = self.call_one(endpoint, path, body, per_try)
            except EtcdError as exc:
                if not exc.transient:
                    raise OSError(errno.EIO, str(exc)) from None
                errors[endpoint] = str(exc)
            except OSError as exc:
                errors[endpoint] = exc.strerror or str(exc)
            else:
                self._current = (self._current + i) % len(self.endpoints)
                return reply
        raise unavailable(total, errors)

    # -- small typed helpers over the gateway

    def range(self, key: bytes, range_end: bytes | None = None, *, limit: int = 0, keys_only: bool = False,
              serializable: bool = False) -> list[dict]:
        body: dict = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if limit:
            body["limit"] = limit
        if keys_only:
            body["keys_only"] = True
        if serializable:
            body["serializable"] = True
        return self.call("/v3/kv/range", body).get("kvs", [])

    def close(self) -> None:
        for endpoint in list(self._conns):
            self._drop(endpoint)


class EtcdError(Exception):
    """etcd answered with an error (gRPC status ``code`` and its message)."""

    # Unavailable, deadline exceeded, aborted: another member (or a later try) may succeed.
    TRANSIENT = frozenset({4, 10, 14})

    def __init__(self, endpoint: str, status: int, reply: dict):
        self.code = int(reply.get("code", 0) or 0)
        self.message = reply.get("message") or reply.get("error") or f"HTTP {status}"
        self.transient = self.code in self.TRANSIENT or status >= 500 and self.code == 0
        super().__init__(f"etcd {endpoint}: {self.message}")


def kv(item: dict) -> tuple[bytes, bytes]:
    return _unb64(item["key"]), _unb64(item.get("value", ""))


def load_namespace(client: EtcdClient, prefix: bytes) -> tuple[SortedDict, int]:
    """Every key under ``prefix`` (the prefix cut off) as of one revision, and that revision: pages of
    ``LOAD_PAGE`` all read at the first page's revision, so a watch from the next one misses nothing."""
    cache = SortedDict()
    start, end, cut = prefix, prefix_end(prefix), len(prefix)
    revision = 0
    while True:
        body: dict = {"key": _b64(start), "range_end": _b64(end), "limit": LOAD_PAGE}
        if revision:
            body["revision"] = str(revision)
        reply = client.call("/v3/kv/range", body)
        revision = revision or int(reply["header"]["revision"])
        page = reply.get("kvs", [])
        for item in page:
            k, v = kv(item)
            cache[k[cut:]] = v
        if not reply.get("more") or not page:
            return cache, revision
        start = _unb64(page[-1]["key"]) + b"\0"


class EtcdEngine:
    inline_sync = False  # sync() is a raft round trip that can hang for the timeout: never on the event loop

    def __init__(self, endpoints: list[str], prefix: bytes = b"/kvfs", *, timeout: float = 5.0, cache: bool = False,
                 pipelined: bool = False, max_txn_ops: int = MAX_TXN_OPS, max_request_bytes: int = MAX_REQUEST_BYTES,
                 loaded: SortedDict | None = None):
        if pipelined and not (cache or loaded is not None):
            raise ValueError("a pipelined etcd engine needs its in-memory copy (cache=True)")
        # Plain: each write is one transaction, acknowledged by etcd once a quorum fsynced it, so group
        # commit has nothing to wait for. Pipelined: writes queue, and sync() sends them (group commit).
        self.durable = pipelined
        self._queue: list[tuple[dict[bytes, bytes | None], int]] = []
        self._queue_lock = threading.Lock()  # write() on the event loop, sync() maybe in a worker thread
        self._sync_lock = threading.Lock()
        self.client = EtcdClient(endpoints, timeout=timeout)
        self.root = prefix
        self.prefix = prefix + b"/m/"
        self.max_txn_ops = max_txn_ops
        self.max_request_bytes = max_request_bytes
        self.writes = 0
        self.broken: str | None = None  # why the engine stopped trusting its copy (it then refuses everything)
        self._fence: dict | None = None
        self._aclient: Any = None  # sync_async's AsyncEtcdClient, made on first use (in the event loop)
        self._cache: SortedDict | None = None
        if loaded is not None:  # a standby's warm copy (meta/etcd_mirror.py), already current
            self._cache = loaded
        elif cache:
            self._cache = load_namespace(self.client, self.prefix)[0]

    @classmethod
    def from_url(cls, url: str, **kwargs) -> EtcdEngine:
        endpoints, prefix = parse_url(url)
        return cls(endpoints, prefix, **kwargs)

    def fence(self, key: bytes, create_revision: int) -> None:
        """Make every later write conditional on ``key`` still having ``create_revision`` (this leader's key)."""
        self._fence = {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(create_revision)}

    def _check(self) -> None:
        if self.broken:
            raise OSError(errno.EIO, f"metadata engine stopped: {self.broken}")

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes) -> bytes | None:
        self._check()
        if self._cache is not None:
            return self._cache.get(key)
        kvs = self.client.range(self.prefix + key)
        return kv(kvs[0])[1] if kvs else None

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        self._check()
        if self._cache is not None:
            return list(map(self._cache.get, keys))
        out: list[bytes | None] = []
        for i in range(0, len(keys), GET_BATCH):
            part = keys[i:i + GET_BATCH]
            ops = [{"request_range": {"key": _b64(self.prefix + k)}} for k in part]
            reply = self.client.call("/v3/kv/txn", {"success": ops})
            for r in reply.get("responses", []):
                kvs = r.get("response_range", {}).get("kvs", [])
                out.append(kv(kvs[0])[1] if kvs else None)
        return out

    def scan(self, prefix: bytes, start: bytes | None = None, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        self._check()
        first = start if start is not None and start > prefix else prefix
        if self._cache is not None:  # as MemoryEngine: the namespace does not write while it iterates
            count = 0
            for key in self._cache.irange(minimum=first):
                if not key.startswith(prefix) or (limit is not None and count >= limit):
                    return
                count += 1
                yield key, self._cache[key]
            return
        end = prefix_end(self.prefix + prefix)
        cursor = self.prefix + first
        left = limit
        cut = len(self.prefix)
        while left is None or left > 0:
            page_size = PAGE if left is None else min(PAGE, left)
            page = self.client.range(cursor, end, limit=page_size)
            for item in page:
                k, v = kv(item)
                yield k[cut:], v
            if left is not None:
                left -= len(page)
            if len(page) < page_size:
                return
            cursor = _unb64(page[-1]["key"]) + b"\0"

    # ------------------------------------------------------------------ writes

    def _ops(self, batch: Batch) -> tuple[dict[bytes, bytes | None], int]:
        # Last change per key wins, as in a RocksDB write batch (etcd refuses a key twice in one txn).
        ops: dict[bytes, bytes | None] = {}
        for key, value in batch:
            ops[key] = value
        size = sum(len(k) + len(self.prefix) + len(v or b"") + 16 for k, v in ops.items())
        if len(ops) > self.max_txn_ops or size > self.max_request_bytes:
            raise OSError(errno.EFBIG, f"metadata change of {len(ops)} keys ({size} bytes) is larger than one etcd "
                          f"transaction may be (kvfs needs etcd started with {' '.join(ETCD_FLAGS)})")
        return ops, size

    def _txn(self, ops: dict[bytes, bytes | None]) -> dict:
        """The fenced transaction of ``ops``. Safe to send again to another member after an unknown
        outcome: only this leader writes (the fence), one transaction at a time, and puts and deletes
        applied twice leave the same keys."""
        success = [
            {"request_delete_range": {"key": _b64(self.prefix + k)}} if v is None
            else {"request_put": {"key": _b64(self.prefix + k), "value": _b64(v)}}
            for k, v in ops.items()
        ]
        body: dict = {"success": success}
        if self._fence is not None:
            body["compare"] = [self._fence]
        return body

    def _failed(self, exc: OSError) -> OSError:
        if "too many operations" in str(exc) or "request is too large" in str(exc):
            return OSError(errno.EIO, f"{exc} (kvfs needs etcd started with {' '.join(ETCD_FLAGS)})")
        self.broken = f"a write's outcome is unknown ({exc.strerror or exc})"
        return OSError(errno.EIO, f"metadata write failed: {exc.strerror or exc}")

    def _answered(self, reply: dict) -> None:
        if self._fence is not None and not reply.get("succeeded"):
            self.broken = "this meta is no longer the leader"
            raise Fenced(errno.EIO, "metadata write refused: this meta is no longer the leader")

    def _send(self, ops: dict[bytes, bytes | None]) -> None:
        """One fenced transaction. Error handling: see ``write``."""
        try:
            reply = self.client.call("/v3/kv/txn", self._txn(ops))
        except OSError as exc:
            raise self._failed(exc) from None
        self._answered(reply)

    def write(self, batch: Batch) -> None:
        """Apply the batch atomically: at once as one etcd transaction conditional on the fence, or
        (``pipelined``) to the in-memory copy now and to etcd at the next ``sync``.

        Error handling: EFBIG for a batch over the limits (nothing applied); ``Fenced`` (EIO) when this
        process is no longer the leader; EIO when etcd is unavailable (the outcome is then unknown and
        the engine refuses everything after it)."""
        self._check()
        ops, size = self._ops(batch)
        self.writes += 1
        if self.durable:
            with self._queue_lock:
                self._queue.append((ops, size))
        else:
            self._send(ops)
        if self._cache is not None:
            for k, v in ops.items():
                if v is None:
                    self._cache.pop(k, None)
                else:
                    self._cache[k] = v

    @property
    def unsynced(self) -> bool:
        return bool(self._queue)

    def _take_queue(self) -> Iterator[dict[bytes, bytes | None]]:
        """Everything queued, in order, whole batches merged into as few transactions as the limits allow."""
        with self._queue_lock:
            queue, self._queue = self._queue, []
        if self.broken:
            raise OSError(errno.EIO, f"metadata engine stopped: {self.broken}")
        merged: dict[bytes, bytes | None] = {}
        size = 0
        for ops, ops_size in queue:
            if merged and (len(merged) + len(ops) > self.max_txn_ops or size + ops_size > self.max_request_bytes):
                yield merged
                merged, size = {}, 0
            merged.update(ops)
            size += ops_size
        if merged:
            yield merged

    def sync(self) -> None:
        """``pipelined``: send every queued batch (``_take_queue``) as fenced transactions (group commit
        over etcd: concurrent clients share a raft round). Otherwise nothing to do: etcd replied to each
        write after a quorum fsynced it. Never at the same time as ``sync_async``: the leader calls this
        one only before it serves and after it stopped. Error handling: EIO (the engine is then broken)."""
        with self._sync_lock:
            for ops in self._take_queue():
                self._send(ops)

    async def sync_async(self) -> None:
        """``sync`` on the trio event loop (meta/etcd_async.py: no worker thread), for group commit.
        Cancelled while a transaction is out, its outcome is unknown: the engine is then broken.
        Error handling: as ``sync``."""
        if self._aclient is None:
            from kvfs.meta.etcd_async import AsyncEtcdClient  # it imports this module

            self._aclient = AsyncEtcdClient(self.client.endpoints, timeout=self.client.timeout)
        for ops in self._take_queue():
            done = False
            try:
                reply = await self._aclient.call("/v3/kv/txn", self._txn(ops))
                done = True
            except OSError as exc:
                raise self._failed(exc) from None
            finally:
                if not done and not self.broken:
                    self.broken = "a write's outcome is unknown (cancelled)"
            self._answered(reply)

    def close(self) -> None:
        """Send what is queued (``pipelined``) and close the connections. Error handling: EIO."""
        try:
            if self.durable and not self.broken:
                self.sync()
        finally:
            self.client.close()

    async def aclose(self) -> None:
        """``close`` on the event loop, for an engine that used ``sync_async`` (its connections live
        in that trio run). Error handling: EIO."""
        try:
            if self.durable and not self.broken:
                await self.sync_async()
        finally:
            if self._aclient is not None:
                await self._aclient.aclose()
            self.client.close()
