"""KV-cache blocks (issue 5): hashing, block format, KVStore over every backend, concurrency, eviction.

The store suite runs against three backends: a local directory (os calls), the native client on a
real cluster, and the FUSE mount of that cluster; a block written one way is read the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

from kvfs.gds import is_kvfs_mount, kvikio_available
from kvfs.kv import BlockError, KVLayout, KVStore, block_hashes
from kvfs.kv.block import decode_block, encode_block, parse_header
from kvfs.kv.device import choose_route
from kvfs.kv.hashing import HASH_BYTES, check_hash, check_hashes, hash_block, root_hash
from kvfs.kv.policy import Policy, evict_now, get_policy, kv_status, kv_status_rows, set_policy

SMALL = KVLayout("bfloat16", block_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8)  # 512 bytes
MID = KVLayout("float16", block_tokens=16, num_layers=4, num_kv_heads=4, head_dim=64)  # 128 KiB


def block_for(layout: KVLayout, block_hash: str) -> torch.Tensor:
    """Deterministic contents per hash, so any reader can check what it got."""
    g = torch.Generator().manual_seed(int(block_hash[:8], 16))
    return torch.randn(layout.block_shape, generator=g).to(layout.torch_dtype())


# --------------------------------------------------------------------------- hashing


def reference_hashes(tokens: list[int], n: int, salt: bytes = b"") -> list[str]:
    """The documented construction, written out independently of kvfs.kv.hashing."""
    parent = hashlib.blake2b(salt, digest_size=16, key=b"kvfs-kv-root").digest()
    out = []
    for i in range(len(tokens) // n):
        data = parent + struct.pack("<I", n) + b"".join(struct.pack("<I", t) for t in tokens[i * n:(i + 1) * n])
        parent = hashlib.blake2b(data, digest_size=16, key=b"kvfs-kv-block").digest()
        out.append(parent.hex())
    return out


def test_hashing_matches_reference():
    rng = random.Random(5)
    for n in (1, 4, 16, 256):
        tokens = [rng.randrange(1 << 32) for _ in range(n * 5 + 3)]
        assert block_hashes(tokens, n) == reference_hashes(tokens, n)
        assert block_hashes(tokens, n, salt=b"lora-7") == reference_hashes(tokens, n, b"lora-7")
    # Pinned vector: the hash is a file name other processes rely on; it must never change silently.
    assert block_hashes(range(8), 4)[1] == reference_hashes(list(range(8)), 4)[1]
    assert block_hashes([1, 2, 3, 4], 4) == ["a5eb086f37904edd0f90772b1d843a1a"]


def test_hashing_chains_and_inputs():
    a = block_hashes(list(range(64)), 16)
    assert len(a) == 4 and all(len(h) == 32 for h in a)
    assert block_hashes(list(range(70)), 16) == a  # the partial tail block is not hashed
    b = block_hashes([0] + list(range(1, 64)), 16)
    assert b == a
    c = block_hashes([99] + list(range(1, 64)), 16)
    assert all(x != y for x, y in zip(a, c))  # a change in block 0 changes every later hash
    assert block_hashes(torch.arange(64), 16) == a  # tensors accepted
    assert block_hashes(list(range(64)), 16, salt="x") != a
    assert block_hashes([], 16) == []
    assert hash_block(root_hash(), list(range(16))).hex() == a[0]
    with pytest.raises(ValueError):
        block_hashes([-1, 2], 1)
    with pytest.raises(ValueError):
        block_hashes([1 << 32], 1)
    with pytest.raises(ValueError):
        block_hashes([1], 0)
    with pytest.raises(ValueError):
        hash_block(b"short", [1])
    assert len(root_hash()) == HASH_BYTES
    for bad in ("../etc/passwd", "ABCDEF0123456789", "abc", "g" * 32):
        with pytest.raises(ValueError):
            check_hash(bad)
        with pytest.raises(ValueError):
            check_hashes(a + [bad])
    check_hashes(a)
    check_hashes([])


# --------------------------------------------------------------------------- layout and block format


def test_layout_name_roundtrip_and_checks():
    lay = KVLayout(torch.bfloat16, 16, 32, 8, 128, tp_rank=1, tp_size=2)
    assert lay.name == "bf16-t16-l32-h8-d128-tp1of2"
    assert KVLayout.from_name(lay.name) == lay
    mla = KVLayout("f16", 64, 61, 1, 576, planes=1)
    assert mla.name.endswith("-p1") and KVLayout.from_name(mla.name) == mla
    # An engine page order is part of the layout: another name, another header dict; canonical ones keep
    # the dict they had before orders existed (old blocks still match).
    paged = KVLayout("bf16", 16, 32, 8, 128, order="kdtvtd")
    assert paged.name == "bf16-t16-l32-h8-d128-tp0of1-okdtvtd" and KVLayout.from_name(paged.name) == paged
    assert KVLayout.from_name(mla.name + "-opt") == KVLayout("f16", 64, 61, 1, 576, planes=1, order="pt")
    assert KVLayout.from_dict(paged.to_dict()) == paged != KVLayout.from_dict(lay.to_dict() | {"order": ""})
    assert "order" not in lay.to_dict() and paged.to_dict()["order"] == "kdtvtd"
    assert lay.nbytes == 32 * 2 * 8 * 16 * 128 * 2 == 2 << 20
    good = {"dtype": "bfloat16", "block_tokens": 16, "num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    for bad in ({"dtype": "complex64"}, {"block_tokens": 0}, {"tp_rank": 2, "tp_size": 2}, {"planes": 3},
                {"order": "K-DT"}):
        args = good | bad
        with pytest.raises(ValueError):
            KVLayout(**args)
    with pytest.raises(ValueError):
        KVLayout.from_name("bf16-t16")


def _file(layout: KVLayout, h: str, t: torch.Tensor) -> bytes:
    header, views = encode_block(layout, h, t)
    return header + b"".join(bytes(v) for v in views)


def test_block_roundtrip_and_bad_blocks():
    h = block_hashes(range(4), 4)[0]
    t = block_for(SMALL, h)
    raw = _file(SMALL, h, t)
    assert len(raw) == 4096 + SMALL.nbytes
    assert torch.equal(decode_block(raw, SMALL, h), t)
    hdr = parse_header(raw, layout=SMALL, block_hash=h, file_size=len(raw))
    assert hdr.layout == SMALL and hdr.shape == SMALL.block_shape and hdr.dtype == "bfloat16"
    # list form == single-tensor form
    planes = list(t.reshape(SMALL.num_planes, *SMALL.plane_shape).unbind(0))
    assert _file(SMALL, h, planes) == raw

    other = KVLayout("bfloat16", block_tokens=4, num_layers=2, num_kv_heads=4, head_dim=4)  # same byte size
    with pytest.raises(BlockError, match="layout"):
        decode_block(raw, other, h)
    with pytest.raises(BlockError, match="hash"):
        decode_block(raw, SMALL, "0" * 32)
    with pytest.raises(BlockError, match="truncated"):
        decode_block(raw[:-1], SMALL, h)
    with pytest.raises(BlockError, match="truncated"):
        decode_block(raw[:30], SMALL, h)
    flipped = bytearray(raw)
    flipped[-5] ^= 0x40
    with pytest.raises(BlockError, match="checksum"):
        decode_block(bytes(flipped), SMALL, h)
    flipped = bytearray(raw)
    flipped[60] ^= 0x01  # inside the JSON description
    with pytest.raises(BlockError, match="checksum|corrupt"):
        decode_block(bytes(flipped), SMALL, h)
    with pytest.raises(BlockError, match="not a kvfs"):
        decode_block(b"\0" * len(raw), SMALL, h)
    bumped = bytearray(raw)
    bumped[8] = 9
    with pytest.raises(BlockError, match="version"):
        decode_block(bytes(bumped), SMALL, h)
    assert issubclass(BlockError, ValueError)


def test_tensor_checks():
    h = block_hashes(range(4), 4)[0]
    with pytest.raises(ValueError, match="shape"):
        encode_block(SMALL, h, torch.zeros(3, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        encode_block(SMALL, h, torch.zeros(SMALL.block_shape, dtype=torch.float32))
    with pytest.raises(ValueError, match="tensors"):
        encode_block(SMALL, h, [torch.zeros(SMALL.plane_shape, dtype=torch.bfloat16)])
    # a non-contiguous input is accepted (copied) for writing
    t = block_for(SMALL, h)
    nc = t.transpose(3, 4).contiguous().transpose(3, 4)
    assert not nc.is_contiguous()
    assert decode_block(_file(SMALL, h, nc), SMALL, h).equal(t)


# --------------------------------------------------------------------------- the store, over every backend


@pytest.fixture(params=["local", "native", "mount"])
def kv(request, tmp_path):
    """(make_store, describe): make_store(root_suffix, layout) -> KVStore on the chosen backend."""
    made: list[KVStore] = []
    clients = []
    if request.param == "local":
        base = str(tmp_path)

        def make(name: str, layout: KVLayout = SMALL, **kw) -> KVStore:
            s = KVStore(f"{base}/{name}", layout, **kw)
            made.append(s)
            return s
    elif request.param == "native":
        cluster = request.getfixturevalue("cluster")
        client = cluster.client()
        clients.append(client)
        test = request.node.name.replace("[", "_").replace("]", "")

        def make(name: str, layout: KVLayout = SMALL, **kw) -> KVStore:
            s = KVStore(f"/kvtest/{test}/{name}", layout, client=client, **kw)
            made.append(s)
            return s
    else:
        mounted = request.getfixturevalue("mounted")
        test = request.node.name.replace("[", "_").replace("]", "")

        def make(name: str, layout: KVLayout = SMALL, **kw) -> KVStore:
            s = KVStore(f"{mounted.mountpoint}/kvtest/{test}/{name}", layout, **kw)
            made.append(s)
            return s
    yield make
    for s in made:
        s.close()
    for c in clients:
        c.close()


def test_store_put_get(kv):
    s = kv("m")
    hs = block_hashes(range(40), 4)
    t = block_for(SMALL, hs[0])
    assert s.get(hs[0]) is None
    assert s.put(hs[0], t) is True
    assert s.put(hs[0], t) is False  # already there: success, not rewritten
    assert torch.equal(s.get(hs[0]), t)
    out = torch.empty(SMALL.block_shape, dtype=torch.bfloat16)
    ptr = out.data_ptr()
    assert s.get(hs[0], out=out) is out and out.data_ptr() == ptr and torch.equal(out, t)
    planes = [torch.empty(SMALL.plane_shape, dtype=torch.bfloat16) for _ in range(SMALL.num_planes)]
    assert s.get(hs[0], out=planes) is planes
    assert torch.equal(torch.stack(planes).reshape(SMALL.block_shape), t)
    # batched
    assert s.put_many([(h, block_for(SMALL, h)) for h in hs[1:6]]) == [True] * 5
    got = s.get_many(hs[:8])
    assert [g is not None for g in got] == [True] * 6 + [False] * 2
    assert all(torch.equal(g, block_for(SMALL, h)) for g, h in zip(got[:6], hs))
    assert s.delete(hs[5]) is True and s.delete(hs[5]) is False
    assert s.get(hs[5]) is None
    assert s.stats["get_hits"] >= 9 and s.stats["get_misses"] >= 3


def test_store_big_block_multi_chunk(kv):
    """A block spanning several 1 MiB chunks; out tensors in list form (scattered reads)."""
    lay = KVLayout("float16", block_tokens=16, num_layers=20, num_kv_heads=8, head_dim=64)  # 2.5 MiB
    s = kv("big", lay)
    h = block_hashes(range(16), 16)[0]
    t = block_for(lay, h)
    assert s.put(h, t)
    assert torch.equal(s.get(h), t)
    planes = [torch.empty(lay.plane_shape, dtype=torch.float16).pin_memory() if torch.cuda.is_available()
              else torch.empty(lay.plane_shape, dtype=torch.float16) for _ in range(lay.num_planes)]
    s.get(h, out=planes)
    assert torch.equal(torch.stack(planes).reshape(lay.block_shape), t)


def test_exists_and_longest_prefix_vs_reference(kv):
    s = kv("p")
    rng = random.Random(11)
    hs = block_hashes([rng.randrange(50000) for _ in range(4 * 60)], 4)
    present = set()
    for round_ in range(4):
        add = [h for h in hs if rng.random() < 0.4 and h not in present]
        s.put_many([(h, block_for(SMALL, h)) for h in add])
        present.update(add)
        if round_ == 2:
            s.put_many([(h, block_for(SMALL, h)) for h in hs[:25] if h not in present])
            present.update(hs[:25])
        for start in (0, 3, 25):
            q = hs[start:]
            want = [h in present for h in q]
            assert s.exists(q) == want
            lead = next((i for i, w in enumerate(want) if not w), len(want))
            assert s.longest_prefix(q) == lead
    assert s.longest_prefix([]) == 0 and s.exists([]) == []
    fresh = kv("nothing-here")
    assert fresh.longest_prefix(hs) == 0 and fresh.exists(hs[:3]) == [False] * 3


def test_wrong_layout_and_corrupt_block_are_rejected(kv):
    s = kv("a", SMALL)
    h = block_hashes(range(4), 4)[0]
    s.put(h, block_for(SMALL, h))
    other = KVLayout("bfloat16", block_tokens=4, num_layers=2, num_kv_heads=4, head_dim=4)  # same byte size
    s2 = kv("a", other)
    raw = _file(SMALL, h, block_for(SMALL, h))
    # A block of SMALL placed where `other` looks for it (a misconfigured copy) is refused, not loaded.
    _write_raw(s2, h, raw)
    with pytest.raises(BlockError, match="layout"):
        s2.get(h)
    # Truncated and corrupted files in place of a block.
    h2, h3 = block_hashes(range(8), 4)[1], block_hashes(range(12), 4)[2]
    _write_raw(s, h2, _file(SMALL, h2, block_for(SMALL, h2))[:-100])
    with pytest.raises(BlockError, match="truncated|bytes"):
        s.get(h2)
    bad = bytearray(_file(SMALL, h3, block_for(SMALL, h3)))
    bad[-1] ^= 0xFF
    _write_raw(s, h3, bytes(bad))
    with pytest.raises(BlockError, match="checksum"):
        s.get(h3)
    with pytest.raises(BlockError):
        s.get_many([h, h3])  # the good one loads, the bad one raises
    assert torch.equal(s.get(h), block_for(SMALL, h))


def _write_raw(store: KVStore, h: str, raw: bytes) -> None:
    """Write a file at a block's path bypassing the format (to plant bad blocks)."""
    path = store.path(h)
    backend = store.backend
    if hasattr(backend, "sync"):
        c = backend.sync
        c.mkdir(path.rpartition("/")[0], parents=True, exist_ok=True)
        c.write_file(path, raw)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(raw)


