"""The self-describing KV block file: a small header, then the raw tensor bytes.

File layout (integers little endian)::

    offset  size  field
    0       8     magic b"KVFSBLK\\0"
    8       2     format version (FORMAT_VERSION)
    10      2     flags (0; reserved)
    12      4     header_len: where the payload starts (a multiple of 4096, so it is page aligned)
    16      4     meta_len: bytes of the JSON description at offset 48
    20      4     reserved (0)
    24      8     payload_len
    32      8     xxh3_64 of the payload
    40      8     xxh3_64 of bytes [0, 40) and the JSON description (the header's own checksum)
    48      ...   JSON: {"hash", "layout" (KVLayout fields), "layout_name", "dtype", "shape"}
    ...           zero padding up to header_len
    header_len    payload: one C-contiguous array of ``layout.block_shape`` in ``layout.dtype``

A reader checks, before it loads any tensor byte: the magic and version, the header checksum, that the
layout and block hash are the ones it asked for, and that the file is as long as the header says; then
the payload checksum once the bytes are in. Any failure is a ``ValueError`` naming what is wrong
(``BlockError``, a ValueError subclass), never a silently wrong tensor.

Tensors: a block is given (``put``) or received (``get(out=...)``) either as one tensor of
``layout.block_shape`` or as a list of ``layout.num_planes`` tensors of ``layout.plane_shape``
(L0.K, L0.V, L1.K, ...). Both must have the layout's dtype; ``out`` tensors must be contiguous, on
the CPU (the bytes land in them without a copy) or a CUDA device (``kvfs.kv.device``).
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from kvfs import chunkio
from kvfs.kv.layout import KVLayout

MAGIC = b"KVFSBLK\0"
FORMAT_VERSION = 1
ALIGN = 4096
FIXED = struct.Struct("<8sHHIIIQQQ")  # 48 bytes
MAX_HEADER = 1 << 20


class BlockError(ValueError):
    """A block file that must not be loaded: wrong layout, truncated, corrupt or not a block at all."""


class DigestMismatch(BlockError):
    """A payload hashed as it was read, with the chunk checksums not checked (``ReadResult.payload_xxh3``),
    does not match the header's checksum: read the block again with the chunk checksums checked, which
    finds a corrupt replica (and fails over) or confirms the block itself is corrupt."""


@dataclass(frozen=True)
class BlockHeader:
    version: int
    header_len: int
    payload_len: int
    payload_checksum: int
    block_hash: str
    layout: KVLayout
    shape: tuple[int, ...]
    dtype: str


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def encode_header(layout: KVLayout, block_hash: str, payload_checksum: int) -> bytes:
    return seal_header(FORMAT_VERSION, {"hash": block_hash, "layout": layout.to_dict(), "layout_name": layout.name,
                                        "dtype": layout.dtype, "shape": list(layout.block_shape)},
                       layout.nbytes, payload_checksum)


def seal_header(version: int, description: dict[str, Any], payload_len: int, payload_checksum: int) -> bytes:
    """A whole header: the fixed part, the JSON ``description``, the header's own checksum, the padding."""
    meta = json.dumps(description, sort_keys=True, separators=(",", ":")).encode()
    header_len = _round_up(FIXED.size + len(meta), ALIGN)
    head = FIXED.pack(MAGIC, version, 0, header_len, len(meta), 0, payload_len, payload_checksum, 0)
    own = xxhash.xxh3_64_intdigest(head[:40] + meta)
    head = head[:40] + struct.pack("<Q", own)
    return head + meta + bytes(header_len - len(head) - len(meta))


def open_header(raw: bytes | bytearray | memoryview, version: int, what: str) -> tuple[int, int, int, dict[str, Any]]:
    """(header_len, payload_len, payload checksum, JSON description) of a header of ``version``, its own
    checksum verified; ``what`` names the kind of file in errors. Error handling: BlockError."""
    header_len = fixed_header_len(raw, version)
    if len(raw) < header_len:
        raise BlockError(f"truncated {what}: {len(raw)} bytes, header says {header_len}")
    _m, _v, _f, _hl, meta_len, _r, payload_len, payload_sum, header_sum = FIXED.unpack_from(raw)
    meta_raw = bytes(raw[FIXED.size:FIXED.size + meta_len])
    if xxhash.xxh3_64_intdigest(bytes(raw[:40]) + meta_raw) != header_sum:
        raise BlockError(f"corrupt {what}: header checksum mismatch")
    try:
        meta = json.loads(meta_raw)
        if not isinstance(meta, dict):
            raise TypeError("not an object")
    except (ValueError, TypeError) as exc:
        raise BlockError(f"corrupt {what} header description: {exc}") from None
    return header_len, payload_len, payload_sum, meta


