"""The KV run file: several consecutive blocks of one prompt prefix in one file, and how runs are named.

A block file (``kvfs.kv.block``) per block costs a file, a header, a chunk and a metadata entry per
block: for a 4,096-token prompt in 32-token blocks, 128 of each to look up, open and check. A *run*
stores up to ``run_blocks`` consecutive blocks of one prefix in one file, LMCache-style, so a prompt is
a few files (docs/kv.md, "Runs").

**Names**: ``<hh>/<hash>-<count>``, where ``hash`` is the run's *last* block hash and ``count`` its
blocks. A chained hash pins the whole prefix before it, so the name says exactly which blocks the file
holds (the ``count`` blocks ending at that hash): two writers of one name wrote the same blocks, and
names never collide with block files (``<hh>/<hash>``). **Alignment**: runs start at multiples of
``run_blocks`` in the prompt (block index ``i`` is in the run starting at ``i // run_blocks *
run_blocks``); a run is full (``run_blocks`` blocks) or ends at the prompt's last full block. So the
same prompt, or the prompt with more tokens after it, finds every block of it, to the block; a prompt
that diverges from a stored one inside a run finds that run's blocks before the divergence only if a
run ending there was stored (up to ``run_blocks - 1`` blocks recomputed).

File layout: the block file's (48-byte fixed header, JSON description, zero padding to a multiple of
4096, payload), with format version 2, the fixed header's payload checksum 0 and the JSON
``{"hash": last hash, "hashes": [every block's], "sums": [16-hex-digit xxh3_64 of every block's
payload], "layout", "layout_name", "dtype", "shape": [count, *layout.block_shape]}``; the payload is the
blocks one after another, each C-contiguous in ``layout.block_shape``. The checksums are per block, so
a reader keeps the blocks before a corrupt one; their fixed width makes the header length a function
of the count and hash length alone (a reader knows where the payload starts before it reads).

Error handling: ``BlockError`` (a ValueError) for a file that is not a run of the expected layout and
blocks, is truncated, or whose header is corrupt.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kvfs.kv.block import BlockError, open_header, seal_header
from kvfs.kv.layout import KVLayout

RUN_VERSION = 2


def run_name(hashes: Sequence[str]) -> str:
    """The file name of the run holding ``hashes`` (consecutive block hashes of one prefix, in order)."""
    return f"{hashes[-1]}-{len(hashes)}"


def run_spans(num_blocks: int, run_blocks: int) -> list[tuple[int, int]]:
    """(first block, count) of the runs a prompt of ``num_blocks`` full blocks is stored as."""
    return [(s, min(run_blocks, num_blocks - s)) for s in range(0, num_blocks, run_blocks)]


def encode_run_header(layout: KVLayout, hashes: Sequence[str], sums: bytes) -> bytes:
    """The header of a run of ``hashes``; ``sums``: every block's payload xxh3_64, little-endian u64s."""
    n = len(hashes)
    values = struct.unpack(f"<{n}Q", sums)
    return seal_header(RUN_VERSION, {"hash": hashes[-1], "hashes": list(hashes), "sums": [f"{v:016x}" for v in values],
                                     "layout": layout.to_dict(), "layout_name": layout.name, "dtype": layout.dtype,
                                     "shape": [n, *layout.block_shape]}, n * layout.nbytes, 0)


def run_header_len(layout: KVLayout, hashes: Sequence[str]) -> int:
    """Where a run's payload starts (fixed for a count and hash length: the checksums are fixed width)."""
    return len(encode_run_header(layout, hashes, bytes(8 * len(hashes))))


@dataclass(frozen=True)
class RunHeader:
    header_len: int
    payload_len: int
    hashes: tuple[str, ...]
    sums: bytes  # little-endian u64 per block


def parse_run_header(raw: bytes | bytearray | memoryview, layout: KVLayout, hashes: Sequence[str],
                     file_size: int) -> RunHeader:
    """Validate a run's header against the layout and block hashes the caller expects and the file's size.

    Error handling: BlockError for a bad magic, version or header checksum, another layout or other
    blocks, a shape that does not match, or a file shorter than header + payload."""
    header_len, payload_len, _checksum, meta = open_header(raw, RUN_VERSION, "KV run")
    try:
        got_layout = KVLayout.from_dict(meta["layout"])
        got_hashes = tuple(str(h) for h in meta["hashes"])
        sums = struct.pack(f"<{len(meta['sums'])}Q", *(int(s, 16) for s in meta["sums"]))
        shape = tuple(int(d) for d in meta["shape"])
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise BlockError(f"corrupt KV run header description: {exc}") from None
    name = run_name(hashes)
    if got_layout != layout:
        raise BlockError(f"KV run {name} has layout {got_layout.name}, expected {layout.name}")
    if got_hashes != tuple(hashes):
        raise BlockError(f"KV run {name} holds other blocks ({len(got_hashes)}, last {got_hashes[-1:]})")
    n = len(got_hashes)
    if shape != (n, *layout.block_shape) or payload_len != n * layout.nbytes or len(sums) != 8 * n:
        raise BlockError(f"KV run {name}: shape {shape} / {payload_len} bytes / {len(sums) // 8} checksums do "
                         f"not match {n} blocks of {layout.name}")
    if file_size != header_len + payload_len:
        raise BlockError(f"{'truncated ' if file_size < header_len + payload_len else ''}KV run {name}: file has "
                         f"{file_size} bytes, header and payload are {header_len + payload_len}")
    return RunHeader(header_len, payload_len, got_hashes, sums)
