"""What engine adapters share: a model's kvfs path level (``<root>/<model_id>/<layout>/...``) and how
its KV store is opened (through a mount path, or a native client of meta).

Error handling: ``model_path_level`` has none (any string maps to a valid path component);
``open_kv_store`` raises what ``KVStore``/``SyncClient`` raise (callers run it inside their guard).
"""

from __future__ import annotations

import re
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
