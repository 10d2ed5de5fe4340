"""What engine adapters share: a model's kvfs path level (``<root>/<model_id>/<layout>/...``) and how
its KV store is opened (through a mount path, or a native client of meta) and closed (``LazyStore``).

Error handling: ``model_path_level`` has none (any string maps to a valid path component);
``open_kv_store`` raises what ``KVStore``/``SyncClient`` raise (callers run it inside their guard).
"""

from __future__ import annotations

import re
import threading
from typing import Any


def model_path_level(name: str, revision: str | None = None) -> str:
    """A model name or path (plus revision) as one stable path component: ``meta-llama/Llama-3-8B`` ->
    ``meta-llama--Llama-3-8B``, ``/models/llama`` -> ``models--llama``."""
    text = name.strip("/") + (f"@{revision}" if revision else "")
    text = re.sub(r"[^A-Za-z0-9._@+=-]+", "--", text.replace("/", "--")).strip("-.") or "model"
    return text[:200]


def open_kv_store(root: str, model_id: str, layout: Any, meta_addr: str, client: Any, timeout: float) -> tuple[Any, Any]:
    """(store, client) for ``<root>/<model_id>``: through the native client when ``meta_addr`` is set
    (``client`` reused if given, else made), else ``root`` is a directory (a kvfs mount path)."""
    from kvfs.kv import KVStore

    path = f"{root.rstrip('/')}/{model_id}"
    if not meta_addr:
        return KVStore(path, layout), client
    if client is None:
        import kvfs

        client = kvfs.SyncClient(meta_addr, kvfs.ClientOptions(timeout=timeout))
    return KVStore(path, layout, client=client), client


class LazyStore:
    """An adapter's KV store, opened on first use and shared by the engine's threads. Callers run
    ``get`` and the closers ``take`` returns inside their guard, so a dead meta blocks nothing."""

    def __init__(self, root: str, model_id: str, meta_addr: str, timeout: float):
        self.root, self.model_id, self.meta_addr, self.timeout = root, model_id, meta_addr, timeout
        self._lock = threading.Lock()
        self._store: Any = None
        self._client: Any = None

    def get(self, layout: Any) -> Any:
        with self._lock:
            if self._store is None:
                self._store, self._client = open_kv_store(self.root, self.model_id, layout, self.meta_addr,
                                                          self._client, self.timeout)
            return self._store

    def take(self) -> list[Any]:
        """Forget the store and client; returns those to close (store first)."""
        with self._lock:
            closers = [c for c in (self._store, self._client) if c is not None]
            self._store = self._client = None
        return closers
