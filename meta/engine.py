"""The metadata engine interface: a few primitives over an ordered byte-key store.

Everything the namespace needs is ``get``, an atomic ``write`` of a batch and an ordered prefix
``scan``. Adding a backend (etcd, FoundationDB, ...) is adding a file that implements these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

# A batch is applied atomically: every (key, value) is put, every (key, None) deleted.
Batch = list[tuple[bytes, bytes | None]]


class MetaEngine(Protocol):
    # Count of ``write`` calls so far: meta/durability.py waits for a sync that covers a given count.
    writes: int
    # True when acknowledged changes must be on disk first: ``write`` does not sync by itself, and
    # ``sync`` makes every earlier write durable (group commit, meta/durability.py).
    durable: bool
    # Optional, default True: group commit may call ``sync`` on the event loop when a request is
    # alone. False for an engine whose sync is a network round trip (etcd): always in a worker thread,
    # or, for an engine that has ``async def sync_async()`` (etcd), awaited on the event loop instead.

    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """``get`` of each key, in order (one call: a prompt's block lookup is thousands of keys)."""

    def write(self, batch: Batch) -> None:
        """Apply the whole batch atomically (visible at once; durable after the next ``sync``)."""

    def sync(self) -> None:
        """Make every write so far durable (blocking: call it from a worker thread). Error handling: OSError."""

    def scan(self, prefix: bytes, start: bytes | None = None, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys with ``prefix`` in byte order, from ``start`` (inclusive) when given."""

    def close(self) -> None: ...
