"""Parse and validate a safetensors header.

Layout of a safetensors file::

    u64 little-endian N | N bytes of UTF-8 JSON (may end in spaces) | data region

The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the data region) plus an optional ``"__metadata__"`` dict of strings. The checks here are strict so a
malformed or hostile file never produces garbage tensors or a huge allocation: the header length is
sane, the JSON is an object without duplicate keys, every dtype is known, ``prod(shape) * itemsize``
equals each span's length, the spans lie inside the file, do not overlap, and cover the data region
with no hole.

Error handling: every problem raises ``SafetensorsError`` (a ``ValueError``) whose message starts with
the file name and says what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER = 100_000_000
PREFIX = 8


class SafetensorsError(ValueError):
    """A malformed safetensors file (or index); the message names the file and the problem."""


def _torch_dtype(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)  # type: ignore[no-any-return]


# safetensors dtype name -> torch dtype, for every dtype this torch build has. Sub-byte formats (F4, F6_*)
# have no one-element-per-item torch dtype and are refused with a clear error.
DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, dt in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": _torch_dtype("uint16"),
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": _torch_dtype("uint32"),
        "F32": torch.float32,
        "F64": torch.float64,
        "I64": torch.int64,
        "U64": _torch_dtype("uint64"),
        "C64": torch.complex64,
        "F8_E4M3": _torch_dtype("float8_e4m3fn"),
        "F8_E5M2": _torch_dtype("float8_e5m2"),
        "F8_E4M3FNUZ": _torch_dtype("float8_e4m3fnuz"),
        "F8_E5M2FNUZ": _torch_dtype("float8_e5m2fnuz"),
        "F8_E8M0": _torch_dtype("float8_e8m0fnu"),
    }.items()
    if dt is not None
}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}
# Known to the format but without a torch equivalent here: named in the error instead of "unknown".
UNSUPPORTED_DTYPES = {"F4", "F6_E2M3", "F6_E3M2"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    dtype_name: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the tensor's bytes
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: str
    file_size: int
    data_start: int  # absolute offset of the data region (8 + header length)
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str] | None


def header_length(path: str, prefix: bytes, file_size: int) -> int:
    """The JSON length from the 8-byte prefix, checked against the file size and ``MAX_HEADER``."""
    if file_size < PREFIX or len(prefix) < PREFIX:
        raise SafetensorsError(f"{path}: file too short ({file_size} bytes) for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:PREFIX])
    if n == 0:
        raise SafetensorsError(f"{path}: header length is 0")
    if n > MAX_HEADER:
        raise SafetensorsError(f"{path}: header length {n} exceeds the {MAX_HEADER}-byte limit")
    if PREFIX + n > file_size:
        raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes)")
    return int(n)


def _no_duplicates(path: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise SafetensorsError(f"{path}: duplicate key {key!r} in header")
            out[key] = value
        return out

    return hook


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(path: str, raw: bytes, file_size: int) -> Header:
    """Validate ``raw`` (the 8-byte prefix followed by the JSON) of a ``file_size``-byte file."""
    n = header_length(path, raw, file_size)
    body = raw[PREFIX: PREFIX + n]
    if len(body) != n:
        raise SafetensorsError(f"{path}: header truncated ({len(body)} of {n} bytes)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except json.JSONDecodeError as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(doc, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")

    data_start = PREFIX + n
    data_len = file_size - data_start
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")

    entries: list[tuple[int, int, str, TensorInfo]] = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: tensor {name!r}: entry is not an object")
        extra = set(info) - {"dtype", "shape", "data_offsets"}
        if extra:
            raise SafetensorsError(f"{path}: tensor {name!r}: unexpected field(s) {sorted(extra)}")
        dname = info.get("dtype")
        if not isinstance(dname, str):
            raise SafetensorsError(f"{path}: tensor {name!r}: missing or non-string dtype")
        dtype = DTYPES.get(dname)
        if dtype is None:
            why = "not supported by this torch" if dname in UNSUPPORTED_DTYPES else "unknown"
            raise SafetensorsError(f"{path}: tensor {name!r}: dtype {dname!r} {why}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers")
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or offs[0] < 0 or offs[1] < offs[0]):
            raise SafetensorsError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] with "
                                   f"0 <= begin <= end, got {offs!r}")
        begin, end = offs
        expected = math.prod(shape) * dtype.itemsize
        if expected != end - begin:
            raise SafetensorsError(f"{path}: tensor {name!r}: shape {shape} of {dname} needs {expected} bytes "
                                   f"but data_offsets span {end - begin}")
        if end > data_len:
            raise SafetensorsError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] run past the end "
                                   f"of the data region ({data_len} bytes)")
        t = TensorInfo(name, dtype, dname, tuple(shape), data_start + begin, data_start + end)
        entries.append((begin, end, name, t))

    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    prev = ""
    for begin, end, name, _ in entries:
        if begin < pos:
            raise SafetensorsError(f"{path}: tensors {prev!r} and {name!r} overlap (offset {begin} < {pos})")
        if begin > pos:
            raise SafetensorsError(f"{path}: data region has a hole at [{pos}, {begin}) before tensor {name!r}")
        pos = end
        prev = name
    if pos != data_len:
        raise SafetensorsError(f"{path}: tensors cover {pos} bytes but the data region holds {data_len} "
                               f"(trailing bytes or truncated file)")
    return Header(path, file_size, data_start, {e[2]: e[3] for e in entries}, metadata)
