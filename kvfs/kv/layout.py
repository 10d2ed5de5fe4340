"""The layout descriptor: everything that makes two KV blocks interchangeable, and its directory name.

Blocks written under one layout can only be loaded by an engine running the same layout, so the
layout is a directory level of the block path (``/kv/<model>/<layout>/<hh>/<hash>``) and is also
repeated in every block header (a block copied into the wrong directory is still rejected).

A block holds ``block_tokens`` tokens of every layer. Its payload is one C-contiguous array of
``block_shape = (num_layers, planes, num_kv_heads, block_tokens, head_dim)`` in ``dtype``, where
``planes`` is 2 (K then V) or 1 (a single latent, as in MLA). ``num_kv_heads`` is the number of KV
heads *this tensor-parallel rank* holds; ``tp_rank``/``tp_size`` only name the shard.

``order`` (default "": the canonical order above) names another element order *within each layer* of
the same bytes: an engine's own paged order (``kvfs.engines.pages.PageOrder.tag``), stored as is so a
loading engine with that order copies pages without rearranging them. It is part of the layout, so
blocks of different orders never meet: another directory, and another header.

The directory name is stable and readable, e.g. ``bf16-t16-l32-h8-d128-tp0of1`` (``-p1`` is appended
for single-plane layouts, ``-o<order>`` for a non-canonical order); ``KVLayout.from_name`` parses it back.

Error handling: ``ValueError`` for an unknown dtype, a non-positive size or an unparsable name.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

# dtype name (torch's, without "torch.") -> (short name used in paths, item size in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("f32", 4),
    "float16": ("f16", 2),
    "bfloat16": ("bf16", 2),
    "float8_e4m3fn": ("f8e4m3", 1),
    "float8_e5m2": ("f8e5m2", 1),
    "int8": ("i8", 1),
    "uint8": ("u8", 1),
}
_SHORT = {short: name for name, (short, _) in DTYPES.items()}
_NAME_RE = re.compile(r"^([a-z0-9]+)-t(\d+)-l(\d+)-h(\d+)-d(\d+)-tp(\d+)of(\d+)(?:-p(\d+))?(?:-o([a-z0-9]+))?$")
_ORDER_RE = re.compile(r"^[a-z0-9]*$")


def is_layout_name(name: str) -> bool:
    """Whether ``name`` has the form of a ``KVLayout.name`` (a KV store's per-layout directory)."""
    return _NAME_RE.match(name) is not None


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"bf16"`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    name = _SHORT.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    return name


@dataclass(frozen=True)
class KVLayout:
    dtype: str
    block_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1
    planes: int = 2
    order: str = ""  # "": canonical; else the engine page order the bytes of each layer are stored in

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for field in ("block_tokens", "num_layers", "num_kv_heads", "head_dim", "tp_size", "planes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"layout {field} must be a positive integer, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if self.planes not in (1, 2):
            raise ValueError(f"planes must be 1 (latent) or 2 (K and V), got {self.planes}")
        if not isinstance(self.order, str) or not _ORDER_RE.match(self.order):
            raise ValueError(f"layout order must be lowercase letters and digits, got {self.order!r}")

    @property
    def name(self) -> str:
        """The stable directory name of this layout."""
        short = DTYPES[self.dtype][0]
        base = (f"{short}-t{self.block_tokens}-l{self.num_layers}-h{self.num_kv_heads}-d{self.head_dim}"
                f"-tp{self.tp_rank}of{self.tp_size}")
        if self.planes != 2:
            base += f"-p{self.planes}"
        return f"{base}-o{self.order}" if self.order else base

    @classmethod
    def from_name(cls, name: str) -> KVLayout:
        m = _NAME_RE.match(name)
        if m is None:
            raise ValueError(f"not a KV layout name: {name!r}")
        short, t, layers, heads, dim, rank, size, planes, order = m.groups()
        return cls(_SHORT.get(short, short), int(t), int(layers), int(heads), int(dim), int(rank), int(size),
                   int(planes) if planes else 2, order or "")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.planes, self.num_kv_heads, self.block_tokens, self.head_dim)

    @property
    def plane_shape(self) -> tuple[int, int, int]:
        """Shape of one layer's K (or V): heads, tokens, head_dim (Hugging Face's per-layer order)."""
        return (self.num_kv_heads, self.block_tokens, self.head_dim)

    @property
    def num_planes(self) -> int:
        """Tensors in the list form of a block: ``num_layers * planes`` (L0.K, L0.V, L1.K, ...)."""
        return self.num_layers * self.planes

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.block_shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.order:
            del d["order"]  # canonical headers stay byte-identical to those written before orders existed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        return cls(**d)

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)