def test_native_and_mount_see_the_same_files(mounted):
    h1, h2 = block_hashes(range(8), 4)
    with mounted.client() as c:
        native = KVStore("/kvshared/model", SMALL, client=c)
        viamount = KVStore(f"{mounted.mountpoint}/kvshared/model", SMALL)
        assert native.put(h1, block_for(SMALL, h1))
        assert viamount.put(h2, block_for(SMALL, h2))
        assert viamount.put(h1, block_for(SMALL, h1)) is False
        assert torch.equal(viamount.get(h1), block_for(SMALL, h1))
        assert torch.equal(native.get(h2), block_for(SMALL, h2))
        assert native.longest_prefix([h1, h2]) == viamount.longest_prefix([h1, h2]) == 2
        names = c.listdir(f"/kvshared/model/{SMALL.name}/{h2[:2]}")
        assert names == [h2]  # no temp files left behind
        native.close()
        viamount.close()
        # Counters from both kinds of client reach meta (the mount's as user.* xattrs), and a policy
        # set through the mount with a plain setxattr is the same policy.
        row = next(d for d in kv_status(c).dirs if d.path == "/kvshared/model")
        assert row.get_hits == 2 and row.lookup_hit_blocks == 4 and row.blocks == 2
        os.setxattr(f"{mounted.mountpoint}/kvshared", "user.kvfs.policy", Policy(quota=1 << 30).encode())
        row = next(d for d in kv_status(c).dirs if d.path == "/kvshared")
        assert row.quota == 1 << 30


