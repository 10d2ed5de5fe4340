"""Per-file chunk sizes (a file's layout, as CephFS and HDFS have them): names, bounds and parsing.

Every regular file records its chunk size in meta when it is created; it never changes once the file
has data. It comes from, in order: an explicit size on the create (``Client.create(chunk_size=...)``,
``kvfs cp --chunk-size``), the nearest directory above with a chunk-size policy (the xattr
``kvfs.chunk_size``, ``user.kvfs.chunk_size`` through the mount), else the cluster's
``kvfs meta --chunk-size``. Meta reads and writes that xattr as the inode's own field (no stored
xattr): on a directory it is the policy, on a file its chunk size (settable only while it is empty).

Error handling: ``ValueError`` for a size that is not a power of two within the bounds below.
"""

from __future__ import annotations

from kvfs import config
from kvfs.protocol import MAX_CHUNK_SIZE, MIN_FILE_CHUNK_SIZE

CHUNK_SIZE_XATTR = "kvfs.chunk_size"
CHUNK_SIZE_XATTRS = (CHUNK_SIZE_XATTR, "user." + CHUNK_SIZE_XATTR)  # Linux wants "user." through a mount
WEIGHTS_CHUNK_SIZE = 16 << 20  # model weight files: fewer, larger transfer units (docs/models.md)


def check_chunk_size(size: int) -> int:
    """``size`` if it is a valid per-file chunk size: a power of two from 64 KiB to 256 MiB."""
    if size < MIN_FILE_CHUNK_SIZE or size > MAX_CHUNK_SIZE or size & (size - 1):
        raise ValueError(f"chunk size {size} must be a power of two from {MIN_FILE_CHUNK_SIZE >> 10} KiB "
                         f"to {MAX_CHUNK_SIZE >> 20} MiB")
    return size


def parse_chunk_size(text: str | bytes) -> int:
    """``16M``, ``16MiB``, ``16777216`` (str or an xattr's bytes) -> a checked chunk size."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    return check_chunk_size(config.parse_size(text.strip()))
