"""The remote tier's records, keys and tunables (meta/remote.py owns the behaviour).

Key layout (own ``r`` prefix; records.py owns the upper-case ones)::

    rb <path>        -> BindingRecord
    rf <ino:8>       -> FileRecord
    ru <ino:8>       -> b""              upload queue (one entry per dirty file)
    rd <seq:8>       -> DeleteJob        remote deletes still to do
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import msgspec

from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.remote.allow import from_env as allow_from_env

MODES = ("writeback", "writethrough", "readonly")
STATE_XATTR = "user.kvfs.state"
DIRTY, UPLOADING, CLEAN = "dirty", "uploading", "clean"


def _env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class TierOptions:
    """Tunables; each can be set from the environment of the meta process (``KVFS_REMOTE_*``)."""

    ttl: float = field(default_factory=lambda: _env("KVFS_REMOTE_TTL", 30.0))  # listing/validation freshness
    sync_wait: float = field(default_factory=lambda: _env("KVFS_REMOTE_SYNC_WAIT", 3.0))  # lookup waits this long
    remote_timeout: float = field(default_factory=lambda: _env("KVFS_REMOTE_TIMEOUT", 60.0))
    max_backoff: float = field(default_factory=lambda: _env("KVFS_REMOTE_MAX_BACKOFF", 30.0))
    uploads: int = field(default_factory=lambda: int(_env("KVFS_REMOTE_UPLOADS", 4)))
    writethrough_timeout: float = field(default_factory=lambda: _env("KVFS_REMOTE_WRITETHROUGH_TIMEOUT", 25.0))
    high_watermark: float = field(default_factory=lambda: _env("KVFS_REMOTE_HIGH_WATERMARK", 0.90))
    low_watermark: float = field(default_factory=lambda: _env("KVFS_REMOTE_LOW_WATERMARK", 0.80))
    evict_min_age: float = field(default_factory=lambda: _env("KVFS_REMOTE_EVICT_MIN_AGE", 60.0))
    # URL prefixes an attach may name (kvfs.remote.allow); empty: none.
    allow: tuple[str, ...] = field(default_factory=lambda: allow_from_env())


class BindingRecord(msgspec.Struct, array_like=True):
    path: str
    url: str
    mode: str
    root_ino: int
    uid: int = 0
    gid: int = 0


class FileRecord(msgspec.Struct, array_like=True):
    binding: str  # binding path
    key: str  # object key relative to the binding's URL
    state: str
    etag: str = ""  # version of the remote object this file matches ("" = never uploaded)
    size: int = 0
    mtime_ns: int = 0
    version: int = 0  # bumped by every local change; an upload only cleans the version it read
    error: str = ""


class DeleteJob(msgspec.Struct, array_like=True):
    url: str
    key: str


_enc = msgspec.msgpack.Encoder().encode
_dec_binding = msgspec.msgpack.Decoder(BindingRecord).decode
_dec_file = msgspec.msgpack.Decoder(FileRecord).decode
_dec_delete = msgspec.msgpack.Decoder(DeleteJob).decode


def binding_key(path: str) -> bytes:
    return b"rb" + path.encode("utf-8", "surrogateescape")


def file_key(ino: int) -> bytes:
    return b"rf" + R.U64.pack(ino)


def upload_key(ino: int) -> bytes:
    return b"ru" + R.U64.pack(ino)


def delete_key(seq: int) -> bytes:
    return b"rd" + R.U64.pack(seq)


def norm_path(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise error(errno.EINVAL, f"{path}: '..' not allowed")
    return "/" + "/".join(parts)