# --------------------------------------------------------------------------- out tensors on a GPU (kvfs.kv.device)
# The staged route is the same code with or without a GPU (device_io="staged" stages CPU outs too), so
# CI runs it on every backend; the CUDA-only tests at the end run where a GPU is (bench/gpu_kv.py).

BIG = KVLayout("float16", block_tokens=16, num_layers=20, num_kv_heads=8, head_dim=64)  # 2.5 MiB: 3 chunks
needs_cuda = pytest.mark.gpu  # deselected by default; `pytest -m gpu` on a GPU machine (bench/gpu_kv.py's run)


def _outs(layout: KVLayout, n: int, device: str = "cpu") -> list:
    """n out arguments, alternately one block tensor and a list of plane tensors, filled with junk."""
    dt = layout.torch_dtype()
    return [torch.full(layout.block_shape, 7, dtype=dt, device=device) if i % 2 == 0 else
            [torch.full(layout.plane_shape, 7, dtype=dt, device=device) for _ in range(layout.num_planes)]
            for i in range(n)]


def _as_block(out, layout: KVLayout) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.stack(out).reshape(layout.block_shape)


def _plant_bad_blocks(s: KVStore, layout: KVLayout, hs: list[str]) -> None:
    """hs[0]: a block of another layout of the same byte size; hs[1]: truncated; hs[2]: payload corrupted."""
    other = KVLayout(layout.dtype, layout.block_tokens, layout.num_layers, layout.num_kv_heads * 2,
                     layout.head_dim // 2)
    _write_raw(s, hs[0], _file(other, hs[0], block_for(other, hs[0])))
    _write_raw(s, hs[1], _file(layout, hs[1], block_for(layout, hs[1]))[:-100])
    bad = bytearray(_file(layout, hs[2], block_for(layout, hs[2])))
    bad[-3] ^= 0x10
    _write_raw(s, hs[2], bytes(bad))


@pytest.mark.parametrize("overlap", [False, True], ids=["copies-after-window", "copies-as-landed"])
def test_staged_route_batches_verifies_and_reuses_buffers(kv, monkeypatch, overlap):
    """device_io="staged": payload into a host staging buffer, verified there, copied into out; small
    blocks' copies after their window, large ones' as each lands (both ways here, whatever the size)."""
    from kvfs.kv import device

    monkeypatch.setattr(device, "OVERLAP_COPIES_FROM", 0 if overlap else 1 << 40)
    s = kv("staged", MID, device_io="staged", concurrency=2)
    hs = block_hashes(range(4 * 12), 4, salt="staged")
    s.put_many([(h, block_for(MID, h)) for h in hs[:7]])
    # 9 blocks with 2 misses among them: 5 windows of 2 over 4 staging buffers, each reused
    want = hs[:3] + [hs[8]] + hs[3:7] + [hs[7]]
    outs = _outs(MID, len(want))
    got = s.get_many(want, outs)
    for h, out, g in zip(want, outs, got):
        if h in (hs[7], hs[8]):
            assert g is None
        else:
            assert g is out and torch.equal(_as_block(out, MID), block_for(MID, h))
    assert len(s.device_io.pool) == 4  # at most 2 x concurrency buffers, back in the pool
    got = s.get_many(hs[:7], _outs(MID, 7))
    assert all(torch.equal(_as_block(g, MID), block_for(MID, h)) for g, h in zip(got, hs))
    assert len(s.device_io.pool) == 4  # reused, not grown
    assert (s.stats["get_hits"], s.stats["get_misses"]) == (14, 2)
    assert s.get(hs[8]) is None

    big = kv("staged-big", BIG, device_io="staged")
    assert big.put(hs[0], block_for(BIG, hs[0]))
    out = torch.empty(BIG.block_shape, dtype=torch.float16)
    assert big.get(hs[0], out=out) is out and torch.equal(out, block_for(BIG, hs[0]))

    # Bad blocks are refused exactly as on the host route; a batch raises, its good blocks still load.
    bad = hs[9:12]
    _plant_bad_blocks(s, MID, bad)
    with pytest.raises(BlockError, match="layout"):
        s.get(bad[0], out=_outs(MID, 1)[0])
    with pytest.raises(BlockError, match="truncated|bytes"):
        s.get(bad[1])
    with pytest.raises(BlockError, match="checksum"):
        s.get(bad[2], out=_outs(MID, 2)[1])
    with pytest.raises(BlockError, match="checksum"):
        s.get_many([hs[0], bad[2], hs[1]])
    assert torch.equal(s.get(hs[1]), block_for(MID, hs[1]))
    # verify=False turns off the payload checksum (and nothing else): the corrupted payload loads
    unverified = kv("staged", MID, device_io="staged", verify=False)
    loaded = unverified.get(bad[2])
    assert loaded is not None and not torch.equal(loaded, block_for(MID, bad[2]))
    with pytest.raises(BlockError, match="layout"):
        unverified.get(bad[0])


@pytest.mark.parametrize("device_io", ["auto", "staged"])
def test_out_tensors_are_checked(tmp_path, device_io):
    s = KVStore(str(tmp_path), SMALL, device_io=device_io)
    h = block_hashes(range(4), 4)[0]
    s.put(h, block_for(SMALL, h))
    dt, plane = torch.bfloat16, SMALL.plane_shape
    planes = [torch.empty(plane, dtype=dt) for _ in range(SMALL.num_planes)]
    bad = {
        "dtype": torch.empty(SMALL.block_shape, dtype=torch.float32),
        "shape": torch.empty(SMALL.nbytes // 2, dtype=dt),
        "expected 4 tensors": planes[:3],
        "not contiguous": torch.empty(SMALL.block_shape[:3] + SMALL.block_shape[:2:-1], dtype=dt).transpose(3, 4),
        "CPU or CUDA": torch.empty(SMALL.block_shape, dtype=dt, device="meta"),
        "share a device": planes[:-1] + [torch.empty(plane, dtype=dt, device="meta")],
    }
    planes_nc = list(planes)
    planes_nc[3] = torch.empty(plane[::-1], dtype=dt).transpose(0, 2)
    bad["tensor 3 is not contiguous"] = planes_nc
    for match, out in bad.items():
        with pytest.raises(ValueError, match=match):
            s.get(h, out=out)
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        s.get(h, out=[None] * SMALL.num_planes)
    assert s.stats["get_hits"] == 0 and s.stats["get_misses"] == 0  # refused before any read
    assert torch.equal(s.get(h, out=planes)[0], block_for(SMALL, h)[0, 0])
    s.close()


def test_choose_route():
    def route(mode: str, device: str, directory: bool = True, kvikio_ok: bool = True, verify: bool = True,
              in_transit: bool = True) -> str:
        return choose_route(mode, device, directory=directory, kvikio_ok=kvikio_ok, verify=verify,
                            verified_in_transit=in_transit)

    assert [route(m, "cpu") for m in ("auto", "kvikio", "staged")] == ["host", "host", "staged"]
    assert route("auto", "cuda") == "kvikio"  # on the kvfs mount: its client checks every byte
    assert route("auto", "cuda", in_transit=False) == "staged"  # local disk: the payload checksum is the only check
    assert route("auto", "cuda", in_transit=False, verify=False) == "kvikio"
    assert route("auto", "cuda", kvikio_ok=False) == "staged"
    assert route("auto", "cuda", directory=False, kvikio_ok=False, in_transit=False) == "staged"  # native client
    assert route("kvikio", "cuda", in_transit=False) == "kvikio"
    assert route("staged", "cuda") == "staged"


def test_device_io_options(cluster, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="device_io must be one of"):
        KVStore(str(tmp_path), SMALL, device_io="gds")
    with cluster.client() as c:
        if not kvikio_available():  # with kvikio, a client store takes device_io="kvikio" (its chunk files)
            with pytest.raises(ImportError, match="needs the kvikio package"):
                KVStore("/kvopt/m", SMALL, client=c, device_io="kvikio")
        native = KVStore("/kvopt/m", SMALL, client=c)
        assert native.device_io.route_for("cuda") == "staged" and native.device_io.route_for("cpu") == "host"
        native.close()
    monkeypatch.setitem(sys.modules, "kvikio", None)  # kvikio not importable, even where it is installed
    assert not kvikio_available()
    with pytest.raises(ImportError, match="needs the kvikio package"):
        KVStore(str(tmp_path), SMALL, device_io="kvikio")
    auto = KVStore(str(tmp_path), SMALL, verify=False)
    assert auto.device_io.route_for("cuda") == "staged"  # auto falls back to staging without kvikio
    h = block_hashes(range(4), 4)[0]
    auto.put(h, block_for(SMALL, h))
    assert torch.equal(auto.get(h), block_for(SMALL, h))
    auto.close()


def test_auto_knows_the_kvfs_mount(mounted, tmp_path):
    assert is_kvfs_mount(mounted.mountpoint) and is_kvfs_mount(f"{mounted.mountpoint}/kv/not/there/yet")
    assert not is_kvfs_mount(str(tmp_path)) and not is_kvfs_mount("/proc/self")
    on_mount = KVStore(f"{mounted.mountpoint}/kvauto/m", SMALL)
    local = KVStore(str(tmp_path), SMALL)
    assert on_mount.device_io.verified_in_transit and not local.device_io.verified_in_transit
    on_mount.close()
    local.close()


@needs_cuda
@pytest.mark.parametrize("device_io", ["staged", "kvikio", "auto"])
def test_gpu_get(kv, request, device_io):
    backend = request.node.callspec.params["kv"]
    if device_io == "kvikio" and not kvikio_available():
        pytest.skip("kvikio does not import here")
    s = kv("gpu", MID, device_io=device_io, concurrency=2)
    route = s.device_io.route_for("cuda")
    if device_io == "auto":
        on_mount = backend == "mount" and kvikio_available()
        assert route == ("kvikio" if on_mount else "staged")
    else:
        assert route == device_io
    hs = block_hashes(range(4 * 12), 4, salt=f"gpu-{device_io}")
    s.put_many([(h, block_for(MID, h)) for h in hs[:7]])
    want = hs[:3] + [hs[8]] + hs[3:7] + [hs[7]]
    outs = _outs(MID, len(want), "cuda")
    ptrs = [o.data_ptr() if isinstance(o, torch.Tensor) else o[0].data_ptr() for o in outs]
    torch.cuda._sleep(50_000_000)  # a busy current stream: get must not write out before it is done
    for o in outs:
        for t in [o] if isinstance(o, torch.Tensor) else o:
            t.fill_(5)
    got = s.get_many(want, outs)
    for h, out, g, ptr in zip(want, outs, got, ptrs):
        if h in (hs[7], hs[8]):
            assert g is None
            continue
        assert g is out
        assert (out.data_ptr() if isinstance(out, torch.Tensor) else out[0].data_ptr()) == ptr
        assert torch.equal(_as_block(out, MID), block_for(MID, h).cuda())
    big = kv("gpu-big", BIG, device_io=device_io)
    big.put(hs[0], block_for(BIG, hs[0]))
    out = torch.empty(BIG.block_shape, dtype=torch.float16, device="cuda")
    assert big.get(hs[0], out=out) is out and torch.equal(out, block_for(BIG, hs[0]).cuda())
    # Headers and sizes are checked on every route; the payload checksum wherever it passes the host.
    bad = hs[9:12]
    _plant_bad_blocks(s, MID, bad)
    with pytest.raises(BlockError, match="layout"):
        s.get(bad[0], out=_outs(MID, 1, "cuda")[0])
    with pytest.raises(BlockError, match="truncated|bytes"):
        s.get(bad[1], out=_outs(MID, 2, "cuda")[1])
    corrupted = _outs(MID, 1, "cuda")[0]
    if route == "kvikio":
        s.get(bad[2], out=corrupted)  # documented: not re-verified on this route
        assert not torch.equal(corrupted, block_for(MID, bad[2]).cuda())
    else:
        with pytest.raises(BlockError, match="checksum"):
            s.get(bad[2], out=corrupted)


# --------------------------------------------------------------------------- concurrency across processes

WORKER = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import test_kv
from kvfs.kv import KVStore, KVLayout
mode, where, root, layout_name, seed = sys.argv[2:7]
hashes = json.loads(sys.argv[7])
layout = KVLayout.from_name(layout_name)
client = None
if mode == "native":
    import kvfs
    client = kvfs.SyncClient(where, kvfs.ClientOptions(timeout=20))
store = KVStore(root, layout, client=client, check_existing=False)
import random
rng = random.Random(int(seed))
published, bad, hits = 0, 0, 0
order = list(hashes)
rng.shuffle(order)
for i, h in enumerate(order):
    if rng.random() < 0.5:
        published += store.put(h, test_kv.block_for(layout, h))
    got = store.get(order[rng.randrange(len(order))])
    for g in store.get_many(order[:4]):
        if g is not None:
            hits += 1
    if got is not None:
        hits += 1
for h in order:
    published += store.put(h, test_kv.block_for(layout, h))
for h in order:
    g = store.get(h)
    if g is None or not torch.equal(g, test_kv.block_for(layout, h)):
        bad += 1
store.close()
if client is not None:
    client.close()
print(json.dumps({"published": published, "bad": bad, "hits": hits}))
"""


@pytest.mark.parametrize("mode", ["native", pytest.param("mount", marks=pytest.mark.slow)])
def test_concurrent_writers_and_readers_processes(request, mode):
    cluster = request.getfixturevalue("cluster" if mode == "native" else "mounted")
    hashes = block_hashes(list(range(4 * 8)), 4, salt=mode)
    if mode == "native":
        where, root = cluster.meta_address, "/kvconc/model"
    else:
        where, root = cluster.mountpoint, f"{cluster.mountpoint}/kvconc/model"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, os.path.dirname(__file__), mode, where, root,
                               MID.name, str(i), json.dumps(hashes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    # Every block published exactly once across 3 racing writers (check_existing=False: they all
    # really race to the rename), every reader saw whole, correct blocks.
    assert sum(r["published"] for r in results) == len(hashes)
    assert all(r["bad"] == 0 for r in results)
    with cluster.client() as c:
        names = c.listdir(f"/kvconc/model/{MID.name}/{hashes[0][:2]}")
        assert not [n for n in names if n.endswith(".tmp")]


# --------------------------------------------------------------------------- cache policy and eviction


def test_policy_set_get_and_cli(cluster, capsys):
    with cluster.client() as c:
        c.mkdir("/kvpol/a", parents=True, exist_ok=True)
        assert get_policy(c, "/kvpol/a") is None
        p = set_policy(c, "/kvpol/a", quota=10 << 30, ttl=3600)
        assert p == Policy(10 << 30, 3600.0, 60.0)
        assert set_policy(c, "/kvpol/a", window=5) == Policy(10 << 30, 3600.0, 5.0)
        assert get_policy(c, "/kvpol/a") == Policy(10 << 30, 3600.0, 5.0)
    from kvfs.cli import main

    assert main(["policy", "set", "/kvpol/a", "--quota", "2G", "--ttl", "2h", "--meta", cluster.meta_address]) == 0
    assert "quota 2" in capsys.readouterr().out
    assert main(["policy", "get", "/kvpol/a", "--meta", cluster.meta_address]) == 0
    out = capsys.readouterr().out
    assert "quota 2" in out and "ttl 7200s" in out and "window 5s" in out
    assert main(["policy", "get", "/nonexistent", "--meta", cluster.meta_address]) == 1
    assert "kvfs: error" in capsys.readouterr().err
    assert main(["policy", "set", "/kvpol/a", "--ttl", "soon", "--meta", cluster.meta_address]) == 1


def test_eviction_under_quota_with_active_readers(cluster):
    """Writers fill a directory past its quota while readers keep reading: eviction brings it back
    under quota, readers only ever see whole verified blocks or a miss, counters show it all."""
    hashes = block_hashes(list(range(16 * 80)), 16)
    with cluster.client() as c, cluster.client() as rc:
        root = "/kvevict/model"
        c.mkdir(root, parents=True, exist_ok=True)
        quota = 40 * (MID.nbytes + 4096)
        # One hour-long LRU window: with 60 s windows on wall-clock time, a run that straddles a window
        # boundary puts its first blocks in an older window, which is evicted first.
        set_policy(c, "/kvevict", quota=quota, window=3600)
        writer = KVStore(root, MID, client=c)
        reader = KVStore(root, MID, client=rc)
        stop = threading.Event()
        seen = {"hit": 0, "miss": 0, "errors": []}

        def read_loop() -> None:
            rng = random.Random(3)
            while not stop.is_set():
                h = hashes[rng.randrange(len(hashes))]
                try:
                    got = reader.get(h)
                except Exception as exc:  # noqa: BLE001 - any error is a failure: evicted blocks must read as misses
                    seen["errors"].append(repr(exc))
                    continue
                if got is None:
                    seen["miss"] += 1
                elif torch.equal(got, block_for(MID, h)):
                    seen["hit"] += 1
                else:
                    seen["errors"].append(f"wrong data for {h}")

        threads = [threading.Thread(target=read_loop) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for i in range(0, len(hashes), 10):
                writer.put_many([(h, block_for(MID, h)) for h in hashes[i:i + 10]])
                if i % 20 == 0:
                    evict_now(c)
            status = evict_now(c)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not seen["errors"], seen["errors"][:5]
        assert seen["hit"] > 0 and seen["miss"] > 0
        row = next(d for d in status.dirs if d.path == "/kvevict")
        assert row.used_bytes <= quota and row.quota == quota
        assert row.evicted_blocks >= len(hashes) - 40 and row.evicted_bytes == row.evicted_blocks * (MID.nbytes + 4096)
        present = writer.exists(hashes)
        assert 0 < sum(present) <= 40
        # Windowed LRU within one window: the newest blocks go first, so what stays is the oldest.
        assert present[0] and not present[-1]
        # an evicted block is gone from the namespace: ENOENT, a miss
        gone = hashes[present.index(False)]
        with pytest.raises(FileNotFoundError):
            c.stat(writer.path(gone))
        assert writer.get(gone) is None
        writer.close()
        reader.close()
        rows = kv_status_rows(c)
        header, body = rows[0], {r[0]: r for r in rows[1:]}
        assert header[0] == "KV DIR" and "/kvevict" in body and "/kvevict/model" in body
        model = next(d for d in kv_status(c).dirs if d.path == "/kvevict/model")
        assert model.get_hits >= seen["hit"] and model.get_misses >= seen["miss"]


def test_ttl_expiry_and_touch_on_hit(cluster):
    hs = block_hashes(range(12), 4)
    with cluster.client() as c:
        s = KVStore("/kvttl/m", SMALL, client=c, touch_interval=0)
        s.put_many([(h, block_for(SMALL, h)) for h in hs])
        set_policy(c, "/kvttl", ttl=30)
        old = time.time_ns() - 3600 * 10**9

        def backdate(h: str) -> None:
            attr = c.stat(s.path(h))
            c.setattr(attr.ino, atime_ns=old, mtime_ns=old)

        for h in hs:
            if h != hs[1]:
                backdate(h)
        # Meta's own pass (every 5 s) may expire the block between its backdating and the hit on a loaded
        # machine: then put it again and retry. The hit must find it in one of a few tries.
        for _ in range(3):
            backdate(hs[1])
            if s.get(hs[1]) is not None:  # a hit touches the block (in the background): it is recent again
                break
            s.put(hs[1], block_for(SMALL, hs[1]))
        else:
            raise AssertionError("the backdated block was gone before every hit")
        deadline = time.monotonic() + 10
        while c.stat(s.path(hs[1])).atime_ns <= old:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status = evict_now(c)
        assert s.exists(hs) == [False, True, False]
        row = next(d for d in status.dirs if d.path == "/kvttl")
        assert row.expired_blocks == 2 and row.ttl == 30
        s.close()


# --------------------------------------------------------------------------- the eviction engine in-process


def _ns():
    from kvfs.meta.engine_memory import MemoryEngine
    from kvfs.meta.namespace import Namespace

    return Namespace(MemoryEngine())


def _mkfile(ns, parent: int, name: str, size: int, access_s: float, written_s: float) -> int:
    from kvfs import protocol as P
    from kvfs.meta import records as R

    attr = ns.mknode(parent, name, stat.S_IFREG | 0o644, 0, 0)
    node = ns.inode(attr.ino)
    node.size = size
    ns.engine.write([(R.inode_key(attr.ino), R.encode(node))])
    ns.setattr(P.SetAttr(attr.ino, atime_ns=int(access_s * 1e9), mtime_ns=int(written_s * 1e9)))
    return attr.ino


def test_windowed_lru_order_in_process():
    from kvfs.meta.eviction import KVCache

    ns = _ns()
    now = 1_000_000.0
    d = ns.mknode(1, "kv", stat.S_IFDIR | 0o755, 0, 0).ino
    # window 100 s: a, b in the oldest window (b written later), c newer window, e newest, t a temp file
    _mkfile(ns, d, "a", 100, now - 250, written_s=now - 900)
    _mkfile(ns, d, "b", 100, now - 220, written_s=now - 800)
    _mkfile(ns, d, "c", 100, now - 150, written_s=now - 950)
    _mkfile(ns, d, "e", 100, now - 10, written_s=now - 10)
    _mkfile(ns, d, ".x.123.tmp", 100, now - 10, written_s=now - 10)
    ns.setxattr(d, "kvfs.policy", Policy(quota=350, window=100).encode(), 0)
    kv = KVCache(ns, clock=lambda: now)
    reply = kv.run_once()
    # 500 bytes > 350: evict until <= 315: b first (oldest window, written last), then a.
    names = {e.name for e in ns.readdir(d, "", 100).entries}
    assert names == {"c", "e", ".x.123.tmp"}
    row = reply.dirs[0]
    assert (row.path, row.evicted_blocks, row.evicted_bytes, row.used_bytes, row.blocks) == ("/kv", 2, 200, 300, 2)
    # counters survive a restart of meta (persisted as an xattr)
    assert KVCache(ns, clock=lambda: now).status().dirs[0].evicted_blocks == 2
    # an old temp file (crashed writer) is cleaned, not counted
    kv2 = KVCache(ns, clock=lambda: now + 7200)
    kv2.run_once()
    assert ".x.123.tmp" not in {e.name for e in ns.readdir(d, "", 100).entries}


def test_chunkserver_watermark_eviction_in_process():
    from kvfs import protocol as P
    from kvfs.meta.eviction import KVCache

    ns = _ns()
    now = 5_000.0
    kvdir = ns.mknode(1, "kv", stat.S_IFDIR | 0o755, 0, 0).ino
    other = ns.mknode(1, "weights", stat.S_IFDIR | 0o755, 0, 0).ino
    for i in range(10):
        _mkfile(ns, kvdir, f"b{i}", 100, now - 1000 + i * 100, written_s=now - 1000)
    _mkfile(ns, other, "w", 500, now - 5000, written_s=now - 5000)  # no policy: never evicted
    ns.setxattr(kvdir, "kvfs.policy", Policy(window=1).encode(), 0)
    ns.registry.register(P.RegisterChunkserver("n1", "127.0.0.1:1", "/d", "h", 1600, 1500, []), lambda c: True)
    ns.used_bytes = 1500  # logical bytes, replication 1
    kv = KVCache(ns, clock=lambda: now)
    kv.run_once()
    # 1500/1600 > 90%: evict down to 80% (1280): 3 least recent blocks (b0, b1, b2).
    left = sorted(e.name for e in ns.readdir(kvdir, "", 100).entries)
    assert left == [f"b{i}" for i in range(3, 10)]
    assert [e.name for e in ns.readdir(other, "", 100).entries] == ["w"]


def test_exists_under_in_process():
    from kvfs.meta.eviction import KVCache

    ns = _ns()
    base = ns.mknode(1, "kv", stat.S_IFDIR | 0o755, 0, 0).ino
    sub = ns.mknode(base, "ab", stat.S_IFDIR | 0o755, 0, 0).ino
    for n in ("ab1", "ab2", "ab4"):
        ns.mknode(sub, n, stat.S_IFREG | 0o644, 0, 0)
    kv = KVCache(ns)
    names = ["ab/ab1", "ab/ab2", "ab/ab3", "ab/ab4", "cd/cd1"]
    r = kv.exists_under("/kv", names)
    assert (r.exists, r.leading) == ([True, True, False, True, False], 2)
    r = kv.exists_under("/kv", names, leading_only=True)
    assert r.leading == 2 and r.exists[:3] == [True, True, False]
    assert kv.exists_under("/missing", names).leading == 0


def test_chunkserver_high_watermark_evicts_real_cluster(make_cluster):
    """A chunkserver filled past 90% of its capacity: one pass evicts the least recent KV blocks until
    the data would fill at most 80%; files outside policy directories are left alone."""
    capacity = 8 << 20
    cluster = make_cluster(chunkservers=1, replication=1, chunkserver_args=("--capacity", str(capacity)))
    block_file = MID.nbytes + 4096
    with cluster.client() as c:
        c.mkdir("/kvwm/model", parents=True, exist_ok=True)
        # No quota, no TTL: evicted only under chunkserver pressure. One hour-long LRU window, so every
        # block is in the same window however slowly a loaded machine writes them.
        set_policy(c, "/kvwm", window=3600)
        c.write_file("/weights.bin", b"w" * (512 << 10))
        s = KVStore("/kvwm/model", MID, client=c)
        hashes = block_hashes(list(range(16 * 200)), 16)
        stored = []
        for h in hashes:
            if (len(stored) + 1) * block_file + (512 << 10) > 0.93 * capacity:
                break
            s.put(h, block_for(MID, h))
            stored.append(h)

        def reported_used() -> int:
            return sum(srv.used for srv in c.refresh_servers().servers)

        deadline = time.monotonic() + 15
        while reported_used() < 0.9 * capacity and time.monotonic() < deadline:
            time.sleep(0.2)  # the chunkserver reports its usage with its heartbeat
        assert reported_used() >= 0.9 * capacity
        status = evict_now(c)
        row = next(d for d in status.dirs if d.path == "/kvwm")
        assert row.evicted_blocks > 0
        assert row.used_bytes + (512 << 10) <= 0.8 * capacity
        present = s.exists(stored)
        # All in one LRU window: the most recently written go first (a chain loses its tail first).
        assert present[0] is True and present[-1] is False
        assert c.stat("/weights.bin").size == 512 << 10
        s.close()


def test_native_get_falls_back_from_a_corrupt_local_replica(cluster):
    """The native backend reads chunk files on this host directly; a corrupt replica is detected by
    the chunk checksums and the block comes from the other replica; with every replica corrupt the
    get fails (never returns wrong bytes)."""
    from kvfs.chunkserver.store import chunk_path

    with cluster.client() as client:
        s = KVStore("/kvtest/corrupt-replica", MID, client=client)
        h = block_hashes(range(16), 16)[0]
        want = block_for(MID, h)
        s.put(h, want)
        servers = {x.address: x.data_dir for x in client.refresh_servers().servers}
        ref = client.chunk_map(client.resolve(s.path(h)).ino).chunks[0]
        assert len(ref.replicas) == 2

        def flip(address: str) -> None:
            path = chunk_path(servers[address], ref.chunk_id)
            assert os.path.getsize(path) == ref.length > 40_000, (path, ref)
            with open(path, "r+b") as f:
                f.seek(40_000)  # inside the payload, past the 4 KiB header
                byte = f.read(1)
                f.seek(40_000)
                f.write(bytes([byte[0] ^ 0x10]))

        flip(ref.replicas[0])
        assert torch.equal(s.get(h), want)
        assert torch.equal(s.get_many([h])[0], want)
        flip(ref.replicas[1])
        with pytest.raises((OSError, BlockError)):
            s.get(h)


def test_native_batch_reports_each_block_as_it_lands(cluster, monkeypatch):
    """The native backend settles each block of a batch as soon as it has landed (``on_ready``, from the
    thread that read it: the batch is read by several, the calling one among them), once per block:
    hits, a miss, and a block whose every replica is corrupt (read again through the client, which fails
    it). The staged route copies each hit as it is reported."""
    import threading

    from kvfs.chunkserver.store import chunk_path
    from kvfs.kv import native_cached

    monkeypatch.setattr(native_cached, "MIN_GROUP_BYTES", 1)  # this small a batch is read by one thread otherwise

    with cluster.client() as client:
        s = KVStore("/kvtest/on-ready", MID, client=client, device_io="staged", concurrency=8)
        hs = block_hashes(range(16 * 5), 16, salt="ready")
        s.put_many([(h, block_for(MID, h)) for h in hs[:4]])  # hs[4]: never stored
        servers = {x.address: x.data_dir for x in client.refresh_servers().servers}
        ref = client.chunk_map(client.resolve(s.path(hs[2])).ino).chunks[0]
        for address in ref.replicas:
            with open(chunk_path(servers[address], ref.chunk_id), "r+b") as f:
                f.seek(40_000)
                byte = f.read(1)
                f.seek(40_000)
                f.write(bytes([byte[0] ^ 0x10]))
        calls: list = []  # per backend.read_many call: its payload_digest flag and its reports
        real = s.backend.read_many

        def spy(jobs, on_ready=None, **kwargs):
            reports: list = []
            calls.append((kwargs.get("payload_digest", False), len(jobs), reports))

            def record(i, res):
                reports.append((i, threading.get_ident(), res))
                on_ready(i, res)

            return real(jobs, record, **kwargs)

        s.backend.read_many = spy
        outs = _outs(MID, 5)
        with pytest.raises((OSError, BlockError)):
            s.get_many(hs[:5], outs)
        # First pass: payloads hashed as they land (chunk checksums not checked), every block reported.
        digest, n, first = calls[0]
        assert digest and n == 5
        assert sorted(i for i, _, _ in first) == [0, 1, 2, 3, 4]
        by_index = {i: (thread, res) for i, thread, res in first}
        assert len({by_index[i][0] for i in (0, 1, 3)}) > 1  # read (and settled) by several threads
        for i in (0, 1, 3):
            res = by_index[i][1]
            assert res.payload_done and res.payload_xxh3 is not None
            assert torch.equal(_as_block(outs[i], MID), block_for(MID, hs[i]))
        assert by_index[4][1] is None
        # Block 2's digest did not match: read once more the checked way, which fails it (every replica bad).
        assert by_index[2][1].payload_xxh3 is not None
        assert [(d, k) for d, k, _ in calls[1:]] == [(False, 1)]
        (i, _, res), = calls[1][2]
        assert i == 0 and isinstance(res, OSError)
        s.close()


def test_native_chunk_file_route_on_cpu(cluster):
    """The native client's kvikio route (``device_io="kvikio"``, CUDA only) with host memory: the backend
    reads and checks each block's head, then hands the block's chunk files on this host
    (``kvfs.chunkfiles``) to ``land``, which here reads them with ``PosixFile`` (kvikio's ``pread``
    shape) through the same ``DeviceIO._pread_tensors`` the GPU route runs with ``kvikio.CuFile``."""
    from kvfs.kv.device import DeviceIO
    from kvfs.kv.hashing import check_hash

    with cluster.client() as client:
        s = KVStore("/kvtest/land", BIG, client=client)  # 2.5 MiB blocks: 3 chunks of 1 MiB
        hs = block_hashes(range(16 * 3), 16, salt="land")
        s.put_many([(h, block_for(BIG, h)) for h in hs[:2]])
        outs = [[torch.empty(BIG.plane_shape, dtype=torch.float16) for _ in range(BIG.num_planes)] for _ in hs]

        def job(h, out):
            header_len = s._header_len_for(check_hash(h))

            def land(chunks, offset):
                return DeviceIO._pread_tensors(chunks, offset, out, chunks.name)

            return (s.path(h), header_len + BIG.nbytes, header_len, [], 0, land)

        res = s.backend.read_many([job(h, o) for h, o in zip(hs, outs)])
        assert res[2] is None  # never stored: a miss
        for h, r, out in zip(hs[:2], res[:2], outs):
            assert r.payload_done
            s._check(h, r, None)  # the header (read and verified by the backend) matches the block
            assert torch.equal(torch.stack(out).reshape(BIG.block_shape), block_for(BIG, h))
        # Read again: the maps are cached and leased (meta/kv_leases.py), so meta is not asked.
        asked = []
        real_validate = s.backend._validate

        async def validate(paths, touch_before):
            asked.append(paths)
            return await real_validate(paths, touch_before)

        s.backend._validate = validate
        for out in outs:
            for t in out:
                t.zero_()
        res = s.backend.read_many([job(h, o) for h, o in zip(hs[:2], outs)])
        assert asked == []
        for h, r, out in zip(hs[:2], res, outs):
            assert r.payload_done
            assert torch.equal(torch.stack(out).reshape(BIG.block_shape), block_for(BIG, h))
        s.close()
