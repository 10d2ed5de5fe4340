"""KV block files in any directory through plain os calls: the kvfs FUSE mount, or a local disk.

Publication: the block is written to ``.<hash>.<random>.tmp`` in the same directory and closed (on
the kvfs mount, close commits it), then renamed into place with ``renameat2(RENAME_NOREPLACE)``; if
the file system does not support that flag, ``link`` + ``unlink`` gives the same no-replace
semantics. The loser of a race removes its temp file and reports the block as already present.

Reads: one ``preadv`` scatters the header into a small buffer and the payload straight into the
caller's tensors; for CUDA tensors read with kvikio, the header is read here and the payload by a
``land`` callback (kvfs.kv.device, which checks that kvikio opened the same inode). A read whose file
was last accessed before the touch interval records an access on one background thread once the read
(or its whole batch) is done, not on the read's path.

Error handling: OSErrors from the file system pass through; a missing block reads as None.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvfs.kv.backend import SCRATCH, OnReady, PayloadSums, ReadResult, read_run_checked

AT_FDCWD = -100
RENAME_NOREPLACE = 1
STAT_WINDOW = 32  # existence checks in flight at once (exists_many)
USER_PREFIX = "user."  # Linux only passes namespaced xattr names through a mount

# (fd of the open block file, payload offset) -> payload bytes put in place (kvfs.kv.device's kvikio route)
Land = Callable[[int, int], int]

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src: str, dst: str) -> None:
    """Atomically rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError then).

    Uses renameat2(RENAME_NOREPLACE); where the file system refuses the flag, link + unlink.
    """
    if _renameat2 is not None:
        rc = _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst)  # FileExistsError if dst exists: same outcome as RENAME_NOREPLACE
    os.unlink(src)


class PosixBackend:
    def __init__(self, concurrency: int = 8):
        self._dirs: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kvfs-kv")
        # Existence checks get threads of their own, more of them: a stat only waits (on the mount, for
        # its daemon), and the mount sends the lookups that wait at once to meta together, so a
        # 4,096-token prompt's 16 runs checked at once cost two or three meta round trips (in windows of
        # 8, four or five).
        self._stat_pool = ThreadPoolExecutor(max_workers=STAT_WINDOW, thread_name_prefix="kvfs-kv-stat")
        # Access times are recorded off the read path: on the kvfs mount a touch is two more round trips
        # (GETATTR, SETATTR) through the mount daemon to meta per file, which a load would wait for.
        self._toucher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfs-kv-touch")

    def put(self, directory: str, name: str, header: bytes, payload: Sequence[memoryview],
            check_existing: bool) -> bool:
        final = os.path.join(directory, name)
        if directory not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            with self._lock:
                self._dirs.add(directory)
        if check_existing and os.path.exists(final):
            return False
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # the directory was removed since we created it
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        published = False
        try:
            try:
                _write_all(fd, [memoryview(header), *payload])
            finally:
                os.close(fd)  # on the kvfs mount, close commits the file (and reports a failed upload)
            try:
                rename_noreplace(tmp, final)
                published = True
                return True
            except FileExistsError:
                return False
        finally:
            if not published:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def read(self, path: str, expect_size: int, header_len: int, out: Sequence[memoryview],
             touch_before_ns: int, land: Land | None = None) -> ReadResult | None:
        """``Backend.read``. ``land`` (kvfs.kv.device's kvikio route): read only the head into host memory
        here and leave the payload to ``land(fd, header_len)``, which returns the bytes it put in place
        (``out`` is then unused). An OSError from ``land`` is handled like one from a read."""
        res = self._read(path, expect_size, header_len, out, touch_before_ns, land)
        self._touch_later([(path, res, touch_before_ns)])
        return res

    def _read(self, path: str, expect_size: int, header_len: int, out: Sequence[memoryview],
              touch_before_ns: int, land: Land | None = None) -> ReadResult | None:
        """``read`` without recording the access."""
        return self._open_read(path, lambda fd: self._read_fd(fd, expect_size, header_len, out, land))

    def _read_checked(self, index: int, path: str, expect_size: int, header_len: int, out: Sequence[memoryview],
                      payload_sums: PayloadSums) -> ReadResult | None:
        """``read_many(payload_sums=...)``'s read of job ``index``: head, then the payload checked as it lands."""
        def read(fd: int) -> ReadResult:
            st = os.fstat(fd)
            return read_run_checked(fd, index, st.st_size, st.st_atime_ns, expect_size, header_len, out,
                                    payload_sums)

        return self._open_read(path, read)

    @staticmethod
    def _open_read(path: str, read: Callable[[int], ReadResult]) -> ReadResult | None:
        """``read(fd)`` of the file at ``path``; None if there is no such file."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return read(fd)
        except OSError as exc:
            # EIO on a block evicted while we read it (its chunks are gone): a miss, not an error.
            if exc.errno in (errno.EIO, errno.ENOENT) and not os.path.exists(path):
                return None
            raise
        finally:
            os.close(fd)

    @staticmethod
    def _read_fd(fd: int, expect_size: int, header_len: int, out: Sequence[memoryview],
                 land: Land | None) -> ReadResult:
        st = os.fstat(fd)
        if st.st_size == expect_size:
            head = memoryview(bytearray(header_len))
            if land is None:
                got = _read_all(fd, [head, *out], 0)
            else:
                got = _read_all(fd, [head], 0)
                if got == header_len:
                    got += land(fd, header_len)
            if got == expect_size:
                return ReadResult(head, st.st_size, st.st_atime_ns, True)
            st = os.fstat(fd)  # the file changed under us: report what its header says
        return ReadResult(memoryview(os.pread(fd, SCRATCH, 0)), st.st_size, st.st_atime_ns, False)

    def exists_many(self, base: str, names: list[str], leading_only: bool) -> tuple[list[bool], int]:
        # A stat through a FUSE mount is a round trip to its daemon (and meta): several at once, in
        # windows, so a leading-only lookup stops within a window of its first miss. One thread walks
        # to ``base`` first: once the kernel's entries have expired, every thread walking the path
        # would otherwise send its own GETATTR and LOOKUP of each directory above it (the root, the
        # store's root), 16 of each queued in the mount daemon ahead of the files' lookups.
        exists: list[bool] = []
        step = STAT_WINDOW
        if len(names) > 1 and not os.path.isdir(base):
            return [False] * len(names), 0
        for start in range(0, len(names), step):
            window = [os.path.join(base, n) for n in names[start:start + step]]
            exists += self._stat_pool.map(os.path.exists, window) if len(window) > 1 else map(os.path.exists, window)
            if leading_only and not all(exists[start:]):
                break
        exists += [False] * (len(names) - len(exists))
        leading = next((i for i, e in enumerate(exists) if not e), len(names))
        return exists, leading

    def locate_many(self, base: str, names: list[str], leading_only: bool,
                    touch_before_ns: int = 0) -> tuple[list[bool | None], int]:
        exists, leading = self.exists_many(base, names, leading_only)
        return [True if e else None for e in exists], leading

    def remove(self, path: str) -> None:
        os.unlink(path)

    def set_xattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(path, USER_PREFIX + name, value)

    def get_xattr(self, path: str, name: str) -> bytes | None:
        try:
            return os.getxattr(path, USER_PREFIX + name)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP):
                return None
            raise

    def put_many(self, jobs: Sequence[tuple]) -> list[bool | OSError]:
        return self._gather(self.put, jobs)

    def read_many(self, jobs: Sequence[tuple], on_ready: OnReady | None = None,
                  map_local: bool = False, caller_verifies: bool = False,
                  locations: Sequence[object] | None = None,
                  payload_digest: bool = False,
                  payload_sums: PayloadSums | None = None) -> list[ReadResult | None | OSError]:
        # payload_digest is not taken up: the caller hashes the payload itself (ReadResult.payload_xxh3 None).
        # Never mapped: touching a mapped page of a file on a FUSE mount that died kills the process (SIGBUS).
        if payload_sums is not None and caller_verifies and all(len(j) == 5 for j in jobs):
            results = self._gather(self._read_checked, [(i, *j[:4], payload_sums) for i, j in enumerate(jobs)],
                                   on_ready)
        else:
            results = self._gather(self._read, jobs, on_ready)
        self._touch_later([(job[0], res, job[4]) for job, res in zip(jobs, results)])
        return results

    def _touch_later(self, reads: list[tuple[str, object, int]]) -> None:
        """Record an access on each (path, read result, touch_before_ns) read whole whose access time is
        older than asked, on the background thread, once the whole batch is read: on the mount the
        touches then do not queue in the mount daemon between the batch's own opens and reads."""
        due = [path for path, res, before in reads
               if isinstance(res, ReadResult) and res.payload_done and res.atime_ns < before]
        if due:
            self._toucher.submit(_touch_each, due)

    def _gather(self, fn, jobs: Sequence[tuple], on_ready: OnReady | None = None) -> list:
        def one(i: int, args: tuple):
            try:
                res = fn(*args)
            except OSError as exc:
                res = exc
            if on_ready is not None:
                on_ready(i, res)
            return res

        if len(jobs) <= 1:
            return [one(i, j) for i, j in enumerate(jobs)]
        return list(self._pool.map(one, range(len(jobs)), jobs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._stat_pool.shutdown(wait=True)
        self._toucher.shutdown(wait=True)


def _touch_each(paths: list[str]) -> None:
    """Record an access on each file (the eviction engine's recency); best effort."""
    for path in paths:
        try:
            os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
        except OSError:
            pass  # a read-only mount, or evicted meanwhile


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from a list of buffers (after a short writev/preadv)."""
    while n:
        if n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


def _write_all(fd: int, views: list[memoryview]) -> None:
    while views:
        _consume(views, os.writev(fd, views[:1024]))


def _read_all(fd: int, views: list[memoryview], offset: int) -> int:
    """preadv until every view is full or end of file; returns bytes read."""
    total = 0
    views = [v for v in views if len(v)]
    while views:
        n = os.preadv(fd, views[:1024], offset + total)
        if n == 0:
            break
        total += n
        _consume(views, n)
    return total
