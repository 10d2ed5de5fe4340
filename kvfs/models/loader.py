"""Load safetensors models into torch tensors on the CPU or a CUDA device.

How a load runs:

1. **Resolve** the path: one ``.safetensors`` file, a ``*.safetensors.index.json`` (sharded model), or
   a directory holding either. Headers are read and validated (``kvfs.models.header``).
2. **Plan**: the requested tensors' byte ranges are cut on a fixed grid of ``span_bytes`` spans aligned to
   the reader's ``alignment`` (a page locally, a chunk through the client). Each span is one large read
   covering many tensors (or part of a big one); each tensor gets its own storage, like
   ``safetensors.torch.load_file`` returns. Never one small read per tensor.
3. **Execute**, spans in parallel on ``threads`` threads, by target:

   * CPU: one ``preadv`` per span scatters the bytes straight into the tensors' storage (gaps such as
     the header go to a scratch buffer): no copy after the read.
   * CUDA, pinned pipeline (``use_kvikio=False``, or kvikio not importable): each span is read into one of ``pinned_buffers`` pinned host
     buffers, then copied to the tensors with ``cudaMemcpyAsync`` (``copy_(non_blocking=True)``) on the
     thread's own stream; a buffer is reused once its copy event has completed. Pinned host memory is
     bounded by ``pinned_buffers * span_bytes``.
   * CUDA, kvikio (the default when kvikio imports and every path is local or mounted):
     ``kvikio.CuFile.pread`` reads spans straight into device staging buffers (GPUDirect Storage where
     the system has it, kvikio's POSIX compat mode elsewhere, always on a FUSE mount), then
     device-to-device copies slice the tensors out. Through the client library only when asked
     (``use_kvikio=True``): kvikio then reads the file's chunk files on this host (``kvfs.chunkfiles``),
     and those bytes are **not** checked against the chunk checksums, which every other route does.

Error handling: malformed files raise ``SafetensorsError`` (a ``ValueError``) naming the file and the
problem; I/O failures raise ``OSError``; a missing tensor raises ``KeyError``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import torch

from kvfs.gds import kvikio_available, kvikio_settings
from kvfs.models.header import PREFIX, Header, SafetensorsError, TensorInfo, header_length, parse_header
from kvfs.models.reader import PAGE, ClientSource, LocalSource, RangeReader, Source

if TYPE_CHECKING:
    from kvfs.client import SyncClient

log = logging.getLogger("kvfs.models")

INDEX_SUFFIX = ".safetensors.index.json"
MiB = 1 << 20


@dataclass
class LoadOptions:
    """Tuning knobs. The defaults suit a local NVMe/page cache and a kvfs mount."""

    span_bytes: int = 16 * MiB  # one read; rounded up to the reader's alignment
    threads: int = field(default_factory=lambda: min(16, max(4, os.cpu_count() or 4)))
    # GPU pipeline: pinned host memory is at most pinned_buffers * span_bytes (256 MiB by default). Buffers
    # are pinned on first use, and pinning costs about 0.5 s per GiB, so a first load favours small spans.
    pinned_buffers: int = 16
    # CPU target: back tensors of 2 MiB and more with transparent huge pages (private anonymous mmap +
    # MADV_HUGEPAGE): fewer page faults while filling fresh memory (1.2-1.7x faster CPU loads measured,
    # docs/benchmarks.md). Off by default: where the kernel must compact memory first, faults can stall.
    hugepages: bool = False
    # None: kvikio for CUDA targets when importable and the path is local or mounted. True also through the
    # client (chunk files on this host, unverified: kvfs.chunkfiles); never chosen automatically there.
    use_kvikio: bool | None = None
    # kvikio knobs, set for the duration of a load (its defaults: 1 thread, 4 MiB tasks, 1 MiB GDS
    # threshold, 16 MiB bounce buffers).
    kvikio_threads: int = 16
    kvikio_task_size: int = 16 * MiB
    kvikio_gds_threshold: int = 1 * MiB  # reads smaller than this always use the POSIX path
    kvikio_bounce_buffer_size: int = 16 * MiB  # pinned, one per kvikio thread in compat mode
    kvikio_span_bytes: int = 256 * MiB  # a kvikio pread is split into task_size tasks over its threads
    kvikio_inflight: int = 2  # device staging buffers of kvikio_span_bytes (512 MiB of GPU memory in a load)
    kvikio_compat_mode: str | None = None  # "on" | "off" | "auto"; None: "on" for FUSE paths, else "auto"


class Progress:
    """Callbacks a caller (the CLI's progress bars) gets during a load. Called from worker threads."""

    def start(self, files: list[tuple[str, int]]) -> None:
        """``files``: (name, bytes to load) for each file, in order."""

    def advance(self, name: str, nbytes: int) -> None: ...

    def finish(self) -> None: ...


# --------------------------------------------------------------------------- resolving paths and headers


def read_header(reader: RangeReader) -> Header:
    """Read and validate the header of ``reader``'s file (one read for a header under 64 KiB)."""
    first = bytearray(min(reader.size, 64 << 10))
    if first:
        reader.readv_into(0, [memoryview(first)])
    n = header_length(reader.name, bytes(first[:PREFIX]), reader.size)
    if PREFIX + n > len(first):
        rest = bytearray(PREFIX + n - len(first))
        reader.readv_into(len(first), [memoryview(rest)])
        first += rest
    return parse_header(reader.name, bytes(first[: PREFIX + n]), reader.size)


def _parse_index(source: Source, index_path: str) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    try:
        doc = json.loads(source.read_bytes(index_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SafetensorsError(f"{index_path}: index is not valid JSON ({exc})") from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise SafetensorsError(f"{index_path}: index has no weight_map of tensor name -> file name")
    for fname in set(wmap.values()):
        if "/" in fname or fname in ("", ".", ".."):
            raise SafetensorsError(f"{index_path}: weight_map names file {fname!r} outside the model directory")
    base = source.dirname(index_path)
    files = [source.join(base, f) for f in dict.fromkeys(sorted(wmap.values()))]
    weight_map = {name: source.join(base, f) for name, f in wmap.items()}
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return files, weight_map, meta


def resolve_files(source: Source, path: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of ``path`` and, for a sharded model, its weight map (name -> file)."""
    if source.is_dir(path):
        names = source.listdir(path)
        indexes = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
        if indexes:
            pick = "model" + INDEX_SUFFIX if "model" + INDEX_SUFFIX in indexes else indexes[0]
            files, wmap, _ = _parse_index(source, source.join(path, pick))
            return files, wmap
        files = sorted(n for n in names if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors file or {INDEX_SUFFIX} in directory")
        return [source.join(path, f) for f in files], None
    if path.endswith(".json"):
        files, wmap, _ = _parse_index(source, path)
        return files, wmap
    return [path], None


@dataclass
class _File:
    path: str
    reader: RangeReader
    header: Header


def _open_files(source: Source, paths: list[str], weight_map: dict[str, str] | None) -> list[_File]:
    out: list[_File] = []
    try:
        for p in paths:
            reader = source.open(p)
            out.append(_File(p, reader, Header(p, 0, 0, {}, None)))
            out[-1].header = read_header(reader)
        seen: dict[str, str] = {}
        for f in out:
            for name in f.header.tensors:
                if name in seen:
                    raise SafetensorsError(f"{f.path}: tensor {name!r} also in {seen[name]}")
                seen[name] = f.path
        if weight_map is not None:
            for name, p in weight_map.items():
                if seen.get(name) != p:
                    raise SafetensorsError(f"{p}: weight_map lists tensor {name!r} but the file does not hold it")
        return out
    except BaseException:
        for f in out:
            f.reader.close()
        raise


# --------------------------------------------------------------------------- planning


@dataclass
class _Piece:
    tensor: str
    t_off: int  # offset inside the tensor's bytes
    s_off: int  # offset inside the span
    n: int


@dataclass
class _Span:
    file: _File
    offset: int
    length: int
    pieces: list[_Piece]


def plan_spans(file: _File, tensors: Iterable[TensorInfo], span_bytes: int) -> list[_Span]:
    """Cut the tensors' bytes into aligned spans of at most ``span_bytes`` (rounded to the alignment)."""
    align = max(1, file.reader.alignment)
    step = max(align, (span_bytes + align - 1) // align * align)
    by_cell: dict[int, list[_Piece]] = {}
    for t in sorted(tensors, key=lambda t: t.begin):
        pos = t.begin
        while pos < t.end:
            cell = pos // step
            end = min(t.end, (cell + 1) * step)
            by_cell.setdefault(cell, []).append(_Piece(t.name, pos - t.begin, pos, end - pos))
            pos = end
    spans = []
    for cell, pieces in sorted(by_cell.items()):
        start = max(cell * step, pieces[0].s_off // align * align)
        stop = min((cell + 1) * step, file.header.file_size,
                   (pieces[-1].s_off + pieces[-1].n + align - 1) // align * align)
        for p in pieces:
            p.s_off -= start
        spans.append(_Span(file, start, stop - start, pieces))
    return spans


# --------------------------------------------------------------------------- executing


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _memview(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor's bytes (the tensor must outlive it)."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


class _Scratch(threading.local):
    buf: bytearray | None = None

    def view(self, n: int) -> memoryview:
        if self.buf is None or len(self.buf) < n:
            self.buf = bytearray(n)
        return memoryview(self.buf)[:n]


def _run_parallel(fn: Callable[[_Span], None], spans: list[_Span], threads: int) -> None:
    if threads <= 1 or len(spans) <= 1:
        for s in spans:
            fn(s)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(spans)), thread_name_prefix="kvfs-load") as pool:
        futures = [pool.submit(fn, s) for s in spans]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _load_cpu(spans: list[_Span], out: dict[str, torch.Tensor], opts: LoadOptions,
              progress: Progress | None) -> None:
    views = {name: _memview(_byte_view(t)) for name, t in out.items()}
    scratch = _Scratch()

    def one(span: _Span) -> None:
        bufs: list[memoryview] = []
        pos = 0
        gap = max((p.s_off - (span.pieces[i - 1].s_off + span.pieces[i - 1].n) if i else p.s_off)
                  for i, p in enumerate(span.pieces))
        gap = max(gap, span.length - span.pieces[-1].s_off - span.pieces[-1].n)
        junk = scratch.view(gap) if gap else memoryview(b"")
        for p in span.pieces:
            if p.s_off > pos:
                bufs.append(junk[: p.s_off - pos])
            bufs.append(views[p.tensor][p.t_off: p.t_off + p.n])
            pos = p.s_off + p.n
        if span.length > pos:
            bufs.append(junk[: span.length - pos])
        span.file.reader.readv_into(span.offset, bufs)
        if progress is not None:
            progress.advance(span.file.path, sum(p.n for p in span.pieces))

    _run_parallel(one, spans, opts.threads)


def _load_cuda_pinned(spans: list[_Span], out: dict[str, torch.Tensor], device: torch.device,
                      opts: LoadOptions, progress: Progress | None) -> None:
    dst = {name: _byte_view(t) for name, t in out.items()}
    size = max(s.length for s in spans)
    nbuf = max(1, min(opts.pinned_buffers, len(spans)))
    # Buffers are pinned lazily by the workers that need one, so pinning (a few GB/s) overlaps other
    # workers' reads and copies instead of delaying the first read.
    pool: queue.Queue[tuple[torch.Tensor, memoryview, torch.cuda.Event | None]] = queue.Queue()
    created = [0]
    pool_lock = threading.Lock()

    def take() -> tuple[torch.Tensor, memoryview, torch.cuda.Event | None]:
        try:
            return pool.get_nowait()
        except queue.Empty:
            pass
        with pool_lock:
            make = created[0] < nbuf
            created[0] += make
        if not make:
            return pool.get()
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return host, _memview(host), None

    local = threading.local()
    streams: list[torch.cuda.Stream] = []
    lock = threading.Lock()

    def stream() -> torch.cuda.Stream:
        s = getattr(local, "stream", None)
        if s is None:
            s = local.stream = torch.cuda.Stream(device)
            with lock:
                streams.append(s)
        return s

    def one(span: _Span) -> None:
        host, view, done = take()
        try:
            if done is not None:
                done.synchronize()  # the last copies out of this buffer have finished
            span.file.reader.readv_into(span.offset, [view[: span.length]])
            s = stream()
            with torch.cuda.stream(s):
                for p in span.pieces:
                    dst[p.tensor][p.t_off: p.t_off + p.n].copy_(host[p.s_off: p.s_off + p.n], non_blocking=True)
                done = torch.cuda.Event()
                done.record(s)
        finally:
            pool.put((host, view, done))
        if progress is not None:
            progress.advance(span.file.path, sum(p.n for p in span.pieces))

    try:
        _run_parallel(one, spans, min(opts.threads, nbuf))
    finally:
        for s in streams:
            s.synchronize()


def kvikio_config(opts: LoadOptions, path: str) -> dict[str, Any]:
    """The ``kvikio.defaults.set`` settings for loading ``path`` with ``opts`` (kvfs.gds)."""
    return kvikio_settings(path, compat_mode=opts.kvikio_compat_mode, num_threads=opts.kvikio_threads,
                           task_size=opts.kvikio_task_size, gds_threshold=opts.kvikio_gds_threshold,
                           bounce_buffer_size=opts.kvikio_bounce_buffer_size)


def _load_cuda_kvikio(files: list[_File], out: dict[str, torch.Tensor], names: dict[str, list[str]],
                      device: torch.device, opts: LoadOptions, progress: Progress | None) -> None:
    import kvikio

    dst = {name: _byte_view(t) for name, t in out.items()}
    for f in files:
        spans = plan_spans(f, (f.header.tensors[n] for n in names[f.path]), opts.kvikio_span_bytes)
        if not spans:
            continue
        if f.reader.local_path is not None:
            path, opened = f.reader.local_path, lambda p=f.reader.local_path: kvikio.CuFile(p, "r")
        else:
            # Through the client: kvikio reads the file's chunk files on this host (kvfs.chunkfiles;
            # those reads skip the chunk checksums, which is why this is never the automatic choice).
            chunks = getattr(f.reader, "chunk_files", lambda _open: None)(lambda p: kvikio.CuFile(p, "r"))
            if chunks is None:
                raise ValueError(f"{f.path}: kvikio through the client needs every chunk on this host; "
                                 f"load it with use_kvikio=False (verified reads over the network)")
            path, opened = chunks.first_path or f.path, lambda c=chunks: c
        _kvikio_file(f.path, path, opened, spans, dst, device, opts, progress)


def _kvikio_file(name: str, path: str, opened: Callable[[], Any], spans: list[_Span], dst: dict[str, torch.Tensor],
                 device: torch.device, opts: LoadOptions, progress: Progress | None) -> None:
    """Read ``spans`` of one file with kvikio into rotating device staging buffers, slice tensors out.
    ``opened()`` gives what to read from (a ``kvikio.CuFile``, or ``ChunkFiles`` of kvikio files)."""
    import kvikio.defaults

    size = max(s.length for s in spans)
    k = max(1, min(opts.kvikio_inflight, len(spans)))
    staging = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(k)]
    copied: list[torch.cuda.Event | None] = [None] * k
    stream = torch.cuda.Stream(device)
    inflight: list[Any] = []
    with kvikio.defaults.set(kvikio_config(opts, path)), opened() as cf:

        def submit(i: int) -> None:
            ev = copied[i % k]
            if ev is not None:
                ev.synchronize()  # the copies out of this staging buffer are done
            s = spans[i]
            inflight.append(cf.pread(staging[i % k][: s.length], s.length, s.offset))

        try:
            for i in range(k):
                submit(i)
            for i, s in enumerate(spans):
                got = inflight.pop(0).get()
                if got != s.length:
                    raise OSError(errno.EIO, f"{name}: short read at offset {s.offset} ({got} of {s.length} bytes)")
                buf = staging[i % k]
                with torch.cuda.stream(stream):
                    stream.wait_stream(torch.cuda.current_stream(device))
                    for p in s.pieces:
                        dst[p.tensor][p.t_off: p.t_off + p.n].copy_(buf[p.s_off: p.s_off + p.n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    copied[i % k] = ev
                if i + k < len(spans):
                    submit(i + k)
                if progress is not None:
                    progress.advance(name, sum(p.n for p in s.pieces))
        finally:
            for fut in inflight:  # never free a staging buffer that a read still writes into
                try:
                    fut.get()
                except Exception as exc:  # noqa: BLE001  (the first error is already propagating)
                    log.debug("kvikio read after an error: %s", exc)
            stream.synchronize()


# --------------------------------------------------------------------------- the public entry points


def _source(client: SyncClient | None) -> Source:
    return ClientSource(client) if client is not None else LocalSource()


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!s} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!s}: use 'cpu' or 'cuda:N'")
    return dev


HUGE_PAGE = 2 * MiB


def _empty(t: TensorInfo, device: torch.device, hugepages: bool) -> torch.Tensor:
    """Storage for one tensor; with ``hugepages``, large CPU tensors get 2 MiB-aligned THP memory."""
    if not (hugepages and device.type == "cpu" and t.nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")):
        return torch.empty(t.shape, dtype=t.dtype, device=device)
    mm = mmap.mmap(-1, t.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    pad = -ctypes.addressof(ctypes.c_char.from_buffer(mm)) % HUGE_PAGE
    # The tensor keeps ``mm`` alive; the mapping is unmapped when the tensor's storage is freed.
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=pad)
    return raw.view(t.dtype).reshape(t.shape)


def _convert(out: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to ``dtype``; integer and bool tensors keep theirs."""
    if dtype is None:
        return out
    return {k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in out.items()}


def _load(files: list[_File], names: dict[str, list[str]], device: torch.device, opts: LoadOptions,
          progress: Progress | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for n in names[f.path]:
            t = f.header.tensors[n]
            out[n] = _empty(t, device, opts.hugepages)
    if progress is not None:
        progress.start([(f.path, sum(f.header.tensors[n].nbytes for n in names[f.path])) for f in files])
    try:
        use_kvikio = opts.use_kvikio
        if device.type == "cuda" and use_kvikio is None:
            use_kvikio = all(f.reader.local_path is not None for f in files) and kvikio_available()
        if device.type == "cuda" and use_kvikio:
            _load_cuda_kvikio(files, out, names, device, opts, progress)
            return out
        spans = [s for f in files
                 for s in plan_spans(f, (f.header.tensors[n] for n in names[f.path]), opts.span_bytes)]
        if spans:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    _load_cuda_pinned(spans, out, device, opts, progress)
            else:
                _load_cpu(spans, out, opts, progress)
        return out
    finally:
        if progress is not None:
            progress.finish()


def load_safetensors(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, client: SyncClient | None = None, *,
                     options: LoadOptions | None = None, progress: Progress | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file, index or model directory onto ``device``.

    ``path`` is a local path (a kvfs mount path included) or, with ``client``, a kvfs namespace path read
    through the client library. ``dtype`` casts floating-point tensors after loading. Each tensor has its
    own storage, as with ``safetensors.torch.load_file``.

    Error handling: ``SafetensorsError`` (``ValueError``) for a malformed file or index, naming the file;
    ``OSError`` for I/O; ``RuntimeError`` for a CUDA device without CUDA.
    """
    opts = options or LoadOptions()
    dev = _device(device)
    source = _source(client)
    paths, wmap = resolve_files(source, os.fspath(path))
    files = _open_files(source, paths, wmap)
    try:
        names = {f.path: list(f.header.tensors) for f in files}
        return _convert(_load(files, names, dev, opts, progress), dtype)
    finally:
        for f in files:
            f.reader.close()


class safe_open:
    """Lazy reader in the style of ``safetensors.safe_open``: headers now, tensors on demand.

    Works on a single file, an index or a model directory (then keys span all shards). ``get_tensor``
    reads one tensor; ``get_tensors`` reads many with the planned, parallel span reads of
    ``load_safetensors``. Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str], framework: str = "pt", device: str | torch.device = "cpu",
                 client: SyncClient | None = None, *, options: LoadOptions | None = None):
        if framework not in ("pt", "torch"):
            raise ValueError(f"framework {framework!r} not supported: kvfs.models loads torch tensors")
        self._opts = options or LoadOptions()
        self._device = _device(device)
        source = _source(client)
        paths, wmap = resolve_files(source, os.fspath(path))
        self._files = _open_files(source, paths, wmap)
        self._where = {n: f for f in self._files for n in f.header.tensors}

    def keys(self) -> list[str]:
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def metadata(self) -> dict[str, str] | None:
        """The first file's ``__metadata__`` (safetensors' ``safe_open.metadata()``)."""
        return self._files[0].header.metadata if self._files else None

    def info(self, name: str) -> TensorInfo:
        return self._where[name].header.tensors[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_tensors([name])[name]

    def get_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted: dict[str, list[str]] = {f.path: [] for f in self._files}
        for n in names:
            if n not in self._where:
                raise KeyError(f"no tensor named {n!r}")
            wanted[self._where[n].path].append(n)
        files = [f for f in self._files if wanted[f.path]]
        return _load(files, wanted, self._device, self._opts, None)

    def close(self) -> None:
        for f in self._files:
            f.reader.close()
        self._files = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timed_load(path: str, **kwargs: Any) -> tuple[dict[str, torch.Tensor], float, int]:
    """``load_safetensors`` that also returns (seconds, bytes loaded); CUDA work is synchronized."""
    t0 = time.perf_counter()
    out = load_safetensors(path, **kwargs)
    if any(t.is_cuda for t in out.values()):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, sum(t.numel() * t.element_size() for t in out.values())


__all__ = ["INDEX_SUFFIX", "PAGE", "LoadOptions", "Progress", "kvikio_available", "kvikio_config", "load_safetensors",
           "plan_spans", "read_header", "resolve_files", "safe_open", "timed_load"]
