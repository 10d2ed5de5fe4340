"""Per-directory cache policy for KV trees, and the ``kvfs status`` rows of the KV cache.

A policy is a JSON xattr ``kvfs.policy`` on a directory (``user.kvfs.policy`` when set through the
mount, where Linux requires the ``user.`` namespace; meta reads both)::

    {"quota": <bytes, 0 = none>, "ttl": <seconds since last access, 0 = none>, "window": <seconds>}

Only directories with a policy are a cache: meta's eviction engine (kvfs.meta.eviction) deletes
files under them when the quota is exceeded, when a file's TTL passes, or when a chunkserver passes
its high watermark; files elsewhere are never evicted. The nearest policy directory above a file
governs it. This module has no torch dependency (meta imports it).

Error handling: ``ValueError`` for a malformed policy value or size; OSErrors from the client.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

POLICY_XATTR = "kvfs.policy"
POLICY_XATTRS = (POLICY_XATTR, "user." + POLICY_XATTR)
STATS_PREFIXES = ("kvfs.kv.stats.", "user.kvfs.kv.stats.")
EVICTIONS_XATTR = "kvfs.kv.evictions"


@dataclass
class Policy:
    quota: int = 0  # bytes; 0 = no quota
    ttl: float = 0.0  # seconds since last access; 0 = no expiry
    window: float = 60.0  # LRU window: accesses within one window count as equally recent

    def __post_init__(self) -> None:
        if self.quota < 0 or self.ttl < 0 or self.window <= 0:
            raise ValueError(f"bad policy {self}: quota and ttl must be >= 0, window > 0")

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Policy:
        try:
            d = json.loads(raw)
            return cls(int(d.get("quota", 0)), float(d.get("ttl", 0)), float(d.get("window", 60.0)))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed kvfs.policy value {raw[:80]!r}: {exc}") from None


def parse_duration(text: str) -> float:
    """``3600``, ``90s``, ``15m``, ``2h``, ``7d`` -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"bad duration {text!r} (e.g. 3600, 90s, 15m, 2h, 7d)") from None


# --------------------------------------------------------------------------- client side (kvfs.SyncClient)


def get_policy(client: Any, path: str) -> Policy | None:
    """The policy of directory ``path`` (set natively or through the mount), or None."""
    ino = client.resolve(path).ino
    for name in POLICY_XATTRS:
        try:
            return Policy.decode(client.getxattr(ino, name))
        except OSError:
            continue
    return None


def set_policy(client: Any, path: str, *, quota: int | None = None, ttl: float | None = None,
               window: float | None = None) -> Policy:
    """Set (or update: fields left None keep their value) the policy of directory ``path``."""
    current = get_policy(client, path) or Policy()
    policy = Policy(current.quota if quota is None else quota, current.ttl if ttl is None else ttl,
                    current.window if window is None else window)
    client.setxattr(client.resolve(path).ino, POLICY_XATTR, policy.encode())
    return policy


def clear_policy(client: Any, path: str) -> None:
    ino = client.resolve(path).ino
    for name in POLICY_XATTRS:
        try:
            client.removexattr(ino, name)
        except OSError:
            pass


def kv_status(client: Any) -> Any:
    """The raw ``KVStatusReply`` from meta."""
    from kvfs import protocol as P

    return client.call(client.client.meta.request, P.META_KV_STATUS, P.Empty())


def evict_now(client: Any) -> Any:
    """Run one eviction pass on meta now; returns the ``KVStatusReply`` after it."""
    from kvfs import protocol as P

    return client.call(client.client.meta.request, P.META_KV_EVICT, P.Empty())


def kv_status_rows(client: Any) -> list[tuple[str, ...]]:
    """Rows for ``kvfs status``: a header row, then one row per KV directory (a directory with a
    policy or with clients' counters). Empty list when there is none."""
    from kvfs.config import format_size

    reply = kv_status(client)
    if not reply.dirs:
        return []
    rows = [("KV DIR", "QUOTA", "TTL", "USED", "BLOCKS", "HITS", "MISSES", "HIT%", "PREFIX HIT/MISS",
             "EVICTED", "EXPIRED")]
    for d in reply.dirs:
        gets = d.get_hits + d.get_misses
        rows.append((d.path, format_size(d.quota) if d.quota else "-", f"{d.ttl:g}s" if d.ttl else "-",
                     format_size(d.used_bytes), str(d.blocks), str(d.get_hits), str(d.get_misses),
                     f"{100 * d.get_hits / gets:.1f}" if gets else "-",
                     f"{d.lookup_hit_blocks}/{d.lookup_miss_blocks}",
                     f"{d.evicted_blocks} ({format_size(d.evicted_bytes)})", str(d.expired_blocks)))
    return rows


def format_rows(rows: list[tuple[str, ...]]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
