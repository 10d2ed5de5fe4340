"""Directory listings that answer lookup bursts (kvfs.dircache): the plain class, then two real clients
of one cluster to pin down what another client may and may not see."""

from __future__ import annotations

import errno
import stat
import time

import pytest

from kvfs import protocol as P
from kvfs.dircache import ListingCache


def attr(ino: int, size: int = 0) -> P.Attr:
    return P.Attr(ino, stat.S_IFREG | 0o644, 1, 0, 0, size, 0, 0, 0, 0)


def test_listing_cache_rules():
    now = [100.0]
    c = ListingCache(ttl=1.0, burst=3, max_entries=2, clock=lambda: now[0])
    assert [c.wants_listing(7) for _ in range(3)] == [False, False, True]  # a burst of lookups
    c.store(7, now[0], [P.DirEntry("a", attr(10)), P.DirEntry("b", attr(11))])
    assert c.get(7, "a").ino == 10 and c.get(7, "zz") is None  # misses are not answered
    got = c.get(7, "a")
    got.size = 99
    assert c.get(7, "a").size == 0  # callers get copies (they overlay pending sizes)
    c.removed(7, "a")
    assert c.get(7, "a") is None
    c.added(7, "c", attr(12))
    assert c.get(7, "c").ino == 12
    c.changed(11)  # b's attributes changed: the listing holding it goes
    assert c.get(7, "b") is None and c.get(7, "c") is None
    c.store(7, now[0], [P.DirEntry("a", attr(10))])
    now[0] += 1.0
    assert c.get(7, "a") is None  # expired
    assert [c.wants_listing(8) for _ in range(3)][-1]
    c.store(8, now[0], None)  # too big: not tried again for a while
    assert not any(c.wants_listing(8) for _ in range(5))
    assert not ListingCache(ttl=0).wants_listing(1)
    few = ListingCache(max_dirs=2)
    for d in (1, 2, 3):
        few.store(d, 0.0 + few.clock(), [P.DirEntry(f"n{d}", attr(100 + d))])
    assert few.get(1, "n1") is None and few.get(3, "n3").ino == 103  # the oldest listing made room


@pytest.fixture
def two_clients(cluster):
    with cluster.client() as a, cluster.client(dir_cache_ttl=0) as b:
        yield a, b


def test_other_clients_changes_show_within_the_ttl(two_clients):
    a, b = two_clients
    d = f"/dc{time.monotonic_ns()}"
    b.mkdir(d)
    for i in range(40):
        b.write_file(f"{d}/f{i}", b"x" * i)
    parent = a.resolve(d).ino
    for i in range(40):  # the burst: a lists the directory and answers the rest from the listing
        assert a.lookup(parent, f"f{i}").size == i
    assert parent in a.client.listings._listings
    # A file b creates now is found by a at once (names a's listing lacks go to meta).
    b.write_file(f"{d}/new", b"hello")
    assert a.lookup(parent, "new").size == 5
    # a's own changes are seen by a at once.
    a.unlink(f"{d}/f1")
    with pytest.raises(FileNotFoundError):
        a.lookup(parent, "f1")
    a.write_file(f"{d}/f2", b"grown")
    assert a.lookup(parent, "f2").size == 5
    # b's unlink and rewrite: a may answer from its listing until the ttl passes, never after.
    b.unlink(f"{d}/f3")
    b.write_file(f"{d}/f4", b"yz" * 100)
    time.sleep(a.client.listings.ttl + 0.05)
    with pytest.raises(OSError) as exc:
        a.lookup(parent, "f3")
    assert exc.value.errno == errno.ENOENT
    assert a.lookup(parent, "f4").size == 200


def test_directory_attributes_follow_own_changes(two_clients):
    a, b = two_clients
    d = f"/da{time.monotonic_ns()}"
    a.mkdir(d)
    ino = a.resolve(d).ino
    first = a.getattr(ino)  # fetched from meta, then kept for the ttl
    assert a.getattr(ino).mtime_ns == first.mtime_ns
    a.write_file(f"{d}/f", b"x")
    after_create = a.getattr(ino)
    assert after_create.mtime_ns > first.mtime_ns  # a's own change is reflected without asking meta
    a.mkdir(f"{d}/sub")
    assert a.getattr(ino).nlink == first.nlink + 1
    a.rmdir(f"{d}/sub")
    assert a.getattr(ino).nlink == first.nlink
    # b's change: visible to a once the ttl has passed, and then exactly as meta has it.
    b.unlink(f"{d}/f")
    time.sleep(a.client.listings.ttl + 0.05)
    assert a.getattr(ino) == b.getattr(ino)


def test_change_log_keeps_listings_of_untouched_directories():
    from kvfs.dircache import ChangeLog

    log = ChangeLog(keep=8)
    start = log.seq
    assert not log.touched_since(start, 10, {11, 12})
    log.note(directory=20)  # another directory's entries changed
    log.note(ino=21)  # an inode outside the listing
    assert not log.touched_since(start, 10, {11, 12})
    log.note(ino=12)  # an inode the listing holds
    assert log.touched_since(start, 10, {11, 12})
    mid = log.seq
    log.note(directory=10)  # this directory's own entries
    assert log.touched_since(mid, 10, set()) and not log.touched_since(mid, 30, set())
    late = log.seq
    log.note()  # anything (a rename)
    assert log.touched_since(late, 30, set())
    # Older than the log reaches: assume the listing is stale.
    old = log.seq
    for i in range(20):
        log.note(directory=100 + i)
    assert log.touched_since(old, 30, set())
