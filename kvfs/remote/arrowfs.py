"""Any filesystem pyarrow.fs supports: ``hdfs://`` (HadoopFileSystem), ``file://`` (LocalFileSystem),
``gs://``, ``abfs://``... ``FileSystem.from_uri`` picks the implementation from the URL.

Files have no ETag here: the version tag is ``<size>-<mtime_ns>``, compared before each ranged read.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator

from kvfs.errors import error
from kvfs.remote.store import RemoteEntry, join_key

log = logging.getLogger("kvfs.remote")


def _errors() -> tuple[type[BaseException], ...]:
    """What pyarrow.fs raises: OSError subclasses for I/O, ArrowException for the rest."""
    import pyarrow as pa

    return (OSError, pa.ArrowException)


def _fail(exc: BaseException, what: str) -> OSError:
    if isinstance(exc, FileNotFoundError):
        return error(errno.ENOENT, f"{what}: no such file or directory")
    if isinstance(exc, PermissionError):
        return error(errno.EACCES, f"{what}: permission denied")
    if isinstance(exc, OSError) and exc.errno:
        return error(exc.errno, f"{what}: {exc.strerror or exc}")
    return error(errno.EIO, f"{what}: {exc}")


def _etag(size: int, mtime_ns: int) -> str:
    return f"{size:x}-{mtime_ns:x}"


class ArrowStore:
    def __init__(self, url: str):
        from pyarrow import fs

        self.url = url
        try:
            self.fs, root = fs.FileSystem.from_uri(url)
        except _errors() as exc:
            raise _fail(exc, url) from None
        self.root = root.rstrip("/") or "/"

    def _path(self, key: str) -> str:
        return self.root + "/" + key.strip("/") if key.strip("/") else self.root

    def _entry(self, key: str, info) -> RemoteEntry:
        from pyarrow import fs

        mtime = info.mtime_ns or 0
        if info.type == fs.FileType.Directory:
            return RemoteEntry(key, is_dir=True, mtime_ns=mtime)
        return RemoteEntry(key, info.size or 0, _etag(info.size or 0, mtime), mtime)

    def check(self) -> None:
        from pyarrow import fs

        try:
            info = self.fs.get_file_info(self.root)
        except _errors() as exc:
            raise _fail(exc, self.url) from None
        if info.type == fs.FileType.NotFound:
            raise error(errno.ENOENT, f"{self.url}: no such directory")
        if info.type != fs.FileType.Directory:
            raise error(errno.ENOTDIR, f"{self.url}: not a directory")

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        from pyarrow import fs

        base = self._path(prefix)
        try:
            infos = self.fs.get_file_info(fs.FileSelector(base, allow_not_found=True, recursive=False))
        except _errors() as exc:
            raise _fail(exc, base) from None
        for info in infos:
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if info.type in (fs.FileType.File, fs.FileType.Directory) and not name.startswith(".kvfs-tmp-"):
                yield self._entry(join_key(prefix, name), info)

    def head(self, key: str) -> RemoteEntry:
        from pyarrow import fs

        try:
            info = self.fs.get_file_info(self._path(key))
        except _errors() as exc:
            raise _fail(exc, self._path(key)) from None
        if info.type != fs.FileType.File:
            raise error(errno.ENOENT, f"{self._path(key)}: no such file")
        return self._entry(key, info)

    def open_range(self, key: str, offset: int, length: int, etag: str = "") -> _ArrowStream:
        if etag and self.head(key).etag != etag:
            raise error(errno.ESTALE, f"{self._path(key)}: changed since it was listed")
        try:
            return _ArrowStream(self._path(key), self.fs.open_input_file(self._path(key)), offset, length)
        except _errors() as exc:
            raise _fail(exc, self._path(key)) from None

    def begin_upload(self, key: str, size_hint: int = 0) -> _ArrowUpload:
        return _ArrowUpload(self, key)

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass
        except _errors() as exc:
            err = _fail(exc, self._path(key))
            if err.errno != errno.ENOENT:
                raise err from None


class _ArrowStream:
    def __init__(self, path: str, f, offset: int, length: int) -> None:
        self.path, self.f, self.pos, self.end = path, f, offset, offset + length

    def readinto(self, into: memoryview) -> int:
        n = min(len(into), self.end - self.pos)
        if n <= 0:
            return 0
        try:
            data = self.f.read_at(n, self.pos)
        except _errors() as exc:
            raise _fail(exc, self.path) from None
        into[: len(data)] = memoryview(data).cast("B")
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()


class _ArrowUpload:
    """Writes to a temporary name next to the target and renames it into place on ``complete``, so
    readers never see a half-written file."""

    def __init__(self, store: ArrowStore, key: str):
        self.store = store
        self.key = key
        path = store._path(key)
        head, _, name = path.rpartition("/")
        self.tmp = f"{head}/.kvfs-tmp-{os.getpid()}-{id(self):x}-{name}"
        try:
            store.fs.create_dir(head, recursive=True)
            self.out = store.fs.open_output_stream(self.tmp)
        except _errors() as exc:
            raise _fail(exc, path) from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.out.write(data)
        except _errors() as exc:
            raise _fail(exc, self.tmp) from None

    def complete(self) -> RemoteEntry:
        try:
            self.out.close()
            self.store.fs.move(self.tmp, self.store._path(self.key))
        except _errors() as exc:
            self.abort()
            raise _fail(exc, self.store._path(self.key)) from None
        return self.store.head(self.key)

    def abort(self) -> None:
        for cleanup in (self.out.close, lambda: self.store.fs.delete_file(self.tmp)):
            try:
                cleanup()
            except _errors() as exc:  # best effort: the temporary name is never listed
                log.debug("cleaning up %s: %s", self.tmp, exc)
