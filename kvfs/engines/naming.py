"""Names engine adapters share: a model's kvfs path level (``<root>/<model_id>/<layout>/...``).

Error handling: none (any string maps to a valid path component).
"""

from __future__ import annotations

import re


def model_path_level(name: str, revision: str | None = None) -> str:
    """A model name or path (plus revision) as one stable path component: ``meta-llama/Llama-3-8B`` ->
    ``meta-llama--Llama-3-8B``, ``/models/llama`` -> ``models--llama``."""
    text = name.strip("/") + (f"@{revision}" if revision else "")
    text = re.sub(r"[^A-Za-z0-9._@+=-]+", "--", text.replace("/", "--")).strip("-.") or "model"
    return text[:200]
