"""SGLang on kvfs (issue 11): ``kvfs.engines.sglang.KvfsHiCacheStorage`` against SGLang 0.5.23's own code.

The SGLang engine cannot run here (it needs a CUDA torch 2.14.1 and flashinfer); its wheel is installed
with ``--no-deps`` (``./dev.sh test``). What is SGLang's, imported from the wheel:

* ``StorageBackendFactory.create_backend("dynamic", ...)`` (``storage/backend_factory.py``) loads the
  backend from ``module_path``/``class_name``, as ``--hicache-storage-backend dynamic`` does, and checks
  that it subclasses the real ``HiCacheStorage``;
* ``HiCacheStorageConfig``, ``get_hash_str`` (the page keys: SGLang's own SHA-256 page chains);
* the host memory pool's page interface: ``MHATokenToKVPoolHost``'s ``init_kv_buffer``, ``get_data_page``,
  ``get_dummy_flat_data_page`` and ``set_from_flat_data_page``, compiled from the wheel's source
  (``pool_host/mha.py``). The class itself cannot be imported on a CPU torch: its module chain imports
  torchvision's C ops and CUDA kernels. Only those four methods are taken; nothing is rewritten.

A real kvfs cluster (meta, chunkservers, FUSE mount) stores the pages; the backend reaches it through the
native client and through the mount. Checked: set/exists/get round trips are bit-exact (zero-copy v1 and
the generic flat-page path); ``batch_exists`` counts the stored prefix; another process with another host
pool layout reads the pages a first instance wrote; a corrupt or truncated page is never loaded; with
kvfs stopped (no answer) or killed every call misses within its time bound, with one log line per outage.
"""

from __future__ import annotations

import ast
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

# No skip: if SGLang is missing, this module must fail (./dev.sh test installs it). Importing it sets
# cache-directory variables (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, ...) that every later subprocess
# of the test session would inherit: the environment is put back afterwards.
_ENV = dict(os.environ)
import sglang
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_hash_str

from kvfs.engines.sglang import KvfsHiCacheStorage
from kvfs.kv import KVLayout, KVStore

os.environ.clear()
os.environ.update(_ENV)

SGLANG_VERSION = "0.5.23"
PAGE, LAYERS, HEADS, HEAD_DIM = 16, 3, 2, 32
MODEL = "tiny/llama-test"
MHA_SOURCE = Path(sglang.__file__).parent / "srt/mem_cache/pool_host/mha.py"
POOL_METHODS = ("init_kv_buffer", "get_data_page", "get_dummy_flat_data_page", "set_from_flat_data_page")


def test_sglang_version():
    import importlib.metadata

    assert importlib.metadata.version("sglang") == SGLANG_VERSION
    assert issubclass(KvfsHiCacheStorage, HiCacheStorage)
    assert not KvfsHiCacheStorage.__abstractmethods__


def _pool_methods() -> dict:
    """The host pool page methods of ``MHATokenToKVPoolHost``, compiled from the installed wheel."""
    tree = ast.parse(MHA_SOURCE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MHATokenToKVPoolHost")
    funcs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in POOL_METHODS]
    assert sorted(f.name for f in funcs) == sorted(POOL_METHODS)

    def alloc(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes):
        return torch.zeros(dims, dtype=dtype, device=device)

    namespace = {"torch": torch, "ALLOC_MEMORY_FUNCS": {"cpu": alloc}}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(MHA_SOURCE), "exec"), namespace)  # noqa: S102 - SGLang's own code
    return {name: namespace[name] for name in POOL_METHODS}


class HostPool:
    """State of an ``MHATokenToKVPoolHost`` (the attributes its page methods read) with SGLang's methods."""

    def __init__(self, layout: str, pages: int = 8, dtype=torch.bfloat16):
        for name, fn in _pool_methods().items():
            setattr(self, name, fn.__get__(self))
        self.layout, self.dtype, self.device, self.pin_memory, self.allocator = layout, dtype, "cpu", False, None
        self.page_size, self.layer_num, self.head_num, self.head_dim, self.v_head_dim = PAGE, LAYERS, HEADS, HEAD_DIM, HEAD_DIM
        self.size, self.page_num = pages * PAGE, pages
        self._transfer_device = torch.device("cpu")
        self.kv_buffer = self.init_kv_buffer()

    def fill(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=g).to(self.dtype))


