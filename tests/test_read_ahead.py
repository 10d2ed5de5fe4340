"""Read-ahead and the whole-chunk cache (kvfs/client_prefetch.py) on a cluster whose chunkserver runs
on this host, so whole chunks are read from chunk files with O_DIRECT (kvfs.chunkio.read_chunk_direct).

Sequential readers get the next chunks read ahead and exact bytes; readers that jump get exact bytes
and start no read-ahead; memory stays within the cache and read-ahead bounds; a corrupt chunk met by
the read-ahead is EIO for the reads of its corrupt block only, through the client and the mount; the
mount's replies straight from cached chunks (``Client.read_buffer``) are the file's bytes.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import time

import pytest
from cluster import Cluster, wait_for

from kvfs import client_prefetch

MiB = 1 << 20
CHUNK = 4 * MiB
CHUNKS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cl = Cluster(str(tmp_path_factory.mktemp("readahead")), chunkservers=1, replication=1, chunk_size="4M").start()
    try:
        yield cl
    finally:
        cl.stop()


@pytest.fixture
def direct_reads(monkeypatch):
    """Counts whole-chunk reads from local chunk files (the O_DIRECT path)."""
    calls: list[int] = []
    real = client_prefetch.read_chunk_direct

    def counting(path, sums_path, chunk_id, *args):
        calls.append(chunk_id)
        return real(path, sums_path, chunk_id, *args)

    monkeypatch.setattr(client_prefetch, "read_chunk_direct", counting)
    return calls


def new_file(cl: Cluster, name: str, size: int = CHUNKS * CHUNK - 12345) -> bytes:
    data = random.Random(name).randbytes(size)
    with cl.client() as w:
        w.write_file(f"/{name}", data)
    return data


def settle(st, cached: set[int] = frozenset()) -> None:
    """Wait for the read-ahead to finish (and to have cached ``cached``)."""
    deadline = time.monotonic() + 10
    while (st.prefetching or not cached <= set(st.cache)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not st.prefetching and cached <= set(st.cache)


@pytest.mark.parametrize("options", [{}, {"prefetch_chunks": 8, "read_cache_chunks": 4}],
                         ids=["defaults", "read-ahead-beyond-the-cache"])
def test_sequential_reads_are_read_ahead_and_exact(cluster, direct_reads, options):
    """With the defaults, and with a read-ahead longer than the cache asked for: the cache keeps at least
    the read-ahead window and the chunk being read (a chunk evicted before its reader came would be
    read again, and again for each of its MiB reads)."""
    name = f"seq{len(options)}"
    data = new_file(cluster, name)
    with cluster.client(**options) as c:
        ino = c.resolve(f"/{name}").ino
        c.open(ino)
        try:
            st = c.client.cached_state(ino)
            opts = c.client.options
            out = bytearray()
            for offset in range(0, len(data), MiB):
                out += c.read(ino, offset, MiB)
                # Memory bound: the cache and the chunks being read ahead, per open file.
                assert len(st.cache) <= opts.cache_chunks
                assert len(st.prefetching) <= opts.prefetch_chunks
                if offset == MiB:
                    settle(st, set(range(1, 1 + opts.prefetch_chunks)))  # read ahead
            assert bytes(out) == data
            assert len(direct_reads) == CHUNKS  # each chunk read once, from its chunk file
        finally:
            c.release(ino)


def test_jumping_reads_are_exact_and_start_no_read_ahead(cluster, direct_reads):
    data = new_file(cluster, "jump")
    rng = random.Random(3)
    with cluster.client() as c:
        ino = c.resolve("/jump").ino
        c.open(ino)
        try:
            st = c.client.cached_state(ino)
            for _ in range(40):
                offset = rng.randrange(len(data))
                size = rng.choice([1, 4096, MiB, 2 * MiB + 3, CHUNK + 17])
                assert c.read(ino, offset, size) == data[offset:offset + size], (offset, size)
            settle(st)
            before = set(st.cache)
            c.read(ino, 5 * CHUNK + 100, 4096)  # inside chunk 5, not where the last read ended
            settle(st)
            assert set(st.cache) == before  # nothing read ahead of a jump
            # read_buffer, the mount's call: views of cached chunks or the buffer filled, same bytes.
            for offset, size in [(0, MiB), (CHUNK - 10, 20), (len(data) - 5, MiB), (len(data), 10)]:
                got = c.read_buffer(ino, offset, size, memoryview(bytearray(size)))
                assert bytes(got) == data[offset:offset + size], (offset, size)
        finally:
            c.release(ino)


def chunk_files(cl: Cluster) -> set[str]:
    return {f for f in glob.glob(os.path.join(cl.root, "cs0", "chunks", "*", "*")) if not f.endswith(".sum")}


def corrupt(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(CHUNK // 2 + 5)
        byte = f.read(1)
        f.seek(CHUNK // 2 + 5)
        f.write(bytes([byte[0] ^ 0xFF]))


def corrupt_chunk(cl: Cluster, name: str, index: int) -> bytes:
    """A new file with one flipped byte in chunk ``index`` (at ``CHUNK // 2 + 5``), its only replica."""
    before = chunk_files(cl)
    data = new_file(cl, name, 6 * CHUNK)
    with cl.client() as c:
        ino = c.resolve(f"/{name}").ino
        c.open(ino)
        chunk_id = c.client.cached_state(ino).chunks[index].chunk_id
        c.release(ino)
    [path] = [p for p in chunk_files(cl) - before if int(os.path.basename(p), 16) == chunk_id]
    corrupt(path)
    return data


def check_mib_reads(read, data: bytes, corrupt_index: int) -> None:
    """Read the file a MiB at a time with ``read(offset, size)``: only the MiB with the flipped byte of
    chunk ``corrupt_index`` is EIO; the rest of that chunk and the other chunks read exactly."""
    for offset in range(0, len(data), MiB):
        if offset == corrupt_index * CHUNK + CHUNK // 2:
            with pytest.raises(OSError) as exc:
                read(offset, MiB)
            assert exc.value.errno == errno.EIO
        else:
            assert read(offset, MiB) == data[offset:offset + MiB], offset


def test_corrupt_chunk_met_by_read_ahead_fails_only_its_range(cluster):
    data = corrupt_chunk(cluster, "corrupt", 3)
    with cluster.client() as c:
        ino = c.resolve("/corrupt").ino
        c.open(ino)
        try:
            check_mib_reads(lambda offset, size: c.read(ino, offset, size), data, 3)
        finally:
            c.release(ino)


def test_mount_reads_whole_chunks_from_the_cache(cluster, tmp_path):
    data = new_file(cluster, "mounted", 5 * CHUNK + 777)
    bad = corrupt_chunk(cluster, "mounted-corrupt", 2)
    mnt = cluster.mount(str(tmp_path / "mnt"))
    try:
        with open(os.path.join(mnt, "mounted"), "rb", buffering=0) as f:
            out = bytearray()
            while block := f.read(MiB):
                out += block
        assert bytes(out) == data
        fd = os.open(os.path.join(mnt, "mounted-corrupt"), os.O_RDONLY)
        try:
            check_mib_reads(lambda offset, size: os.pread(fd, size, offset), bad, 2)
            # Meta has checked the report by now or soon: the only copy is kept, not dropped, so the
            # good parts of the chunk stay readable afterwards too (meta/bad_chunks.py).
            wait_for(lambda: "it is the only copy: kept" in cluster.meta.log(), 20, "meta to check the report")
            check_mib_reads(lambda offset, size: os.pread(fd, size, offset), bad, 2)
        finally:
            os.close(fd)
    finally:
        cluster.unmount(mnt)
