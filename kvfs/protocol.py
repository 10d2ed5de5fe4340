"""The kvfs wire protocol: every message, method number and frame layout, in one place.

Frame (both directions)::

    Header (24 bytes, little endian)  |  msgpack payload  |  raw bulk data
    magic u16, version u8, kind u8, method u16, status u16, request_id u32,
    payload_len u32, data_len u64

``status`` is 0 on success or an errno (replies only). Bulk data (chunk bytes) travels raw after the
payload so it can be received with ``recv_into`` straight into its destination buffer and sent with
``sendfile`` from a chunk file; it is never base64 or JSON.

Method numbers are per service and never reused: retire a number by leaving a comment in its place.
Each method maps to one request struct and one reply struct (``META_METHODS`` / ``CHUNK_METHODS``).
"""

from __future__ import annotations

import errno
import struct

import msgspec

from kvfs.identity import ROLE_ADMIN, ROLE_CHUNKSERVER, ROLE_CLIENT, ROLE_META, ROLES

PROTOCOL_VERSION = 1
MAGIC = 0x4B56  # "KV"

HEADER = struct.Struct("<HBBHHIIQ")
HEADER_SIZE = HEADER.size

KIND_REQUEST = 0
KIND_REPLY = 1

# Upper bounds that keep a malformed or hostile frame from making a server allocate without limit.
MAX_PAYLOAD = 64 << 20
MAX_DATA = 1 << 30

# Checksums cover fixed blocks of a chunk so a ranged read verifies only the blocks it touches.
CHECKSUM_BLOCK = 64 << 10

NAME_MAX = 255
PATH_MAX = 4096


class Struct(msgspec.Struct, array_like=True, omit_defaults=True):
    """Base for wire structs: array-encoded (field order is the wire order; append new fields last)."""


# --------------------------------------------------------------------------- shared types


class Attr(Struct):
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    generation: int = 0
    # A regular file's chunk size (kvfs/layout.py); 0 for other types, and from a meta before per-file
    # chunk sizes: the file then uses the cluster's (HelloReply.chunk_size).
    chunk_size: int = 0


class DirEntry(Struct):
    name: str
    attr: Attr


class ChunkRef(Struct):
    """One chunk of a file: chunk ``index`` covers bytes [index*chunk_size, index*chunk_size+length)."""

    index: int
    chunk_id: int
    length: int
    replicas: list[str]  # chunkserver addresses "host:port"; the first is the write-chain primary
    token: bytes = b""  # a chunk capability (CHUNK_TOKEN below) for reading it; "" in requests to meta


class ChunkserverInfo(Struct):
    server_id: int
    address: str
    data_dir: str
    host_id: str  # identifies the machine, so a client can read that server's chunk files directly
    capacity: int
    used: int
    chunks: int
    alive: bool
    last_heartbeat: float
    # Decommissioning (meta/decommission.py): "live", "dead", "draining" (chunks_left of its chunks still
    # lack their full replica count elsewhere) or "decommissioned" (safe to stop).
    state: str = ""
    chunks_left: int = 0


class Empty(Struct):
    pass


class ErrorReply(Struct):
    """Payload of any reply whose header status is an errno."""

    message: str
    leader: str = ""  # NOT_LEADER only: the leader's address, "" while none is elected


# Status of a reply from a meta process that is not the leader (HA meta on etcd): the request was not
# executed, so it is safe to send it to ``ErrorReply.leader`` (or any other meta). An errno, so a
# client that does not know it still gets a plain OSError ("Remote address changed").
NOT_LEADER = errno.EREMCHG


# --------------------------------------------------------------------------- meta service


class Lookup(Struct):
    parent: int
    name: str


class GetAttr(Struct):
    ino: int


class SetAttr(Struct):
    ino: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class MkNode(Struct):
    parent: int
    name: str
    mode: int  # includes the file type bits (S_IFREG, S_IFDIR, ...)
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    exclusive: bool = True  # False: return the existing regular file instead of EEXIST
    # Non-empty: also take the write lease for this client (create + open in one call; the mount sends
    # it for an O_TRUNC create; other creates take the lease at their first write).
    lease_client: str = ""
    # A new regular file's chunk size (kvfs/layout.py); 0: its directory's policy, else the cluster's.
    chunk_size: int = 0


