"""Which remote stores an attach may name: the admin's allow-list (issue 13).

Meta opens remote stores with its own identity and credentials (from its environment, never from the
client), so an unrestricted ``kvfs remote attach`` would let any client make meta list, write and delete
anywhere it can reach: ``file:///etc/cron.d`` in write-back mode, or another team's bucket. Meta
therefore accepts only URLs at or below a prefix it was started with (``kvfs meta --remote-allow``,
repeatable, or ``KVFS_REMOTE_ALLOW`` comma-separated); ``*`` allows any URL (``kvfs up``'s default: it
listens on loopback only and serves one user). The default of ``kvfs meta`` is to allow none.

A prefix matches on path-segment boundaries (``s3://b/models`` allows ``s3://b/models/x``, not
``s3://b/models-other``); ``file://`` paths are compared after resolving symlinks and ``..``.
"""

from __future__ import annotations

import errno
import os
from urllib.parse import urlparse

from kvfs.errors import error

ANY = "*"


def _canonical(url: str) -> tuple[str, str, str]:
    u = urlparse(url)
    scheme = u.scheme.lower()
    path = u.path
    if scheme == "file":
        path = os.path.realpath(path or "/")
    else:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise error(errno.EACCES, f"{url}: '..' is not allowed in a remote URL")
        path = "/" + "/".join(parts)
    return scheme, u.netloc.lower(), path.rstrip("/") or "/"


def allowed(url: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    if ANY in prefixes:
        return True
    scheme, netloc, path = _canonical(url)
    for prefix in prefixes:
        p_scheme, p_netloc, p_path = _canonical(prefix)
        if (scheme, netloc) != (p_scheme, p_netloc):
            continue
        if p_path == "/" or path == p_path or path.startswith(p_path + "/"):
            return True
    return False


def check(url: str, prefixes: tuple[str, ...] | list[str]) -> None:
    """Error handling: EACCES, one line naming the URL and what the admin must do."""
    if not allowed(url, prefixes):
        raise error(errno.EACCES, f"{url}: not on this meta's remote allow-list (the admin starts meta with "
                                  f"--remote-allow <url prefix>)")


def from_env() -> tuple[str, ...]:
    return tuple(p.strip() for p in os.environ.get("KVFS_REMOTE_ALLOW", "").split(",") if p.strip())
