"""The few primitives a KV store needs from where the block files live, and one helper they share.

``KVStore`` (store.py) holds the logic: paths, headers, checks, counters, batching. A backend only
moves bytes and names; adding a place to keep blocks is adding a file:

* ``native.py``: the kvfs client library (``kvfs.SyncClient``): one meta round trip for a whole
  prompt's lookup, chunk reads straight into the caller's tensors.
* ``posix.py``: any directory through plain os calls: the kvfs FUSE mount, or a local disk.

Error handling: primitives raise ``OSError`` with an errno; ``read`` returns None for a missing block.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A reader fetches the first SCRATCH bytes of a block into a scratch buffer (the header and the start
# of the payload), and the rest of the payload straight into the caller's tensors from this offset,
# which is a multiple of the client's 64 KiB checksum block so the chunk reads need no bounce buffer.
SCRATCH = 64 << 10

OnReady = Callable[[int, "ReadResult | None | OSError"], None]
# read_many(payload_sums=...): (job index, the file's head, its size) -> the caller's XXH3-64 per ``block``
# bytes of that job's payload (little-endian u64s) and ``block``, or None: the head is bad, skip the payload.
PayloadSums = Callable[[int, memoryview, int], "tuple[bytes, int] | None"]


@dataclass
class ReadResult:
    head: memoryview  # the first min(size, SCRATCH) bytes of the file, or more if the header is larger
    size: int  # file size
    atime_ns: int
    payload_done: bool  # False: the payload was not read (the size was not the expected one)
    mapped: memoryview | None = None  # read_many(map_local=True): the whole file, mapped; ``out`` untouched
    # read_many(payload_digest=True): XXH3-64 of the payload bytes (from header_len on) as they landed in
    # ``out``, computed while reading, and *not* checked against the chunk checksums: the caller must
    # compare it with the block's payload checksum. None: the backend checked the chunk checksums.
    payload_xxh3: int | None = None
    # read_many(payload_sums=...): the payload was checked as it landed in ``out`` against the caller's
    # per-block sums: how many leading blocks were read whole and match (the read stopped at the first
    # that did not). None: not checked here (the caller hashes ``out`` itself).
    payload_checked: int | None = None


class Backend(Protocol):
    def put(self, directory: str, name: str, header: bytes, payload: Sequence[memoryview],
            check_existing: bool) -> bool:
        """Write a new file atomically under ``directory/name``; False if it already existed (not rewritten)."""

    def read(self, path: str, expect_size: int, header_len: int, out: Sequence[memoryview],
             touch_before_ns: int) -> ReadResult | None:
        """Read a block: its head, and (if the file has ``expect_size`` bytes) the payload at
        ``header_len`` into ``out``. None if there is no such file. If the file's atime is older than
        ``touch_before_ns``, set it to now (the eviction engine's recency; best effort)."""

    def exists_many(self, base: str, names: list[str], leading_only: bool) -> tuple[list[bool], int]:
        """Which of ``names`` (paths relative to directory ``base``) exist, and how many lead without a
        gap. ``leading_only``: the caller only wants the count; the backend may stop at the first miss."""

    def locate_many(self, base: str, names: list[str], leading_only: bool,
                    touch_before_ns: int = 0) -> tuple[list[Any], int]:
        """``exists_many`` with, per name, None (missing) or where the file is (native: its chunk map;
        a directory: True), and the leading count. A location may travel to another process (it is
        picklable) and be handed to ``read_many(locations=...)`` there, to skip a look-up the read
        would make. ``touch_before_ns``: the files about to be loaded; where the backend can, an access
        is recorded on those older than this as part of the lookup (native: by meta, in the same
        round trip; the location then carries the new access time, so the read records none)."""

    def remove(self, path: str) -> None: ...

    def set_xattr(self, path: str, name: str, value: bytes) -> None: ...

    def get_xattr(self, path: str, name: str) -> bytes | None: ...

    def put_many(self, jobs: Sequence[tuple]) -> list[bool | OSError]:
        """``put(*job)`` for every job, concurrently (bounded); an OSError is returned in its slot."""

    def read_many(self, jobs: Sequence[tuple], on_ready: OnReady | None = None,
                  map_local: bool = False, caller_verifies: bool = False,
                  locations: Sequence[Any] | None = None,
                  payload_digest: bool = False,
                  payload_sums: PayloadSums | None = None) -> list[ReadResult | None | OSError]:
        """``read(*job)`` for every job, concurrently (bounded); an OSError is returned in its slot.
        ``on_ready(i, result)``, if given, is called once per job as soon as that job's result is final,
        from whichever thread finished it, so a caller can use each block while others still read (the
        staged GPU route starts each block's copy then). It must not raise. ``map_local``: the backend
        may map a file instead of reading it into ``out`` (``ReadResult.mapped``: zero-copy, verified as a
        read is), where it can do so safely; ``out`` is then left alone. ``caller_verifies``: the caller
        checks every byte it uses of a mapped file against checksums of its own (a KV run's header
        checksum and per-block sums), so the backend may skip checking the mapping against the chunk
        checksums (each byte hashed once). ``locations``: ``locate_many``'s answers for the jobs' files,
        which the backend may use instead of looking them up again (native: their chunk maps).
        ``payload_digest``: the caller checks each block's payload against an end-to-end checksum of its
        own (the block header's XXH3-64 of the payload): the backend may, instead of checking the chunk
        checksums, hash the payload once as it lands and return that digest (``ReadResult.payload_xxh3``)
        for the caller to compare; on a mismatch the caller reads the block again without this flag (the
        chunk checksums then find a bad replica, and the backend fails over). ``payload_sums`` (with
        ``caller_verifies``; KV runs, whose header holds a checksum per block): the backend may read a
        job's head first, ask ``payload_sums`` for the payload's block sums and read the payload into
        ``out`` checking each block as it lands (``ReadResult.payload_checked``), in place of mapping it
        or of the caller hashing it afterwards."""

    def close(self) -> None: ...


def read_run_checked(fd: int, index: int, size: int, atime_ns: int, expect_size: int, header_len: int,
                     out: Sequence[memoryview], payload_sums: PayloadSums) -> ReadResult:
    """``read_many(payload_sums=...)`` for one open file of ``size`` bytes: its head, then, if it is the
    size expected and ``payload_sums`` accepts the head, its payload into ``out``, checked block by block
    as it lands (``kvfs.chunkio.read_blocks_checked``). Error handling: OSError from the reads."""
    from kvfs.chunkio import read_blocks_checked

    if size != expect_size:
        return ReadResult(memoryview(os.pread(fd, SCRATCH, 0)), size, atime_ns, False)
    head = memoryview(os.pread(fd, header_len, 0))
    want = payload_sums(index, head, size) if len(head) == header_len else None
    if want is None:
        return ReadResult(head, size, atime_ns, False)
    sums, block = want
    checked = read_blocks_checked(fd, header_len, list(out), sums, block)
    return ReadResult(head, size, atime_ns, True, payload_checked=checked)


def in_parts(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any], parts: int) -> list[Any]:
    """``[fn(x) for x in items]``, the items dealt into ``parts`` interleaved parts: the first run in the
    calling thread, the others on ``pool`` (a ``concurrent.futures`` executor), so a small batch costs no
    thread hand-off of its own and a large one keeps ``parts`` threads busy. ``fn`` releases the GIL for
    its heavy part (a C read) or the parts run one at a time anyway."""
    parts = max(1, min(parts, len(items)))
    out: list[Any] = [None] * len(items)

    def run(k: int) -> None:
        for i in range(k, len(items), parts):
            out[i] = fn(items[i])

    futures = [pool.submit(run, k) for k in range(1, parts)]
    try:
        run(0)
    finally:
        for f in futures:
            f.result()
    return out


def split_into(views: Sequence[memoryview], skip: int) -> list[tuple[int, memoryview]]:
    """Payload-relative (offset, view) pieces of ``views`` from byte ``skip`` on."""
    out = []
    pos = 0
    for v in views:
        end = pos + len(v)
        if end > skip:
            start = max(skip - pos, 0)
            out.append((pos + start, v[start:]))
        pos = end
    return out


def copy_into(views: Sequence[memoryview], src: memoryview) -> None:
    """Copy ``src`` over the first ``len(src)`` bytes of the concatenation of ``views``."""
    pos = 0
    for v in views:
        if pos >= len(src):
            return
        n = min(len(v), len(src) - pos)
        v[:n] = src[pos:pos + n]
        pos += n
