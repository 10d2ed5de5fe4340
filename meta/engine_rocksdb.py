"""RocksDB metadata engine (rocksdict). Each namespace change is one WriteBatch: atomic on crash."""

from __future__ import annotations

import errno
from collections.abc import Iterator

from rocksdict import Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from kvfs.meta.engine import Batch


class RocksEngine:
    def __init__(self, path: str, *, sync: bool = True):
        """Writes go to the WAL unsynced; ``sync()`` fsyncs it (group commit in meta/durability.py).
        ``sync=False`` (opt-out) acknowledges without syncing: changes survive a killed process (the
        WAL is in the OS page cache) but not a power loss or VM reset."""
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = Rdict(path, options=opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = False
        self.durable = sync
        self.writes = 0

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        # Point gets in a C-level map: faster here than rocksdict's multi-get for thousands of keys.
        return list(map(self._db.get, keys))

    def sync(self) -> None:
        try:
            self._db.flush_wal(True)  # releases the GIL while it fsyncs
        except Exception as exc:  # rocksdict raises plain Exceptions for I/O errors
            raise OSError(errno.EIO, f"RocksDB WAL sync: {exc}") from exc

    def write(self, batch: Batch) -> None:
        self.writes += 1
        wb = WriteBatch(raw_mode=True)
        for key, value in batch:
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        self._db.write(wb, self._write_opts)

    def scan(self, prefix: bytes, start: bytes | None = None, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter(ReadOptions())
        it.seek(start if start is not None and start > prefix else prefix)
        count = 0
        while it.valid():
            key = it.key()
            if not key.startswith(prefix) or (limit is not None and count >= limit):
                break
            yield key, it.value()
            count += 1
            it.next()

    def close(self) -> None:
        if self.durable:
            self.sync()
        self._db.close()
