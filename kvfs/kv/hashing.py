"""Token ids -> chained prefix block hashes.

A prompt is cut into blocks of ``block_tokens`` tokens; only full blocks are hashed (a partial tail
block is never cached, as in vLLM's prefix caching). Block ``i``'s hash covers its parent's hash and
its own tokens, so it names exactly one prefix::

    h[-1] = BLAKE2b-128(key=b"kvfs-kv-root", data=salt)
    h[i]  = BLAKE2b-128(key=b"kvfs-kv-block", data=h[i-1] || u32le(block_tokens) || u32le(tok) * block_tokens)

``salt`` separates caches that must never share blocks although their token ids agree (a LoRA
adapter, a multimodal input's digest, a cache-version bump). The model, dtype and the rest of the
tensor layout are *not* hashed: they are directory levels of the path (``/kv/<model>/<layout>/...``).

The hash is a 128-bit keyed BLAKE2b: collisions would silently load another prompt's KV, so a
cryptographic hash is used rather than a fast non-cryptographic one; at ~1 GB/s it hashes a 32k-token
prompt in well under a millisecond. Hashes are written as 32 lowercase hex characters.

Error handling: ``ValueError`` for a token id outside [0, 2**32) or a non-positive block size.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

HASH_BYTES = 16
HASH_HEX_LEN = 2 * HASH_BYTES
_ROOT_KEY = b"kvfs-kv-root"
_BLOCK_KEY = b"kvfs-kv-block"


def root_hash(salt: bytes | str = b"") -> bytes:
    """The parent hash of a prompt's first block."""
    data = salt.encode() if isinstance(salt, str) else bytes(salt)
    return hashlib.blake2b(data, digest_size=HASH_BYTES, key=_ROOT_KEY).digest()


def hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of one block given its parent's hash (raw 16 bytes) and its token ids."""
    if len(parent) != HASH_BYTES:
        raise ValueError(f"parent hash must be {HASH_BYTES} bytes, got {len(parent)}")
    try:
        packed = struct.pack(f"<I{len(tokens)}I", len(tokens), *tokens)
    except struct.error:
        raise ValueError("token ids must be integers in [0, 2**32)") from None
    h = hashlib.blake2b(parent, digest_size=HASH_BYTES, key=_BLOCK_KEY)
    h.update(packed)
    return h.digest()


def _as_int_list(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):  # torch tensor, numpy array
        token_ids = token_ids.tolist()
    out = list(token_ids)
    if out and isinstance(out[0], list):
        raise ValueError("token_ids must be one sequence (one prompt), not a batch")
    return [int(t) for t in out]


def block_hashes(token_ids: Iterable[int] | Any, block_tokens: int, *, salt: bytes | str = b"") -> list[str]:
    """Chained hashes (hex) of every full block of ``token_ids``; ``len(token_ids) // block_tokens`` of them."""
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    tokens = _as_int_list(token_ids)
    parent = root_hash(salt)
    out: list[str] = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = hash_block(parent, tokens[start:start + block_tokens])
        out.append(parent.hex())
    return out


_HASH_RE = re.compile(r"[0-9a-f]{16,128}")
_HEX_RE = re.compile(r"[0-9a-f]*")


def check_hash(block_hash: str) -> str:
    """Validate a block hash before it becomes a file name: 16 to 128 lowercase hex characters (ours
    are 32; an engine may bring its own, e.g. a SHA-256). Error handling: ValueError if malformed."""
    if not isinstance(block_hash, str) or _HASH_RE.fullmatch(block_hash) is None:
        raise ValueError(f"not a block hash (want 16-128 lowercase hex characters): {block_hash!r}")
    return block_hash


def check_hashes(hashes: Sequence[str]) -> None:
    """``check_hash`` for a whole prompt at once (one regex over the joined hashes when they all have
    the same length, as a prompt's do). Error handling: ValueError naming the first bad hash."""
    if hashes and isinstance(hashes[0], str) and 16 <= len(hashes[0]) <= 128:
        n = len(hashes[0])
        try:
            joined = "".join(hashes)
        except TypeError:
            joined = ""
        if len(joined) == n * len(hashes) and all(len(h) == n for h in hashes) and _HEX_RE.fullmatch(joined):
            return
    for h in hashes:
        check_hash(h)
