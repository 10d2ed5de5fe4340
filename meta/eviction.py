"""The meta side of the KV cache (issue 5): eviction under per-directory policies, status, prefix lookup.

``KVCache`` is a plain class over the Namespace; the service calls ``tick`` from its housekeeping
loop and forwards META_KV_EXISTS / META_KV_STATUS / META_KV_EVICT to it.

Policies are xattrs (``kvfs.policy``, see kvfs/kv/policy.py) on directories; only files under a
policy directory are ever evicted, and the nearest policy directory above a file governs it. A pass:

1. TTL: a file not accessed for ``ttl`` seconds is deleted (counted as *expired*).
2. Quota: while a directory's files exceed ``quota`` bytes, the least valuable are deleted until they
   fit in ``quota_low`` (90%) of it.
3. Chunkserver pressure: when any live chunkserver is above ``high_watermark`` (90%) of its capacity,
   the least valuable files of *all* policy directories are deleted until the logical data would fill
   at most ``low_watermark`` (80%) of the cluster (``used_bytes * replication / capacity``; chunkservers
   report their freed space only once the deletions reach them, so the logical size is the target).

Value (windowed LRU): files are ordered by their last access (max of atime and mtime) cut into
``window``-second windows, least recent window first; within a window the most recently *written*
(mtime) go first. Blocks of one prompt are written parent first, so inside a window a chain loses its tail
before its head, and what stays is still a usable prefix.

Recency: meta records an access when a client sets the atime; ``KVStore.get`` does that on a hit at
most once per ``touch_interval`` (60 s) per block. Plain reads through the mount or the client do
not update atime, so a block only ever read that way ages from its creation time.

Deleting a block is unlink + purge in meta: it leaves the namespace at once (a lookup misses), and its
chunks are deleted on the chunkservers with the next heartbeat. A reader that already holds the chunk
map either gets the whole verified block or an error that the KV store turns into a miss, never
partial data. Temp files of writers (``.<name>.<random>.tmp``) count towards usage but are never
evicted while written; ones older than an hour with no write lease are removed (crashed writers).

Cost: a pass walks every policy directory's tree in the meta thread (a few microseconds per file);
the pass interval grows with the pass duration so eviction takes at most ~5% of meta's time.
"""

from __future__ import annotations

import errno
import json
import logging
import stat
import time
from dataclasses import dataclass, field

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.kv.policy import EVICTIONS_XATTR, POLICY_XATTRS, STATS_PREFIXES, Policy
from kvfs.meta import records as R
from kvfs.meta.kv_leases import KVLeases
from kvfs.meta.namespace import ROOT_INO, Namespace
from kvfs.meta.tenants import scope_root

log = logging.getLogger("kvfs.meta.eviction")

MISSING_DIR = b""  # the key prefix of a directory that does not exist: b"" + name is never a stored key

STAT_FIELDS = ("get_hits", "get_misses", "lookup_hit_blocks", "lookup_miss_blocks")


@dataclass
class _File:
    ino: int
    parent: int
    name: str
    size: int
    last_access_ns: int
    written_ns: int  # mtime: set when the file was committed; atime-only updates keep it
    tmp: bool


@dataclass
class _DirState:
    used_bytes: int = 0
    blocks: int = 0
    scanned_at: float = 0.0
    evicted_blocks: int = 0
    evicted_bytes: int = 0
    expired_blocks: int = 0
    loaded: bool = False
    dirty: bool = False
    files: list[_File] = field(default_factory=list)


