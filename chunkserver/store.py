"""Chunk files on local disk: immutable chunks, each with a sidecar of per-block checksums.

Layout under ``<data_dir>/chunks/<xx>/``: ``<id:016x>`` holds the data, ``<id:016x>.sum`` the xxh3_64 of
every CHECKSUM_BLOCK. A chunk is written to temporary names, fsynced (per policy), and renamed into
place sum first, data last: the data rename is the commit point, so a crash or a full disk never
leaves a half-written chunk that reads back as data. Startup rescans and removes leftovers.

A committed chunk is never overwritten in place: writing an id the store holds is refused (EEXIST)
unless it is the same content (a retried write or replication), which succeeds without rewriting.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from kvfs import protocol as P
from kvfs.errors import error

log = logging.getLogger("kvfs.chunkserver")

SUM_SUFFIX = ".sum"
TMP_SUFFIX = ".tmp"


def block_checksums(data: bytes | bytearray | memoryview) -> list[int]:
    from kvfs.chunkio import block_checksums as checksums  # C helper where built

    return checksums(data)


def chunk_path(data_dir: str, chunk_id: int) -> str:
    name = f"{chunk_id:016x}"
    return os.path.join(data_dir, "chunks", name[-2:], name)


def read_sums(path: str) -> list[int]:
    from kvfs.chunkio import parse_sums

    with open(path + SUM_SUFFIX, "rb") as f:
        return parse_sums(f.read())


def host_id() -> str:
    """Identifies this machine (and boot), so clients know when chunk files are readable directly."""
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return os.uname().nodename


@dataclass
class ChunkLocation:
    fd: int
    data_offset: int
    data_length: int
    checksums: list[int]
    chunk_length: int


class ChunkStore:
    def __init__(self, data_dir: str, *, capacity: int = 0, fsync: bool = True, reserve_bytes: int = 64 << 20,
                 max_open_files: int = 512):
        self.data_dir = os.path.abspath(data_dir)
        self.fsync = fsync
        self.reserve_bytes = reserve_bytes
        self._configured_capacity = capacity
        self._lengths: dict[int, int] = {}
        self._fds: OrderedDict[int, tuple[int, list[int]]] = OrderedDict()
        self._max_open = max_open_files
        self._lock = threading.Lock()
        self._writing: set[int] = set()  # chunk ids being written now (a second writer is refused)
        os.makedirs(os.path.join(self.data_dir, "chunks"), exist_ok=True)
        probe = os.path.join(self.data_dir, ".write-probe")
        with open(probe, "wb") as f:  # fails early (EROFS/EACCES) on an unusable data dir
            f.write(b"ok")
        os.unlink(probe)
        self.node_id = self._node_id()
        self._scan()

    def _node_id(self) -> str:
        path = os.path.join(self.data_dir, "node_id")
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            node = uuid.uuid4().hex
            with open(path + TMP_SUFFIX, "w") as f:
                f.write(node)
                f.flush()
                os.fsync(f.fileno())
            os.rename(path + TMP_SUFFIX, path)
            return node

    def _scan(self) -> None:
        root = os.path.join(self.data_dir, "chunks")
        for sub in os.listdir(root):
            folder = os.path.join(root, sub)
            if not os.path.isdir(folder):
                continue
            names = set(os.listdir(folder))
            for name in names:
                full = os.path.join(folder, name)
                if name.endswith(TMP_SUFFIX):
                    os.unlink(full)
                    continue
                if name.endswith(SUM_SUFFIX):
                    if name[: -len(SUM_SUFFIX)] not in names:
                        os.unlink(full)  # crash between the two renames: the chunk never committed
                    continue
                if name + SUM_SUFFIX not in names:
                    log.warning("chunk file %s has no checksums: removing", full)
                    os.unlink(full)
                    continue
                try:
                    self._lengths[int(name, 16)] = os.path.getsize(full)
                except ValueError:
                    continue

    # ------------------------------------------------------------------ accounting

    @property
    def used(self) -> int:
        return sum(self._lengths.values())

    @property
    def capacity(self) -> int:
        if self._configured_capacity:
            return self._configured_capacity
        st = os.statvfs(self.data_dir)
        return st.f_blocks * st.f_frsize

    def free_on_disk(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize

    def chunk_ids(self) -> list[int]:
        return list(self._lengths)

    def __len__(self) -> int:
        return len(self._lengths)

    # ------------------------------------------------------------------ write / read / delete

    def write(self, chunk_id: int, data: memoryview, checksums: list[int], durable: bool = True) -> None:
        """Store a chunk, durably unless ``durable`` is False (a re-fetchable cache copy: no fsyncs; the
        page cache writes it back, and a copy torn by a machine crash fails its checksums). Error handling: EINVAL on checksum mismatch (corrupted in flight),
        ENOSPC when the disk or the configured capacity is full; nothing partial is left behind;
        EEXIST for an id this store holds with other content, or that another write is storing now."""
        if block_checksums(data) != list(checksums):
            raise error(errno.EINVAL, f"chunk {chunk_id:x}: checksum mismatch on receive")
        with self._lock:
            if chunk_id in self._writing:
                raise error(errno.EEXIST, f"chunk {chunk_id:x} is being written by another request")
            self._writing.add(chunk_id)
        try:
            if chunk_id in self._lengths and self._holds(chunk_id, len(data), checksums):
                return  # the same bytes are committed already: an idempotent retry
            self._store(chunk_id, data, checksums, durable)
        finally:
            with self._lock:
                self._writing.discard(chunk_id)

    def _holds(self, chunk_id: int, length: int, checksums: list[int]) -> bool:
        """True when the committed chunk has exactly this content; EEXIST when it has other content.
        False (rewrite it) only when the stored copy no longer matches its own checksums (torn or
        corrupt): the new bytes are the chunk's true content, so that is a repair, not an overwrite."""
        path = chunk_path(self.data_dir, chunk_id)
        try:
            stored_sums = read_sums(path)
        except FileNotFoundError:
            return False
        if stored_sums != list(checksums):
            raise error(errno.EEXIST, f"chunk {chunk_id:x} is committed with other content; chunks are immutable")
        with open(path, "rb") as f:
            stored = f.read()
        return len(stored) == length and block_checksums(stored) == stored_sums

    def _store(self, chunk_id: int, data: memoryview, checksums: list[int], durable: bool) -> None:
        length = len(data)
        if self._configured_capacity and self.used + length > self._configured_capacity:
            raise error(errno.ENOSPC, "chunkserver capacity full")
        if self.free_on_disk() - length < self.reserve_bytes:
            raise error(errno.ENOSPC, "chunkserver disk full")
        path = chunk_path(self.data_dir, chunk_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp_data, tmp_sum = path + TMP_SUFFIX, path + SUM_SUFFIX + TMP_SUFFIX
        try:
            sync = self.fsync and durable
            self._write_file(tmp_sum, b"".join(c.to_bytes(8, "little") for c in checksums), sync)
            self._write_file(tmp_data, data, sync)
            os.rename(tmp_sum, path + SUM_SUFFIX)
            os.rename(tmp_data, path)
            if sync:
                dfd = os.open(os.path.dirname(path), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            for leftover in (tmp_data, tmp_sum):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise error(errno.ENOSPC, "chunkserver disk full") from None
            raise
        with self._lock:
            self._lengths[chunk_id] = length
            stale = self._fds.pop(chunk_id, None)  # a repaired copy: readers dup'ed the old fd already
        if stale is not None:
            os.close(stale[0])

    def _write_file(self, path: str, data: bytes | memoryview, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data).cast("B")
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def locate(self, chunk_id: int, offset: int, length: int) -> ChunkLocation:
        """Where to send a ranged read from: whole checksum blocks covering [offset, offset+length)."""
        chunk_length = self._lengths.get(chunk_id)
        if chunk_length is None:
            raise error(errno.ENOENT, f"chunk {chunk_id:x} not on this server")
        fd, sums = self._open(chunk_id)
        start = min(offset, chunk_length) // P.CHECKSUM_BLOCK * P.CHECKSUM_BLOCK
        end = min(offset + length, chunk_length)
        if end <= start:
            return ChunkLocation(fd, start, 0, [], chunk_length)
        end_block = (end + P.CHECKSUM_BLOCK - 1) // P.CHECKSUM_BLOCK
        data_end = min(end_block * P.CHECKSUM_BLOCK, chunk_length)
        return ChunkLocation(fd, start, data_end - start, sums[start // P.CHECKSUM_BLOCK:end_block], chunk_length)

    def _open(self, chunk_id: int) -> tuple[int, list[int]]:
        with self._lock:
            hit = self._fds.get(chunk_id)
            if hit is not None:
                self._fds.move_to_end(chunk_id)
                return hit
        path = chunk_path(self.data_dir, chunk_id)
        fd = os.open(path, os.O_RDONLY)
        entry = (fd, read_sums(path))
        with self._lock:
            self._fds[chunk_id] = entry
            while len(self._fds) > self._max_open:
                # Closing an fd a reader may still be sending from is unsafe, so evicted fds are
                # closed only when far beyond the bound; normal eviction happens at delete.
                _, (old_fd, _) = self._fds.popitem(last=False)
                os.close(old_fd)
        return entry

    def delete(self, chunk_ids: list[int]) -> None:
        for chunk_id in chunk_ids:
            with self._lock:
                self._lengths.pop(chunk_id, None)
                entry = self._fds.pop(chunk_id, None)
            if entry is not None:
                os.close(entry[0])
            path = chunk_path(self.data_dir, chunk_id)
            for p in (path, path + SUM_SUFFIX):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
