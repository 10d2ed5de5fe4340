"""Verified reads of chunk bytes straight into the caller's buffers.

A chunk carries one xxh3_64 checksum per 64 KiB block (``CHECKSUM_BLOCK``), so a ranged read must
cover whole blocks to verify them. The caller's range rarely starts or ends on a block boundary (a KV
block's payload starts after its 4 KiB header; a tensor ends anywhere), and staging the whole range
in a scratch buffer costs a full extra copy. Instead only the partial blocks at the two edges are
read into small scratch buffers: the bytes in between land directly in the caller's buffers (one
``preadv``), and blocks that straddle buffers are hashed incrementally.

Error handling: ``ChecksumError`` (an ``OSError`` with EIO) for a mismatch, a short or unaligned read;
other ``OSError`` from the file system as raised.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections import OrderedDict

import xxhash

from kvfs import xxh3_impls
from kvfs.chunk_buffers import ALIGN, ChunkBuffers
from kvfs.protocol import CHECKSUM_BLOCK as BLOCK

IOV_MAX = 1024
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_IMPL = xxh3_impls.choose()  # the XXH3-64 in use: AVX2/AVX-512 where built and supported (kvfs.xxh3_impls)
# That function through ctypes, which releases the GIL during the call: python-xxhash keeps the GIL
# while hashing a 64 KiB block, so the loader's threads would verify one block at a time.
_XXH3 = _IMPL.fn if _IMPL is not None else None


def _block_hasher():
    """kvfs._blockhash (optional C extension): whole runs of blocks per call, GIL released."""
    if _IMPL is None:
        return None
    try:
        from kvfs import _blockhash
    except ImportError:
        return None
    _blockhash.init(_IMPL.address, _IMPL.name)
    return _blockhash


_BLOCKHASH = _block_hasher()
# Read and verify in one C call (older builds of the extension lack it).
_PREADV_VERIFY = getattr(_BLOCKHASH, "preadv_verify", None)
# A whole chunk file, O_DIRECT unless cached, read and verified in one C call (read_chunk_direct).
_READ_CHUNK_FILE = getattr(_BLOCKHASH, "read_chunk_file", None)
# Receive chunk data from a socket and check each block as it lands (kvfs.rpc_blocking), or None.
recv_verify = getattr(_BLOCKHASH, "recv_verify", None)


def _stream_hasher(name: str | None):
    """kvfs._blockhash.read_hashed with the streaming XXH3-64 of the implementation ``name`` (the one
    that verifies blocks: kvfs's AVX2/AVX-512 build where the CPU has it), else python-xxhash's (its
    runtime-dispatched update where the library has one), checked against ``xxhash.xxh3_64_intdigest``
    on a probe file before it is trusted; None where any piece is missing."""
    read_hashed = getattr(_BLOCKHASH, "read_hashed", None)
    if read_hashed is None:
        return None, None
    for impl in dict.fromkeys([name, xxh3_impls.PYTHON_XXHASH]):
        fns = xxh3_impls.stream_functions(impl) if impl else None
        if fns is not None and _stream_probe(read_hashed, fns):
            return read_hashed, impl
    return None, None


def _stream_probe(read_hashed, fns: tuple[int, ...]) -> bool:
    """Install ``fns`` as read_hashed's streaming hash; whether it then reads and hashes a probe right."""
    try:
        _BLOCKHASH.init_stream(*fns)
        probe = bytes(range(256)) * 1031  # 263,936 bytes: more than one read window, a partial stripe
        fd = os.memfd_create("kvfs-xxh3-probe", os.MFD_CLOEXEC)
        try:
            os.write(fd, probe)
            half = len(probe) // 2
            bufs = [bytearray(5), bytearray(half - 5), bytearray(len(probe) - half)]
            got, digest = read_hashed([f"/proc/self/fd/{fd}"] * 2, [half, len(probe) - half], bufs, 7)
        finally:
            os.close(fd)
        want = xxhash.xxh3_64_intdigest(probe[7:half] + probe[:len(probe) - half])
        return got == len(probe) and digest == want and b"".join(bufs) == probe[:half] + probe[:len(probe) - half]
    except (OSError, ValueError):
        return False


_READ_HASHED, _STREAM_IMPL = _stream_hasher(_IMPL.name if _IMPL is not None else None)


def hashed_reads_in_c() -> bool:
    """Whether ``read_files_hashed`` runs in C (GIL released); its Python fallback holds the GIL while it
    hashes, so a reader with the C helper missing is better off checking chunk checksums in C instead."""
    return _READ_HASHED is not None


def xxh3_impl() -> str:
    """Which XXH3-64 verifies blocks: a ``kvfs.xxh3_impls`` name ("avx2", "xxhash-sse2", ...), or
    "python-xxhash" where no C function is reachable (hashing from Python, GIL held)."""
    if _BLOCKHASH is not None:
        return _BLOCKHASH.impl()
    return _IMPL.name if _IMPL is not None and _XXH3 is not None else "python-xxhash"


def use_xxh3(name: str) -> None:
    """Hash with the named implementation from now on (benchmarks compare them in one process). Not
    safe while other threads hash.

    Error handling: ``ValueError`` for a name that is not usable here."""
    global _IMPL, _XXH3, _READ_HASHED, _STREAM_IMPL
    _IMPL = xxh3_impls.choose(name)
    _XXH3 = _IMPL.fn
    if _BLOCKHASH is not None:
        _BLOCKHASH.init(_IMPL.address, _IMPL.name)
        _READ_HASHED, _STREAM_IMPL = _stream_hasher(_IMPL.name)


def stream_xxh3_impl() -> str | None:
    """Which streaming XXH3-64 ``read_files_hashed`` hashes with (a ``kvfs.xxh3_impls`` name), or None
    where it runs in Python."""
    return _STREAM_IMPL


def block_checksums(data) -> list[int]:
    """XXH3-64 of each CHECKSUM_BLOCK of ``data`` (the last block may be short)."""
    view = memoryview(data).cast("B")
    if _BLOCKHASH is not None:
        return parse_sums(_BLOCKHASH.hash_blocks(view, BLOCK))
    return [xxhash.xxh3_64_intdigest(view[i:i + BLOCK]) for i in range(0, len(view), BLOCK)]


def packed_checksums(data, block: int) -> bytes:
    """XXH3-64 of each ``block`` bytes of ``data`` as little-endian u64s (the last block may be short);
    without the GIL when the C helper is built."""
    view = memoryview(data).cast("B")
    if _BLOCKHASH is not None:
        return _BLOCKHASH.hash_blocks(view, block)
    sums = [xxhash.xxh3_64_intdigest(view[i:i + block]) for i in range(0, len(view), block)]
    return struct.pack(f"<{len(sums)}Q", *sums)


def first_bad_block(data, block: int, sums: bytes) -> int:
    """Index of the first ``block``-byte block of ``data`` whose XXH3-64 is not the little-endian u64
    at ``sums[8*i]`` (a block with no data counts as bad), or -1: ``packed_checksums``'s check."""
    view = memoryview(data).cast("B")
    if _BLOCKHASH is not None:
        return _BLOCKHASH.first_mismatch(view, block, sums)
    for i in range(len(sums) // 8):
        piece = view[i * block:(i + 1) * block]
        if not len(piece) or struct.pack("<Q", xxhash.xxh3_64_intdigest(piece)) != sums[8 * i:8 * i + 8]:
            return i
    return -1


def _address(view: memoryview) -> int | None:
    """Where a writable contiguous buffer's bytes start (None: read-only, hash it from Python)."""
    if _XXH3 is None or view.readonly or not len(view):
        return None
    return ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))


