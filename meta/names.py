"""Rules every part of the namespace shares: what a file name may be, and the clock for timestamps."""

from __future__ import annotations

import errno
import time

from kvfs import protocol as P
from kvfs.errors import error


def now_ns() -> int:
    return time.time_ns()


def check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise error(errno.EINVAL, f"invalid file name {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > P.NAME_MAX:
        raise error(errno.ENAMETOOLONG, "file name too long")