class KVCache:
    def __init__(self, ns: Namespace, *, high_watermark: float = 0.90, low_watermark: float = 0.80,
                 quota_low: float = 0.90, interval: float = 5.0, tmp_max_age: float = 3600.0, clock=time.time):
        self.ns = ns
        # exists_under's cache: base path -> (inode, subdirectory -> dentry key prefix)
        self._lookup_dirs: dict[tuple[int, str], tuple[int, dict[str, bytes]]] = {}
        self._dir_inos: dict[tuple[int, str], int] = {}  # chunks_many's run directories, by path
        self._touches: dict[int, int] = {}  # inode -> access time a lookup answered, not yet written
        self._lookup_epoch = -1
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.quota_low = quota_low
        self.interval = interval
        self.tmp_max_age = tmp_max_age
        self.clock = clock
        self.passes = 0
        self._dirs: dict[int, _DirState] = {}
        self._last_pass = 0.0
        self._next_interval = interval

    # ------------------------------------------------------------------ policy and counters discovery

    def _xattr_dirs(self) -> tuple[dict[int, Policy], dict[int, dict[str, int]]]:
        """Policy directories and per-directory client counters, from one scan of all xattrs."""
        policies: dict[int, Policy] = {}
        stats: dict[int, dict[str, int]] = {}
        for key, value in self.ns.engine.scan(b"X"):
            ino = R.U64.unpack(key[1:9])[0]
            name = key[9:].decode("utf-8", "surrogateescape")
            if name in POLICY_XATTRS:
                try:
                    policies[ino] = Policy.decode(value)
                except ValueError as exc:
                    log.warning("inode %d: ignoring %s", ino, exc)
            elif name.startswith(STATS_PREFIXES):
                try:
                    counters = json.loads(value)
                except ValueError:
                    continue
                acc = stats.setdefault(ino, dict.fromkeys(STAT_FIELDS, 0))
                for f in STAT_FIELDS:
                    acc[f] += int(counters.get(f, 0))
        return policies, stats

    def _state(self, ino: int) -> _DirState:
        st = self._dirs.get(ino)
        if st is None:
            st = self._dirs[ino] = _DirState()
        if not st.loaded:
            st.loaded = True
            raw = self.ns.engine.get(R.xattr_key(ino, EVICTIONS_XATTR))
            if raw:
                try:
                    d = json.loads(raw)
                    st.evicted_blocks, st.evicted_bytes = int(d["evicted_blocks"]), int(d["evicted_bytes"])
                    st.expired_blocks = int(d["expired_blocks"])
                except (ValueError, KeyError):
                    pass
        return st

    def _save(self, ino: int, st: _DirState) -> None:
        if st.dirty and self.ns.engine.get(R.inode_key(ino)) is not None:
            value = json.dumps({"evicted_blocks": st.evicted_blocks, "evicted_bytes": st.evicted_bytes,
                                "expired_blocks": st.expired_blocks}).encode()
            self.ns.engine.write([(R.xattr_key(ino, EVICTIONS_XATTR), value)])
            st.dirty = False

    # ------------------------------------------------------------------ walking

    def _walk(self, top: int, skip: set[int]) -> list[_File]:
        """Regular files under directory ``top``, not descending into directories in ``skip``."""
        engine = self.ns.engine
        out: list[_File] = []
        stack = [top]
        while stack:
            d = stack.pop()
            prefix = R.dentry_prefix(d)
            for key, raw in engine.scan(prefix):
                child = R.U64.unpack(raw)[0]
                node_raw = engine.get(R.inode_key(child))
                if node_raw is None:
                    continue
                node = R.decode_inode(node_raw)
                if stat.S_ISDIR(node.mode):
                    if child not in skip:
                        stack.append(child)
                elif stat.S_ISREG(node.mode):
                    name = key[len(prefix):].decode("utf-8", "surrogateescape")
                    out.append(_File(child, d, name, node.size, max(node.atime_ns, node.mtime_ns), node.mtime_ns,
                                     name.startswith(".") and name.endswith(".tmp")))
        return out

    def path_of(self, ino: int) -> str:
        parts = []
        seen = 0
        while ino != ROOT_INO and seen < 4096:
            parent = self.ns.inode(ino).parent or ROOT_INO
            name = next((k[9:].decode("utf-8", "surrogateescape") for k, v in
                         self.ns.engine.scan(R.dentry_prefix(parent)) if R.U64.unpack(v)[0] == ino), f"#{ino}")
            parts.append(name)
            ino = parent
            seen += 1
        return "/" + "/".join(reversed(parts))

    # ------------------------------------------------------------------ eviction

    def _leased(self, ino: int) -> bool:
        holder = self.ns.leases.get(ino)
        return holder is not None and holder[1] > self.ns.clock()

    def _delete(self, f: _File) -> bool:
        """Unlink + purge one file, if it is still the same file under the same name."""
        if self.ns._child(f.parent, f.name) != f.ino or self._leased(f.ino):
            return False
        try:
            attr = self.ns.unlink(f.parent, f.name)
            if attr.nlink <= 0:
                self.ns.purge(f.ino)
        except OSError as exc:
            log.warning("evicting %s: %s", f.name, exc)
            return False
        return True

    @staticmethod
    def _value_key(f: _File, window_ns: int) -> tuple[int, int]:
        return (f.last_access_ns // window_ns, -f.written_ns)

    def run_once(self) -> P.KVStatusReply:
        """One eviction pass over every policy directory; returns the status after it."""
        self.flush_touches()  # a run just looked up for a load is recent, not an eviction candidate
        started = time.monotonic()
        now_ns = int(self.clock() * 1e9)
        policies, stats = self._xattr_dirs()
        pool: list[tuple[tuple[int, int], int, _File]] = []
        for ino, policy in policies.items():
            if self.ns.engine.get(R.inode_key(ino)) is None:
                continue
            st = self._state(ino)
            files = self._walk(ino, set(policies) - {ino})
            window_ns = max(int(policy.window * 1e9), 1)
            kept: list[_File] = []
            for f in files:
                age_ns = now_ns - f.last_access_ns
                if f.tmp:
                    if age_ns > self.tmp_max_age * 1e9 and self._delete(f):
                        continue
                elif policy.ttl and age_ns > policy.ttl * 1e9 and self._delete(f):
                    st.expired_blocks += 1
                    st.dirty = True
                    continue
                kept.append(f)
            used = sum(f.size for f in kept)
            if policy.quota and used > policy.quota:
                target = policy.quota * self.quota_low
                for f in sorted((f for f in kept if not f.tmp), key=lambda f: self._value_key(f, window_ns)):
                    if used <= target:
                        break
                    if self._delete(f):
                        used -= f.size
                        st.evicted_blocks += 1
                        st.evicted_bytes += f.size
                        st.dirty = True
                        f.size = -1  # gone
                kept = [f for f in kept if f.size >= 0]
            st.files = kept
            st.used_bytes = sum(f.size for f in kept)
            st.blocks = sum(1 for f in kept if not f.tmp)
            st.scanned_at = self.clock()
            pool.extend((self._value_key(f, window_ns), ino, f) for f in kept if not f.tmp)
        self._relieve_pressure(pool)
        for ino in policies:
            if ino in self._dirs:
                self._dirs[ino].files = []
                self._save(ino, self._dirs[ino])
        self.passes += 1
        took = time.monotonic() - started
        self._next_interval = max(self.interval, 20 * took)
        return self._status(policies, stats)

    def _relieve_pressure(self, pool: list[tuple[tuple[int, int], int, _File]]) -> None:
        live = self.ns.registry.live_servers()
        if not pool or not any(s.capacity and s.used >= self.high_watermark * s.capacity for s in live):
            return
        capacity = sum(s.capacity for s in live) / max(self.ns.replication, 1)
        to_free = self.ns.used_bytes - self.low_watermark * capacity
        if to_free <= 0:
            return
        log.info("chunkserver above %.0f%% full: evicting %d bytes of KV blocks", 100 * self.high_watermark, to_free)
        pool.sort(key=lambda item: item[0])
        for _key, ino, f in pool:
            if to_free <= 0:
                break
            if self._delete(f):
                to_free -= f.size
                st = self._dirs[ino]
                st.evicted_blocks += 1
                st.evicted_bytes += f.size
                st.used_bytes -= f.size
                st.blocks -= 1
                st.dirty = True

    def tick(self) -> None:
        """Called from the service's housekeeping loop: run a pass when one is due. Never raises."""
        if self.clock() - self._last_pass < self._next_interval:
            return
        self._last_pass = self.clock()
        try:
            self.run_once()
        except Exception:  # a bug here must not stop meta's housekeeping
            log.exception("KV eviction pass failed")

    # ------------------------------------------------------------------ status

    def status(self) -> P.KVStatusReply:
        policies, stats = self._xattr_dirs()
        return self._status(policies, stats)

    def _status(self, policies: dict[int, Policy], stats: dict[int, dict[str, int]]) -> P.KVStatusReply:
        rows = []
        for ino in sorted(set(policies) | set(stats)):
            if self.ns.engine.get(R.inode_key(ino)) is None:
                continue
            st = self._state(ino)
            if ino not in policies or self.clock() - st.scanned_at > 2 * self._next_interval:
                files = self._walk(ino, set(policies) - {ino})
                st.used_bytes = sum(f.size for f in files)
                st.blocks = sum(1 for f in files if not f.tmp)
                st.scanned_at = self.clock() if ino in policies else 0.0
            policy = policies.get(ino)
            s = stats.get(ino) or dict.fromkeys(STAT_FIELDS, 0)
            rows.append(P.KVDirStatus(self.path_of(ino), policy.quota if policy else 0, policy.ttl if policy else 0.0,
                                      policy.window if policy else 0.0, st.used_bytes, st.blocks,
                                      s["get_hits"], s["get_misses"], s["lookup_hit_blocks"], s["lookup_miss_blocks"],
                                      st.evicted_blocks, st.evicted_bytes, st.expired_blocks))
        return P.KVStatusReply(rows, self.passes)

    # ------------------------------------------------------------------ lookups

    def chunks_many(self, paths: list[str], leases: KVLeases | None = None,
                    touch_before_ns: int = 0) -> P.KVChunksReply:
        """Attributes and chunk maps (with replica addresses) of several files in one call: a batch
        of block reads needs no other meta round trip. None for a path that is not a regular file.
        With ``leases`` (a leased read: meta/kv_leases.py) every file found is leased, and the reply
        says for how long (0 when a path names no file by a plain name, e.g. ends in "..").
        ``touch_before_ns``: files found with an older access time get an access recorded now: the
        reply carries the new time, the write waits for ``flush_touches`` (so this read-only request
        waits for no disk sync, and many lookups' touches go out in one write)."""
        out: list[P.GetChunksReply | None] = []
        leased = leases is not None and leases.seconds > 0
        self._check_epoch()
        for path in paths:
            head, _, name = path.rstrip("/").rpartition("/")
            parent = self._dir_ino(head or "/")
            try:
                if parent is None:
                    raise FileNotFoundError
                attr = self.ns.lookup(parent, name) if name not in ("", ".", "..") else self.ns.resolve(path)
            except OSError:
                out.append(None)
                continue
            if not stat.S_ISREG(attr.mode):
                out.append(None)
                continue
            if leased:
                assert leases is not None
                if name in ("", ".", "..") or parent is None:
                    leased = False
                else:
                    leases.grant(parent, name, attr.ino)
            info = self.ns.chunks(attr.ino, 0, 1 << 30)
            self._touch(info.attr, touch_before_ns)
            out.append(info)
        return P.KVChunksReply(out, leases.seconds if leased and leases is not None else 0.0)

    def flush_touches(self) -> int:
        """Write the access times the lookups answered with (``_touch``; files deleted meanwhile are
        skipped); how many were written. The service calls it shortly after (and every eviction pass
        first)."""
        if not self._touches:
            return 0
        touches, self._touches = self._touches, {}
        written = 0
        for ino, atime_ns in touches.items():
            try:
                node = self.ns.inode(ino)
                if node.atime_ns < atime_ns:
                    self.ns.setattr(P.SetAttr(ino, atime_ns=atime_ns))
                    written += 1
            except OSError:
                continue  # deleted meanwhile: nothing to record
        return written

    def _check_epoch(self) -> None:
        """Drop the cached directories after a rmdir or rename (``ns.dir_epoch``): until then a directory
        path names the same inode (directories are never hard-linked, and inode numbers are not reused)."""
        if self._lookup_epoch != self.ns.dir_epoch:
            self._lookup_dirs.clear()
            self._dir_inos.clear()
            self._lookup_epoch = self.ns.dir_epoch

    def _dir_ino(self, path: str) -> int | None:
        """The inode of directory ``path`` in the request's tenant scope, or None if it is not one; cached
        (``_check_epoch``): a batch's runs sit in up to 256 hash-prefix directories, each a 4-step walk."""
        key = (scope_root(ROOT_INO), path)
        ino = self._dir_inos.get(key)
        if ino is None:
            try:
                attr = self.ns.resolve(path)
            except OSError:
                return None  # not cached: the directory may be created any time
            if not stat.S_ISDIR(attr.mode):
                return None
            if len(self._dir_inos) > 4096:
                self._dir_inos.clear()
            ino = self._dir_inos[key] = attr.ino
        return ino

    def lookup_chunks(self, parent: int, name: str, leases: KVLeases | None = None,
                      touch_before_ns: int = 0) -> P.KVLookupReply:
        """LOOKUP that also returns a regular file's chunk map, leased with ``leases`` (``chunks_many`` for
        one entry named by its directory inode: the mount knows inodes, not paths), and records an
        access as ``chunks_many`` does. Error handling: the errnos of LOOKUP."""
        attr = self.ns.lookup(parent, name)
        if not stat.S_ISREG(attr.mode) or name in (".", ".."):
            return P.KVLookupReply(attr)
        seconds = leases.seconds if leases is not None and leases.seconds > 0 else 0.0
        if seconds:
            assert leases is not None
            leases.grant(parent, name, attr.ino)
        info = self.ns.chunks(attr.ino, 0, 1 << 30)
        self._touch(info.attr, touch_before_ns)
        attr.atime_ns = info.attr.atime_ns
        return P.KVLookupReply(attr, info, seconds)

    def lookup_chunks_many(self, parents: list[int], names: list[str], leases: KVLeases | None = None,
                           touch_before_ns: int = 0) -> P.KVLookupManyReply:
        """``lookup_chunks`` of each (``parents[i]``, ``names[i]``), each answered on its own: a failed one
        is None with its errno. Error handling: EINVAL for lists of different lengths or over
        ``P.KV_LOOKUP_MANY_MAX``."""
        if len(parents) != len(names) or len(names) > P.KV_LOOKUP_MANY_MAX:
            raise error(errno.EINVAL, f"KV_LOOKUP_MANY: {len(parents)} parents for {len(names)} names "
                        f"(at most {P.KV_LOOKUP_MANY_MAX})")
        replies: list[P.KVLookupReply | None] = []
        errors: list[int] = []
        for parent, name in zip(parents, names):
            try:
                replies.append(self.lookup_chunks(parent, name, leases, touch_before_ns))
                errors.append(0)
            except OSError as exc:
                replies.append(None)
                errors.append(exc.errno or errno.EIO)
        return P.KVLookupManyReply(replies, errors)

    def _touch(self, attr: P.Attr, touch_before_ns: int) -> None:
        """Record an access on ``attr``'s file if its access time is older than ``touch_before_ns``: in
        ``attr`` (the reply) now, in the namespace at the next ``flush_touches``."""
        if attr.atime_ns < touch_before_ns:
            now = time.time_ns()
            self._touches[attr.ino] = now
            attr.atime_ns = now

    def exists_under(self, base: str, names: list[str], leading_only: bool = False) -> P.ExistsManyReply:
        """Which of ``names`` (relative paths under directory ``base``) exist, in one call: a prompt's
        block lookup.

        Directories are resolved once and cached until a rmdir or rename (``ns.dir_epoch``); then the
        blocks are engine point gets of their directory-entry keys, nothing decoded, in slices so a
        ``leading_only`` lookup stops soon after the first miss."""
        n = len(names)
        exists = [False] * n
        self._check_epoch()
        key = (scope_root(ROOT_INO), base)  # a tenant's "/" is its root
        cached = self._lookup_dirs.get(key)
        if cached is None:
            try:
                base_ino = self.ns.resolve(base).ino
            except OSError:
                return P.ExistsManyReply(exists, 0)
            if len(self._lookup_dirs) > 1024:
                self._lookup_dirs.clear()
            cached = self._lookup_dirs[key] = (base_ino, {"": R.dentry_prefix(base_ino)})
        base_ino, dirs = cached
        child = self.ns._child

        def prefix_of(head: str) -> bytes:
            prefix = dirs.get(head)
            if prefix is None:
                d: int | None = base_ino
                for part in head.split("/"):
                    d = child(d, part) if d is not None else None
                if d is None:
                    return MISSING_DIR  # not cached: the directory may be created any time
                prefix = dirs[head] = R.dentry_prefix(d)
            return prefix

        keys = []
        for name in names:
            head, _, leaf = name.rpartition("/")
            keys.append(prefix_of(head) + leaf.encode("utf-8", "surrogateescape"))
        get_many = self.ns.engine.get_many
        step = 256 if leading_only else max(n, 1)
        leading = n
        for start in range(0, n, step):
            got = get_many(keys[start:start + step])
            for i, raw in enumerate(got, start):
                if raw is not None:
                    exists[i] = True
                elif leading == n:
                    leading = i
            if leading_only and leading < n:
                for i in range(leading + 1, min(n, start + step)):
                    exists[i] = False  # only the count is asked for: nothing after the first miss
                break
        return P.ExistsManyReply(exists, leading)
