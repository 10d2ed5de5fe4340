"""The client library's plain data: options, per-file state, local chunk files (kvfs/client.py)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from kvfs import protocol as P

BLOCK = P.CHECKSUM_BLOCK


@dataclass
class ClientOptions:
    timeout: float = 30.0  # per RPC; a dead server surfaces as EIO after this
    connect_timeout: float = 5.0
    local_reads: bool = True  # read chunk files directly when the chunkserver is on this machine
    max_upload_inflight: int = 8  # chunks being uploaded at once per client (write backpressure)
    read_cache_chunks: int = 8  # verified chunks kept per open file for small sequential reads
    prefetch: bool = True
    prefetch_chunks: int = 4  # chunks fetched ahead of a sequential reader, concurrently (disk queue depth)
    # Lookup bursts in one directory are answered from one listing for this long (kvfs.dircache);
    # 0 turns it off. Same staleness bound as the mount's attribute cache.
    dir_cache_ttl: float = 1.0
    dir_cache_burst: int = 16  # lookups in one directory within the ttl before it is listed
    # TCP reads of at least this many bytes are received and verified in worker threads on blocking
    # sockets (kvfs/rpc_blocking.py), several at once, instead of on the event loop; 0 turns it off.
    thread_read_min: int = 1 << 20
    read_threads: int = 8  # such reads in flight at once per client
    # A TLS directory (kvfs.tls) for this client; "" uses the process's (--tls-dir, KVFS_TLS_DIR), if any.
    tls_dir: str = ""
    # Lookups of KV block/run files bring their chunk map under a KV map lease, so their open needs no
    # META_GET_CHUNKS (kvfs/leased_lookups.py); False: every open asks meta (close-to-open).
    kv_lookup_leases: bool = True
    # Such a lookup also records an access on a file last accessed longer ago than this (seconds; the
    # KV stores' default touch interval): an engine reading KV runs through the mount then sends no
    # access-time write of its own while it computes. -1: lookups record nothing.
    kv_lookup_touch_interval: float = 60.0

    @property
    def cache_chunks(self) -> int:
        """Verified chunks kept per open file: ``read_cache_chunks``, but with read-ahead on never fewer than
        its window and the chunk being read (a chunk evicted before its reader came would be read again)."""
        return max(self.read_cache_chunks, self.prefetch_chunks + 1) if self.prefetch else self.read_cache_chunks


@dataclass
class _ServerInfo:
    address: str
    data_dir: str
    host_id: str
    visible: bool = False  # its data dir is visible here (short-circuit reads), as of visible_at
    visible_at: float = float("-inf")  # time.monotonic()


@dataclass(frozen=True)
class LocalChunk:
    """A replica's chunk file on this host, readable without the chunkserver (short-circuit)."""

    path: str
    sums_path: str
    chunk_id: int
    address: str
    length: int


@dataclass
class FileState:
    """Per-inode state shared by every open handle of this client."""

    ino: int
    attr: P.Attr
    chunks: dict[int, P.ChunkRef]  # committed chunk map as last fetched
    opens: int = 0
    writable: bool = False  # opened for writing by a handle not yet released
    # Meta may hold this client's write lease on the file (taken at open for write of an existing file,
    # at the first write of one this client created); released at the last close.
    leased: bool = False
    leasing: trio.Lock = field(default_factory=trio.Lock)  # one lease request at a time per file
    size: int = 0  # current size including uncommitted writes
    dirty: dict[int, bytearray] = field(default_factory=dict)  # chunk index -> whole chunk contents
    uploaded: dict[int, P.ChunkRef] = field(default_factory=dict)  # written to chunkservers, not committed
    modified: bool = False
    version: int = 0  # bumped by every write/truncate, so a flush knows whether writes raced its commit
    uploads: int = 0
    upload_error: OSError | None = None
    upload_done: trio.Event = field(default_factory=trio.Event)
    cache: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    last_read_end: int = -1
    prefetching: dict[int, trio.Event] = field(default_factory=dict)  # chunk index -> set once loaded
    inflight: set[int] = field(default_factory=set)  # chunk indexes being uploaded
    truncated_to: int = -1  # smallest size truncated to since the last commit (-1: none)
    # kvfs.remote.fill: no chunk is missing below this index, as of the chunk map, version and size stamped
    # with it ((chunks, len(chunks), version, size, index)): a sequential reader looks ahead for holes once
    # per chunk, not once per read.
    holes_checked: tuple | None = None
    # A file this client created, until its first commit: its create mtime and when (time.monotonic) it
    # was created here; a first commit soon after keeps that mtime (kvfs/client_write.py, flush).
    born_mtime_ns: int = 0
    born_at: float = 0.0
    # The file's own chunk size (kvfs/layout.py): chunk ``i`` holds bytes [i*chunk_size, (i+1)*chunk_size).
    chunk_size: int = 4 << 20

    def ref(self, index: int) -> P.ChunkRef | None:
        return self.uploaded.get(index) or self.chunks.get(index)