def xxh3_64(data) -> int:
    """XXH3-64 of a buffer, without the GIL where the C function is reachable and the buffer writable
    (python-xxhash holds the GIL while it hashes, so threads hashing big payloads queue on it)."""
    view = memoryview(data).cast("B")
    base = _address(view)
    if base is None:
        return xxhash.xxh3_64_intdigest(view)
    return _XXH3(base, len(view))


def parse_sums(raw: bytes) -> list[int]:
    """A chunk's checksum file (or part of it): little-endian u64 per block."""
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))


class ChecksumError(OSError):
    pass


def verify(chunk_id: int, where: str, data: memoryview, data_offset: int, checksums: list[int],
           chunk_length: int) -> None:
    """``data`` starts at block-aligned ``data_offset`` of the chunk; ``checksums`` are its blocks'."""
    verify_views(chunk_id, where, [data], data_offset, checksums, chunk_length)


def verify_views(chunk_id: int, where: str, views: list[memoryview], data_offset: int, checksums: list[int],
                 chunk_length: int, raw_sums: bytes | None = None) -> None:
    """Like ``verify`` over the concatenation of ``views`` (never materialised). ``raw_sums``: the same
    checksums as stored (little-endian u64s), which spares packing them for the C helper."""
    if data_offset % BLOCK:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: unaligned reply")
    total = sum(len(v) for v in views)
    covered = len(checksums) * BLOCK
    if total > covered and data_offset + covered < chunk_length:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: data not covered by checksums")
    vi, vpos = 0, 0  # current view and position in it
    bases = [_address(v) for v in views] if _BLOCKHASH is None else [None] * len(views)
    i = 0
    while i < len(checksums):
        expected = checksums[i]
        want = min(BLOCK, total - i * BLOCK)
        if want <= 0:
            raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: short data")
        while vi < len(views) and vpos >= len(views[vi]):
            vi, vpos = vi + 1, 0
        view = views[vi]
        run = _blocks_inside(len(view) - vpos, i, len(checksums), total) if _BLOCKHASH is not None else 0
        if run:  # the common case: whole runs of blocks inside one buffer, checked in C
            n = min(len(view) - vpos, total - i * BLOCK, run * BLOCK)
            sums = raw_sums[8 * i: 8 * (i + run)] if raw_sums is not None else struct.pack(
                f"<{run}Q", *checksums[i:i + run])
            bad = _BLOCKHASH.first_mismatch(view[vpos:vpos + n], BLOCK, sums)
            if bad >= 0:
                raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: checksum mismatch at block "
                                               f"{data_offset // BLOCK + i + bad} (corrupt replica)")
            vpos += n
            i += run
            continue
        if len(view) - vpos >= want:  # the block lies inside one buffer
            base = bases[vi]
            if base is not None:
                got = _XXH3(base + vpos, want)
            else:
                got = xxhash.xxh3_64_intdigest(view[vpos:vpos + want])
            vpos += want
        else:
            h = xxhash.xxh3_64()
            left = want
            while left:
                while vpos >= len(views[vi]):
                    vi, vpos = vi + 1, 0
                take = min(left, len(views[vi]) - vpos)
                h.update(views[vi][vpos:vpos + take])
                vpos += take
                left -= take
            got = h.intdigest()
        if got != expected:
            raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: checksum mismatch at block "
                                           f"{data_offset // BLOCK + i} (corrupt replica)")
        i += 1


