"""The XXH3-64 implementations kvfs verifies blocks with (kvfs.xxh3_impls, kvfs._xxh3_simd): each gives
python-xxhash's digest for any length and alignment, corrupt blocks are still caught with each, the
widest one the CPU has is the active one where it could be built, and ``kvfs doctor`` names it."""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys

import pytest
import xxhash

from kvfs import chunkio, xxh3_impls
from kvfs.chunkio import BLOCK, ChecksumError, read_local_chunk
from kvfs.doctor import cpu_flags

IMPLS = xxh3_impls.usable()
LENGTHS = [*range(0, 301), 511, 1023, 1025, 4095, 4097, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 1 << 20]


def xxhash_header_present() -> bool:
    """Where setup.py looks for xxhash.h (libxxhash-dev, or KVFS_XXHASH_INCLUDE)."""
    dirs = [os.environ.get("KVFS_XXHASH_INCLUDE"), "/usr/include", "/usr/local/include"]
    return any(d and os.path.exists(os.path.join(d, "xxhash.h")) for d in dirs)


@pytest.fixture
def restore_impl():
    """Tests that switch the implementation put the process's default back."""
    default = chunkio.xxh3_impl()
    yield
    chunkio.use_xxh3(default)


def test_python_xxhash_is_always_a_candidate():
    assert IMPLS and IMPLS[-1].name == xxh3_impls.PYTHON_XXHASH


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
def test_each_implementation_matches_python_xxhash(impl):
    rng = random.Random(10)
    data = bytearray(rng.randbytes(max(LENGTHS) + 64))
    base = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
    view = memoryview(data)
    for offset in (0, 1, 3, 7, 8, 13, 32, 63):  # unaligned starts as well as aligned ones
        for n in LENGTHS:
            assert impl(base + offset, n) == xxhash.xxh3_64_intdigest(view[offset:offset + n]), (offset, n)


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
def test_block_checksums_and_corruption_with_each_implementation(impl, restore_impl, tmp_path):
    chunkio.use_xxh3(impl.name)
    assert chunkio.xxh3_impl() == impl.name
    data = os.urandom(5 * BLOCK + 1234)
    want = [xxhash.xxh3_64_intdigest(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]
    assert chunkio.block_checksums(data) == want  # the C loop, with this function
    path, sums = str(tmp_path / "chunk"), str(tmp_path / "chunk.sum")
    with open(path, "wb") as f:
        f.write(data)
    with open(sums, "wb") as f:
        f.write(b"".join(s.to_bytes(8, "little") for s in want))
    out = memoryview(bytearray(len(data)))
    read_local_chunk(path, sums, 1, "test", 0, [out])
    assert out == data
    with open(path, "r+b") as f:  # one flipped bit in block 3
        f.seek(3 * BLOCK + 5)
        f.write(bytes([data[3 * BLOCK + 5] ^ 0x10]))
    with pytest.raises(ChecksumError, match="block 3"):
        read_local_chunk(path, sums, 1, "test", 0, [out])
    with open(path, "rb") as f:
        corrupt = memoryview(bytearray(f.read()))
    with pytest.raises(ChecksumError, match="block 3"):  # run verification after a Python read
        chunkio.verify(1, "test", corrupt, 0, want, len(data))


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
def test_hashed_reads_stream_with_each_implementation(impl, restore_impl, tmp_path):
    """``read_files_hashed`` (a KV block read and hashed in one C call) hashes with the streaming XXH3 of
    the implementation that verifies blocks (kvfs's AVX2/AVX-512 build, not python-xxhash's SSE2 one,
    where it is active), and its digest is python-xxhash's over any split of files and buffers."""
    chunkio.use_xxh3(impl.name)
    if not chunkio.hashed_reads_in_c():
        pytest.skip("kvfs._blockhash.read_hashed not built")
    assert chunkio.stream_xxh3_impl() == impl.name
    rng = random.Random(11)
    data = rng.randbytes(3 * BLOCK * 5 + 777)
    cuts = [BLOCK * 4 + 3, BLOCK * 9, len(data)]
    paths, lengths = [], []
    for k, (a, b) in enumerate(zip([0, *cuts], cuts)):
        (tmp_path / f"c{k}").write_bytes(data[a:b])
        paths.append(str(tmp_path / f"c{k}"))
        lengths.append(b - a)
    out = memoryview(bytearray(len(data)))
    for hash_from in (0, 1, 4096, BLOCK + 5):
        got, digest = chunkio.read_files_hashed(paths, lengths, [out[:100], out[100:300001], out[300001:]], hash_from)
        assert got == len(data) and out == data
        assert digest == xxhash.xxh3_64_intdigest(data[hash_from:]), hash_from


def test_a_function_that_disagrees_is_never_used(restore_impl):
    wrong = xxh3_impls.XXH3_FN(lambda address, length: 12345)
    address = ctypes.cast(wrong, ctypes.c_void_p).value
    assert not xxh3_impls.agrees_with_xxhash(xxh3_impls.Impl("wrong", address, wrong))
    with pytest.raises(ValueError, match="not usable"):
        chunkio.use_xxh3("wrong")
    assert chunkio.xxh3_impl() == IMPLS[0].name


def test_the_widest_implementation_the_cpu_has_is_active():
    """On a CPU with AVX2 and xxhash.h at install (this VM, CI via dev.sh), a build that silently fell
    back to python-xxhash's SSE2 XXH3 fails here."""
    flags = cpu_flags()
    if "avx2" not in flags or not xxhash_header_present():
        pytest.skip("no AVX2 on this CPU or no xxhash.h to build kvfs._xxh3_simd with")
    want = "avx512" if "avx512f" in flags else "avx2"
    assert chunkio.xxh3_impl() == want
    if chunkio.hashed_reads_in_c():  # (kvfs._blockhash built)
        assert chunkio.stream_xxh3_impl() == want
    assert [i.name for i in IMPLS][:1] == [want]


def run_kvfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfs.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_doctor_names_the_active_implementation_and_kvfs_xxh3_picks_one():
    out = run_kvfs("doctor")
    assert out.returncode == 0, out.stderr
    assert f"XXH3-64 verifying reads: {IMPLS[0].name}\n" in out.stdout
    assert "C block hasher (kvfs._blockhash): built" in out.stdout
    forced = run_kvfs("doctor", env={xxh3_impls.ENV: xxh3_impls.PYTHON_XXHASH})
    assert forced.returncode == 0, forced.stderr
    assert f"XXH3-64 verifying reads: {xxh3_impls.PYTHON_XXHASH}\n" in forced.stdout
    bad = run_kvfs("doctor", env={xxh3_impls.ENV: "no-such-impl"})
    assert bad.returncode != 0 and "no-such-impl: not usable here" in bad.stderr
