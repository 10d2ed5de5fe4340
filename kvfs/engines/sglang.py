"""SGLang on kvfs: a HiCache L3 storage backend (``KvfsHiCacheStorage``).

Written against SGLang 0.5.23 (``sglang/srt/mem_cache/hicache_storage.py:HiCacheStorage``; docs/engines.md
has what was and was not run). A thin adapter: keys, layouts and error mapping live here, storage logic
stays in ``kvfs.kv``.

**Selecting it** (SGLang's dynamic backend: ``storage/backend_factory.py`` imports ``module_path`` and calls
``class_name(storage_config, kwargs)``)::

    --enable-hierarchical-cache --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
      '{"backend_name":"kvfs","module_path":"kvfs.engines.sglang","class_name":"KvfsHiCacheStorage",
        "interface_v1":1,"root":"/mnt/kvfs/kv"}'

Extra config: ``root`` (a directory, e.g. on the kvfs mount; or, with ``meta`` "host:port", a kvfs path
read through the native client), ``model_id`` (the model path level; default SGLang's model name made
one path component), ``timeout`` (seconds per storage call, default 5, plus a second per 100 MB moved),
``retry_after`` (seconds a detected outage is trusted before kvfs is tried again, default 10).
``interface_v1: 1`` makes SGLang call ``batch_get_v1``/``batch_set_v1`` with host-pool indices (no page
copies through SGLang's flat "dummy" pages); without it SGLang uses ``batch_get``/``batch_set`` on flat
pages. Both work.

**Keys**: SGLang's own page hashes (``get_hash_str``: SHA-256 chains over each page's token ids, 64 hex
characters) are the kvfs block hashes: ``<root>/<model_id>/<KVLayout.name>/<hh>/<hash>``. The layout is
derived from the registered host pool: dtype, page size (block tokens), layers, KV heads, head dim, TP
rank/size (pipeline stages get their own model level, ``<model_id>-pp<r>of<n>``). So two instances of one
model and TP shape share pages; another dtype, page size or TP shape is another directory, never a
collision. ``batch_exists`` (SGLang's prefix count) is one ``KVStore.longest_prefix`` round trip.

**Pages**: a kvfs block is the canonical ``(layers, K/V, heads, tokens, head_dim)`` array, whatever the
host pool's layout (``layer_first``, ``page_first``, ``page_first_direct``, ``page_head``): a page is
viewed in canonical order through the pool's own ``get_data_page(index, flat=False)`` and copied out
(set) or, after a verified read into a staging buffer, copied in (get). A page written by a
``layer_first`` instance is therefore loaded correctly by a ``page_first`` one. Reads are verified
(header, size, checksum) before anything reaches the pool: a corrupt or truncated page is a miss, and
is deleted so the next backup replaces it.

**Failures**: every storage call is bounded (``kvfs.engines.guard``): kvfs down or slow means misses
(``batch_exists`` 0, gets None/False, sets False), one log line per outage; SGLang then recomputes.

Not supported (every call answers "miss"/False, one log line at start): MLA and other non-MHA host pools,
K/V head dims that differ, the ``page_unified`` layout, attention context parallelism, the v2 per-pool
interface (hybrid models: Mamba/SWA sidecar pools). ``clear`` leaves kvfs alone (the cache is shared).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolTransfer,
    PoolTransferResult,
)

from kvfs.engines.guard import Guard
from kvfs.engines.naming import LazyStore, model_path_level
from kvfs.kv import BlockError, KVLayout, KVStore
from kvfs.kv.hashing import check_hashes
from kvfs.kv.layout import dtype_name

log = logging.getLogger("sglang.kvfs")

# Host pool layout -> (shape of one page as the pool stores it, with L layers, P tokens, H heads, D
# head dim; permutation of that shape into kvfs's canonical (L, 2, H, P, D)). From SGLang 0.5.23
# pool_host/mha.py: MHATokenToKVPoolHost.init_kv_buffer / get_data_page / set_from_flat_data_page.
_PAGE_ORDERS = {
    "layer_first": ("2LPHD", (1, 0, 3, 2, 4)),
    "page_first": ("2PLHD", (2, 0, 3, 1, 4)),
    "page_first_direct": ("2LPHD", (1, 0, 3, 2, 4)),
    "page_head": ("2HPLD", (3, 0, 1, 2, 4)),
}


class KvfsHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None):
        extra = dict(storage_config.extra_config or {})
        self.storage_config = storage_config
        self._root = str(extra.get("root") or "")
        self._meta_addr = extra.get("meta")
        model_id = str(extra.get("model_id") or model_path_level(storage_config.model_name or "model"))
        if storage_config.pp_size > 1:
            model_id += f"-pp{storage_config.pp_rank}of{storage_config.pp_size}"
        self._model_id = model_id
        self._guard = Guard(log, timeout=float(extra.get("timeout", 5.0)),
                            retry_after=float(extra.get("retry_after", 10.0)))
        self._layout: KVLayout | None = None
        self._page_shape: tuple[int, ...] = ()
        self._perm: tuple[int, ...] = ()
        # SGLang's prefetch and backup threads share the backend (and so the store).
        self._kv = LazyStore(self._root, model_id, self._meta_addr, self._guard.timeout)
        self._disabled = "" if self._root else 'extra config needs "root"'
        if storage_config.attn_cp_size > 1:
            self._disabled = "attention context parallelism is not supported"
        self._warned_v2 = False
        if self._disabled:
            log.warning("KvfsHiCacheStorage disabled: %s", self._disabled)

    # ------------------------------------------------------------------ set-up

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        why = self._disabled or self._derive_layout(mem_pool_host)
        if why:
            self._disabled = why
            log.warning("KvfsHiCacheStorage disabled: %s", why)
            return
        assert self._layout is not None
        log.info("KvfsHiCacheStorage: %s/%s/%s via %s (host pool layout %s)", self._root, self._model_id,
                 self._layout.name, f"native client, meta {self._meta_addr}" if self._meta_addr else "directory",
                 mem_pool_host.layout)
        self._guard.call(self._open, "open")  # connect now (bounded), not in the first request

    def _derive_layout(self, pool: Any) -> str:
        """Set the kvfs layout and page order from an MHA host pool; the reason it cannot, or ""."""
        order = _PAGE_ORDERS.get(getattr(pool, "layout", None))
        if order is None:
            return f"host pool layout {getattr(pool, 'layout', None)!r} is not supported"
        if not all(hasattr(pool, a) for a in ("head_num", "head_dim", "layer_num", "page_size", "dtype")):
            return f"host pool {type(pool).__name__} is not an MHA pool (MLA is not supported)"
        if getattr(pool, "v_head_dim", pool.head_dim) != pool.head_dim:
            return "K and V head dims differ"
        cfg = self.storage_config
        try:
            self._layout = KVLayout(dtype_name(pool.dtype), int(pool.page_size), int(pool.layer_num),
                                    int(pool.head_num), int(pool.head_dim), cfg.tp_rank, cfg.tp_size)
        except ValueError as e:
            return str(e)
        dims = {"2": 2, "L": pool.layer_num, "P": pool.page_size, "H": pool.head_num, "D": pool.head_dim}
        self._page_shape = tuple(dims[c] for c in order[0])
        self._perm = order[1]
        return ""

    def _open(self) -> KVStore:
        """The store, opened on first use (inside a guarded call: a dead meta cannot block the engine)."""
        assert self._layout is not None
        return self._kv.get(self._layout)

    @property
    def enabled(self) -> bool:
        return self._layout is not None and not self._disabled

    def _canonical(self, page: torch.Tensor) -> torch.Tensor:
        """A pool page (a view from ``get_data_page``, or a flat page in the pool's order) as a
        ``(layers, 2, heads, tokens, head_dim)`` view."""
        return page.reshape(self._page_shape).permute(self._perm)

    def _valid(self, keys: Sequence[str]) -> bool:
        try:
            check_hashes(keys)
            return True
        except ValueError:
            return False  # not a page hash (e.g. a v2 sidecar key): never stored here

    # ------------------------------------------------------------------ core: read and write blocks

    def _read(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """Verified blocks (canonical, CPU) or None per key: a miss, an outage, a corrupt block."""
        if not keys or not self.enabled or not self._valid(keys):
            return [None] * len(keys)
        assert self._layout is not None
        lay = self._layout
        staging = torch.empty((len(keys), *lay.block_shape), dtype=lay.torch_dtype())
        outs = [staging[i] for i in range(len(keys))]
        try:
            ok, got = self._guard.call(lambda: self._open().get_many(keys, outs), "get",
                                       nbytes=lay.nbytes * len(keys))
        except BlockError:
            return [self._read_one(k, out) for k, out in zip(keys, outs)]
        return list(got) if ok else [None] * len(keys)

    def _read_one(self, key: str, out: torch.Tensor) -> torch.Tensor | None:
        try:
            ok, got = self._guard.call(lambda: self._open().get(key, out), "get", nbytes=out.nbytes)
            return got if ok else None
        except BlockError as e:
            log.warning("kvfs: dropping bad page %s (%s)", key, e)
            self._guard.call(lambda: self._open().delete(key), "delete")
            return None

    def _write(self, keys: Sequence[str], blocks: Sequence[torch.Tensor]) -> list[bool]:
        """Publish canonical blocks; True per key that is stored now (published or already there)."""
        if not keys or not self.enabled or not self._valid(keys):
            return [False] * len(keys)
        assert self._layout is not None
        items = [(k, b.contiguous()) for k, b in zip(keys, blocks)]
        ok, _ = self._guard.call(lambda: self._open().put_many(items), "put",
                                 nbytes=self._layout.nbytes * len(keys))
        return [ok] * len(keys)

    # ------------------------------------------------------------------ lookups

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many of ``keys``, from the first, are stored: one ``longest_prefix`` round trip."""
        if not keys or not self.enabled or not self._valid(keys):
            return 0
        ok, n = self._guard.call(lambda: self._open().longest_prefix(keys), "lookup")
        return int(n) if ok else 0

    # ------------------------------------------------------------------ zero-copy (v1): host pool indices

    def _page_views(self, n: int, host_indices: torch.Tensor) -> list[torch.Tensor] | None:
        page = self._layout.block_tokens if self._layout else 1
        if host_indices is None or host_indices.numel() != n * page:
            log.error("KvfsHiCacheStorage: %s host indices for %d pages of %d tokens",
                      None if host_indices is None else host_indices.numel(), n, page)
            return None
        starts = host_indices[::page].tolist()
        return [self._canonical(self.mem_pool_host.get_data_page(int(s), flat=False)) for s in starts]

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        views = self._page_views(len(keys), host_indices) if self.enabled else None
        if views is None:
            return [False] * len(keys)
        results = []
        for view, block in zip(views, self._read(keys)):
            if block is not None:
                view.copy_(block)
            results.append(block is not None)
        return results

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        views = self._page_views(len(keys), host_indices) if self.enabled else None
        if views is None:
            return [False] * len(keys)
        return self._write(keys, views)

    # ------------------------------------------------------------------ generic: flat pages

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        """Flat pages in the host pool's order (as ``set_from_flat_data_page`` takes them), or None."""
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        out: list[torch.Tensor | None] = []
        for block, target in zip(self._read(keys), targets):
            if block is None:
                out.append(None)
                continue
            if target is None:
                target = torch.empty(block.numel(), dtype=block.dtype)
            self._canonical(target).copy_(block)
            out.append(target)
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        """Store flat pages in the host pool's order (``get_data_page(index, flat=True)``)."""
        if values is None or len(values) != len(keys) or not self.enabled:
            return False
        try:
            blocks = [self._canonical(v) for v in values]
        except RuntimeError as e:  # a page of another size
            log.error("KvfsHiCacheStorage: page does not fit layout %s: %s", self._layout, e)
            return False
        return all(self._write(keys, blocks))

    # ------------------------------------------------------------------ v2 (hybrid models): not supported

    def _v2_unsupported(self) -> None:
        if not self._warned_v2:
            self._warned_v2 = True
            log.warning("KvfsHiCacheStorage: the v2 per-pool interface (hybrid models) is not supported; "
                        "all lookups miss")

    def batch_exists_v2(self, keys: list[str], pool_transfers: list[PoolTransfer] | None = None,
                        extra_info: HiCacheStorageExtraInfo | None = None) -> PoolTransferResult:
        self._v2_unsupported()
        return PoolTransferResult.empty()

    def batch_get_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        self._v2_unsupported()
        return {t.name: [False] * len(t.keys or []) for t in transfers}

    def batch_set_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        self._v2_unsupported()
        return {t.name: [False] * len(t.keys or []) for t in transfers}

    # ------------------------------------------------------------------ housekeeping

    def clear(self) -> bool:
        """kvfs is shared by every instance: flushing one engine's cache leaves it alone."""
        return False

    def get_stats(self) -> None:
        return None  # counters go to kvfs (``kvfs status``), not to SGLang's storage metrics

    def close(self) -> None:
        for closer in self._kv.take():
            self._guard.call(closer.close, "close")
        self._guard.close()
