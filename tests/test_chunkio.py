"""Verified chunk reads straight into caller buffers (kvfs.chunkio): any range, any split into
buffers, every byte checked; corrupt, truncated and short files are errors, never wrong bytes."""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import xxhash

from kvfs import chunkio
from kvfs.chunkio import BLOCK, ChecksumError, OpenChunks, read_local_chunk, verify_views
from kvfs.chunkserver.store import block_checksums


@pytest.fixture(params=["preadv", "native", "python"], autouse=True)
def hashing(request, monkeypatch):
    """Every test runs with the C helper (kvfs._blockhash, built by the install): reading and verifying
    in one call ("preadv", and ``read_chunk_file`` for whole chunks) or verifying runs of blocks after a
    Python read ("native"); and without it."""
    assert chunkio._BLOCKHASH is not None, "kvfs._blockhash was not built"
    assert chunkio._PREADV_VERIFY is not None, "kvfs._blockhash lacks preadv_verify"
    assert chunkio._READ_CHUNK_FILE is not None, "kvfs._blockhash lacks read_chunk_file"
    if request.param != "preadv":
        monkeypatch.setattr(chunkio, "_PREADV_VERIFY", None)
        monkeypatch.setattr(chunkio, "_READ_CHUNK_FILE", None)
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
    path, sums = str(Path(tmp_path) / "chunk"), str(Path(tmp_path) / "chunk.sum")
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


def test_whole_chunk_direct_read_is_verified(tmp_path):
    """read_chunk_direct (O_DIRECT into huge-page-aligned memory): the exact bytes for any length, a
    flipped byte or a short file is an error; tmpfs (no O_DIRECT) falls back to a buffered read."""
    from kvfs.chunk_buffers import ChunkBuffers
    from kvfs.chunkio import ChunkSums, read_chunk_direct

    buffers, sums = ChunkBuffers(), ChunkSums()
    roots = [tmp_path] + ([tempfile.mkdtemp(dir="/dev/shm")] if os.path.isdir("/dev/shm") else [])
    try:
        for root in roots:
            for length in (4 * BLOCK, 3 * BLOCK + 4095, 12345, 1):
                data = os.urandom(length)
                path, sums_path = write_chunk(_fresh_dir(root), data)  # a chunk file never changes: new ids
                for keep in (None, sums):
                    got = read_chunk_direct(path, sums_path, 1, "test", length, keep, buffers)
                    assert got.readonly and bytes(got) == data
            data = os.urandom(4 * BLOCK)
            path, sums_path = write_chunk(_fresh_dir(root), data)
            sums.get(sums_path)  # kept from a good read: a corrupt read must drop it
            with open(path, "r+b") as f:
                f.seek(3 * BLOCK + 9)
                f.write(bytes([data[3 * BLOCK + 9] ^ 0x10]))
            with pytest.raises(ChecksumError, match="block 3"):
                read_chunk_direct(path, sums_path, 1, "test", 4 * BLOCK, sums, buffers)
            assert sums_path not in sums._sums
            with open(path, "r+b") as f:
                f.truncate(2 * BLOCK)
            with pytest.raises(ChecksumError) as info:
                read_chunk_direct(path, sums_path, 1, "test", 4 * BLOCK, sums, buffers)
            assert info.value.errno == errno.EIO
    finally:
        for root in roots[1:]:
            shutil.rmtree(root)


def _fresh_dir(root) -> str:
    return tempfile.mkdtemp(dir=str(root))


def test_chunk_buffers_are_reused_only_when_nothing_views_them():
    import ctypes

    from kvfs.chunk_buffers import HUGE, ChunkBuffers

    pool = ChunkBuffers(keep=2)
    buf = pool.take(4 << 20)
    assert len(buf) == 4 << 20 and not buf.readonly
    assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE == 0
    cached = buf[:100].toreadonly()
    del buf
    reader = cached[10:20]  # a reader still holds a slice of the chunk
    pool.give(cached)
    del cached
    other = pool.take(4 << 20)
    assert other.obj is not reader.obj  # never handed out while viewed
    raw = reader.obj
    del reader
    again = pool.take(4 << 20)
    assert again.obj is raw  # reused once nothing views it
    pool.give(b"not a pooled buffer")  # ignored


def test_nowait_reads_only_from_the_page_cache(tmp_path):
    data = os.urandom(8 * BLOCK)
    path, sums = write_chunk(tmp_path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        out = memoryview(bytearray(4 * BLOCK))
        try:
            read_local_chunk(path, sums, 1, "test", BLOCK, [out], nowait=True)
            cached = True  # the kernel kept the pages after all: nothing to assert about NotCached
        except chunkio.NotCached:
            cached = False
        read_local_chunk(path, sums, 1, "test", BLOCK, [out])  # a blocking read brings them in
        assert bytes(out) == data[BLOCK:5 * BLOCK]
        out2 = memoryview(bytearray(4 * BLOCK))
        read_local_chunk(path, sums, 1, "test", BLOCK, [out2], nowait=True)
        assert bytes(out2) == data[BLOCK:5 * BLOCK]
        assert cached in (True, False)
    finally:
        os.close(fd)


def test_direct_read_copies_a_cached_chunk_and_reads_an_uncached_one_with_o_direct(tmp_path, monkeypatch, hashing):
    """read_chunk_direct: a chunk file all in the page cache (just written) is copied from there; one
    dropped from the cache is read with O_DIRECT. The same bytes either way."""
    from kvfs.chunk_buffers import ChunkBuffers
    from kvfs.chunkio import read_chunk_direct

    data = os.urandom(4 * BLOCK)
    path, sums_path = write_chunk(_fresh_dir(tmp_path), data)
    if hashing == "preadv":  # the one C call: it says which way it read
        _direct_read_in_c(path, sums_path, data)
        return
    flags_seen = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (flags_seen.append((p, flags)), real_open(p, flags, *a))[1])
    buffers = ChunkBuffers()
    assert bytes(read_chunk_direct(path, sums_path, 1, "test", len(data), None, buffers)) == data
    assert not any(f & os.O_DIRECT for p, f in flags_seen if p == path)  # cached: no disk read
    fd = real_open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    flags_seen.clear()
    assert bytes(read_chunk_direct(path, sums_path, 1, "test", len(data), None, buffers)) == data
    assert any(f & os.O_DIRECT for p, f in flags_seen if p == path)