class Unlink(Struct):
    """UNLINK (and RMDIR, which ignores ``keep_open``).

    ``keep_open``: None leaves an inode whose last name went for an explicit PURGE (when the caller
    closes it); a list (the caller's open inodes) purges it in the same call unless it is listed:
    one round trip for the common unlink of a closed file."""

    parent: int
    name: str
    keep_open: list[int] | None = None


class Rename(Struct):
    parent: int
    name: str
    new_parent: int
    new_name: str
    flags: int = 0  # RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2 (as in renameat2)


class RenameReply(Struct):
    replaced_ino: int = 0  # inode whose last link the rename removed (the mount forgets it)


class Link(Struct):
    ino: int
    new_parent: int
    new_name: str


class Symlink(Struct):
    parent: int
    name: str
    target: str
    uid: int = 0
    gid: int = 0


class ReadLinkReply(Struct):
    target: str


class ReadDir(Struct):
    ino: int
    after: str = ""  # resume after this name ("" = from the start)
    limit: int = 1024


class ReadDirReply(Struct):
    entries: list[DirEntry]
    more: bool


class StatFsReply(Struct):
    block_size: int
    total_bytes: int
    free_bytes: int
    files: int


class SetXattr(Struct):
    ino: int
    name: str
    value: bytes
    flags: int = 0  # XATTR_CREATE = 1, XATTR_REPLACE = 2


class GetXattr(Struct):
    ino: int
    name: str


class XattrValue(Struct):
    value: bytes


class ListXattrReply(Struct):
    names: list[str]


class ResolvePath(Struct):
    path: str


class ExistsMany(Struct):
    paths: list[str]


class ExistsManyReply(Struct):
    exists: list[bool]
    leading: int  # how many of the paths, from the first, exist without a gap (longest prefix)


class OpenWrite(Struct):
    ino: int
    client_id: str


class LeaseReply(Struct):
    expires_in: float
    # The file as the lease starts: a writer whose first write comes after its create (kvfs.Client
    # takes a new file's lease then) sees whether another client wrote the file meanwhile.
    attr: Attr | None = None


class ReleaseWrite(Struct):
    ino: int
    client_id: str


class RenewLeases(Struct):
    """Keep a client's write leases (and so its uploaded, uncommitted chunks) alive while files are open."""

    client_id: str
    inos: list[int]


class RenewLeasesReply(Struct):
    lost: list[int]  # leases this client no longer holds (another writer has the file, or it is gone)
    expires_in: float


class GetChunks(Struct):
    ino: int
    first: int = 0
    count: int = 1 << 30


class GetChunksReply(Struct):
    attr: Attr
    chunk_size: int
    chunks: list[ChunkRef]


class AllocChunk(Struct):
    ino: int
    client_id: str
    size_hint: int = 0


class AllocChunkReply(Struct):
    chunk_id: int
    replicas: list[str]
    token: bytes = b""  # a chunk capability to write (and read) the new chunk


class Commit(Struct):
    """Publish a file's new length and changed chunks atomically (close-to-open consistency)."""

    ino: int
    client_id: str
    size: int
    chunks: list[ChunkRef]
    mtime_ns: int = 0
    # The smallest size the file was truncated to since the last commit (-1: not shrunk). Chunks not in
    # ``chunks`` lose their bytes past it, so shrinking then growing again reads zeros, not old data.
    truncated_to: int = -1
    # The writer's last close: drop its write lease in the same call (no RELEASE_WRITE after it).
    release: bool = False
    # The chunk size the writer split the file by (0: an older client: the cluster's). Meta refuses a
    # commit whose chunk size is not the file's (EINVAL), so an old client cannot misplace bytes.
    chunk_size: int = 0


class Purge(Struct):
    ino: int


class RegisterChunkserver(Struct):
    node_id: str  # stable identity kept in the chunkserver's data dir, so restarts keep the server id
    address: str
    data_dir: str
    host_id: str
    capacity: int
    used: int
    chunk_ids: list[int]


class ChunkKey(Struct):
    """A secret that signs chunk capabilities; meta hands every chunkserver the keys it must accept."""

    key_id: int
    secret: bytes


class RegisterReply(Struct):
    server_id: int
    delete_chunk_ids: list[int]
    chunk_size: int
    keys: list[ChunkKey] = []  # chunk capability keys (replaces what the chunkserver knew)


class Heartbeat(Struct):
    server_id: int
    capacity: int
    used: int
    chunks: int