def config(**extra) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
                                model_name=MODEL, extra_config={
                                    "backend_name": "kvfs", "module_path": "kvfs.engines.sglang",
                                    "class_name": "KvfsHiCacheStorage", "interface_v1": 1, **extra})


def backend(pool: HostPool, **extra) -> KvfsHiCacheStorage:
    """Made the way SGLang's cache controller makes it (``attach_storage_backend``)."""
    b = StorageBackendFactory.create_backend("dynamic", config(**extra), pool)
    assert isinstance(b, KvfsHiCacheStorage)
    b.register_mem_pool_host(pool)
    b.on_host_pools_registered()
    return b


def page_keys(n: int, seed: int = 0) -> list[str]:
    tokens = [(seed * 7919 + i * 31) % 50000 for i in range(n * PAGE)]
    keys = get_hash_str(tokens, None, page_size=PAGE)
    assert len(keys) == n and all(len(k) == 64 for k in keys)
    return keys


def indices(first_page: int, n: int) -> torch.Tensor:
    return torch.arange(first_page * PAGE, (first_page + n) * PAGE, dtype=torch.int64)


def layer_first_page(pool: HostPool, page: int) -> torch.Tensor:
    """Page ``page`` as (2, layers, tokens, heads, head_dim), read straight from the pool's buffer."""
    if pool.layout == "layer_first":
        return pool.kv_buffer[:, :, page * PAGE:(page + 1) * PAGE].clone()
    assert pool.layout == "page_first"
    return pool.kv_buffer[:, page * PAGE:(page + 1) * PAGE].transpose(1, 2).clone()


def test_round_trip_native(cluster):
    pool = HostPool("layer_first")
    pool.fill(1)
    keys = page_keys(4)
    b = backend(pool, meta=cluster.meta_address, root="/kv-sglang")
    try:
        assert b.batch_exists(keys) == 0
        assert b.batch_set_v1(keys, indices(0, 4)) == [True] * 4
        assert b.batch_set_v1(keys, indices(0, 4)) == [True] * 4  # already there: still stored
        assert b.batch_exists(keys) == 4
        assert b.batch_exists(keys + page_keys(2, seed=9)) == 4
        assert b.batch_exists(page_keys(1, seed=9) + keys) == 0  # a prefix count, not a total
        assert b.exists(keys[2]) and not b.exists(page_keys(1, seed=9)[0])
        expected = [layer_first_page(pool, p) for p in range(4)]
        # zero-copy v1: into other host pages, bit-exact
        assert b.batch_get_v1(keys, indices(4, 4)) == [True] * 4
        for p in range(4):
            assert torch.equal(layer_first_page(pool, 4 + p), expected[p])
        # the generic path: flat pages in the pool's own order, as SGLang's controller moves them
        flat = b.get(keys[1], pool.get_dummy_flat_data_page())
        assert flat is not None
        pool.set_from_flat_data_page(7 * PAGE, flat)
        assert torch.equal(layer_first_page(pool, 7), expected[1])
        assert b.batch_get([keys[0], page_keys(1, seed=9)[0]], [pool.get_dummy_flat_data_page()] * 2)[1] is None
        new_key = page_keys(5, seed=3)[4]
        assert b.set(new_key, pool.get_data_page(2 * PAGE, flat=True))
        assert torch.equal(b.get(new_key), pool.get_data_page(2 * PAGE, flat=True))
        # stored as a kvfs KV block of the pool's layout, under SGLang's own key
        lay = KVLayout("bfloat16", PAGE, LAYERS, HEADS, HEAD_DIM)
        with cluster.client() as c, KVStore(f"/kv-sglang/{MODEL.replace('/', '--')}", lay, client=c) as store:
            block = store.get(keys[0])
        assert torch.equal(block, expected[0].permute(1, 0, 3, 2, 4))
    finally:
        b.close()


SECOND = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_engines_sglang import HostPool, backend, indices, page_keys
    pool = HostPool("page_first")
    b = backend(pool, meta=sys.argv[2], root="/kv")
    keys = page_keys(3)
    hits = b.batch_exists(keys + page_keys(1, seed=5))
    ok = b.batch_get_v1(keys, indices(1, 3))
    b.close()
    torch.save({"hits": hits, "ok": ok, "pages": [pool.kv_buffer[:, (1 + p) * 16:(2 + p) * 16].clone() for p in range(3)]},
               sys.argv[3])
