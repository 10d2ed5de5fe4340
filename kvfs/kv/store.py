"""KVStore: KV-cache blocks as files, for inference engines.

Path convention (see docs/kv.md)::

    <root>/<layout.name>/<hh>/<hash>        e.g. /kv/llama-3-8b/bf16-t16-l32-h8-d128-tp0of1/3f/3f09...

``root`` is the model's KV directory (``/kv/<model>`` by convention), ``hh`` the first two hex digits
of the hash (256-way fan-out keeps directories small). The same files are reachable two ways:

* ``KVStore("/kv/llama", layout, client=kvfs.SyncClient(meta))``: the native client library.
* ``KVStore("/mnt/kvfs/kv/llama", layout)``: any directory (the kvfs FUSE mount) through os calls.

``get`` reads into CPU or CUDA tensors; how a payload reaches GPU memory (kvikio straight into it, or
staged through pinned host memory) is ``device_io`` (``kvfs.kv.device``).

Blocks are immutable and published atomically (native: meta creates the file whole in one step;
a directory: temp file + no-replace rename): a reader finds either nothing or the whole block; of two writers of one block one publishes, the other gets success
(``put`` returns False: "already there") without rewriting it.

Cache semantics: a block can disappear at any time (eviction, TTL): ``get`` then returns None (a
miss) and ``longest_prefix`` stops before it. Recency: a hit records an access time on the block
(``touch_interval``, default 60 s: at most one extra metadata write per block per minute), which
the eviction engine (kvfs.meta.eviction) uses for its windowed LRU.

Counters (hits, misses, bytes): kept per store and written every ``stats_interval`` seconds and on
``close`` as an xattr ``kvfs.kv.stats.<client id>`` of ``root``; ``kvfs status`` sums them.

Error handling: ``BlockError`` (a ValueError) for a block of another layout, a truncated or corrupt
block; ``ValueError`` for tensors that do not fit the layout or a malformed hash; ``OSError`` for
I/O failures. A miss is never an exception.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, Self

from kvfs.kv.backend import Backend, ReadResult
from kvfs.kv.block import BlockError, encode_block, encode_header, parse_header, verify_payload
from kvfs.kv.device import DeviceIO, ReadJob
from kvfs.kv.hashing import check_hash, check_hashes
from kvfs.kv.layout import KVLayout

STATS_XATTR = "kvfs.kv.stats."
COUNTERS = ("get_hits", "get_misses", "lookup_hit_blocks", "lookup_miss_blocks", "puts", "puts_existing",
            "get_bytes", "put_bytes")


class KVStore:
    def __init__(self, root: str, layout: KVLayout, *, client: Any = None, concurrency: int = 8,
                 verify: bool = True, check_existing: bool = True, touch_interval: float = 60.0,
                 stats_interval: float = 5.0, device_io: str = "auto"):
        """``client``: a ``kvfs.SyncClient`` (root is then a kvfs path), or None (root is a local
        directory, e.g. under the kvfs mount). ``verify``: check the payload checksum on every read
        that passes through host memory (not the kvikio route: ``kvfs.kv.device``).
        ``check_existing``: ``put`` first looks whether the block is there and skips writing it.
        ``device_io``: how ``get`` fills CUDA ``out`` tensors: "auto", "kvikio" or "staged"
        (``kvfs.kv.device``). Error handling: ValueError for an unknown ``device_io`` or "kvikio" with a
        client; ImportError for "kvikio" where kvikio does not import."""
        if client is None:
            root = os.path.expanduser(root)
        self.root = root.rstrip("/") or "/"
        self.layout = layout
        self.dir = f"{self.root}/{layout.name}"
        self.verify = verify
        self.device_io = DeviceIO(device_io, self.root, layout, directory=client is None, verify=verify,
                                  concurrency=concurrency)
        self.check_existing = check_existing
        self.touch_interval = touch_interval
        self.stats_interval = stats_interval
        self.backend: Backend
        if client is not None:
            from kvfs.kv.native import NativeBackend

            self.backend = NativeBackend(client, concurrency)
            client_id = client.client.client_id
        else:
            from kvfs.kv.posix import PosixBackend

            self.backend = PosixBackend(concurrency)
            client_id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stats = dict.fromkeys(COUNTERS, 0)
        self._stats_name = STATS_XATTR + client_id
        self._stats_lock = threading.Lock()
        self._stats_dirty = False
        self._stats_flushed = time.monotonic()
        # The header is the same for every block of this layout but for the hash and checksum; its
        # length (where the payload starts) is fixed for a given hash length.
        self._header_len: dict[int, int] = {}

    # ------------------------------------------------------------------ paths

    def path(self, block_hash: str) -> str:
        check_hash(block_hash)
        return f"{self.dir}/{block_hash[:2]}/{block_hash}"

    def _header_len_for(self, block_hash: str) -> int:
        n = self._header_len.get(len(block_hash))
        if n is None:
            n = self._header_len[len(block_hash)] = len(encode_header(self.layout, block_hash, 0))
        return n

    # ------------------------------------------------------------------ put

    def put(self, block_hash: str, tensors: Any) -> bool:
        """Store one block. True: this call published it; False: it was already there (not rewritten).

        ``tensors``: one tensor of ``layout.block_shape`` or ``layout.num_planes`` tensors of
        ``layout.plane_shape`` (L0.K, L0.V, L1.K, ...), of the layout's dtype."""
        return self.put_many([(block_hash, tensors)])[0]

    def put_many(self, items: Sequence[tuple[str, Any]]) -> list[bool]:
        """Store several blocks concurrently; results as for ``put``, in order. Error handling: the
        first OSError is raised after every block was tried (the others are published)."""
        jobs = []
        for block_hash, tensors in items:
            path = self.path(block_hash)
            header, views = encode_block(self.layout, block_hash, tensors)
            jobs.append((path.rpartition("/")[0], block_hash, header, views, self.check_existing))
        results = self.backend.put_many(jobs)
        self._count(puts=sum(r is True for r in results), puts_existing=sum(r is False for r in results),
                    put_bytes=self.layout.nbytes * sum(r is True for r in results))
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [bool(r) for r in results]

    # ------------------------------------------------------------------ get

    def get(self, block_hash: str, out: Any = None) -> Any:
        """Load one block into ``out`` (allocated when None) and return it; None on a miss.

        ``out``: one contiguous tensor of ``layout.block_shape`` or a list of ``layout.num_planes``
        contiguous tensors of ``layout.plane_shape``, all on the CPU (pinned or not: the bytes are read
        into them without an intermediate copy) or all on one CUDA device (kvikio straight into them,
        or staged through pinned host memory: ``device_io``; CUDA work is complete when this returns).
        None allocates a CPU tensor. On an error the contents of ``out`` are undefined.

        Error handling: BlockError for a block of another layout, truncated or corrupt; ValueError for
        ``out`` tensors that do not fit the layout or are on another device (``kvfs.kv.device``)."""
        return self.get_many([block_hash], [out])[0]

    def get_many(self, hashes: Sequence[str], outs: Sequence[Any] | None = None) -> list[Any]:
        """Load several blocks concurrently; per block the ``out`` (or a new tensor), or None on a miss."""
        if outs is None:
            outs = [None] * len(hashes)
        if len(outs) != len(hashes):
            raise ValueError("get_many: one out per hash")
        jobs = []
        touch_before = time.time_ns() - int(self.touch_interval * 1e9) if self.touch_interval >= 0 else 0
        for block_hash, out in zip(hashes, outs):
            if out is None:
                import torch

                out = torch.empty(self.layout.block_shape, dtype=self.layout.torch_dtype())
            target = self.device_io.target(out)
            header_len = self._header_len_for(check_hash(block_hash))
            jobs.append(ReadJob(block_hash, self.path(block_hash), header_len + self.layout.nbytes, header_len,
                                target, touch_before))
        loaded: list[Any] = []
        first_error: BaseException | None = None
        errors = 0
        for res in self.device_io.read_many(self.backend, jobs, self._check):
            if isinstance(res, BaseException):
                first_error, errors = first_error or res, errors + 1
                res = None
            loaded.append(res)
        hits = sum(x is not None for x in loaded)
        self._count(get_hits=hits, get_misses=len(loaded) - hits - errors,
                    get_bytes=hits * self.layout.nbytes)
        if first_error is not None:
            raise first_error
        return loaded

    def _check(self, block_hash: str, res: ReadResult, views: list[memoryview] | None) -> None:
        """Check a read block's header (every route) and, given its payload's host ``views``, the payload
        checksum (``verify``). Error handling: BlockError."""
        header = parse_header(res.head, layout=self.layout, block_hash=block_hash, file_size=res.size)
        if not res.payload_done or res.size != header.header_len + header.payload_len:
            raise BlockError(f"KV block {block_hash}: file has {res.size} bytes, header says "
                             f"{header.header_len + header.payload_len}")
        if self.verify and views is not None:
            verify_payload(header, views)

    # ------------------------------------------------------------------ lookups

    def _names(self, hashes: Sequence[str]) -> list[str]:
        check_hashes(hashes)
        return [h[:2] + "/" + h for h in hashes]

    def exists(self, hashes: Sequence[str]) -> list[bool]:
        """Which blocks exist (one metadata round trip through the native client)."""
        exists, _ = self.backend.exists_many(self.dir, self._names(hashes), False)
        return exists

    def longest_prefix(self, hashes: Sequence[str]) -> int:
        """How many of a prompt's chained block hashes, from the first, are stored without a gap: the
        blocks an engine can load instead of recomputing. One round trip through the native client;
        through a directory, one stat per block up to the first miss."""
        _, n = self.backend.exists_many(self.dir, self._names(hashes), True)
        self._count(lookup_hit_blocks=n, lookup_miss_blocks=len(hashes) - n)
        return n

    def delete(self, block_hash: str) -> bool:
        """Remove one block; False if it was not there."""
        try:
            self.backend.remove(self.path(block_hash))
            return True
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ counters

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                self.stats[k] += v
            self._stats_dirty = True
            due = time.monotonic() - self._stats_flushed >= self.stats_interval
        if due:
            self.flush_stats()

    def flush_stats(self) -> None:
        """Publish this store's counters (cumulative, so a lost update is harmless)."""
        with self._stats_lock:
            if not self._stats_dirty:
                return
            value = json.dumps({"t": time.time(), **self.stats}, separators=(",", ":")).encode()
            self._stats_dirty = False
            self._stats_flushed = time.monotonic()
        try:
            self.backend.set_xattr(self.root, self._stats_name, value)
        except OSError:
            pass  # counters are best effort: the root may not exist yet, or not support xattrs

    def close(self) -> None:
        self.flush_stats()
        self.backend.close()
        self.device_io.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