class HeartbeatReply(Struct):
    delete_chunk_ids: list[int]
    known: bool = True  # False: meta lost track of this server (restart): register again
    keys: list[ChunkKey] = []  # as RegisterReply.keys (rotation reaches chunkservers this way)


class ListChunkserversReply(Struct):
    servers: list[ChunkserverInfo]
    chunk_size: int
    replication: int
    files: int
    used_bytes: int


class ReportBadChunk(Struct):
    chunk_id: int
    address: str
    reason: str


class Decommission(Struct):
    """Drain the chunkserver at ``address`` (admin): no new chunks, its chunks copied to other servers."""

    address: str
    cancel: bool = False  # put it back into placement
    forget: bool = False  # drop a decommissioned, stopped server from the cluster's list


class ChunkLocations(Struct):
    chunk_ids: list[int]


class ChunkLocationsReply(Struct):
    replicas: list[list[str]]
    tokens: list[bytes] = []  # a read capability per chunk id (a fresh one for a client whose token expired)


class Hello(Struct):
    client_version: int


class HelloReply(Struct):
    server_version: int
    chunk_size: int
    cluster_id: str
    lease_seconds: float = 60.0  # write leases expire this long after their last renewal
    # The caller's "/" : its tenant's root directory (meta/tenants.py), or 1 (the whole namespace).
    root_ino: int = 1
    tenant: str = ""
    # META_KV_LOOKUP is served (a meta before it answers an unknown method by closing the connection).
    kv_lookup: bool = False
    # Files carry their own chunk size (Attr.chunk_size, MkNode.chunk_size; kvfs/layout.py).
    per_file_chunk_size: bool = False
    # META_KV_LOOKUP_MANY is served (as kv_lookup).
    kv_lookup_many: bool = False


META_HELLO = 1
META_LOOKUP = 2
META_GETATTR = 3
META_SETATTR = 4
META_MKNODE = 5
META_UNLINK = 6
META_RMDIR = 7
META_RENAME = 8
META_LINK = 9
META_SYMLINK = 10
META_READLINK = 11
META_READDIR = 12
META_STATFS = 13
META_SETXATTR = 14
META_GETXATTR = 15
META_LISTXATTR = 16
META_REMOVEXATTR = 17
META_RESOLVE = 18
META_EXISTS_MANY = 19
META_OPEN_WRITE = 20
META_RELEASE_WRITE = 21
META_GET_CHUNKS = 22
META_ALLOC_CHUNK = 23
META_COMMIT = 24
META_PURGE = 25
META_RENEW_LEASES = 26
META_REGISTER = 40
META_HEARTBEAT = 41
META_LIST_CHUNKSERVERS = 42
META_REPORT_BAD_CHUNK = 43
META_CHUNK_LOCATIONS = 44
META_DECOMMISSION = 45

META_METHODS: dict[int, tuple[type[Struct], type[Struct]]] = {
    META_HELLO: (Hello, HelloReply),
    META_LOOKUP: (Lookup, Attr),
    META_GETATTR: (GetAttr, Attr),
    META_SETATTR: (SetAttr, Attr),
    META_MKNODE: (MkNode, Attr),
    META_UNLINK: (Unlink, Attr),
    META_RMDIR: (Unlink, Empty),
    META_RENAME: (Rename, RenameReply),
    META_LINK: (Link, Attr),
    META_SYMLINK: (Symlink, Attr),
    META_READLINK: (GetAttr, ReadLinkReply),
    META_READDIR: (ReadDir, ReadDirReply),
    META_STATFS: (Empty, StatFsReply),
    META_SETXATTR: (SetXattr, Empty),
    META_GETXATTR: (GetXattr, XattrValue),
    META_LISTXATTR: (GetAttr, ListXattrReply),
    META_REMOVEXATTR: (GetXattr, Empty),
    META_RESOLVE: (ResolvePath, Attr),
    META_EXISTS_MANY: (ExistsMany, ExistsManyReply),
    META_OPEN_WRITE: (OpenWrite, LeaseReply),
    META_RELEASE_WRITE: (ReleaseWrite, Empty),
    META_GET_CHUNKS: (GetChunks, GetChunksReply),
    META_ALLOC_CHUNK: (AllocChunk, AllocChunkReply),
    META_COMMIT: (Commit, Attr),
    META_PURGE: (Purge, Empty),
    META_RENEW_LEASES: (RenewLeases, RenewLeasesReply),
    META_REGISTER: (RegisterChunkserver, RegisterReply),
    META_HEARTBEAT: (Heartbeat, HeartbeatReply),
    META_LIST_CHUNKSERVERS: (Empty, ListChunkserversReply),
    META_REPORT_BAD_CHUNK: (ReportBadChunk, Empty),
    META_CHUNK_LOCATIONS: (ChunkLocations, ChunkLocationsReply),
    META_DECOMMISSION: (Decommission, ChunkserverInfo),
}

