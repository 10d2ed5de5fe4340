"""RocksDB metadata engine (rocksdict). Each namespace change is one WriteBatch: atomic on crash."""

from __future__ import annotations

from collections.abc import Iterator

from rocksdict import Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from kvfs.meta.engine import Batch


class RocksEngine:
    def __init__(self, path: str, *, sync: bool = False):
        """``sync=False`` survives a killed process (the WAL is in the OS page cache) but not power
        loss; ``sync=True`` fsyncs the WAL on every change."""
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = Rdict(path, options=opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        # Point gets in a C-level map: faster here than rocksdict's multi-get for thousands of keys.
        return list(map(self._db.get, keys))

    def write(self, batch: Batch) -> None:
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
        self._db.close()