@pytest.mark.parametrize("c_helper", [True, False], ids=["c", "python"])
def test_files_read_whole_with_one_digest_of_a_suffix(tmp_path, monkeypatch, c_helper):
    """``read_files_hashed``: several files in turn into buffers cut anywhere, bytes intact, one XXH3-64 of
    the bytes from ``hash_from`` on (what a KV block's payload checksum covers); a short file reads short,
    a missing one is an OSError. The C helper and the Python fallback agree."""
    if c_helper and chunkio._READ_HASHED is None:
        pytest.skip("kvfs._blockhash.read_hashed not built")
    if not c_helper:
        monkeypatch.setattr(chunkio, "_READ_HASHED", None)
    rng = random.Random(7)
    data = rng.randbytes(3 * (1 << 20) + 12345)
    cuts = [1 << 20, 2 * (1 << 20), len(data)]  # three "chunk files"
    paths = []
    for k, (a, b) in enumerate(zip([0] + cuts, cuts)):
        path = tmp_path / f"chunk{k}"
        path.write_bytes(data[a:b])
        paths.append(str(path))
    lengths = [b - a for a, b in zip([0] + cuts, cuts)]
    out = bytearray(len(data))
    view = memoryview(out)
    dests = [view[:4096], view[4096:4099], view[4099:1_500_000], view[1_500_000:]]
    got, digest = chunkio.read_files_hashed(paths, lengths, dests, 4096)
    assert got == len(data) and bytes(out) == data
    assert digest == xxhash.xxh3_64_intdigest(data[4096:])
    _, whole = chunkio.read_files_hashed(paths, lengths, [memoryview(bytearray(len(data)))], 0)
    assert whole == xxhash.xxh3_64_intdigest(data)

    os.truncate(paths[1], lengths[1] - 100)
    got, _ = chunkio.read_files_hashed(paths, lengths, dests, 4096)
    assert got == lengths[0] + lengths[1] - 100
    with pytest.raises(OSError) as info:
        chunkio.read_files_hashed([paths[0], str(tmp_path / "gone")], lengths[:2], [view[:cuts[1]]], 0)
    assert info.value.errno == errno.ENOENT


def _direct_read_in_c(path: str, sums_path: str, data: bytes) -> None:
    from kvfs.chunk_buffers import ChunkBuffers

    buffers = ChunkBuffers()
    expected_sums = Path(sums_path).read_bytes()

    def read(sums):
        view = buffers.take(len(data))
        length, got, bad, raw, direct = chunkio._READ_CHUNK_FILE(path, view, len(data), sums, sums_path, BLOCK)
        assert (length, got, bad, raw) == (len(data), len(data), -1, expected_sums)
        assert bytes(view[:len(data)]) == data
        return direct

    assert read(None) is False  # cached (just written): copied, no disk read; the checksums read from their file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert read(expected_sums) is True  # O_DIRECT, with the checksums the caller kept
    with pytest.raises(FileNotFoundError):
        chunkio._READ_CHUNK_FILE(path + ".gone", buffers.take(BLOCK), BLOCK, None, sums_path, BLOCK)
    with pytest.raises(FileNotFoundError):
        chunkio._READ_CHUNK_FILE(path, buffers.take(BLOCK), BLOCK, None, sums_path + ".gone", BLOCK)


def test_blocks_read_and_checked_against_the_callers_sums(tmp_path):
    """``read_blocks_checked`` (a KV run's payload against its header's per-block sums): bytes intact in
    buffers cut anywhere, blocks straddling them included; a corrupt block stops the count at it (the
    blocks before it are good), a short file at its last whole block; every hashing route agrees."""
    rng = random.Random(11)
    block, head = 48 * 1024 + 8, 3000  # blocks of any size, at any file offset
    payload = rng.randbytes(5 * block)
    sums = chunkio.packed_checksums(payload, block)
    path = tmp_path / "run"
    path.write_bytes(rng.randbytes(head) + payload)

    def read(n: int = 5) -> tuple[int, bytes]:
        out = bytearray(n * block)
        view = memoryview(out)
        dests = [view[:100], view[100:block + 7], view[block + 7:]]  # block 0 and 1 straddle buffers
        fd = os.open(path, os.O_RDONLY)
        try:
            return chunkio.read_blocks_checked(fd, head, dests, sums[:8 * n], block), bytes(out)
        finally:
            os.close(fd)

    assert read() == (5, payload)
    assert read(3) == (3, payload[:3 * block])
    raw = bytearray(path.read_bytes())
    raw[head + 3 * block + 17] ^= 0x01  # block 3
    path.write_bytes(bytes(raw))
    good, got = read()
    assert good == 3 and got[:3 * block] == payload[:3 * block]
    raw[head + 3 * block + 17] ^= 0x01
    raw[head + 7] ^= 0x80  # block 0, in the first buffer
    path.write_bytes(bytes(raw))
    assert read()[0] == 0
    raw[head + 7] ^= 0x80
    path.write_bytes(bytes(raw[:head + 4 * block - 1]))  # truncated inside block 3
    good, got = read()
    assert good == 3 and got[:3 * block] == payload[:3 * block]
