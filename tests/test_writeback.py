"""``kvfs mount --writeback-cache``: the kernel buffers writes and sends several WRITEs at once, also
for read-modify-write of chunks after a truncate. Random writes and truncates through such a mount
must read back equal to an in-memory model from another mount (what reached the chunkservers)."""

import os
import random

import pytest


@pytest.mark.parametrize("seed", [1, 2])
def test_writeback_random_writes_and_truncates(make_cluster, tmp_path, seed):
    cluster = make_cluster(chunkservers=1, replication=1, chunk_size="1M")
    writer = cluster.mount(str(tmp_path / "wb"), "--writeback-cache")
    reader = cluster.mount(str(tmp_path / "plain"))
    rng = random.Random(seed)
    for f in range(6):
        model = bytearray()
        fd = os.open(os.path.join(writer, f"f{f}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(200):
                r = rng.random()
                if r < 0.85:
                    off = rng.randrange(0, 6 << 20)
                    data = rng.randbytes(rng.choice([1, 100, 4095, 4096, 65536, 200_000, 1 << 20]))
                    os.pwrite(fd, data, off)
                    model.extend(bytes(max(0, off - len(model))))
                    model[off: off + len(data)] = data
                elif r < 0.95:
                    size = rng.randrange(0, 6 << 20)
                    os.ftruncate(fd, size)
                    del model[size:]
                    model.extend(bytes(size - len(model)))
                else:
                    off = rng.randrange(0, max(1, len(model)))
                    assert os.pread(fd, 300_000, off) == bytes(model[off: off + 300_000])
        finally:
            os.close(fd)
        with open(os.path.join(reader, f"f{f}"), "rb") as fh:
            assert fh.read() == bytes(model), f"file f{f} differs when read through another mount"