""")


def test_second_instance_through_mount_and_native(mounted, tmp_path):
    """Instance A writes through the mount with a layer_first pool; instance B, another process, reads
    them through the native client into a page_first pool."""
    pool = HostPool("layer_first")
    pool.fill(2)
    keys = page_keys(3)
    a = backend(pool, root=os.path.join(mounted.mountpoint, "kv"))
    assert a.batch_set_v1(keys, indices(0, 3)) == [True] * 3
    a.close()
    out = tmp_path / "b.pt"
    subprocess.run([sys.executable, "-c", SECOND, os.path.dirname(__file__), mounted.meta_address, str(out)],
                   check=True, timeout=60)
    got = torch.load(out)
    assert got["hits"] == 3 and got["ok"] == [True] * 3
    for p in range(3):
        assert torch.equal(got["pages"][p].transpose(1, 2), layer_first_page(pool, p))


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_bad_page_is_never_loaded(mounted, damage):
    pool = HostPool("layer_first")
    pool.fill(3)
    keys = page_keys(3, seed={"corrupt": 11, "truncate": 12}[damage])
    root = os.path.join(mounted.mountpoint, f"kv-{damage}")
    b = backend(pool, root=root)
    try:
        assert b.batch_set_v1(keys, indices(0, 3)) == [True] * 3
        [path] = list(Path(root).rglob(keys[1]))
        data = bytearray(path.read_bytes())
        if damage == "corrupt":
            data[-5] ^= 0xFF
        else:
            del data[-100:]
        path.unlink()
        path.write_bytes(bytes(data))
        before = pool.kv_buffer.clone()
        pool.kv_buffer[:, :, 4 * PAGE:7 * PAGE] = 0
        zeroed = pool.kv_buffer.clone()
        assert b.batch_get_v1(keys, indices(4, 3)) == [True, False, True]
        assert torch.equal(pool.kv_buffer[:, :, 5 * PAGE:6 * PAGE], zeroed[:, :, 5 * PAGE:6 * PAGE])
        assert torch.equal(pool.kv_buffer[:, :, 4 * PAGE:5 * PAGE], before[:, :, 0:PAGE])
        assert b.get(keys[1]) is None
        assert b.batch_exists(keys) == 1  # the bad page was dropped: SGLang will recompute and back it up
        assert b.batch_set_v1(keys, indices(0, 3)) == [True] * 3
        assert b.batch_exists(keys) == 3
    finally:
        b.close()


@pytest.mark.parametrize("fault", ["stopped", "killed"])
def test_kvfs_down_means_misses(make_cluster, caplog, fault):
    c = make_cluster(chunkservers=1, replication=1)
    pool = HostPool("layer_first")
    pool.fill(4)
    keys = page_keys(4, seed=4)
    b = backend(pool, meta=c.meta_address, root="/kv", timeout=1.0, retry_after=30)
    try:
        assert b.batch_set_v1(keys, indices(0, 4)) == [True] * 4
        assert b.batch_exists(keys) == 4
        sig = signal.SIGSTOP if fault == "stopped" else signal.SIGKILL
        for proc in [c.meta, *c.servers]:
            proc.popen.send_signal(sig)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sglang.kvfs"):
            t0 = time.monotonic()
            assert b.batch_exists(keys) == 0
            assert b.batch_get_v1(keys, indices(4, 4)) == [False] * 4
            assert b.batch_set_v1(page_keys(2, seed=8), indices(0, 2)) == [False] * 2
            assert b.get(keys[0]) is None and not b.exists(keys[0])
            elapsed = time.monotonic() - t0
        assert elapsed < 10, f"calls against a dead kvfs took {elapsed:.1f} s"
        outage_lines = [r for r in caplog.records if "kvfs unavailable" in r.getMessage()]
        assert len(outage_lines) == 1, [r.getMessage() for r in caplog.records]
    finally:
        if fault == "stopped":
            for proc in [c.meta, *c.servers]:
                proc.popen.send_signal(signal.SIGCONT)
        b.close()


def test_unsupported_pool_disables(cluster, caplog):
    pool = HostPool("layer_first")
    pool.v_head_dim = HEAD_DIM // 2  # an asymmetric K/V pool
    with caplog.at_level(logging.WARNING, logger="sglang.kvfs"):
        b = backend(pool, meta=cluster.meta_address, root="/kv-x")
    assert any("disabled" in r.getMessage() for r in caplog.records)
    assert b.batch_exists(page_keys(1)) == 0 and b.batch_set_v1(page_keys(1), indices(0, 1)) == [False]
    b.close()