# --------------------------------------------------------------------------- chunkserver service


class WriteChunk(Struct):
    """Store a whole immutable chunk; the data follows the payload.

    ``chain`` lists the replicas still to receive it after this server (chain replication): the
    reply comes only once every server in the chain holds the chunk durably.

    ``durable=False``: skip the fsyncs (the chunk is a cache of data that lives elsewhere, e.g. a
    remote object: a copy torn by a machine crash is detected by its checksums and fetched again).
    """

    chunk_id: int
    checksums: list[int]  # xxh3_64 of each CHECKSUM_BLOCK of the data
    chain: list[str]
    durable: bool = True
    token: bytes = b""  # write capability; forwarded unchanged down the chain


class ReadChunk(Struct):
    chunk_id: int
    offset: int
    length: int
    token: bytes = b""  # read capability


class ReadChunkReply(Struct):
    """The data follows, covering the checksum blocks that hold the asked range.

    ``data_offset`` is where the data starts in the chunk (a multiple of CHECKSUM_BLOCK);
    ``checksums`` are those blocks' checksums, for the client to verify end to end.
    """

    data_offset: int
    checksums: list[int]
    chunk_length: int


class DeleteChunks(Struct):
    chunk_ids: list[int]
    tokens: list[bytes] = []  # a delete capability per chunk id


class ReplicateChunk(Struct):
    """Copy a chunk this server holds to ``targets`` (a new replication chain): re-replication."""

    chunk_id: int
    targets: list[str]
    token: bytes = b""  # a replicate capability for chunk_id (only meta's replicator gets one)
    write_token: bytes = b""  # the write capability passed to the targets


class VerifyChunk(Struct):
    """Re-read a chunk and check it against its stored block checksums (meta, before it acts on a
    client's bad-chunk report)."""

    chunk_id: int


class VerifyChunkReply(Struct):
    ok: bool  # False: missing, unreadable or a checksum mismatch (``reason`` says which)
    reason: str = ""


class ChunkserverStat(Struct):
    capacity: int
    used: int
    chunks: int
    data_dir: str
    host_id: str


CHUNK_WRITE = 1
CHUNK_READ = 2
CHUNK_DELETE = 3
CHUNK_STAT = 4
CHUNK_REPLICATE = 5
CHUNK_VERIFY = 6

CHUNK_METHODS: dict[int, tuple[type[Struct], type[Struct]]] = {
    CHUNK_WRITE: (WriteChunk, Empty),
    CHUNK_READ: (ReadChunk, ReadChunkReply),
    CHUNK_DELETE: (DeleteChunks, Empty),
    CHUNK_STAT: (Empty, ChunkserverStat),
    CHUNK_REPLICATE: (ReplicateChunk, Empty),
    CHUNK_VERIFY: (VerifyChunk, VerifyChunkReply),
}

# Chunk capability tokens (issue 13, kvfs/captoken.py): meta signs them, chunkservers verify them.
# Layout: CHUNK_TOKEN (key id u32, chunk id u64, expiry u32 unix seconds, operation bits u8), then the
# first CHUNK_TOKEN_MAC bytes of HMAC-SHA256(key, CHUNK_TOKEN_DOMAIN + those 17 bytes): 33 bytes.
CHUNK_TOKEN = struct.Struct("<IQIB")
CHUNK_TOKEN_MAC = 16
CHUNK_TOKEN_DOMAIN = b"kvfs-chunk-token-v1\0"
TOKEN_READ = 1  # CHUNK_READ
TOKEN_WRITE = 2  # CHUNK_WRITE (a chain forwards it)
TOKEN_DELETE = 4  # CHUNK_DELETE
TOKEN_REPLICATE = 8  # CHUNK_REPLICATE: push the chunk to other chunkservers (meta's replicator only)


# --------------------------------------------------------------------------- encoding

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


def decode(kind: type[Struct], payload: bytes | memoryview) -> Struct:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder.decode(payload)


