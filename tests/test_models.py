"""kvfs.models: bit-exact against safetensors.torch.load_file, strict header validation, every backend.

The same checks run on a local path, through the kvfs client library (``cluster`` fixture) and through a
FUSE mount (``mounted`` fixture). CUDA paths are exercised by bench/gpu_load.py on the device machine.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open as st_safe_open
from safetensors.torch import load_file, save_file

from kvfs.gds import is_fuse
from kvfs.models import DTYPES, LoadOptions, SafetensorsError, load_safetensors, safe_open
from kvfs.models.cli import main as cli_main
from kvfs.models.header import MAX_HEADER

# Tiny spans force many spans per file, tensors straddling span edges and scatter reads with gaps.
SMALL = LoadOptions(span_bytes=4096, threads=4)
MiB = 1 << 20
# Every dtype both safetensors.torch and this torch know (the reference must be able to load it).
REF_DTYPES = sorted((name for name in DTYPES if name != "F8_E8M0"), key=str)
SHAPES = [(), (0,), (1,), (3, 0, 2), (7, 13), (2, 3, 5, 7), (1025,)]


def rand_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(ref)
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == r.dtype, name
        assert tuple(g.shape) == tuple(r.shape), name
        assert as_bytes(g) == as_bytes(r), name


def mixed_model(seed: int = 0, big: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for i, dname in enumerate(REF_DTYPES):
        for j, shape in enumerate(SHAPES):
            out[f"layer.{dname}.{j}"] = rand_tensor(DTYPES[dname], shape, seed + 31 * i + j)
    if big:
        out["big"] = rand_tensor(torch.float32, (big // 4,), seed + 999)
    return out


def write_sharded(d: Path, shards: list[dict[str, torch.Tensor]], name: str = "model") -> Path:
    wmap = {}
    for i, shard in enumerate(shards):
        fname = f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, d / fname)
        wmap.update({k: fname for k in shard})
    index = d / f"{name}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    return index


def raw_file(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


# --------------------------------------------------------------------------- local path


@pytest.mark.parametrize("opts", [SMALL, LoadOptions()], ids=["4k-spans", "default"])
def test_every_dtype_and_shape_bit_exact(tmp_path: Path, opts: LoadOptions) -> None:
    p = tmp_path / "m.safetensors"
    save_file(mixed_model(), p)
    assert_same(load_safetensors(p, options=opts), load_file(p))


def test_float8_e8m0_when_torch_has_it(tmp_path: Path) -> None:
    if "F8_E8M0" not in DTYPES:
        pytest.skip("this torch has no float8_e8m0fnu")
    t = rand_tensor(DTYPES["F8_E8M0"], (4, 5), 1)
    p = raw_file(tmp_path / "e8m0.safetensors",
                 {"x": {"dtype": "F8_E8M0", "shape": [4, 5], "data_offsets": [0, 20]}}, as_bytes(t))
    got = load_safetensors(p)["x"]
    assert got.dtype == DTYPES["F8_E8M0"] and as_bytes(got) == as_bytes(t)


def test_metadata_and_lazy_reader(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    tensors = mixed_model(seed=3)
    save_file(tensors, p, metadata={"format": "pt", "note": "kvfs"})
    ref = load_file(p)
    with st_safe_open(str(p), "pt") as ref_f, safe_open(p, options=SMALL) as f:
        assert f.metadata() == ref_f.metadata() == {"format": "pt", "note": "kvfs"}
        assert sorted(f.keys()) == sorted(ref_f.keys())
        some = list(f.keys())[::5]
        assert_same(f.get_tensors(some), {k: ref[k] for k in some})
        name = "layer.BF16.5"
        assert_same({name: f.get_tensor(name)}, {name: ref[name]})
        assert f.info(name).shape == (2, 3, 5, 7)
        with pytest.raises(KeyError):
            f.get_tensor("nope")


def test_sharded_index_and_directory(tmp_path: Path) -> None:
    full = mixed_model(seed=5)
    names = sorted(full)
    shards = [{k: full[k] for k in names[i::3]} for i in range(3)]
    index = write_sharded(tmp_path, shards)
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        ref.update(load_file(f))
    assert_same(load_safetensors(tmp_path, options=SMALL), ref)
    assert_same(load_safetensors(index), ref)
    with safe_open(tmp_path) as f:
        assert sorted(f.keys()) == names


def test_directory_without_index_loads_all_files(tmp_path: Path) -> None:
    save_file({"a": torch.arange(5)}, tmp_path / "a.safetensors")
    save_file({"b": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "b.safetensors")
    got = load_safetensors(tmp_path)
    assert_same(got, {**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")})


def test_file_larger_than_a_chunk(tmp_path: Path) -> None:
    p = tmp_path / "big.safetensors"
    save_file(mixed_model(seed=7, big=9 * MiB + 4), p)
    ref = load_file(p)
    assert_same(load_safetensors(p), ref)
    assert_same(load_safetensors(p, options=LoadOptions(span_bytes=MiB, threads=3)), ref)


def test_hugepage_backed_tensors(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(mixed_model(seed=17, big=5 * MiB), p)
    ref = load_file(p)
    got = load_safetensors(p, options=LoadOptions(hugepages=True, span_bytes=MiB))
    assert_same(got, ref)
    assert got["big"].data_ptr() % (2 * MiB) == 0
    got["big"].add_(1)  # writable, and owned: the reference is untouched
    assert as_bytes(got["big"]) != as_bytes(ref["big"])
    del got
    save_file(load_safetensors(p, options=LoadOptions(hugepages=True)), tmp_path / "again.safetensors")


def test_dtype_casts_floats_only(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4), "i": torch.arange(4), "b": torch.ones(2, dtype=torch.bool)}, p)
    got = load_safetensors(p, dtype=torch.bfloat16)
    assert got["w"].dtype == torch.bfloat16 and got["i"].dtype == torch.int64 and got["b"].dtype == torch.bool
    assert torch.equal(got["w"], load_file(p)["w"].to(torch.bfloat16))


def test_tensors_own_their_storage(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(3), "b": torch.randn(5)}, p)
    got = load_safetensors(p)
    save_file(got, tmp_path / "again.safetensors")  # refuses tensors that share memory
    assert_same(load_file(tmp_path / "again.safetensors"), got)


def test_cuda_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: bench/gpu_load.py covers it")
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(3)}, p)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_safetensors(p, device="cuda:0")


def test_cli_load_reports_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "m.safetensors"
    save_file(mixed_model(seed=2), p)
    assert cli_main(["load", str(p), "--no-progress", "--span-mib", "1"]) == 0
    out = capsys.readouterr().out
    assert f"loaded {len(mixed_model())} tensors" in out and "GB/s" in out
    raw_file(tmp_path / "bad.safetensors", b"[1, 2]")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["load", str(tmp_path / "bad.safetensors"), "--no-progress"])
    assert exit_info.value.code == 1
    assert "not a JSON object" in capsys.readouterr().err


# --------------------------------------------------------------------------- malformed files

T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED: list[tuple[str, Any, bytes, int | None, str]] = [
    # id, header, data, forced length, expected message fragment
    ("zero-length", b"", b"", 0, "header length is 0"),
    ("length-over-limit", b"{}", b"", MAX_HEADER + 1, "exceeds the"),
    ("length-past-eof", b"{}", b"", 1000, "runs past the end of the file"),
    ("not-utf8", b"{\xff\xfe}", b"", None, "not valid UTF-8"),
    ("not-json", b"{\"a\": ", b"", None, "not valid JSON"),
    ("json-list", b"[1, 2]", b"", None, "not a JSON object"),
    ("duplicate-key", (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                       b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'), b"", None, "duplicate key"),
    ("entry-not-object", {"a": [1]}, b"", None, "entry is not an object"),
    ("unknown-dtype", {"a": {**T, "dtype": "F17"}}, bytes(8), None, "dtype 'F17' unknown"),
    ("sub-byte-dtype", {"a": {**T, "dtype": "F4"}}, bytes(8), None, "not supported"),
    ("missing-dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "dtype"),
    ("extra-field", {"a": {**T, "stride": [1]}}, bytes(8), None, "unexpected field"),
    ("negative-dim", {"a": {**T, "shape": [-2]}}, bytes(8), None, "non-negative integers"),
    ("float-dim", {"a": {**T, "shape": [2.0]}}, bytes(8), None, "non-negative integers"),
    ("bool-dim", {"a": {**T, "shape": [True, 8]}}, bytes(8), None, "non-negative integers"),
    ("size-mismatch", {"a": {**T, "shape": [3]}}, bytes(8), None, "needs 12 bytes but data_offsets span 8"),
    ("reversed-offsets", {"a": {**T, "data_offsets": [8, 0]}}, bytes(8), None, "0 <= begin <= end"),
    ("negative-offset", {"a": {**T, "data_offsets": [-8, 0]}}, bytes(8), None, "0 <= begin <= end"),
    ("three-offsets", {"a": {**T, "data_offsets": [0, 8, 16]}}, bytes(8), None, "data_offsets"),
    ("past-end", {"a": T}, bytes(4), None, "run past the end of the data region"),
    ("overlap", {"a": T, "b": {**T, "data_offsets": [4, 12]}}, bytes(12), None, "overlap"),
    ("hole", {"a": T, "b": {**T, "data_offsets": [12, 20]}}, bytes(20), None, "hole at [8, 12)"),
    ("trailing-bytes", {"a": T}, bytes(16), None, "trailing bytes"),
    ("metadata-not-strings", {"__metadata__": {"a": 1}, "b": T}, bytes(8), None, "__metadata__"),
]


@pytest.mark.parametrize(("header", "data", "length", "match"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_header_raises_clear_error(tmp_path: Path, header: Any, data: bytes, length: int | None,
                                             match: str) -> None:
    p = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(SafetensorsError, match=re.escape(match)) as info:
        load_safetensors(p)
    assert isinstance(info.value, ValueError) and str(info.value).startswith(f"{p}: ")
    with pytest.raises(ValueError, match=re.escape(match)):
        safe_open(p)


def test_too_short_file(tmp_path: Path) -> None:
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=re.escape(f"{p}: file too short")):
        load_safetensors(p)


def test_bad_index(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(ValueError, match="index is not valid JSON"):
        load_safetensors(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(ValueError, match="weight_map lists tensor 'b'"):
        load_safetensors(index)
    index.write_text(json.dumps({"weight_map": {"a": "../s1.safetensors"}}))
    with pytest.raises(ValueError, match="outside the model directory"):
        load_safetensors(index)
    save_file({"a": torch.zeros(2)}, tmp_path / "s2.safetensors")
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "x": "s2.safetensors"}}))
    with pytest.raises(ValueError, match="'a' also in"):
        load_safetensors(index)


# --------------------------------------------------------------------------- through kvfs


def _upload(client: Any, local: Path, remote: str) -> None:
    client.write_file(remote, local.read_bytes())


def test_client_library_bit_exact(cluster: Any, tmp_path: Path) -> None:
    full = mixed_model(seed=11, big=9 * MiB + 4)  # several 4 MiB chunks
    single = tmp_path / "m.safetensors"
    save_file(full, single, metadata={"k": "v"})
    names = sorted(full)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    write_sharded(shard_dir, [{k: full[k] for k in names[i::2]} for i in range(2)])
    client = cluster.client()
    try:
        client.mkdir("/models/sharded", parents=True, exist_ok=True)
        _upload(client, single, "/models/m.safetensors")
        for f in shard_dir.iterdir():
            _upload(client, f, f"/models/sharded/{f.name}")
        ref = load_file(single)
        assert_same(load_safetensors("/models/m.safetensors", client=client), ref)
        assert_same(load_safetensors("/models/m.safetensors", client=client,
                                     options=LoadOptions(span_bytes=MiB, threads=4)), ref)
        assert_same(load_safetensors("/models/sharded", client=client), ref)
        with safe_open("/models/m.safetensors", client=client) as f:
            assert f.metadata() == {"k": "v"}
            assert_same({"big": f.get_tensor("big")}, {"big": ref["big"]})
        raw_file(tmp_path / "bad.safetensors", {"a": T}, bytes(4))
        _upload(client, tmp_path / "bad.safetensors", "/models/bad.safetensors")
        with pytest.raises(ValueError, match="kvfs:/models/bad.safetensors: .*run past the end"):
            load_safetensors("/models/bad.safetensors", client=client)
    finally:
        client.close()


def test_chunk_files_map_a_client_file_onto_local_chunk_files(cluster: Any) -> None:
    """kvikio's route through the client (``LoadOptions(use_kvikio=True)``) reads a file's chunk files on
    this host by path (``kvfs.chunkfiles``). The mapping is tested here with ``PosixFile`` in place of
    ``kvikio.CuFile`` (same ``pread`` shape, host memory): every range, across chunk boundaries and at the
    end, comes back bit-exact; a range outside the file, or a chunk with no replica here, is refused."""
    import errno
    import os

    import kvfs
    from kvfs.chunkfiles import PosixFile
    from kvfs.models.reader import ClientFileReader

    data = os.urandom(3 * MiB + 12345)  # 4 chunks of 1 MiB, the last one short
    client = cluster.client()
    try:
        client.mkdir("/models", parents=True, exist_ok=True)
        client.write_file("/models/chunkfiles.bin", data)
        reader = ClientFileReader(client, "/models/chunkfiles.bin")
        with reader.chunk_files(PosixFile) as chunks:
            for offset, n in ((0, len(data)), (MiB - 5, 10), (2 * MiB, MiB), (len(data) - 7, 7), (123, 2 * MiB)):
                buf = bytearray(n)
                assert chunks.pread(buf, n, offset).get() == n
                assert bytes(buf) == data[offset:offset + n], (offset, n)
            with pytest.raises(OSError) as info:
                chunks.pread(bytearray(10), 10, len(data) - 5)
            assert info.value.errno == errno.EINVAL
            chunks._local.pop(2)  # as if chunk 2's replicas were all on other hosts
            with pytest.raises(OSError) as info:
                chunks.pread(bytearray(MiB), MiB, 2 * MiB)
            assert info.value.errno == errno.ENXIO
        reader.close()
        with kvfs.SyncClient(cluster.meta_address, kvfs.ClientOptions(local_reads=False)) as remote:
            far = ClientFileReader(remote, "/models/chunkfiles.bin")
            assert far.chunk_files(PosixFile) is None  # no short-circuit: nothing to hand kvikio
            far.close()
    finally:
        client.close()


def test_client_short_circuit_falls_back_on_a_corrupt_local_chunk(cluster: Any, tmp_path: Path) -> None:
    """The loader reads chunk files on this host directly; a corrupt one is detected by its checksums,
    the load goes on from the other replica (bit-exact), and with every replica corrupt it fails with
    EIO: never wrong bytes."""
    import errno
    import os

    from kvfs.chunkserver.store import chunk_path

    full = mixed_model(seed=17, big=9 * MiB + 4)
    local = tmp_path / "c.safetensors"
    save_file(full, local)
    ref = load_file(local)
    client = cluster.client()
    try:
        client.mkdir("/models", parents=True, exist_ok=True)
        _upload(client, local, "/models/corrupt.safetensors")
        servers = {s.address: s.data_dir for s in client.refresh_servers().servers}
        chunks = client.chunk_map(client.resolve("/models/corrupt.safetensors").ino).chunks
        victim = chunks[1]  # inside the big tensor
        assert len(victim.replicas) == 2

        def flip(address: str) -> None:
            path = chunk_path(servers[address], victim.chunk_id)
            with open(path, "r+b") as f:
                f.seek(100_000)
                byte = f.read(1)
                f.seek(100_000)
                f.write(bytes([byte[0] ^ 0x55]))
                os.fsync(f.fileno())

        flip(victim.replicas[0])
        assert_same(load_safetensors("/models/corrupt.safetensors", client=client), ref)
        flip(victim.replicas[1])
        with pytest.raises(OSError) as info:
            load_safetensors("/models/corrupt.safetensors", client=client)
        assert info.value.errno == errno.EIO
    finally:
        client.close()


def test_fuse_mount_bit_exact(mounted: Any, tmp_path: Path) -> None:
    full = mixed_model(seed=13, big=9 * MiB + 4)
    local = tmp_path / "m.safetensors"
    save_file(full, local)
    mdir = Path(mounted.mountpoint) / "models-fuse"
    mdir.mkdir(exist_ok=True)
    remote = mdir / "m.safetensors"
    remote.write_bytes(local.read_bytes())
    ref = load_file(local)
    assert_same(load_safetensors(remote), ref)
    assert_same(load_file(remote), ref)  # the mount serves the same bytes to the reference loader
    names = sorted(full)
    shard_dir = mdir / "sharded"
    shard_dir.mkdir(exist_ok=True)
    write_sharded(shard_dir, [{k: full[k] for k in names[i::3]} for i in range(3)])
    assert_same(load_safetensors(shard_dir, options=SMALL), ref)
    # kvikio must run in compat mode on a FUSE path: the loader tells a mount path from a local one.
    assert is_fuse(str(remote)) and not is_fuse(str(local))


def test_open_file_cache_shares_handles_and_closes_idle_ones(tmp_path: Path) -> None:
    """kvfs.chunkfiles.OpenFileCache: one handle per path however many leases; handles in use are never
    closed; idle ones beyond the capacity are, least recently used first; reads go to the handle."""
    from kvfs.chunkfiles import OpenFileCache, PosixFile

    opened, closed = [], []

    class Counting(PosixFile):
        def __init__(self, path: str):
            super().__init__(path)
            opened.append(path)

        def close(self) -> None:
            closed.append(self)
            super().close()

    paths = []
    for i in range(4):
        p = tmp_path / f"c{i}"
        p.write_bytes(bytes([i]) * 100)
        paths.append(str(p))
    cache = OpenFileCache(Counting, capacity=2)
    a, b = cache(paths[0]), cache(paths[0])
    assert opened == [paths[0]]  # one open for two leases
    buf = bytearray(10)
    assert a.pread(buf, 10, 5).get() == 10 and buf == bytes([0]) * 10
    held = [cache(p) for p in paths[1:]]  # 4 files in use: over capacity, nothing may close
    assert len(cache) == 4 and closed == []
    for lease in held:
        lease.close()
    assert len(cache) == 2 and len(closed) == 2  # two idle ones went; paths[0] is still held
    a.close()
    b.close()
    b.close()  # a second close of a lease is harmless
    cache.close()
    assert len(cache) == 0 and len(closed) == 4
