"""In-memory metadata engine: the reference backend for fast unit tests of the namespace."""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict

from kvfs.meta.engine import Batch


class MemoryEngine:
    durable = False  # nothing to sync: gone with the process

    def __init__(self) -> None:
        self._data: SortedDict = SortedDict()
        self.writes = 0

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return list(map(self._data.get, keys))

    def sync(self) -> None:
        pass

    def write(self, batch: Batch) -> None:
        self.writes += 1
        for key, value in batch:
            if value is None:
                self._data.pop(key, None)
            else:
                self._data[key] = value

    def scan(self, prefix: bytes, start: bytes | None = None, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        count = 0
        for key in self._data.irange(minimum=start if start is not None and start > prefix else prefix):
            if not key.startswith(prefix) or (limit is not None and count >= limit):
                return
            count += 1
            yield key, self._data[key]

    def close(self) -> None:
        pass