def pack_header(kind: int, method: int, status: int, request_id: int, payload_len: int, data_len: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, method, status, request_id, payload_len, data_len)


class FrameHeader(msgspec.Struct):
    kind: int
    method: int
    status: int
    request_id: int
    payload_len: int
    data_len: int


# --------------------------------------------------------------------------- request limits
# A server checks a request's declared sizes against these before it allocates anything for the
# frame (a hostile or broken peer cannot make it reserve memory it then never fills). Requests take
# at most REQUEST_PAYLOAD bytes of payload and no bulk data unless listed here.

REQUEST_PAYLOAD = 1 << 20
MAX_CHUNK_SIZE = 256 << 20  # the largest --chunk-size meta accepts: bounds CHUNK_WRITE's data
MIN_FILE_CHUNK_SIZE = 64 << 10  # the smallest per-file chunk size (kvfs/layout.py): one checksum block
LIST_PAYLOAD = 16 << 20  # requests that carry lists (paths, chunk ids, chunk refs)


def request_limits(service_methods: dict[int, tuple[type[Struct], type[Struct]]]) -> dict[int, tuple[int, int]]:
    """method -> (max payload bytes, max bulk data bytes) for one service's method table."""
    if service_methods is CHUNK_METHODS:
        special = {CHUNK_WRITE: (REQUEST_PAYLOAD, MAX_CHUNK_SIZE), CHUNK_DELETE: (LIST_PAYLOAD, 0)}
    else:
        special = {m: (LIST_PAYLOAD, 0) for m in (
            META_EXISTS_MANY, META_COMMIT, META_CHUNK_LOCATIONS, META_RENEW_LEASES, META_KV_EXISTS,
            META_KV_CHUNKS, META_KV_PUBLISH, META_REMOTE_FILL_COMMIT, META_REMOTE_REFILL)}
        special[META_REGISTER] = (MAX_PAYLOAD, 0)  # every chunk id a server holds
    return {m: special.get(m, (REQUEST_PAYLOAD, 0)) for m in service_methods}


