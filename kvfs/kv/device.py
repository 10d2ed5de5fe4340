"""Landing KV block payloads where the caller's ``out`` tensors live: ``KVStore.get`` into GPU memory.

Every route reads the block's head (the header) into host memory and checks it the same way
(``KVStore._check``: magic, version, header checksum, layout, hash, file size); they differ in how the
payload reaches ``out``:

* **host** (CPU ``out``): the backend reads the payload straight into ``out``'s memory; the payload
  checksum is verified there, each block as it lands (the backend's ``on_ready``, in the thread that
  read it), while the rest of the batch is still being read. This is the path of ``kvfs.kv.store`` and ``posix``/``native``.
  Through the native client the payload is hashed as it lands, by the C call that reads it, and the
  chunk checksums are left unchecked (``Backend.read_many(payload_digest=True)``): each byte is hashed
  once; a block whose digest does not match is read again with the chunk checksums checked.
* **kvikio** (CUDA ``out``, kvikio importable): ``kvikio.CuFile.pread`` reads the payload from the
  block file (a directory store), or from the block's chunk files on this host (the native client,
  ``kvfs.chunkfiles``; only when asked for with ``device_io="kvikio"``, ENXIO if a chunk is elsewhere),
  straight into ``out`` (GPUDirect Storage where the system has it, else kvikio's
  POSIX compat mode through its own pinned bounce buffers; compat mode is always on for a FUSE path,
  ``kvfs.gds``). The payload's xxh3 is **not** recomputed: its bytes never sit in host memory where
  that is cheap. What still guards them: the header check, the file size, and, on the kvfs mount, the
  mount's client, which verifies every 64 KiB of every chunk it serves against the chunk checksums (a
  local-disk store and the native client's chunk files have no such check). Before writing, the device's current stream is synchronized
  (pending kernels may still use ``out``); kvikio's reads are complete when the call returns.
* **staged** (any ``out``): the payload is read into a reusable host staging buffer (pinned when CUDA
  is available), verified there exactly as on the host route, then copied into ``out``: for CUDA, with
  ``copy_(non_blocking=True)`` on a side stream that first waits for the caller's current stream; the
  call synchronizes before it returns. Each block is verified and its copy started as soon as it has
  landed, in the thread that read it (the backend's ``on_ready``), so copies overlap the reads of the
  rest of the batch; blocks under ``OVERLAP_COPIES_FROM`` bytes are instead copied together by the calling
  thread once their window has landed (a copy of a small block is shorter than the per-copy costs the
  reader threads would pay for it: CUDA stream switch and event record under the GIL). A batch is read
  in windows of ``concurrency`` blocks (concurrent within a window), so staging memory is at most ``2 x concurrency`` blocks per ``get_many`` call in flight;
  buffers are reused across calls and freed by ``KVStore.close``. Works with both backends (the native
  client reads straight into the staging buffer).

``KVStore(device_io=...)`` picks, per block, by its ``out`` tensors' device (``choose_route``):

* ``"auto"`` (default): CPU -> host. CUDA -> kvikio if the store is a directory, kvikio imports and
  skipping the payload checksum gives nothing up (``verify=False``, or the root is on a kvfs mount,
  whose client verifies every byte); else staged. So the default never drops a check that nothing
  else makes.
* ``"kvikio"``: CUDA -> kvikio always (payload not re-verified, as above), with a client too (its chunk
  files); CPU -> host. ImportError at construction if kvikio does not import.
* ``"staged"``: every block staged, CPU ``out`` too (a plain copy): the same code path with or without a
  GPU, which is how CI tests it.

kvikio's process-wide thread pool is raised to ``concurrency`` threads on first use if it is smaller
(its default is 1, which would serialize every block's read).

Error handling: ValueError for ``out`` tensors of the wrong count, shape or dtype, non-contiguous, on a
device other than CPU or CUDA, or spread over several devices (TypeError for a non-tensor); OSError
(EIO) for a kvikio I/O failure (a miss if the block is gone), (ESTALE) if the file was replaced between
the header read and kvikio's open.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvfs.chunkfiles import ChunkFiles, OpenFileCache
from kvfs.gds import is_kvfs_mount, kvikio_available, kvikio_settings, wait_all
from kvfs.kv.backend import Backend, ReadResult
from kvfs.kv.block import BlockError, DigestMismatch, byte_view, check_tensors
from kvfs.kv.layout import KVLayout

HOST, KVIKIO, STAGED = "host", "kvikio", "staged"
DEVICE_IO = ("auto", KVIKIO, STAGED)

_kvikio_open = threading.Lock()  # kvikio reads its compat mode from process-wide defaults when a file opens


def choose_route(device_io: str, device_type: str, *, directory: bool, kvikio_ok: bool, verify: bool,
                 verified_in_transit: bool) -> str:
    """The route for one block's ``out`` (see the module docstring). ``verified_in_transit``: the store's
    files are read through a client that checksums every byte (the kvfs mount)."""
    if device_io == STAGED:
        return STAGED
    if device_type == "cpu":
        return HOST
    if device_io == KVIKIO:
        return KVIKIO
    if directory and kvikio_ok and (not verify or verified_in_transit):
        return KVIKIO
    return STAGED


@dataclass
class Target:
    out: Any  # what get returns for this block
    tensors: list[Any]  # ``out`` as a list of contiguous tensors in payload order
    device: Any  # their torch.device
    route: str
    views: list[memoryview] | None  # host route: byte views of ``tensors``


@dataclass
class ReadJob:
    block_hash: str
    path: str
    expect_size: int
    header_len: int
    target: Target
    touch_before_ns: int


Check = Callable[[str, ReadResult, list[memoryview] | None], None]  # KVStore._check: raises BlockError


def out_tensors(layout: KVLayout, out: Any) -> tuple[list[Any], Any]:
    """``out``'s tensors in payload order and their device. Error handling: ValueError (see module)."""
    items = check_tensors(layout, out)
    dev = items[0].device
    for i, t in enumerate(items):
        if t.device != dev:
            raise ValueError(f"out tensor {i} is on {t.device} but tensor 0 on {dev}: one block's tensors "
                             f"must share a device")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"out tensor {i} is on {t.device}: KVStore.get reads into CPU or CUDA tensors")
        if not t.is_contiguous():
            raise ValueError(f"out tensor {i} is not contiguous")
    return items, dev