def _blocks_inside(avail: int, i: int, count: int, total: int) -> int:
    """How many whole blocks from block ``i`` on lie within ``avail`` bytes of one buffer (the last
    block of the data may be short)."""
    k = min(count - i, avail // BLOCK)
    if k < count - i and i + k == count - 1 and 0 < total - (count - 1) * BLOCK <= avail - k * BLOCK:
        k += 1
    return k


def edges(offset: int, length: int, chunk_length: int) -> tuple[int, int]:
    """The block-aligned range [start, end) of the chunk that covers [offset, offset+length)."""
    start = offset // BLOCK * BLOCK
    end = min((offset + length + BLOCK - 1) // BLOCK * BLOCK, chunk_length)
    return start, end


class OpenChunks:
    """Chunk files a reader keeps open, with their checksums, so a load that touches each chunk
    several times (16 MiB spans over 4 MiB chunks, many tensors) opens and parses each once.
    Thread-safe. ``close`` releases every descriptor."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int, bytes]] = {}  # path -> (fd, file length, raw checksums)

    def get(self, path: str, sums_path: str) -> tuple[int, int, bytes]:
        found = self._files.get(path)
        if found is not None:
            return found
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            length = os.fstat(fd).st_size
            with open(sums_path, "rb") as f:
                raw = f.read()
        except BaseException:
            os.close(fd)
            raise
        entry = self._files.setdefault(path, (fd, length, raw))
        if entry[0] != fd:  # another thread opened it first
            os.close(fd)
        return entry

    def drop(self, path: str) -> None:
        entry = self._files.pop(path, None)
        if entry is not None:
            os.close(entry[0])

    def close(self) -> None:
        for path in list(self._files):
            self.drop(path)


class ChunkSums:
    """Checksum files read whole and kept, the least recently used dropped past ``limit``: a reader of
    1 MiB pieces of 4 MiB chunks would otherwise open and read each one four times. A chunk file never
    changes under its name, so a kept copy is never stale; ``read_local_chunk`` drops the copy of a
    chunk that failed to verify (it may come back repaired). Thread-safe."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._sums: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sums_path: str, flags: int = 0) -> bytes:
        with self._lock:
            raw = self._sums.get(sums_path)
            if raw is not None:
                self._sums.move_to_end(sums_path)
                return raw
        fd = os.open(sums_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = bytearray(os.fstat(fd).st_size)
            raw = bytes(buf[:_preadv(fd, [memoryview(buf)], 0, flags)]) if buf else b""
        finally:
            os.close(fd)
        self.put(sums_path, raw)
        return raw

    def peek(self, sums_path: str) -> bytes | None:
        """The kept checksums, or None (nothing is read)."""
        with self._lock:
            raw = self._sums.get(sums_path)
            if raw is not None:
                self._sums.move_to_end(sums_path)
            return raw

    def put(self, sums_path: str, raw: bytes) -> None:
        with self._lock:
            self._sums[sums_path] = raw
            while len(self._sums) > self.limit:
                self._sums.popitem(last=False)

    def drop(self, sums_path: str) -> None:
        with self._lock:
            self._sums.pop(sums_path, None)


class NotCached(Exception):
    """``read_local_chunk(..., nowait=True)``: some of the range is not in the page cache (a read would
    wait for the disk). Nothing is verified or complete; read again without ``nowait``."""


def read_local_chunk(path: str, sums_path: str, chunk_id: int, where: str, offset: int,
                     dests: list[memoryview], files: OpenChunks | None = None, nowait: bool = False,
                     sums: ChunkSums | None = None) -> None:
    """Read chunk bytes [offset, offset + sum(len(dests))) of the chunk file at ``path`` into ``dests``
    (consecutive pieces of the range), verified against the checksum file ``sums_path``. ``files``
    keeps the file open (and its checksums parsed) for the next read of the same chunk; ``sums`` keeps
    only the checksums. ``nowait``:
    only from the page cache (``RWF_NOWAIT``), else ``NotCached``: an event loop can then try a read
    itself and hand only the ones that would block to a worker thread."""
    length = sum(len(d) for d in dests)
    if not length:
        return
    flags = os.RWF_NOWAIT if nowait else 0
    if files is not None:
        fd, chunk_length, all_sums = files.get(path, sums_path)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        all_sums = None
    try:
        if files is None:
            chunk_length = os.fstat(fd).st_size
        if offset + length > chunk_length:
            raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
        start, end = edges(offset, length, chunk_length)
        head = memoryview(bytearray(offset - start)) if offset > start else None
        tail = memoryview(bytearray(end - offset - length)) if end > offset + length else None
        iov = ([head] if head is not None else []) + [d for d in dests if len(d)] + ([tail] if tail is not None else [])
        want = end - start
        first, count = start // BLOCK * 8, (end - start + BLOCK - 1) // BLOCK * 8
        if all_sums is None and sums is not None:
            all_sums = sums.get(sums_path, flags)
        if all_sums is not None:
            raw = all_sums[first:first + count]
        else:
            raw = _read_sums(sums_path, first, count, flags)
        try:
            if _PREADV_VERIFY is not None and not nowait:
                # The common case: read and check in one call without the GIL (kvfs/_blockhash.c).
                _check_verified_read(*_PREADV_VERIFY(fd, start, iov, raw, BLOCK), want, raw, chunk_id, where, start)
                return
            got, pos, rest = 0, start, iov
            while rest:  # preadv may stop short (signals); continue after what arrived
                n = _preadv(fd, rest[:IOV_MAX], pos, flags)
                if n <= 0:
                    raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
                got += n
                pos += n
                rest = _advance(rest, n)
            if got < want:
                raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
            verify_views(chunk_id, where, iov, start, parse_sums(raw), chunk_length, raw)
        except ChecksumError:
            if sums is not None:
                sums.drop(sums_path)  # it may be the checksums that are bad, or come back repaired
            raise
    finally:
        if files is None:
            os.close(fd)


def read_chunk_start(path: str, sums_path: str, chunk_id: int, where: str, dests: list[memoryview],
                     sums: bytes | None = None) -> bytes:
    """Read chunk bytes [0, sum(len(dests))) of the chunk file at ``path`` into ``dests``, verified: one
    C call that reads and hashes without the GIL (``read_local_chunk`` where the extension lacks it).
    ``sums``: the chunk's checksums as returned by an earlier call (a chunk's checksums never change),
    else they are read from ``sums_path``. Returns the checksums it used, for the caller to keep.
    Errors as ``read_local_chunk``."""
    want = sum(len(d) for d in dests)
    if sums is None:
        sums = _read_sums(sums_path, 0, (want + BLOCK - 1) // BLOCK * 8, 0)
    if _PREADV_VERIFY is None:
        read_local_chunk(path, sums_path, chunk_id, where, 0, dests)
        return sums
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got, bad = _PREADV_VERIFY(fd, 0, dests, sums, BLOCK)
    finally:
        os.close(fd)
    _check_verified_read(got, bad, want, sums, chunk_id, where, 0)
    return sums


def read_files_hashed(paths: list[str], lengths: list[int], dests: list[memoryview], hash_from: int) -> tuple[int, int]:
    """Fill ``dests`` (together ``sum(lengths)`` bytes) with the first ``lengths[i]`` bytes of each file
    ``paths[i]`` in turn (a KV block's local chunk files), and XXH3-64 bytes [hash_from, nread) of them
    as they land (one C call, GIL released, each window hashed while it is in the CPU cache). Returns
    (nread, digest): nread short of the total when a file is short. **Nothing is verified**: for a caller
    that checks the digest against an end-to-end checksum of its own (a KV block's payload checksum),
    so that every byte is hashed once instead of once against the chunk checksums and once more.
    Without the C helper: ``os.preadv`` and python-xxhash. Error handling: OSError from open/read."""
    if _READ_HASHED is not None:
        return _READ_HASHED(paths, lengths, dests, hash_from)
    h = xxhash.xxh3_64()
    total, pos = 0, 0
    flat = [v.cast("B") if v.format != "B" else v for v in dests]
    for path, length in zip(paths, lengths):
        piece = slice_views(flat, total, length)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            got, rest = 0, piece
            while rest:
                n = os.preadv(fd, rest[:IOV_MAX], got)
                if n <= 0:
                    break
                got += n
                rest = _advance(rest, n)
        finally:
            os.close(fd)
        total += got
        if got < length:
            break
    for v in flat:
        end = pos + len(v)
        lo, hi = max(pos, hash_from), min(end, total)
        if hi > lo:
            h.update(v[lo - pos:hi - pos])
        pos = end
    return total, h.intdigest()


def read_blocks_checked(fd: int, offset: int, dests: list[memoryview], sums: bytes, block: int) -> int:
    """Fill ``dests`` from file ``fd`` at ``offset`` on, checking each ``block`` bytes against the caller's
    little-endian u64 XXH3-64s ``sums`` as they land (a KV run's per-block sums: each byte is hashed once,
    while it is still in the CPU cache). Returns how many leading blocks were read whole and match; the
    read stops at the first that does not (or at a short file). One C call, GIL released, where the
    extension is built (``preadv_verify``); else ``os.preadv`` and ``first_bad_block``. Error handling:
    OSError from the read."""
    whole = len(sums) // 8
    if _PREADV_VERIFY is not None:
        got, bad = _PREADV_VERIFY(fd, offset, dests, sums, block)
    else:
        got, rest = 0, [v.cast("B") if v.format != "B" else v for v in dests]
        while rest:
            n = os.preadv(fd, rest[:IOV_MAX], offset + got)
            if n <= 0:
                break
            got += n
            rest = _advance(rest, n)
        flat = b"".join(dests)[:got] if len(dests) > 1 else dests[0][:got]
        bad = first_bad_block(flat, block, sums)
    return min(bad if bad >= 0 else whole, got // block, whole)


def slice_views(views: list[memoryview], offset: int, length: int) -> list[memoryview]:
    """The pieces of the concatenation of ``views`` that cover [offset, offset + length)."""
    out, pos, end = [], 0, offset + length
    for v in views:
        n = len(v)
        if pos + n > offset and pos < end:
            out.append(v[max(0, offset - pos):min(n, end - pos)])
        pos += n
        if pos >= end:
            break
    return out


def _check_verified_read(got: int, bad: int, want: int, sums: bytes, chunk_id: int, where: str, start: int) -> None:
    """``preadv_verify``'s answer (bytes read, first bad block) for a read of ``want`` bytes at chunk
    offset ``start``. It stops reading at a bad block; a short last block is a short file, not
    corruption. Error handling: ChecksumError."""
    if got < want and not 0 <= bad < got // BLOCK:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
    if bad >= len(sums) // 8:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: data not covered by checksums")
    if bad >= 0:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: checksum mismatch at block "
                                       f"{start // BLOCK + bad} (corrupt replica)")


def read_chunk_direct(path: str, sums_path: str, chunk_id: int, where: str, length: int,
                      sums: ChunkSums | None = None, buffers: ChunkBuffers | None = None) -> memoryview:
    """The whole chunk (``length`` bytes) of the chunk file at ``path``, verified, as a read-only view
    of page-aligned memory (from ``buffers``, else fresh). A chunk whose file is all in the page cache
    (``cachestat``) is copied from there; otherwise it is read with ``O_DIRECT``: the disk's DMA is
    the only copy, and no page cache is filled (that costs as much CPU as the copy, and a chunk read
    whole is held by the caller anyway). Where the file system refuses ``O_DIRECT`` (tmpfs), a
    buffered read. All of it, the checksum file included when ``sums`` does not hold it, is one C call
    where the extension has it (``_read_chunk_file``). Errors as ``read_local_chunk``."""
    view = (buffers or ChunkBuffers(0)).take(length)
    data = view[:length]
    if _READ_CHUNK_FILE is not None:
        _read_chunk_file(path, sums_path, chunk_id, where, view, length, sums)
        return data.toreadonly()
    if _all_cached(path, length):  # just written, or read before: copy it, no disk read
        read_local_chunk(path, sums_path, chunk_id, where, 0, [data], sums=sums)
        return data.toreadonly()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        read_local_chunk(path, sums_path, chunk_id, where, 0, [data], sums=sums)
        return data.toreadonly()
    try:
        chunk_length = os.fstat(fd).st_size
        got = 0
        while got < min(length, chunk_length):
            n = os.preadv(fd, [view[got:]], got)
            got += max(n, 0)
            if n <= 0 or n % ALIGN:
                break  # end of file (a short read that stops on the alignment goes on)
    finally:
        os.close(fd)
    if got < length:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
    count = (length + BLOCK - 1) // BLOCK * 8
    raw = (sums.get(sums_path) if sums is not None else _read_sums(sums_path, 0, count, 0))[:count]
    try:
        verify_views(chunk_id, where, [data], 0, parse_sums(raw), chunk_length, raw)
    except ChecksumError:
        if sums is not None:
            sums.drop(sums_path)
        raise
    return data.toreadonly()


def _read_chunk_file(path: str, sums_path: str, chunk_id: int, where: str, view: memoryview, length: int,
                     sums: ChunkSums | None) -> None:
    """``read_chunk_direct`` in one C call (kvfs/_blockhash.c ``read_chunk_file``): the worker thread
    gives the GIL back once per chunk, not once per system call."""
    known = sums.peek(sums_path) if sums is not None else None
    _, got, bad, raw, _ = _READ_CHUNK_FILE(path, view, length, known, sums_path, BLOCK)
    count = (length + BLOCK - 1) // BLOCK * 8
    try:
        _check_verified_read(min(got, length), bad, length, raw[:count], chunk_id, where, 0)
    except ChecksumError:
        if sums is not None:
            sums.drop(sums_path)  # it may be the checksums that are bad, or come back repaired
        raise
    if sums is not None and known is None:
        sums.put(sums_path, raw)


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # Linux 6.5+, x86-64 and arm64 alike (the generic syscall table)
_libc = ctypes.CDLL(None, use_errno=True)
_cachestat_works = True


def _all_cached(path: str, length: int) -> bool:
    """Whether the first ``length`` bytes of ``path`` are all in the page cache (``cachestat``, which,
    unlike a RWF_NOWAIT read, starts no read-ahead I/O). False where the kernel lacks it."""
    global _cachestat_works
    if not _cachestat_works or length <= 0:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        stat = _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CacheRange(0, length)), ctypes.byref(stat), 0) != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
                _cachestat_works = False  # an older kernel (or a seccomp filter): always read direct
            return False
        return stat.nr_cache * PAGE >= length
    finally:
        os.close(fd)


def _preadv(fd: int, views: list[memoryview], pos: int, flags: int) -> int:
    """``os.preadv``; with ``RWF_NOWAIT``, a read that would wait (EAGAIN, or stopping short where the
    page cache ends: a later call would wait) is ``NotCached``."""
    if not flags:
        return os.preadv(fd, views, pos)
    try:
        n = os.preadv(fd, views, pos, flags)
    except BlockingIOError:
        raise NotCached from None
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:  # a file system without RWF_NOWAIT: read the ordinary way
            raise NotCached from None
        raise
    if n < sum(len(v) for v in views):
        raise NotCached
    return n


def _read_sums(sums_path: str, first: int, count: int, flags: int) -> bytes:
    fd = os.open(sums_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = bytearray(count)
        n = _preadv(fd, [memoryview(raw)], first, flags)
        return bytes(raw[:n])  # short: verify_views reports the blocks it has no checksum for
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def map_local_chunk(path: str, sums_path: str, chunk_id: int, where: str, length: int,
                    verify: bool = True) -> memoryview:
    """Bytes [0, ``length``) of the chunk file at ``path``, mapped read-only instead of copied, locked in
    memory (``mlock``) and verified against the checksum file ``sums_path``: a zero-copy verified read.
    The lock keeps the kernel from dropping the verified pages and reading them from disk again while
    the caller uses them, so what it reads is what was verified (kvfs never rewrites a chunk file in
    place: a new chunk is a new file). Unlocked and unmapped when the last view of it is gone.
    ``verify=False``: not checked here, for a caller that checks every byte it uses against checksums of
    its own (a KV run's per-block sums) on the locked pages: each byte is then hashed once, not twice.

    Error handling: ChecksumError (an OSError, EIO) for a short file or a checksum mismatch; OSError
    from mmap or mlock (ENOMEM/EPERM where RLIMIT_MEMLOCK is small): the caller reads instead."""
    import numpy as np

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < length:
            raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
        # Read-only on purpose: locking a writable private mapping would copy every page.
        mapped = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(mapped)
    address = np.frombuffer(view, dtype=np.uint8).ctypes.data
    if _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mlock of chunk {chunk_id:x}: {os.strerror(err)}")
    if verify:
        with open(sums_path, "rb") as f:
            raw = f.read((length + BLOCK - 1) // BLOCK * 8)
        verify_views(chunk_id, where, [view], 0, parse_sums(raw), length, raw)
    return view


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    for i, v in enumerate(views):
        if n < len(v):
            return [v[n:]] + views[i + 1:]
        n -= len(v)
    return []
