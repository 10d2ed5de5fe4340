"""KVStore: KV-cache blocks as files, for inference engines.

Path convention (see docs/kv.md)::

    <root>/<layout.name>/<hh>/<hash>        e.g. /kv/llama-3-8b/bf16-t16-l32-h8-d128-tp0of1/3f/3f09...

``root`` is the model's KV directory (``/kv/<model>`` by convention), ``hh`` the first two hex digits
of the hash (256-way fan-out keeps directories small). The same files are reachable two ways:

* ``KVStore("/kv/llama", layout, client=kvfs.SyncClient(meta))``: the native client library.
* ``KVStore("/mnt/kvfs/kv/llama", layout)``: any directory (the kvfs FUSE mount) through os calls.

Runs (``kvfs.kv.run``): ``put_runs``/``get_runs``/``runs_prefix`` store and load several consecutive
blocks of one prefix as one file ``<hh>/<last hash>-<count>`` (fewer files, headers and lookups per
prompt); ``get_runs(map_local=True)`` maps a run's local chunk instead of copying it.

``get`` reads into CPU or CUDA tensors; how a payload reaches GPU memory (kvikio straight into it, or
staged through pinned host memory) is ``device_io`` (``kvfs.kv.device``).

Blocks are immutable and published atomically (native: meta creates the file whole in one step;
a directory: temp file + no-replace rename): a reader finds either nothing or the whole block; of two writers of one block one publishes, the other gets success
(``put`` returns False: "already there") without rewriting it.

Cache semantics: a block can disappear at any time (eviction, TTL): ``get`` then returns None (a
miss) and ``longest_prefix`` stops before it. Recency: a hit records an access time on the block
(``touch_interval``, default 60 s: at most one extra metadata write per block per minute), which
the eviction engine (kvfs.meta.eviction) uses for its windowed LRU; for runs the lookup
(``runs_prefix``) records it, where the backend can, in its own round trip (docs/kv.md).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

from kvfs.chunkio import first_bad_block, packed_checksums
from kvfs.kv.backend import Backend, ReadResult
from kvfs.kv.block import (BlockError, CheckedHeaders, byte_view, check_digest, encode_block, encode_header,
                           verify_payload)
from kvfs.kv.device import DeviceIO, ReadJob
from kvfs.kv.hashing import check_hash, check_hashes
from kvfs.kv.layout import KVLayout
from kvfs.kv.run import RunHeader, encode_run_header, parse_run_header, run_header_len, run_name, run_spans

STATS_XATTR = "kvfs.kv.stats."
COUNTERS = ("get_hits", "get_misses", "lookup_hit_blocks", "lookup_miss_blocks", "puts", "puts_existing",
            "get_bytes", "put_bytes")


@dataclass
class RunPrefix:
    """``KVStore.runs_prefix``'s answer: leading blocks stored, the runs holding them (first, count), and
    where each run is (the backend's ``locate_many`` answer: native, its chunk map), which
    ``get_runs(locations=...)`` takes to skip looking the runs up again (a loader in another process
    too: they pickle)."""

    blocks: int
    runs: list[tuple[int, int]]
    locations: list[Any] = field(default_factory=list)


@dataclass
class RunRead:
    """``KVStore.get_runs``'s answer per run: leading blocks verified, the error that stopped it (None: all
    loaded, or a miss), and the tensor (the caller's ``out``, or a mapped chunk) holding them."""

    blocks: int
    error: BlockError | None
    data: Any


def _readonly_tensor(view: memoryview, dtype: Any, shape: Any) -> Any:
    """A tensor over read-only bytes (a mapped chunk), never written: torch would warn that it could be."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(shape)


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
        self._headers = CheckedHeaders(layout)  # headers of blocks read before: a byte compare, not a parse
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
        self._run_header_len: dict[tuple[int, int], int] = {}  # (blocks, hash length) -> payload offset
        self._verify_pool: ThreadPoolExecutor | None = None

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
        check_hashes(hashes)  # once for the batch: the paths below need no check of their own
        nbytes, base, target = self.layout.nbytes, self.dir, self.device_io.target
        for block_hash, out in zip(hashes, outs):
            if out is None:
                import torch

                out = torch.empty(self.layout.block_shape, dtype=self.layout.torch_dtype())
            header_len = self._header_len_for(block_hash)
            jobs.append(ReadJob(block_hash, f"{base}/{block_hash[:2]}/{block_hash}", header_len + nbytes, header_len,
                                target(out), touch_before))
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
        checksum (``verify``): the digest the backend computed as the bytes landed, where it did
        (``ReadResult.payload_xxh3``), else a hash of ``views``. Error handling: BlockError
        (``DigestMismatch`` for a digest that does not match: read the block again without one)."""
        header = self._headers.parse(res.head, block_hash, res.size)
        if not res.payload_done or res.size != header.header_len + header.payload_len:
            raise BlockError(f"KV block {block_hash}: file has {res.size} bytes, header says "
                             f"{header.header_len + header.payload_len}")
        if res.payload_xxh3 is not None:
            check_digest(header, res.payload_xxh3)  # whatever ``verify`` says: no chunk checksum was checked
        elif self.verify and views is not None:
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

    # ------------------------------------------------------------------ runs (kvfs.kv.run)

    def run_path(self, hashes: Sequence[str]) -> str:
        return f"{self.dir}/{check_hash(hashes[-1])[:2]}/{run_name(hashes)}"

    def put_runs(self, items: Sequence[tuple[Sequence[str], Any]]) -> list[bool]:
        """Store runs: per item the consecutive block hashes of one prefix and one tensor of shape
        ``(len(hashes), *layout.block_shape)``. Results and errors as for ``put_many``."""
        jobs = []
        for hashes, tensor in items:
            check_hashes(hashes)
            want = (len(hashes), *self.layout.block_shape)
            if tuple(tensor.shape) != want or tensor.dtype != self.layout.torch_dtype():
                raise ValueError(f"run of {len(hashes)} blocks: tensor {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"layout {self.layout.name} needs {want}")
            view = byte_view(tensor.detach().to("cpu").contiguous())
            header = encode_run_header(self.layout, hashes, packed_checksums(view, self.layout.nbytes))
            path = self.run_path(hashes)
            jobs.append((path.rpartition("/")[0], path.rpartition("/")[2], header, [view], self.check_existing))
        results = self.backend.put_many(jobs)
        written = [len(hashes) for (hashes, _), r in zip(items, results) if r is True]
        self._count(puts=len(written), puts_existing=sum(r is False for r in results),
                    put_bytes=self.layout.nbytes * sum(written))
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [bool(r) for r in results]

    def get_runs(self, runs: Sequence[Sequence[str]], outs: Sequence[Any], *, map_local: bool = False,
                 locations: Sequence[Any] | None = None) -> list[RunRead]:
        """Load runs into contiguous CPU tensors of shape ``(len(hashes), *layout.block_shape)``; per run a
        ``RunRead``: blocks verified from its first on, the error that stopped it, and the tensor holding
        them. A miss is ``RunRead(0, None, out)``; a run whose header is bad loads nothing; a corrupt block
        keeps the blocks before it. Every byte returned was checked against its block's checksum.

        ``map_local``: where the native client has a run's chunk on this host, ``data`` is a read-only
        view of the chunk file, mapped and locked in memory (``kvfs.chunkio.map_local_chunk``), instead of
        ``out``: no copy. Keep it only as long as needed (it pins page cache).
        ``locations``: ``runs_prefix``'s ``RunPrefix.locations`` for these runs, in order (through the
        native client the runs are then mapped or read from the lookup's chunk maps, with no metadata
        round trip of their own when ``verify`` is on: every byte is checked against the run's header and
        block sums anyway). With ``verify`` on, a run that is read (not mapped) has its header read first
        and each block checked against the header's sums as it lands in ``out`` (``Backend.read_many(
        payload_sums=...)``: one pass over the bytes; through the native client with ``locations``, from
        the run's chunk file on this host, with no thread hop but to the read pool). Error handling:
        ValueError for unfit ``outs`` or ``locations``; the first OSError is raised after every run was read."""
        if locations is not None and len(locations) != len(runs):
            raise ValueError("get_runs: one location per run")
        if len(outs) != len(runs):
            raise ValueError("get_runs: one out per run")
        touch_before = time.time_ns() - int(self.touch_interval * 1e9) if self.touch_interval >= 0 else 0
        jobs = []
        for hashes, out in zip(runs, outs):
            check_hashes(hashes)
            want = (len(hashes), *self.layout.block_shape)
            if (tuple(out.shape) != want or out.dtype != self.layout.torch_dtype() or out.device.type != "cpu"
                    or not out.is_contiguous()):
                raise ValueError(f"get_runs: out {tuple(out.shape)} {out.dtype} on {out.device}, needs a "
                                 f"contiguous CPU tensor {want} of {self.layout.dtype}")
            key = (len(hashes), len(hashes[-1]))
            header_len = self._run_header_len.get(key)
            if header_len is None:
                header_len = self._run_header_len[key] = run_header_len(self.layout, hashes)
            jobs.append((self.run_path(hashes), header_len + len(hashes) * self.layout.nbytes, header_len,
                         [byte_view(out)], touch_before))
        # Every byte loaded is checked below against the run's per-block sums: a mapped chunk need not be
        # hashed against its chunk checksums as well (with verify off, the backend checks chunks).
        headers: dict[int, RunHeader] = {}  # parsed by payload_sums, for _check_run

        def payload_sums(i: int, head: memoryview, size: int) -> tuple[bytes, int] | None:
            try:
                header = headers[i] = parse_run_header(head, self.layout, runs[i], size)
            except BlockError:
                return None  # reported by _check_run, which parses it again
            return header.sums, self.layout.nbytes

        reads = self.backend.read_many(jobs, map_local=map_local, caller_verifies=self.verify, locations=locations,
                                       payload_sums=payload_sums if self.verify else None)
        items = [(hashes, res, out, job[2], headers.get(i)) for i, (hashes, res, out, job) in
                 enumerate(zip(runs, reads, outs, jobs))]
        to_hash = sum(isinstance(res, ReadResult) and res.payload_checked is None for res in reads)
        checked = list(self._verifier().map(self._check_run, items)) if to_hash > 1 else [
            self._check_run(it) for it in items]
        good = sum(r.blocks for r in checked)
        self._count(get_hits=good, get_misses=sum(len(h) for h in runs) - good, get_bytes=good * self.layout.nbytes)
        for r in reads:
            if isinstance(r, OSError):
                raise r
        return checked

    def _check_run(self, item: tuple[Sequence[str], Any, Any, int, RunHeader | None]) -> RunRead:
        hashes, res, out, header_len, header = item
        if res is None or isinstance(res, BaseException):
            return RunRead(0, None, out)
        if header is None:
            try:
                header = parse_run_header(res.head, self.layout, hashes, res.size)
            except BlockError as exc:
                return RunRead(0, exc, out)
        if not res.payload_done:
            return RunRead(0, BlockError(f"KV run {run_name(hashes)}: payload not read"), out)
        if res.payload_checked is not None:  # checked as it landed (read_many(payload_sums=...))
            good = min(res.payload_checked, len(hashes))
            if good == len(hashes):
                return RunRead(good, None, out)
            return RunRead(good, BlockError(f"corrupt KV run {run_name(hashes)}: block {good} payload checksum "
                                            f"mismatch or short"), out)
        if res.mapped is not None:
            payload = res.mapped[header_len:header_len + header.payload_len]
            data = _readonly_tensor(payload, self.layout.torch_dtype(), out.shape)
        else:
            payload, data = byte_view(out), out
        bad = first_bad_block(payload, self.layout.nbytes, header.sums) if self.verify else -1
        if bad < 0:
            return RunRead(len(hashes), None, data)
        return RunRead(bad, BlockError(f"corrupt KV run {run_name(hashes)}: block {bad} payload checksum mismatch"),
                       data)

    def _verifier(self) -> ThreadPoolExecutor:
        """Threads for runs' checksums (the C helper hashes without the GIL)."""
        with self._stats_lock:
            if self._verify_pool is None:
                self._verify_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                       thread_name_prefix="kvfs-kv-run")
            return self._verify_pool

    def runs_prefix(self, hashes: Sequence[str], run_blocks: int, usable: int | None = None) -> RunPrefix:
        """How many of a prompt's blocks, from the first, are stored as runs (``kvfs.kv.run``), capped at
        ``usable``, and the runs that hold them. ``hashes``: every full block of the prompt (a run may end
        after ``usable``). At most two metadata round trips through the native client: the runs of the
        prompt's own alignment (up to the first missing one), then, for that run's place, the runs that end
        earlier (a shorter prompt's last run); through a directory, one stat per name asked. Through the
        native client these round trips return the runs' chunk maps too (``RunPrefix.locations``)."""
        usable = len(hashes) if usable is None else min(usable, len(hashes))
        check_hashes(hashes)
        spans = [sp for sp in run_spans(len(hashes), run_blocks) if sp[0] < usable]
        names = [self._run_entry(hashes[s:s + n]) for s, n in spans]
        # The runs found are about to be loaded: their accesses are recorded by the lookup where the
        # backend can (native: meta, in this round trip), and the load then records none of its own.
        touch = time.time_ns() - int(self.touch_interval * 1e9) if self.touch_interval >= 0 else 0
        where, lead = self.backend.locate_many(self.dir, names, True, touch) if names else ([], 0)
        found, locations = spans[:lead], where[:lead]
        if lead < len(spans):
            s, n = spans[lead]
            shorter = [self._run_entry(hashes[s:s + k]) for k in range(1, n)]
            # (No touch here: of the shorter runs only the longest found is loaded, and the load touches it.)
            where, _ = self.backend.locate_many(self.dir, shorter, False) if shorter else ([], 0)
            k = max((i + 1 for i, w in enumerate(where) if w is not None), default=0)
            if k:
                found.append((s, k))
                locations.append(where[k - 1])
        blocks = min(usable, sum(n for _, n in found))
        self._count(lookup_hit_blocks=blocks, lookup_miss_blocks=usable - blocks)
        return RunPrefix(blocks, found, locations)

    @staticmethod
    def _run_entry(hashes: Sequence[str]) -> str:
        return f"{hashes[-1][:2]}/{run_name(hashes)}"

    def delete_run(self, hashes: Sequence[str]) -> bool:
        """Remove one run; False if it was not there."""
        try:
            self.backend.remove(self.run_path(hashes))
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
        if self._verify_pool is not None:
            self._verify_pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