def _bytes(t: Any) -> Any:
    """A contiguous tensor's bytes as a flat uint8 tensor on its device (a view, no copy)."""
    import torch

    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


@dataclass
class _Staging:
    tensor: Any  # uint8, one payload
    view: memoryview


# Staged blocks this large or larger are copied as each lands, overlapping the batch's other reads; smaller
# ones after their window (on the GPU host, 2 MiB blocks: the host route + one copy per batch was 1.3x
# the per-block copies, while at 32 MiB the overlap won: docs/benchmarks.md, session 8 on the GPU host).
OVERLAP_COPIES_FROM = 8 << 20


class StagingPool:
    """Reusable host buffers of one block's payload, pinned when CUDA is available (so host-to-device
    copies are asynchronous DMA). Holds what concurrent calls needed at once; ``close`` frees them."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list[_Staging] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> list[_Staging]:
        with self._lock:
            got = self._free[len(self._free) - min(n, len(self._free)):]
            del self._free[len(self._free) - len(got):]
        while len(got) < n:
            import torch

            t = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            got.append(_Staging(t, byte_view(t)))
        return got

    def give(self, bufs: Sequence[_Staging]) -> None:
        with self._lock:
            self._free.extend(bufs)

    def __len__(self) -> int:
        return len(self._free)

    def close(self) -> None:
        with self._lock:
            self._free.clear()


class DeviceIO:
    """One store's routes: turns ``out`` arguments into ``Target``s and reads batches of them."""

    def __init__(self, device_io: str, root: str, layout: KVLayout, *, directory: bool, verify: bool,
                 concurrency: int):
        if device_io not in DEVICE_IO:
            raise ValueError(f"device_io must be one of {', '.join(map(repr, DEVICE_IO))}, not {device_io!r}")
        if device_io == KVIKIO:
            try:
                import kvikio  # noqa: F401
            except Exception as exc:  # ImportError, or a missing libcufile/libcudart underneath
                raise ImportError(f"device_io='kvikio' needs the kvikio package (pip install kvikio-cu13, or "
                                  f"kvikio-cu12 for CUDA 12), which does not import here: {exc}") from exc
        self.mode = device_io
        self.root = root
        self.layout = layout
        self.directory = directory
        self.verify = verify
        self.window = max(1, concurrency)
        self.pool = StagingPool(layout.nbytes)
        self._kvikio_threads_set = False
        self._chunk_files: OpenFileCache | None = None  # the native client's chunk files, open in kvikio
        self._verifier: ThreadPoolExecutor | None = None  # checks a batch's payloads in parallel
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: device -> side stream for staged copies
        self._routes: dict[str, str] = {}  # device type -> route_for's answer (fixed once resolved)
        self._block_shape = layout.block_shape

    # ------------------------------------------------------------------ choosing (resolved on first use)

    @functools.cached_property
    def kvikio_ok(self) -> bool:
        """The kvikio route is possible: a directory store and kvikio imports."""
        return self.mode == KVIKIO or (self.directory and kvikio_available())

    @functools.cached_property
    def verified_in_transit(self) -> bool:
        """The store's files are read through the kvfs mount, whose client checksums every byte it serves."""
        return self.directory and is_kvfs_mount(self.root)

    @functools.cached_property
    def _kvikio_settings(self) -> dict[str, Any]:
        return kvikio_settings(self.root)  # compat mode "on" on a FUSE mount

    @functools.cached_property
    def _dtype(self) -> Any:
        return self.layout.torch_dtype()  # imports torch: not at construction

    def route_for(self, device_type: str) -> str:
        """The route a block whose ``out`` is on a ``device_type`` ("cpu", "cuda") device takes."""
        if device_type == "cpu" or self.mode == STAGED:
            return choose_route(self.mode, device_type, directory=self.directory, kvikio_ok=False,
                                verify=self.verify, verified_in_transit=False)
        return choose_route(self.mode, device_type, directory=self.directory, kvikio_ok=self.kvikio_ok,
                            verify=self.verify, verified_in_transit=self.verified_in_transit)

    def target(self, out: Any) -> Target:
        import torch

        # The common ``out``, one contiguous CPU or CUDA tensor of the block's shape, checked inline (a
        # get_many makes one target per block); anything else through the general checks.
        if (isinstance(out, torch.Tensor) and out.shape == self._block_shape and out.dtype == self._dtype
                and out.is_contiguous() and out.device.type in ("cpu", "cuda")):
            tensors, dev = [out], out.device
        else:
            tensors, dev = out_tensors(self.layout, out)
        route = self._routes.get(dev.type)
        if route is None:
            route = self._routes[dev.type] = self.route_for(dev.type)
        views = [byte_view(t) for t in tensors] if route == HOST else None
        return Target(out, tensors, dev, route, views)

    # ------------------------------------------------------------------ reading

    def read_many(self, backend: Backend, jobs: Sequence[ReadJob], check: Check) -> list[Any]:
        """Read every job's block into its target; per job the target's ``out`` (a hit), None (a miss) or
        the exception (an OSError from the backend, a BlockError from ``check``).

        Verified routes ask the backend for payload digests (``Backend.read_many(payload_digest=True)``):
        each payload byte is then hashed once, as it lands, and compared with the block's own checksum,
        instead of once against the chunk checksums and once more here. A block whose digest does not
        match is read again the checked way (chunk checksums: a bad replica fails over)."""
        results = self._read_routes(backend, jobs, check, self.verify)
        again = [i for i, r in enumerate(results) if isinstance(r, DigestMismatch)]
        if again:
            for i, r in zip(again, self._read_routes(backend, [jobs[i] for i in again], check, False)):
                results[i] = r
        return results

    def _read_routes(self, backend: Backend, jobs: Sequence[ReadJob], check: Check, digest: bool) -> list[Any]:
        """``read_many``'s one pass: the direct routes (host, kvikio) in one backend call, then the staged
        one in windows. ``digest``: ask the backend for payload digests."""
        results: list[Any] = [None] * len(jobs)
        direct = [i for i, j in enumerate(jobs) if j.target.route != STAGED]
        if direct:
            self._before_kvikio([jobs[i].target for i in direct])
            seen = [False] * len(direct)

            def ready(k: int, res: Any) -> None:
                # A host-route block is checked as it lands, in the thread that read it, while the rest of
                # the batch is still being read.
                job = jobs[direct[k]]
                if job.target.route == HOST:
                    results[direct[k]] = _finish_guarded(check, job, res, job.target.views)
                    seen[k] = True

            reads = backend.read_many([self._direct_args(jobs[i]) for i in direct], ready, payload_digest=digest)
            rest = [k for k in range(len(direct)) if not seen[k]]  # kvikio, or a backend that did not report
            done = self._finish_all(check, [(jobs[direct[k]], reads[k], jobs[direct[k]].target.views) for k in rest])
            for k, r in zip(rest, done):
                results[direct[k]] = r
        staged = [i for i, j in enumerate(jobs) if j.target.route == STAGED]
        if staged:
            for i, r in zip(staged, self._read_staged(backend, [jobs[i] for i in staged], check, digest)):
                results[i] = r
        return results

    def _direct_args(self, job: ReadJob) -> tuple:
        t = job.target
        if t.route == HOST:
            return (job.path, job.expect_size, job.header_len, t.views, job.touch_before_ns)
        path, tensors = job.path, t.tensors

        def land(src: int | ChunkFiles, offset: int) -> int:
            if isinstance(src, ChunkFiles):  # the native client: the block's chunk files on this host
                return self._kvikio_chunks(src, offset, tensors)
            return self._kvikio_read(path, src, offset, tensors)

        return (job.path, job.expect_size, job.header_len, [], job.touch_before_ns, land)

    def _before_kvikio(self, targets: Sequence[Target]) -> None:
        devices = {t.device for t in targets if t.route == KVIKIO}
        if not devices:
            return
        import kvikio.defaults
        import torch

        if not self._kvikio_threads_set:
            if kvikio.defaults.get("num_threads") < self.window:
                kvikio.defaults.set("num_threads", self.window)
            self._kvikio_threads_set = True
        for dev in devices:  # kernels queued on the caller's stream may still read the out tensors
            torch.cuda.current_stream(dev).synchronize()

    def _kvikio_read(self, path: str, fd: int, offset: int, tensors: Sequence[Any]) -> int:
        import kvikio
        import kvikio.defaults

        try:
            with _kvikio_open, kvikio.defaults.set(self._kvikio_settings):
                cf = kvikio.CuFile(path, "r")
        except OSError:
            raise
        except Exception as exc:  # kvikio reports system errors as RuntimeError
            raise OSError(errno.EIO, f"kvikio could not open {path}: {exc}") from exc
        with cf:
            a, b = os.fstat(fd), os.fstat(cf.fileno())
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                raise OSError(errno.ESTALE, f"{path} was replaced while it was read")
            return self._pread_tensors(cf, offset, tensors, path)

    def _kvikio_chunks(self, chunks: ChunkFiles, offset: int, tensors: Sequence[Any]) -> int:
        """kvikio reads of a block's payload from its chunk files (kvfs.chunkfiles) into ``tensors``;
        the files stay open across calls (``OpenFileCache``), closed by ``close``."""
        with self._lock:
            if self._chunk_files is None:
                import kvikio
                import kvikio.defaults

                # Chunk directories are local disks: the settings are resolved once, not per file.
                settings = kvikio_settings(chunks.first_path or chunks.name)

                def open_file(p: str) -> Any:
                    with _kvikio_open, kvikio.defaults.set(settings):
                        return kvikio.CuFile(p, "r")

                self._chunk_files = OpenFileCache(open_file)
        chunks.open_file = self._chunk_files
        return self._pread_tensors(chunks, offset, tensors, chunks.first_path or chunks.name)

    @staticmethod
    def _pread_tensors(f: Any, offset: int, tensors: Sequence[Any], what: str) -> int:
        """``f.pread`` (kvikio's shape) of consecutive payload bytes from ``offset`` into each tensor."""
        futures = []
        pos = offset
        for t in tensors:
            n = t.numel() * t.element_size()
            futures.append(f.pread(_bytes(t), n, pos))
            pos += n
        return wait_all(futures, f"kvikio read of {what}")

    def _read_staged(self, backend: Backend, jobs: Sequence[ReadJob], check: Check, digest: bool) -> list[Any]:
        w = self.window
        bufs = self.pool.take(min(len(jobs), 2 * w))
        copied: list[list[Any]] = [[] for _ in bufs]  # per buffer: CUDA events of the copies out of it
        pending: list[Any] = []  # every copy's event: waited for before returning
        after = self._caller_events(jobs)
        lock = threading.Lock()
        results: list[Any] = []
        overlap = self.pool.nbytes >= OVERLAP_COPIES_FROM
        try:
            for start in range(0, len(jobs), w):
                window = jobs[start:start + w]
                idx = [(start + k) % len(bufs) for k in range(len(window))]
                for b in idx:
                    for ev in copied[b]:
                        ev.synchronize()  # the copy out of this buffer two windows ago is done
                    copied[b] = []
                done: list[Any] = [None] * len(window)
                seen = [False] * len(window)

                def ready(k: int, res: Any, window=window, idx=idx, done=done, seen=seen) -> None:
                    # As each block lands (in the thread that read it): verify it, start its copy.
                    j, b = window[k], idx[k]
                    seen[k] = True
                    r = _finish_guarded(check, j, res, [bufs[b].view])
                    if r is j.target.out and overlap:
                        try:
                            ev = self._copy(bufs[b].tensor, j.target, after)
                            if ev is not None:
                                with lock:
                                    copied[b].append(ev)
                                    pending.append(ev)
                        except Exception as exc:  # noqa: BLE001  (reported in the block's slot)
                            r = exc
                    done[k] = r

                reads = backend.read_many([(j.path, j.expect_size, j.header_len, [bufs[b].view], j.touch_before_ns)
                                           for j, b in zip(window, idx)], ready, payload_digest=digest)
                for k, res in enumerate(reads):
                    if not seen[k]:  # a backend that did not report this one as it landed
                        ready(k, res)
                if not overlap:
                    self._copy_window(window, idx, bufs, done, after, copied, pending)
                results += done
        finally:
            for ev in pending:
                ev.synchronize()
            self.pool.give(bufs)
        return results

    def _copy_window(self, window: Sequence[ReadJob], idx: list[int], bufs: list[_Staging], done: list[Any],
                     after: dict[Any, Any], copied: list[list[Any]], pending: list[Any]) -> None:
        """The non-overlapped copies: every verified block of a landed window, from this thread, one CUDA
        event per device for the lot (each buffer waits on it before its next reuse)."""
        events: dict[Any, Any] = {}
        for k, (j, b) in enumerate(zip(window, idx)):
            if done[k] is not j.target.out:
                continue
            try:
                self._copy(bufs[b].tensor, j.target, after, record=False)
            except Exception as exc:  # noqa: BLE001  (reported in the block's slot)
                done[k] = exc
                continue
            if j.target.device.type == "cuda":
                events.setdefault(j.target.device, []).append(b)
        for dev, used in events.items():
            ev = self._record(dev)
            pending.append(ev)
            for b in used:
                copied[b].append(ev)

    def _caller_events(self, jobs: Sequence[ReadJob]) -> dict[Any, Any]:
        """Per CUDA device of ``jobs``: an event on the caller's current stream. Copies (from reader
        threads, on their own streams) wait for it: kernels the caller queued may still use ``out``."""
        devices = {j.target.device for j in jobs if j.target.device.type == "cuda"}
        if not devices:
            return {}
        import torch

        events = {}
        for dev in devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            events[dev] = ev
        return events

    def _copy(self, src: Any, target: Target, after: dict[Any, Any], record: bool = True) -> Any:
        """Copy one staged payload into ``target``'s tensors; for CUDA, on this thread's side stream
        after ``after[device]``, returning the event after the copies (``record=False``: None, the
        caller records one for several copies with ``_record``)."""
        import torch

        if target.device.type == "cpu":
            pos = 0
            for t in target.tensors:
                dst = _bytes(t)
                dst.copy_(src[pos:pos + dst.numel()])
                pos += dst.numel()
            return None
        with torch.cuda.device(target.device):
            s = self._side_stream(target.device)
            s.wait_event(after[target.device])
            with torch.cuda.stream(s):
                pos = 0
                for t in target.tensors:
                    dst = _bytes(t)
                    dst.copy_(src[pos:pos + dst.numel()], non_blocking=True)
                    pos += dst.numel()
                if not record:
                    return None
                ev = torch.cuda.Event()
                ev.record(s)
        return ev

    def _side_stream(self, device: Any) -> Any:
        """This thread's stream for staged copies to ``device``."""
        import torch

        per_thread = self._local.__dict__.setdefault("streams", {})
        s = per_thread.get(device)
        if s is None:
            s = per_thread[device] = torch.cuda.Stream(device)
        return s

    def _record(self, device: Any) -> Any:
        """An event after everything this thread queued on its side stream to ``device``."""
        import torch

        with torch.cuda.device(device):
            ev = torch.cuda.Event()
            ev.record(self._side_stream(device))
        return ev

    def _finish_all(self, check: Check, items: list[tuple[ReadJob, Any, list[memoryview] | None]]) -> list[Any]:
        """``_finish`` for every read block; payload checksums of a batch on threads (xxh3 runs without
        the GIL), so verifying 8 blocks takes about as long as verifying one."""
        if not (self.verify and len(items) > 1 and sum(views is not None for _, _, views in items) > 1):
            return [_finish(check, *it) for it in items]
        with self._lock:
            if self._verifier is None:
                self._verifier = ThreadPoolExecutor(max_workers=self.window, thread_name_prefix="kvfs-kv-verify")
        return list(self._verifier.map(lambda it: _finish(check, *it), items))

    def close(self) -> None:
        self.pool.close()
        if self._chunk_files is not None:
            self._chunk_files.close()
        with self._lock:
            verifier, self._verifier = self._verifier, None
        if verifier is not None:
            verifier.shutdown(wait=True)


def _finish_guarded(check: Check, job: ReadJob, res: ReadResult | None | BaseException,
                    views: list[memoryview] | None) -> Any:
    """``_finish`` for a backend's ``on_ready``, which must not raise: any error lands in the block's slot."""
    try:
        return _finish(check, job, res, views)
    except Exception as exc:  # noqa: BLE001
        return exc


def _finish(check: Check, job: ReadJob, res: ReadResult | None | BaseException,
            views: list[memoryview] | None) -> Any:
    if res is None or isinstance(res, BaseException):
        return res
    try:
        check(job.block_hash, res, views)
    except BlockError as exc:
        return exc
    return job.target.out
