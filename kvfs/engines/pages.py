"""Paged KV layouts of inference engines <-> kvfs's canonical block layout.

A kvfs block holds, per layer, ``(K/V, kv_heads, block_tokens, head_dim)`` (``kvfs.kv.layout``). Engines
keep a layer's blocks as pages whose element order is their attention backend's business; vLLM 0.32, for
one, gives connectors ``[blocks, heads, tokens, 2*head_dim]`` views whose bytes each backend arranges
differently. ``PageOrder`` describes one arrangement as a permutation and copies between the two;
``PagedCache`` holds an engine's per-layer pages and copies whole blocks in (per layer, when the engine
waits for that layer, so it can start a layer's attention once that layer is in) and out.

Error handling: none beyond torch's (shapes are the caller's: ``(n, 2, heads, tokens, head_dim)`` planes,
``(n, heads, tokens, 2*head_dim)`` pages); a copy's exception is raised by ``wait``/``finish``.
"""

from __future__ import annotations

import time

import torch

from kvfs.kv import KVLayout


class PageOrder:
    """Where a backend's page ``[heads, tokens, 2*head_dim]`` keeps one block layer's canonical
    ``(K/V, heads, tokens, head_dim)`` elements: ``order[i]`` is the canonical index of page element i.

    Known arrangements get strided copies (``kind``): "per_token" (each token's row is K then V) or
    "planar K[TD|DT] V[TD|DT]" (per head all K, then all V, each [tokens, head_dim] or transposed), and
    "identity" (blocks stored in the page order itself: ``KVLayout.order`` set to the engine's ``tag``)
    a plain copy. Any other permutation still works, through a gather per element (slower)."""

    def __init__(self, order: torch.Tensor, lay: KVLayout):
        self.order = order
        self.shape = lay.plane_shape
        self.kind = ""
        self._planar: tuple[bool, bool] | None = None
        h, t, d = self.shape
        can = torch.arange(2 * h * t * d).view(2, h, t, d)
        if torch.equal(can.reshape(-1), order):
            self.kind = "identity"
            return
        if torch.equal(torch.cat([can[0], can[1]], dim=-1).reshape(-1), order):
            self.kind = "per_token"
            return
        for kt in (False, True):
            for vt in (False, True):
                parts = [(can[p].transpose(1, 2) if tr else can[p]).reshape(h, t * d) for p, tr in ((0, kt), (1, vt))]
                if torch.equal(torch.stack(parts, dim=1).reshape(-1), order):
                    self.kind = f"planar K{'DT' if kt else 'TD'} V{'DT' if vt else 'TD'}"
                    self._planar = (kt, vt)
                    return

    @property
    def tag(self) -> str:
        """This arrangement as a ``KVLayout.order`` (lowercase, stable): "pt" (per token) or
        "k<td|dt>v<td|dt>" (planar); "" for the identity (canonical already) and irregular ones."""
        if self.kind == "per_token":
            return "pt"
        if self._planar is not None:
            return "".join(f"{p}{'dt' if tr else 'td'}" for p, tr in zip("kv", self._planar))
        return ""

    @classmethod
    def identity(cls, lay: KVLayout) -> PageOrder:
        """Blocks stored in the pages' own order (a layout whose ``order`` is the engine's tag): plain copies."""
        h, t, d = lay.plane_shape
        return cls(torch.arange(2 * h * t * d), lay)

    @classmethod
    def per_token(cls, lay: KVLayout) -> PageOrder:
        """Each token's row is its K then its V (vLLM 0.32's FLASH_ATTN/TRITON_ATTN, read from its source)."""
        h, t, d = lay.plane_shape
        can = torch.arange(2 * h * t * d).view(2, h, t, d)
        return cls(torch.cat([can[0], can[1]], dim=-1).reshape(-1), lay)

    def to_pages(self, planes: torch.Tensor) -> torch.Tensor:
        """(n, 2, heads, tokens, head_dim) canonical -> (n, heads, tokens, 2*head_dim) pages (a new tensor)."""
        n, (h, t, d) = planes.shape[0], self.shape
        pages = torch.empty((n, h, t, 2 * d), dtype=planes.dtype, device=planes.device)
        self.into_pages(planes, pages)
        return pages

    def into_pages(self, planes: torch.Tensor, pages: torch.Tensor) -> None:
        """(n, 2, heads, tokens, head_dim) canonical -> ``pages`` (n, heads, tokens, 2*head_dim), in place:
        one strided copy per plane, no intermediate (``pages`` may be a slice of the engine's cache; each
        page must be contiguous)."""
        n, (h, t, d) = planes.shape[0], self.shape
        if self.kind == "identity":
            pages.view(n, -1).copy_(planes.reshape(n, -1))
        elif self.kind == "per_token":
            pages[..., :d].copy_(planes[:, 0])
            pages[..., d:].copy_(planes[:, 1])
        elif self._planar is None:
            pages.view(n, -1).copy_(planes.reshape(n, -1)[:, self.order])
        else:
            halves = pages.view(n, h, 2, t * d)
            for p, transposed in enumerate(self._planar):
                if transposed:
                    halves[:, :, p].view(n, h, d, t).copy_(planes[:, p].transpose(-1, -2))
                else:
                    halves[:, :, p].view(n, h, t, d).copy_(planes[:, p])

    def from_pages(self, pages: torch.Tensor, planes: torch.Tensor) -> None:
        """(n, heads, tokens, 2*head_dim) contiguous pages -> ``planes`` (n, 2, heads, tokens, head_dim), in place."""
        n, (h, t, d) = pages.shape[0], self.shape
        if self.kind == "identity":
            planes.view(n, -1).copy_(pages.reshape(n, -1))  # planes: a view of the caller's blocks
        elif self.kind == "per_token":
            planes[:, 0].copy_(pages[..., :d])
            planes[:, 1].copy_(pages[..., d:])
        elif self._planar is None:
            planes.view(n, -1)[:, self.order] = pages.reshape(n, -1)
        else:
            halves = pages.view(n, h, 2, t * d)
            for p, transposed in enumerate(self._planar):
                src = halves[:, :, p].view(n, h, d, t).transpose(-1, -2) if transposed else halves[:, :, p].view(n, h, t, d)
                planes[:, p].copy_(src)


