"""The remote-store interface: the few primitives the capacity tier needs from S3, HDFS, ...

A store is bound to one location (``s3://bucket/prefix``, ``hdfs://nn:8020/path``, ``file:///dir``);
keys are paths relative to it, "/"-separated, without a leading slash. One kvfs file is one remote
object with the same relative path, so anything written through kvfs stays readable by other tools
and an existing bucket or directory is usable as is.

Stores are blocking (boto3 and pyarrow are): trio callers run them with ``trio.to_thread``. Each call
is bounded by the backend's own connect/read timeouts, so nothing hangs.

Error handling: every method raises ``OSError`` with an errno: ENOENT (no such object or bucket),
EACCES (bad credentials, access denied), ESTALE (the object changed: an ``etag`` precondition
failed), EIO (unreachable, timed out, anything else). ``RemoteError`` carries the one-line message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RemoteEntry:
    """One object (or, with ``is_dir``, one common prefix) of a listing."""

    key: str  # relative to the store root, no trailing slash
    size: int = 0
    etag: str = ""  # opaque version tag: S3 ETag, or size+mtime for stores without one
    mtime_ns: int = 0
    is_dir: bool = False


class Upload(Protocol):
    """One object being written: ``write`` the data in order, then ``complete`` (or ``abort``)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def complete(self) -> RemoteEntry:
        """Make the object visible; returns its new entry (etag, size, mtime)."""

    def abort(self) -> None: ...


class RangeStream(Protocol):
    """The body of a ranged read, consumed in order (one request however long the range)."""

    def readinto(self, into: memoryview) -> int: ...

    def close(self) -> None: ...


class RemoteStore(Protocol):
    url: str

    def check(self) -> None:
        """Verify the location is reachable and the credentials work (attach-time validation)."""

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        """Direct children of directory ``prefix`` ("" = root): objects and sub-directories."""

    def head(self, key: str) -> RemoteEntry: ...

    def open_range(self, key: str, offset: int, length: int, etag: str = "") -> RangeStream:
        """Start reading ``length`` bytes at ``offset``. With ``etag``, raise ESTALE instead of
        returning data of a different version."""


    def begin_upload(self, key: str, size_hint: int = 0) -> Upload: ...

    def delete(self, key: str) -> None:
        """Delete one object; a missing object is not an error."""


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def read_full(stream: RangeStream, into: memoryview) -> int:
    """Fill ``into`` from ``stream``; short only when the stream ends."""
    got = 0
    while got < len(into):
        n = stream.readinto(into[got:])
        if not n:
            break
        got += n
    return got


def read_range(store: RemoteStore, key: str, offset: int, into: memoryview, etag: str = "") -> int:
    """Fill ``into`` from ``offset`` with one request (short only at the end of the object); returns
    bytes read. Derived from ``open_range``, so backends implement only that."""
    if not len(into):
        return 0
    stream = store.open_range(key, offset, len(into), etag)
    try:
        return read_full(stream, into)
    finally:
        stream.close()
