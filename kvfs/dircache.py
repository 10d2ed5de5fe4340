"""Client-side directory listings that answer positive lookups without a meta round trip.

Why: a ``stat`` or ``unlink`` of many files in one directory is one META_LOOKUP per name (~0.3 ms each
through Python RPC) once the kernel's dentry cache has expired or been dropped. When a directory sees
a burst of lookups (``burst`` within ``ttl``), the client lists it once (META_READDIR pages carry
every entry's attributes) and answers the following lookups from that listing for ``ttl`` seconds.

Consistency: the same as the kernel's own entry/attribute cache (``attr_timeout``, 1 s by default),
which the mount already runs with: another client's change shows up within ``ttl``. Only *positive*
answers come from a listing; a name it does not hold goes to meta, so a file another client just
created is found at once. This client's own changes update the listing at once (``added``,
``removed``, ``changed``), and the caller overlays its own uncommitted sizes as for any lookup.
Directories of more than ``max_entries`` are not listed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from kvfs import protocol as P


@dataclass
class _Listing:
    loaded: float
    entries: dict[str, P.Attr] = field(default_factory=dict)


class ListingCache:
    def __init__(self, ttl: float = 1.0, burst: int = 16, max_entries: int = 16384, clock=time.monotonic):
        self.ttl = ttl
        self.burst = burst
        self.max_entries = max_entries
        self.clock = clock
        self._listings: dict[int, _Listing] = {}
        self._parent_of: dict[int, int] = {}  # inode -> directory whose listing holds it
        self._streaks: dict[int, tuple[float, int]] = {}  # directory -> (window start, lookups)
        self._too_big: dict[int, float] = {}  # directory -> when it was found too big to list

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def get(self, parent: int, name: str) -> P.Attr | None:
        """A copy of the listed attributes of ``name``, or None (not listed, or the listing expired)."""
        listing = self._listings.get(parent)
        if listing is None:
            return None
        if self.clock() - listing.loaded >= self.ttl:
            self.forget_dir(parent)
            return None
        attr = listing.entries.get(name)
        return msgspec.structs.replace(attr) if attr is not None else None

    def wants_listing(self, parent: int) -> bool:
        """Count a lookup that went to meta; True once ``parent`` has seen a burst worth listing."""
        if not self.enabled or parent in self._listings:
            return False
        now = self.clock()
        if now - self._too_big.get(parent, -1e18) < self.ttl * 10:
            return False
        start, count = self._streaks.get(parent, (now, 0))
        if now - start >= self.ttl:
            start, count = now, 0
        count += 1
        self._streaks[parent] = (start, count)
        return count >= self.burst

    def store(self, parent: int, loaded: float, entries: list[P.DirEntry] | None) -> None:
        """Install a listing fetched from ``loaded`` on (None: the directory was too big to list)."""
        self._streaks.pop(parent, None)
        if entries is None:
            self._too_big[parent] = loaded
            return
        listing = self._listings[parent] = _Listing(loaded)
        for e in entries:
            listing.entries[e.name] = e.attr
            self._parent_of[e.attr.ino] = parent

    # ------------------------------------------------------------------ this client's own changes

    def added(self, parent: int, name: str, attr: P.Attr) -> None:
        listing = self._listings.get(parent)
        if listing is not None:
            listing.entries[name] = msgspec.structs.replace(attr)
            self._parent_of[attr.ino] = parent

    def removed(self, parent: int, name: str) -> None:
        listing = self._listings.get(parent)
        if listing is not None:
            attr = listing.entries.pop(name, None)
            if attr is not None and self._parent_of.get(attr.ino) == parent:
                del self._parent_of[attr.ino]

    def changed(self, ino: int) -> None:
        """An inode's attributes changed (size, times, mode, links): drop the listing that holds it."""
        parent = self._parent_of.get(ino)
        if parent is not None:
            self.forget_dir(parent)

    def forget_dir(self, parent: int) -> None:
        listing = self._listings.pop(parent, None)
        if listing is not None:
            for attr in listing.entries.values():
                if self._parent_of.get(attr.ino) == parent:
                    del self._parent_of[attr.ino]

    def clear(self) -> None:
        self._listings.clear()
        self._parent_of.clear()
        self._streaks.clear()
