"""Verified chunk reads straight into caller buffers (kvfs.chunkio): any range, any split into
buffers, every byte checked; corrupt, truncated and short files are errors, never wrong bytes."""

from __future__ import annotations

import errno
import os
import random

import pytest
import xxhash

from kvfs import chunkio
from kvfs.chunkio import BLOCK, ChecksumError, OpenChunks, read_local_chunk, verify_views
from kvfs.chunkserver.store import block_checksums


@pytest.fixture(params=["preadv", "native", "python"], autouse=True)
def hashing(request, monkeypatch):
    """Every test runs with the C helper (kvfs._blockhash, built by the install): reading and verifying
    in one call ("preadv") or verifying runs of blocks after a Python read ("native"); and without it."""
    assert chunkio._BLOCKHASH is not None, "kvfs._blockhash was not built"
    assert chunkio._PREADV_VERIFY is not None, "kvfs._blockhash lacks preadv_verify"
    if request.param != "preadv":
        monkeypatch.setattr(chunkio, "_PREADV_VERIFY", None)
    if request.param == "python":
        monkeypatch.setattr(chunkio, "_BLOCKHASH", None)
        monkeypatch.setattr(chunkio, "_XXH3", None)
    return request.param


def test_block_checksums_are_xxh3_of_each_block():
    data = os.urandom(3 * BLOCK + 17)
    want = [xxhash.xxh3_64_intdigest(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]
    assert chunkio.block_checksums(data) == want
    assert chunkio.block_checksums(b"") == []


def write_chunk(tmp_path, data: bytes) -> tuple[str, str]:
    path, sums = str(tmp_path / "chunk"), str(tmp_path / "chunk.sum")
    with open(path, "wb") as f:
        f.write(data)
    with open(sums, "wb") as f:
        f.write(b"".join(s.to_bytes(8, "little") for s in block_checksums(data)))
    return path, sums


def split(rng: random.Random, length: int) -> list[memoryview]:
    cuts = sorted(rng.sample(range(1, length), min(4, length - 1))) if length > 1 else []
    bounds = [0, *cuts, length]
    return [memoryview(bytearray(b - a)) for a, b in zip(bounds, bounds[1:])]


def test_any_range_into_any_buffers(tmp_path):
    rng = random.Random(7)
    data = rng.randbytes(5 * BLOCK + 1234)  # a short last block, as at the end of a file
    path, sums = write_chunk(tmp_path, data)
    cases = [(0, len(data)), (4096, len(data) - 4096), (BLOCK - 1, 2), (3 * BLOCK, BLOCK), (len(data) - 5, 5)]
    cases += [(o, rng.randrange(1, len(data) - o + 1)) for o in rng.sample(range(len(data)), 40)]
    files = OpenChunks()  # the same reads with the file kept open between them
    for offset, length in cases:
        for keep in (None, files):
            dests = split(rng, length)
            read_local_chunk(path, sums, 1, "test", offset, dests, keep)
            assert b"".join(bytes(d) for d in dests) == data[offset:offset + length], (offset, length)
    files.close()


def test_corrupt_short_and_uncovered_chunks_are_errors(tmp_path):
    data = os.urandom(4 * BLOCK)
    path, sums = write_chunk(tmp_path, data)
    with open(path, "r+b") as f:  # one flipped byte in block 2
        f.seek(2 * BLOCK + 77)
        f.write(bytes([data[2 * BLOCK + 77] ^ 1]))
    out = memoryview(bytearray(100))
    read_local_chunk(path, sums, 1, "test", 10, [out])  # block 0 is fine
    for offset, length in ((2 * BLOCK + 70, 20), (BLOCK + 5, 2 * BLOCK), (0, 4 * BLOCK)):
        with pytest.raises(ChecksumError) as info:
            read_local_chunk(path, sums, 1, "test", offset, [memoryview(bytearray(length))])
        assert info.value.errno == errno.EIO and "block 2" in str(info.value)
    # Asking past the end of the file (truncated chunk): an error, not zeros.
    with pytest.raises(OSError) as info:
        read_local_chunk(path, sums, 1, "test", 3 * BLOCK, [memoryview(bytearray(2 * BLOCK))])
    assert info.value.errno == errno.EIO
    # A checksum file that covers less than the data read.
    good, good_sums = write_chunk(tmp_path, data)
    with open(good_sums, "r+b") as f:
        f.truncate(8 * 2)
    with pytest.raises(ChecksumError):
        read_local_chunk(good, good_sums, 1, "test", 0, [memoryview(bytearray(4 * BLOCK))])


def test_blocks_straddling_buffers_are_verified(tmp_path):
    data = bytearray(os.urandom(3 * BLOCK))
    sums = block_checksums(bytes(data))
    views = [memoryview(data)[:100], memoryview(data)[100:BLOCK + 7], memoryview(data)[BLOCK + 7:]]
    verify_views(1, "t", views, 0, sums, len(data))
    data[BLOCK + 3] ^= 0xFF  # inside the block that straddles the second and third view
    with pytest.raises(ChecksumError, match="block 1"):
        verify_views(1, "t", views, 0, sums, len(data))


def test_corrupt_block_straddling_destination_buffers(tmp_path):
    """A read whose destination buffers split checksum blocks: the split block is checked whole."""
    data = os.urandom(3 * BLOCK)
    path, sums = write_chunk(tmp_path, data)
    sizes = [100, BLOCK + 7 - 100, 2 * BLOCK - 7]
    dests = [memoryview(bytearray(n)) for n in sizes]
    read_local_chunk(path, sums, 1, "test", 0, dests)
    assert b"".join(bytes(d) for d in dests) == data
    with open(path, "r+b") as f:  # block 1 straddles the second and third buffer
        f.seek(BLOCK + 3)
        f.write(bytes([data[BLOCK + 3] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="block 1"):
        read_local_chunk(path, sums, 1, "test", 0, [memoryview(bytearray(n)) for n in sizes])


def test_read_error_is_an_oserror(tmp_path):
    """A descriptor that cannot be read (a directory): the system's errno, not a checksum error."""
    data = os.urandom(BLOCK)
    path, sums = write_chunk(tmp_path, data)
    files = OpenChunks()
    fd = os.open(str(tmp_path), os.O_RDONLY)
    with open(sums, "rb") as f:
        files._files[path] = (fd, BLOCK, f.read())
    with pytest.raises(OSError) as info:
        read_local_chunk(path, sums, 1, "test", 0, [memoryview(bytearray(BLOCK))], files)
    assert info.value.errno == errno.EISDIR
    files.close()


def test_corruption_early_in_a_long_read_is_named(tmp_path):
    """preadv_verify reads in windows and stops at the first bad block: the error names that block
    (not "short"), for a corrupt block far before the end of a multi-MiB read."""
    data = os.urandom(40 * BLOCK + 5)
    path, sums = write_chunk(tmp_path, data)
    with open(path, "r+b") as f:
        f.seek(BLOCK + 9)
        f.write(bytes([data[BLOCK + 9] ^ 0x01]))
    with pytest.raises(ChecksumError, match="block 1 "):
        read_local_chunk(path, sums, 1, "test", 0, [memoryview(bytearray(len(data)))])
