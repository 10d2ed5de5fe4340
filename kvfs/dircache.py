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

Directory attributes: the kernel drops a directory's attributes after every change made in it and
asks again (GETATTR) before the next permission check, so a loop of creates or unlinks pays an extra
round trip per file. A directory's attributes fetched by this client are kept for ``ttl``; this
client's own changes in it update them in place (mtime/ctime to now, link count for subdirectories),
as the meta service does; another client's changes show within ``ttl``, as with the kernel's cache.
"""

from __future__ import annotations

import stat
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from kvfs import protocol as P


class ChangeLog:
    """This client's recent namespace changes, so a listing fetched while some happened is kept unless
    one touched *its* directory or an inode in it (a global counter threw away every listing fetched
    while any other directory changed: four clients unlinking in four directories re-listed them over
    and over)."""

    def __init__(self, keep: int = 4096):
        self.seq = 0
        self._log: deque[tuple[int, int, int]] = deque(maxlen=keep)  # (seq, directory or 0, inode or 0)

    def note(self, directory: int = 0, ino: int = 0) -> None:
        """``directory``: one of its entries changed; ``ino``: its attributes changed; both 0: anything."""
        self.seq += 1
        self._log.append((self.seq, directory, ino))

    def touched_since(self, seq: int, directory: int, inos: set[int]) -> bool:
        if seq == self.seq:
            return False
        if not self._log or self._log[0][0] > seq + 1:
            return True  # the log no longer reaches back that far: assume the worst
        for s, d, i in reversed(self._log):
            if s <= seq:
                break
            if (d == 0 and i == 0) or d == directory or i == directory or i in inos:
                return True
        return False


@dataclass
class _Listing:
    loaded: float
    entries: dict[str, P.Attr] = field(default_factory=dict)


class ListingCache:
    def __init__(self, ttl: float = 1.0, burst: int = 16, max_entries: int = 16384, max_dirs: int = 64,
                 clock=time.monotonic):
        self.ttl = ttl
        self.burst = burst
        self.max_entries = max_entries  # per listed directory
        self.max_dirs = max_dirs  # listings kept at once (a tree walk must not grow memory without bound)
        self.clock = clock
        self._listings: dict[int, _Listing] = {}
        self._parent_of: dict[int, int] = {}  # inode -> directory whose listing holds it
        self._streaks: dict[int, tuple[float, int]] = {}  # directory -> (window start, lookups)
        self._too_big: dict[int, float] = {}  # directory -> when it was found too big to list
        self._dir_attrs: dict[int, tuple[float, P.Attr]] = {}  # directory -> (fetched, attributes)
        self.loading: set[int] = set()  # directories whose listing is being fetched

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
        """Count a lookup that went to meta; True once ``parent`` has seen a burst worth listing: the
        caller then loads it and calls ``store`` (until then no other lookup asks again)."""
        if not self.enabled or parent in self._listings or parent in self.loading:
            return False
        now = self.clock()
        if now - self._too_big.get(parent, -1e18) < self.ttl * 10:
            return False
        if len(self._streaks) > 4096:
            self._streaks.clear()
        start, count = self._streaks.get(parent, (now, 0))
        if now - start >= self.ttl:
            start, count = now, 0
        count += 1
        self._streaks[parent] = (start, count)
        if count < self.burst:
            return False
        self.loading.add(parent)
        return True

    def store(self, parent: int, loaded: float, entries: list[P.DirEntry] | None) -> None:
        """Install a listing fetched from ``loaded`` on (None: the directory was too big to list)."""
        self.loading.discard(parent)
        self._streaks.pop(parent, None)
        if entries is None:
            if len(self._too_big) > 4096:
                self._too_big.clear()
            self._too_big[parent] = loaded
            return
        self.forget_dir(parent)
        while len(self._listings) >= self.max_dirs:
            self.forget_dir(next(iter(self._listings)))  # the oldest
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
        """An inode's attributes changed (size, times, mode, links): drop what holds them."""
        self._dir_attrs.pop(ino, None)
        parent = self._parent_of.get(ino)
        if parent is not None:
            self.forget_dir(parent)

    # ------------------------------------------------------------------ directory attributes

    def dir_attr(self, ino: int) -> P.Attr | None:
        hit = self._dir_attrs.get(ino)
        if hit is None:
            return None
        if self.clock() - hit[0] >= self.ttl:
            del self._dir_attrs[ino]
            return None
        return msgspec.structs.replace(hit[1])

    def saw_dir_attr(self, attr: P.Attr) -> None:
        if self.enabled and stat.S_ISDIR(attr.mode):
            if len(self._dir_attrs) > self.max_entries:
                self._dir_attrs.clear()
            self._dir_attrs[attr.ino] = (self.clock(), msgspec.structs.replace(attr))

    def dir_touched(self, ino: int, nlink_delta: int = 0) -> None:
        """This client changed an entry of directory ``ino``: meta set its mtime/ctime to now."""
        hit = self._dir_attrs.get(ino)
        if hit is not None:
            attr = hit[1]
            attr.mtime_ns = attr.ctime_ns = max(time.time_ns(), attr.mtime_ns + 1)
            attr.nlink += nlink_delta

    def forget_dir(self, parent: int) -> None:
        listing = self._listings.pop(parent, None)
        if listing is not None:
            for attr in listing.entries.values():
                if self._parent_of.get(attr.ino) == parent:
                    del self._parent_of[attr.ino]

    def clear(self) -> None:
        self._dir_attrs.clear()
        self._listings.clear()
        self._parent_of.clear()
        self._streaks.clear()