def fixed_header_len(raw: bytes | bytearray | memoryview, want_version: int = FORMAT_VERSION) -> int:
    """header_len from the first 48 bytes (to know how much more to read). ``want_version``: a block
    (FORMAT_VERSION) or a run (``kvfs.kv.run``); a reader of one refuses the other. Error handling:
    BlockError."""
    if len(raw) < FIXED.size:
        raise BlockError(f"truncated block: {len(raw)} bytes, less than the {FIXED.size}-byte fixed header")
    magic, version, _flags, header_len, meta_len, _r, _pl, _pc, _hc = FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise BlockError(f"not a kvfs KV block (magic {bytes(magic)!r})")
    if version != want_version:
        raise BlockError(f"KV block format version {version} where {want_version} was expected")
    if header_len % ALIGN or not FIXED.size + meta_len <= header_len <= MAX_HEADER:
        raise BlockError(f"corrupt KV block header (header_len {header_len}, meta_len {meta_len})")
    return int(header_len)


def parse_header(raw: bytes | bytearray | memoryview, *, layout: KVLayout | None = None,
                 block_hash: str | None = None, file_size: int | None = None) -> BlockHeader:
    """Validate a header (at least ``header_len`` bytes of the file) against what the caller expects.

    Error handling: ``BlockError`` (a ValueError) for a bad magic/version/checksum, a layout or hash other
    than the expected one, or (given ``file_size``) a file shorter than header + payload.
    """
    header_len, payload_len, payload_sum, meta = open_header(raw, FORMAT_VERSION, "KV block")
    try:
        got_layout = KVLayout.from_dict(meta["layout"])
        shape = tuple(int(d) for d in meta["shape"])
        got_hash = str(meta["hash"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BlockError(f"corrupt KV block header description: {exc}") from None
    if layout is not None and got_layout != layout:
        raise BlockError(f"KV block has layout {got_layout.name}, expected {layout.name}")
    if block_hash is not None and got_hash != block_hash:
        raise BlockError(f"KV block is for hash {got_hash}, expected {block_hash}")
    if shape != got_layout.block_shape or payload_len != got_layout.nbytes:
        raise BlockError(f"KV block shape {shape} / {payload_len} bytes do not match its layout {got_layout.name}")
    if file_size is not None and file_size < header_len + payload_len:
        raise BlockError(f"truncated KV block: file has {file_size} bytes, needs {header_len + payload_len}")
    return BlockHeader(FORMAT_VERSION, header_len, payload_len, payload_sum, got_hash, got_layout, shape, got_layout.dtype)


class CheckedHeaders:
    """Headers already parsed and checked, by block hash, with the exact bytes their checksum covers (and
    the checksum): a block read again has byte-identical header bytes, so comparing a few hundred bytes
    replaces the checksum, JSON parse and layout checks (``parse_header``) on the hot path. Bounded:
    forgotten wholesale past ``limit`` entries. Thread-safe (dict operations under the GIL)."""

    def __init__(self, layout: KVLayout, limit: int = 4096):
        self.layout = layout
        self.limit = limit
        self._checked: dict[str, tuple[bytes, BlockHeader]] = {}

    def parse(self, raw: bytes | bytearray | memoryview, block_hash: str, file_size: int) -> BlockHeader:
        """``parse_header(raw, layout=self.layout, block_hash=..., file_size=...)``. Errors as it."""
        if len(raw) >= FIXED.size:
            meta_len = FIXED.unpack_from(raw)[4]
            covered = bytes(raw[:FIXED.size + meta_len])
            seen = self._checked.get(block_hash)
            if seen is not None and seen[0] == covered and len(raw) >= seen[1].header_len:
                header = seen[1]
                if file_size < header.header_len + header.payload_len:
                    raise BlockError(f"truncated KV block: file has {file_size} bytes, "
                                     f"needs {header.header_len + header.payload_len}")
                return header
        header = parse_header(raw, layout=self.layout, block_hash=block_hash, file_size=file_size)
        if len(self._checked) >= self.limit:
            self._checked.clear()
        self._checked[block_hash] = (bytes(raw[:FIXED.size + FIXED.unpack_from(raw)[4]]), header)
        return header


def payload_checksum(views: Sequence[memoryview]) -> int:
    if len(views) == 1:  # the staged route's one buffer: hashed without the GIL (kvfs.chunkio)
        return chunkio.xxh3_64(views[0])
    h = xxhash.xxh3_64()
    for v in views:
        h.update(v)
    return h.intdigest()


def check_digest(header: BlockHeader, digest: int) -> None:
    """Error handling: DigestMismatch if ``digest`` (XXH3-64 of the payload bytes as read) is not the
    header's payload checksum."""
    if digest != header.payload_checksum:
        raise DigestMismatch(f"corrupt KV block {header.block_hash}: payload checksum mismatch")


def verify_payload(header: BlockHeader, views: Sequence[memoryview]) -> None:
    """Error handling: BlockError if the payload bytes read do not match the header's checksum."""
    got = sum(len(v) for v in views)
    if got != header.payload_len:
        raise BlockError(f"truncated KV block {header.block_hash}: payload {got} bytes, expected {header.payload_len}")
    if payload_checksum(views) != header.payload_checksum:
        raise BlockError(f"corrupt KV block {header.block_hash}: payload checksum mismatch")


# --------------------------------------------------------------------------- tensors <-> bytes


def byte_view(t: Any) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (works for bfloat16 and float8 too)."""
    import torch

    n = t.numel() * t.element_size()
    if n and t.device.type == "cpu" and t.is_contiguous():
        # From the data pointer: a fifth of the time of the tensor/numpy views below (a block read
        # makes one per destination tensor). The ctypes array keeps ``t`` alive as long as the view.
        array = (ctypes.c_char * n).from_address(t.data_ptr())
        array.owner = t  # type: ignore[attr-defined]
        return memoryview(array).cast("B")
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def check_tensors(layout: KVLayout, tensors: Any) -> list[Any]:
    """The block's tensors in payload order, checked for count, shape and dtype against ``layout``.

    ``tensors``: one tensor of ``layout.block_shape`` or a sequence of ``layout.num_planes`` tensors of
    ``layout.plane_shape``. Error handling: ValueError naming the tensor and what is wrong.
    """
    import torch

    want_dtype = layout.torch_dtype()
    if isinstance(tensors, torch.Tensor):
        items, shape = [tensors], layout.block_shape
    else:
        items, shape = list(tensors), layout.plane_shape
        if len(items) != layout.num_planes:
            raise ValueError(f"expected {layout.num_planes} tensors (layers x planes) for layout {layout.name}, "
                             f"got {len(items)}")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {i} has shape {tuple(t.shape)}, layout {layout.name} needs {shape}")
        if t.dtype != want_dtype:
            raise ValueError(f"tensor {i} has dtype {t.dtype}, layout {layout.name} needs {want_dtype}")
    return items


def tensor_views(layout: KVLayout, tensors: Any) -> list[memoryview]:
    """Byte views of a block's tensors in payload order for writing, checked by ``check_tensors``; a GPU
    or non-contiguous tensor is first copied into a contiguous CPU one.

    Error handling: ValueError for a wrong count, shape or dtype.
    """
    views = []
    for t in check_tensors(layout, tensors):
        if t.device.type != "cpu":
            t = t.to("cpu")
        views.append(byte_view(t.contiguous()))
    return views


def encode_block(layout: KVLayout, block_hash: str, tensors: Any) -> tuple[bytes, list[memoryview]]:
    """Header bytes and payload views (no copy of the payload) for writing one block."""
    views = tensor_views(layout, tensors)
    return encode_header(layout, block_hash, payload_checksum(views)), views


def decode_block(raw: bytes | bytearray | memoryview, layout: KVLayout, block_hash: str | None = None) -> Any:
    """A whole block file's bytes -> one tensor of ``layout.block_shape`` (a copy). For tests and tools."""
    import torch

    header = parse_header(raw, layout=layout, block_hash=block_hash, file_size=len(raw))
    payload = memoryview(raw)[header.header_len:header.header_len + header.payload_len]
    verify_payload(header, [payload])
    out = torch.empty(layout.block_shape, dtype=layout.torch_dtype())
    byte_view(out)[:] = payload
    return out