def consecutive_spans(ids: list[int]) -> list[tuple[int, int, int]]:
    """``ids`` as (position in ids, first id, count) runs of consecutive ids: ``[7, 8, 9, 3]`` ->
    ``[(0, 7, 3), (3, 3, 1)]``."""
    spans: list[tuple[int, int, int]] = []
    for pos, i in enumerate(ids):
        if spans and spans[-1][1] + spans[-1][2] == i:
            spans[-1] = (spans[-1][0], spans[-1][1], spans[-1][2] + 1)
        else:
            spans.append((pos, i, 1))
    return spans


class PagedCache:
    """An engine's paged KV cache, one (pages, PageOrder) per layer in layer order, and copies of
    canonical blocks into and out of it.

    ``start`` plans a load's copies and returns at once; ``wait(layer)`` copies that layer's blocks in,
    in the calling thread, so an engine that waits for each layer just before its attention gets each
    layer's pages filled right before it reads them (still in cache), and layer 0's attention does not
    wait for the other layers. No threads of its own: vLLM on CPU binds its OpenMP threads to every core,
    and a copy thread competing with them slowed the whole forward down (torch's copy runs on those
    same OpenMP threads instead). ``finish`` copies any layer not yet waited for and drops the sources
    (mapped chunks are unmapped then)."""

    def __init__(self, layers: list[tuple[torch.Tensor, PageOrder]]):
        self.layers = layers
        self.device = layers[0][0].device
        self._pending: set[int] = set()
        self._plans: list = []
        self._started = 0.0
        self.copy_seconds = 0.0  # spent copying the last load in (``wait`` and ``finish``)

    def gather(self, block_ids: list[int], block_shape: tuple[int, ...]) -> torch.Tensor:
        """Blocks out of the pages, canonical order: a CPU tensor (n, *block_shape)."""
        pages0 = self.layers[0][0]
        out = torch.empty((len(block_ids), *block_shape), dtype=pages0.dtype)
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer, (pages, order) in enumerate(self.layers):
            order.from_pages(pages.index_select(0, idx).cpu(), out[:, layer])
        return out

    def start(self, pieces: list[tuple[torch.Tensor, list[int]]]) -> None:
        """Plan copies in: per piece, blocks (n, *block_shape) in canonical order and the n page ids they
        belong at; straight into each span of consecutive pages (one strided copy per plane), or, when a
        piece's ids are scattered, through one ``index_copy_`` per layer. The pieces are kept until
        ``finish``."""
        self.finish()
        for blocks, block_ids in pieces:
            spans = consecutive_spans(block_ids)
            scattered = len(spans) > max(1, len(block_ids) // 8)  # per-span copies would cost more
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.device) if scattered else None
            self._plans.append((blocks, spans, idx))
        self._pending = set(range(len(self.layers)))
        self._started = time.perf_counter()
        self.copy_seconds = 0.0

    def _copy_layer(self, layer: int) -> None:
        pages, order = self.layers[layer]
        for blocks, spans, idx in self._plans:
            planes = blocks[:, layer].to(self.device)
            if idx is not None:
                pages.index_copy_(0, idx, order.to_pages(planes))
                continue
            for pos, first, n in spans:
                order.into_pages(planes[pos:pos + n], pages[first:first + n])

    def wait(self, layer: int) -> None:
        """Copy ``layer``'s blocks of the load ``start`` planned, unless done already."""
        if layer in self._pending:
            self._pending.discard(layer)
            t0 = time.perf_counter()
            self._copy_layer(layer)
            self.copy_seconds += time.perf_counter() - t0

    def finish(self) -> float:
        """Copy every layer not yet waited for and drop the sources; seconds since ``start`` (0: none)."""
        if not self._pending and not self._plans:
            return 0.0
        try:
            for layer in sorted(self._pending):
                self.wait(layer)
        finally:
            self._pending, self._plans = set(), []
        return time.perf_counter() - self._started

    def close(self) -> None:
        self.finish()