def unpack_header(raw: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and validate a frame header. Error handling: ValueError on a malformed header."""
    magic, version, kind, method, status, request_id, payload_len, data_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"bad frame magic {magic:#x}")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})")
    if payload_len > MAX_PAYLOAD or data_len > MAX_DATA:
        raise ValueError(f"frame too large (payload {payload_len}, data {data_len})")
    return FrameHeader(kind, method, status, request_id, payload_len, data_len)


# --------------------------------------------------------------------------- meta service: remote tier (issue 3)


class RemoteBinding(Struct):
    path: str  # the bound kvfs directory
    url: str  # s3://bucket/prefix, hdfs://..., file://...
    mode: str  # "writeback" | "writethrough" | "readonly"
    root_ino: int = 0
    dirty: int = 0  # files not yet uploaded (listing only)
    queued_deletes: int = 0


class RemoteAttach(Struct):
    path: str
    url: str
    mode: str
    uid: int = 0
    gid: int = 0


class RemotePath(Struct):
    path: str


class RemoteListReply(Struct):
    bindings: list[RemoteBinding]


class RemoteSyncReply(Struct):
    added: int
    updated: int
    removed: int


class RemoteInfo(Struct):
    ino: int


class RemoteInfoReply(Struct):
    """A file's remote state. ``fillable``: its missing chunks may be fetched from ``url``/``key``."""

    url: str
    key: str
    mode: str
    state: str  # "dirty" | "uploading" | "clean" | "local" (in a binding but never uploaded, e.g. symlinks)
    etag: str
    size: int
    mtime_ns: int
    fillable: bool
    error: str = ""  # the last upload error, if any


class RemoteFillAlloc(Struct):
    ino: int
    count: int
    size_hint: int = 0


class RemoteFillAllocReply(Struct):
    chunks: list[AllocChunkReply]


class RemoteFillCommit(Struct):
    """Record chunks fetched from the remote; refused (ESTALE) unless ``etag`` is still the file's version."""

    ino: int
    etag: str
    chunks: list[ChunkRef]
    chunk_size: int = 0  # the chunk size the filler split the object by (0: the cluster's); as Commit


class RemoteFillCommitReply(Struct):
    chunks: list[ChunkRef]  # the file's refs for those indexes (another client may have filled one first)


class RemoteEvictReply(Struct):
    files: int
    bytes: int


class RemoteRefill(Struct):
    """A client found fetched chunks of a clean remote-backed file unreadable (torn by a crash,
    corrupt, lost with their server): forget them so they are fetched from the remote again.
    Only the listed chunk ids are dropped, and only while ``etag`` is still the file's version."""

    ino: int
    etag: str
    chunks: list[ChunkRef]


META_REMOTE_ATTACH = 80
META_REMOTE_DETACH = 81
META_REMOTE_LIST = 82
META_REMOTE_SYNC = 83
META_REMOTE_INFO = 84
META_REMOTE_FILL_ALLOC = 85
META_REMOTE_FILL_COMMIT = 86
META_REMOTE_EVICT = 87
META_REMOTE_REFILL = 88

META_METHODS.update({
    META_REMOTE_ATTACH: (RemoteAttach, RemoteBinding),
    META_REMOTE_DETACH: (RemotePath, Empty),
    META_REMOTE_LIST: (Empty, RemoteListReply),
    META_REMOTE_SYNC: (RemotePath, RemoteSyncReply),
    META_REMOTE_INFO: (RemoteInfo, RemoteInfoReply),
    META_REMOTE_FILL_ALLOC: (RemoteFillAlloc, RemoteFillAllocReply),
    META_REMOTE_FILL_COMMIT: (RemoteFillCommit, RemoteFillCommitReply),
    META_REMOTE_REFILL: (RemoteRefill, Empty),
    META_REMOTE_EVICT: (RemotePath, RemoteEvictReply),
})


# --------------------------------------------------------------------------- meta service: KV-cache blocks (issue 5)


class KVExists(Struct):
    """Which of ``names`` (paths relative to directory ``base``) exist: a whole prompt's block lookup in
    one round trip. ``leading_only``: stop at the first missing one (``exists`` is False after it)."""

    base: str
    names: list[str]
    leading_only: bool = False


class KVDirStatus(Struct):
    """One KV directory: its cache policy (0 = none), usage and counters (clients' hits and misses,
    meta's evictions) for ``kvfs status``."""

    path: str
    quota: int
    ttl: float
    window: float
    used_bytes: int
    blocks: int
    get_hits: int
    get_misses: int
    lookup_hit_blocks: int
    lookup_miss_blocks: int
    evicted_blocks: int
    evicted_bytes: int
    expired_blocks: int


class KVStatusReply(Struct):
    dirs: list[KVDirStatus]
    passes: int  # eviction passes run since meta started


class KVChunks(Struct):
    """Resolve files and return their chunk maps in one round trip (a batch of block reads)."""

    paths: list[str]
    # Ask for a KV map lease (meta/kv_leases.py): meta acknowledges no change to these names' bytes
    # until ``KVChunksReply.lease_seconds`` after it answered. Old clients do not ask.
    lease: bool = False
    # Record an access on every file found whose access time is older than this (ns since the epoch;
    # 0: none): a load's lookup carries its recency update, so the load sends no write per file. Meta
    # answers with the new access time and writes it just after (meta/eviction.py); an old meta ignores
    # the field and answers the old time, so the client touches as before.
    touch_before_ns: int = 0


class KVChunksReply(Struct):
    files: list[GetChunksReply | None]  # None: no such regular file
    # The lease granted on every file in ``files`` (0: none; a client counts it from when it sent the request).
    lease_seconds: float = 0.0


class KVLookup(Struct):
    """LOOKUP of ``name`` in directory ``parent`` that also returns a regular file's chunk map, under a KV
    map lease when asked (meta/kv_leases.py): the mount's open of a KV block or run file then needs no
    GET_CHUNKS round trip of its own (kvfs/leased_lookups.py)."""

    parent: int
    name: str
    lease: bool = False
    # As KVChunks.touch_before_ns: a regular file found with an older access time gets one recorded now
    # (the mount's lookups of KV files: the engine's reads then record none of their own).
    touch_before_ns: int = 0


class KVLookupReply(Struct):
    attr: Attr
    file: GetChunksReply | None = None  # None: not a regular file, or no map to rely on (a remote-bound file)
    lease_seconds: float = 0.0  # the lease on ``file``'s map (0: none), counted from when the request was sent


class KVLookupMany(Struct):
    """Several KVLookups (``parents[i]``, ``names[i]``) in one round trip, each answered on its own: a
    mount's daemon sends the KV lookups its kernel asks for while the previous batch is in flight together
    (an engine's prefix lookup stats its runs 8 at a time), so meta serves one request, not 8."""

    parents: list[int]
    names: list[str]
    lease: bool = False  # as KVLookup.lease, for every one
    touch_before_ns: int = 0  # as KVLookup.touch_before_ns, for every one


class KVLookupManyReply(Struct):
    replies: list[KVLookupReply | None]  # per lookup, in order; None where ``errors`` has its errno
    errors: list[int]  # per lookup: 0, or the errno its own KV_LOOKUP would have answered


KV_LOOKUP_MANY_MAX = 256  # lookups per KVLookupMany


class KVAlloc(Struct):
    """A chunk for a file that does not exist yet (a block being put): pending until KV_PUBLISH
    names it, garbage-collected if never published."""

    size_hint: int = 0


class KVPublish(Struct):
    """Create regular file ``name`` in directory ``parent`` with its whole content in one step: the
    chunks (from KV_ALLOC, already written) and the size. Never replaces: if ``name`` exists the
    chunks are dropped and ``created`` is False. A block put is lookup + alloc + chunk write + this,
    instead of create/open/alloc/commit/release/rename."""

    parent: int
    name: str
    mode: int
    uid: int
    gid: int
    size: int
    chunks: list[ChunkRef]
    chunk_size: int = 0  # the chunk size the writer split the block by (0: an older client: the cluster's)


class KVPublishReply(Struct):
    created: bool
    attr: Attr


META_KV_EXISTS = 60
META_KV_STATUS = 61
META_KV_EVICT = 62  # run one eviction pass now (tests, `kvfs policy evict`)
META_KV_CHUNKS = 63
META_KV_ALLOC = 64
META_KV_PUBLISH = 65
META_KV_LOOKUP = 66
META_KV_LOOKUP_MANY = 67

META_METHODS.update({
    META_KV_EXISTS: (KVExists, ExistsManyReply),
    META_KV_STATUS: (Empty, KVStatusReply),
    META_KV_EVICT: (Empty, KVStatusReply),
    META_KV_CHUNKS: (KVChunks, KVChunksReply),
    META_KV_ALLOC: (KVAlloc, AllocChunkReply),
    META_KV_PUBLISH: (KVPublish, KVPublishReply),
    META_KV_LOOKUP: (KVLookup, KVLookupReply),
    META_KV_LOOKUP_MANY: (KVLookupMany, KVLookupManyReply),
})


# --------------------------------------------------------------------------- meta service: tenants (issue 13)


class TenantSpec(Struct):
    """TENANT_ADD / TENANT_SET. None leaves a setting as it is (SET) or takes the default (ADD: uid/gid
    0, no quota). A quota of 0 means unlimited."""

    name: str
    uid: int | None = None
    gid: int | None = None
    quota_bytes: int | None = None
    quota_files: int | None = None
    quota_kv_blocks: int | None = None


class TenantName(Struct):
    name: str


class TenantInfo(Struct):
    """A tenant's settings and usage (bytes: logical file data; files: inodes; kv_blocks: KV_PUBLISHed files)."""

    name: str
    root_ino: int
    root_path: str
    uid: int
    gid: int
    quota_bytes: int
    quota_files: int
    quota_kv_blocks: int
    used_bytes: int
    files: int
    kv_blocks: int


class TenantListReply(Struct):
    tenants: list[TenantInfo]


META_TENANT_ADD = 120
META_TENANT_SET = 121
META_TENANT_LIST = 122  # admins: every tenant; a tenant's client: its own row
META_TENANT_REMOVE = 123

META_METHODS.update({
    META_TENANT_ADD: (TenantSpec, TenantInfo),
    META_TENANT_SET: (TenantSpec, TenantInfo),
    META_TENANT_LIST: (Empty, TenantListReply),
    META_TENANT_REMOVE: (TenantName, Empty),
})


# --------------------------------------------------------------------------- HA meta (etcd engine)


class MetaMember(Struct):
    address: str
    role: str  # "leader" | "standby"


class EtcdMemberStatus(Struct):
    endpoint: str
    healthy: bool
    is_leader: bool = False
    version: str = ""
    db_size: int = 0
    error: str = ""


class HaStatusReply(Struct):
    """What every meta process (leader or standby) answers about the HA group; engine "rocksdb" when alone."""

    engine: str
    address: str  # the answering process
    role: str  # "leader" | "standby" | "single"
    leader: str
    members: list[MetaMember]
    etcd: list[EtcdMemberStatus]


META_HA_STATUS = 90

META_METHODS.update({
    META_HA_STATUS: (Empty, HaStatusReply),
})

# Meta methods that are safe to send again when a failover left their outcome unknown (the reply was
# lost): reads, and changes that leave the same state when applied twice (a lease renewed twice, a
# commit of the same chunks, a fresh chunk id: the unused one becomes garbage). Anything else (create,
# unlink, rename, publish, ...) fails with EIO instead of running twice.
META_IDEMPOTENT = frozenset({
    META_HELLO, META_LOOKUP, META_GETATTR, META_SETATTR, META_READLINK, META_READDIR, META_STATFS,
    META_GETXATTR, META_LISTXATTR, META_RESOLVE, META_EXISTS_MANY, META_OPEN_WRITE, META_RELEASE_WRITE,
    META_GET_CHUNKS, META_ALLOC_CHUNK, META_COMMIT, META_PURGE, META_RENEW_LEASES, META_REGISTER,
    META_HEARTBEAT, META_LIST_CHUNKSERVERS, META_REPORT_BAD_CHUNK, META_CHUNK_LOCATIONS, META_KV_EXISTS,
    META_KV_STATUS, META_KV_CHUNKS, META_KV_ALLOC, META_REMOTE_LIST, META_REMOTE_INFO, META_HA_STATUS,
    META_TENANT_LIST, META_TENANT_SET, META_DECOMMISSION, META_KV_LOOKUP, META_KV_LOOKUP_MANY,
})


def is_idempotent(method: int, request: Struct) -> bool:
    """Safe to send again after an unknown outcome (a create that may return an existing file is too)."""
    return method in META_IDEMPOTENT or (method == META_MKNODE and not getattr(request, "exclusive", True))


# --------------------------------------------------------------------------- roles (issue 13)
# Who may call what, by the role in the caller's certificate (kvfs.identity). A method not listed is a
# client method: clients, admins and meta (its own background client) may call it. RpcServer enforces
# this from the header, before the request is read (EACCES); a plaintext server (--insecure, kvfs up)
# enforces nothing. Methods only sometimes privileged check their arguments in the handler: setting or
# removing the kvfs.policy xattr (policies, quotas) needs admin (meta/service.py).

CLIENT_ROLES = frozenset({ROLE_CLIENT, ROLE_ADMIN, ROLE_META})
ADMIN_ROLES = frozenset({ROLE_ADMIN})
ANY_ROLE = frozenset(ROLES)

META_ROLES: dict[int, frozenset[str]] = {
    META_HELLO: ANY_ROLE,
    META_REGISTER: frozenset({ROLE_CHUNKSERVER}),  # only certified chunkservers join placement
    META_HEARTBEAT: frozenset({ROLE_CHUNKSERVER}),
    META_REMOTE_ATTACH: ADMIN_ROLES,
    META_REMOTE_DETACH: ADMIN_ROLES,
    META_REMOTE_SYNC: ADMIN_ROLES,
    META_REMOTE_EVICT: ADMIN_ROLES,
    META_KV_EVICT: ADMIN_ROLES,  # an eviction pass on demand
    META_TENANT_ADD: ADMIN_ROLES,  # and not confined to a tenant (meta/tenants.py)
    META_TENANT_SET: ADMIN_ROLES,
    META_TENANT_REMOVE: ADMIN_ROLES,
    META_DECOMMISSION: ADMIN_ROLES,
}

CHUNK_ROLES: dict[int, frozenset[str]] = {
    CHUNK_WRITE: CLIENT_ROLES | {ROLE_CHUNKSERVER},  # chunkservers forward along a replication chain
    CHUNK_DELETE: frozenset({ROLE_META}),
    CHUNK_REPLICATE: frozenset({ROLE_META}),
    CHUNK_VERIFY: frozenset({ROLE_META}),  # reads a whole chunk from disk: meta's bad-chunk checks only
    CHUNK_STAT: ANY_ROLE,
}


def method_roles(service_methods: dict[int, tuple[type[Struct], type[Struct]]]) -> dict[int, frozenset[str]]:
    """method -> the roles that may call it, for one service's method table."""
    special = CHUNK_ROLES if service_methods is CHUNK_METHODS else META_ROLES
    return {m: special.get(m, CLIENT_ROLES) for m in service_methods}
