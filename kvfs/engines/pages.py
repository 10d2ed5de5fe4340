"""Paged KV layouts of inference engines <-> kvfs's canonical block layout.

A kvfs block holds, per layer, ``(K/V, kv_heads, block_tokens, head_dim)`` (``kvfs.kv.layout``). Engines
keep a layer's blocks as pages whose element order is their attention backend's business; vLLM 0.32, for
one, gives connectors ``[blocks, heads, tokens, 2*head_dim]`` views whose bytes each backend arranges
differently. ``PageOrder`` describes one arrangement as a permutation and copies between the two.

Error handling: none beyond torch's (shapes are the caller's: ``(n, 2, heads, tokens, head_dim)`` planes,
``(n, heads, tokens, 2*head_dim)`` pages).
"""

from __future__ import annotations

import torch

from kvfs.kv import KVLayout


class PageOrder:
    """Where a backend's page ``[heads, tokens, 2*head_dim]`` keeps one block layer's canonical
    ``(K/V, heads, tokens, head_dim)`` elements: ``order[i]`` is the canonical index of page element i.

    Known arrangements get strided copies (``kind``): "per_token" (each token's row is K then V) or
    "planar K[TD|DT] V[TD|DT]" (per head all K, then all V, each [tokens, head_dim] or transposed). Any
    other permutation still works, through a gather per element (slower)."""

    def __init__(self, order: torch.Tensor, lay: KVLayout):
        self.order = order
        self.shape = lay.plane_shape
        self.kind = ""
        self._planar: tuple[bool, bool] | None = None
        h, t, d = self.shape
        can = torch.arange(2 * h * t * d).view(2, h, t, d)
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
        if self.kind == "per_token":
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
        if self.kind == "per_token":
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
