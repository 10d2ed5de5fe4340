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

import errno
import os

import xxhash

from kvfs.protocol import CHECKSUM_BLOCK as BLOCK

IOV_MAX = 1024


class ChecksumError(OSError):
    pass


def verify(chunk_id: int, where: str, data: memoryview, data_offset: int, checksums: list[int],
           chunk_length: int) -> None:
    """``data`` starts at block-aligned ``data_offset`` of the chunk; ``checksums`` are its blocks'."""
    verify_views(chunk_id, where, [data], data_offset, checksums, chunk_length)


def verify_views(chunk_id: int, where: str, views: list[memoryview], data_offset: int, checksums: list[int],
                 chunk_length: int) -> None:
    """Like ``verify`` over the concatenation of ``views`` (never materialised)."""
    if data_offset % BLOCK:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: unaligned reply")
    total = sum(len(v) for v in views)
    covered = len(checksums) * BLOCK
    if total > covered and data_offset + covered < chunk_length:
        raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: data not covered by checksums")
    vi, vpos = 0, 0  # current view and position in it
    for i, expected in enumerate(checksums):
        want = min(BLOCK, total - i * BLOCK)
        if want <= 0:
            raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: short data")
        while vi < len(views) and vpos >= len(views[vi]):
            vi, vpos = vi + 1, 0
        view = views[vi]
        if len(view) - vpos >= want:  # the common case: the block lies inside one buffer
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


def edges(offset: int, length: int, chunk_length: int) -> tuple[int, int]:
    """The block-aligned range [start, end) of the chunk that covers [offset, offset+length)."""
    start = offset // BLOCK * BLOCK
    end = min((offset + length + BLOCK - 1) // BLOCK * BLOCK, chunk_length)
    return start, end


def read_local_chunk(path: str, sums_path: str, chunk_id: int, where: str, offset: int,
                     dests: list[memoryview]) -> None:
    """Read chunk bytes [offset, offset + sum(len(dests))) of the chunk file at ``path`` into ``dests``
    (consecutive pieces of the range), verified against the checksum file ``sums_path``."""
    length = sum(len(d) for d in dests)
    if not length:
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunk_length = os.fstat(fd).st_size
        if offset + length > chunk_length:
            raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
        start, end = edges(offset, length, chunk_length)
        head = memoryview(bytearray(offset - start)) if offset > start else None
        tail = memoryview(bytearray(end - offset - length)) if end > offset + length else None
        iov = ([head] if head is not None else []) + [d for d in dests if len(d)] + ([tail] if tail is not None else [])
        want = end - start
        got, pos, rest = 0, start, iov
        while rest:  # preadv may stop short (signals); continue after what arrived
            n = os.preadv(fd, rest[:IOV_MAX], pos)
            if n <= 0:
                raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
            got += n
            pos += n
            rest = _advance(rest, n)
        if got < want:
            raise ChecksumError(errno.EIO, f"chunk {chunk_id:x} on {where}: local file short")
    finally:
        os.close(fd)
    with open(sums_path, "rb") as f:
        f.seek(start // BLOCK * 8)
        raw = f.read((end - start + BLOCK - 1) // BLOCK * 8)
    sums = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
    verify_views(chunk_id, where, iov, start, sums, chunk_length)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    for i, v in enumerate(views):
        if n < len(v):
            return [v[n:]] + views[i + 1:]
        n -= len(v)
    return []
