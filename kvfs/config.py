"""Defaults and small parsers shared by the CLI and the services."""

from __future__ import annotations

import os
import re

DEFAULT_META_PORT = 9400
DEFAULT_CHUNK_SIZE = 4 << 20
META_ENV = "KVFS_META"


def default_meta_address() -> str:
    return os.environ.get(META_ENV, f"127.0.0.1:{DEFAULT_META_PORT}")


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "kvfs")


def default_mountpoint() -> str:
    return os.path.join(os.path.expanduser("~"), "kvfs")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4M', '4MiB', '10G', '512k', '1048576' -> bytes (binary units). ValueError on nonsense."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 4M, 10G, 1048576)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
