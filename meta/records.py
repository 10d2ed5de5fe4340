"""On-disk records and key layout of the metadata store (not wire types: those live in kvfs.protocol).

Key layout (all integers big endian so byte order is numeric order)::

    A <ino:8>                 -> Inode
    D <parent:8> <name>       -> <ino:8>              directory entry
    C <ino:8> <index:8>       -> ChunkRecord          file chunk map
    K <chunk_id:8>            -> b""                  live chunk ids (garbage detection)
    X <ino:8> <name>          -> value                extended attributes
    O <ino:8>                 -> <unlinked_at_ns:8>   unlinked but maybe still open (orphans)
    P <chunk_id:8>            -> PendingRecord        allocated, not yet committed (meta/pending.py)
    S <node_id>               -> ServerRecord         chunkserver identities
    T <name>                  -> TenantRecord         tenants (meta/tenants.py)
    H <key_id:4>              -> TokenKeyRecord       chunk capability keys (meta/chunk_keys.py)
    N                         -> Counters
    L                         -> b""                  KV map leases were granted (meta/kv_leases.py)
"""

from __future__ import annotations

import struct

import msgspec

U64 = struct.Struct(">Q")


class Inode(msgspec.Struct, array_like=True):
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    parent: int = 0  # directories only: their single parent (rename loop checks, "..")
    target: str = ""  # symlinks only
    generation: int = 0
    # The tenant whose tree holds this inode ("" = none): inherited from the parent at creation and
    # never changed (rename and link across tenants are refused), so checking it needs no tree walk.
    tenant: str = ""
    kv_block: bool = False  # created whole by KV_PUBLISH: counts against the tenant's KV-block quota
    # A regular file's chunk size (0: made before per-file sizes: the cluster's); a directory's chunk-size
    # policy for new files below it (0: none). meta/layouts.py; never changes once a file has data.
    chunk_size: int = 0


class ChunkRecord(msgspec.Struct, array_like=True):
    chunk_id: int
    length: int


class PendingRecord(msgspec.Struct, array_like=True):
    ino: int  # 0: for a file that does not exist yet (KV publish, remote fill)
    client_id: str


class ServerRecord(msgspec.Struct, array_like=True):
    server_id: int
    address: str
    data_dir: str
    host_id: str
    drain: str = ""  # "" | "draining" | "decommissioned" (meta/decommission.py)


class TenantRecord(msgspec.Struct, array_like=True):
    name: str
    root_ino: int
    uid: int = 0
    gid: int = 0
    quota_bytes: int = 0  # 0: unlimited
    quota_files: int = 0
    quota_kv_blocks: int = 0


class TokenKeyRecord(msgspec.Struct, array_like=True):
    key_id: int
    secret: bytes
    active_from: float  # unix seconds: signs tokens from then until the next key's active_from


class Counters(msgspec.Struct, array_like=True):
    next_ino: int = 2
    next_chunk_id: int = 1
    next_server_id: int = 1
    cluster_id: str = ""


def inode_key(ino: int) -> bytes:
    return b"A" + U64.pack(ino)


def dentry_prefix(parent: int) -> bytes:
    return b"D" + U64.pack(parent)


def dentry_key(parent: int, name: str) -> bytes:
    return b"D" + U64.pack(parent) + name.encode("utf-8", "surrogateescape")


def chunk_prefix(ino: int) -> bytes:
    return b"C" + U64.pack(ino)


def chunk_key(ino: int, index: int) -> bytes:
    return b"C" + U64.pack(ino) + U64.pack(index)


def live_chunk_key(chunk_id: int) -> bytes:
    return b"K" + U64.pack(chunk_id)


def xattr_prefix(ino: int) -> bytes:
    return b"X" + U64.pack(ino)


def xattr_key(ino: int, name: str) -> bytes:
    return b"X" + U64.pack(ino) + name.encode("utf-8", "surrogateescape")


def orphan_key(ino: int) -> bytes:
    return b"O" + U64.pack(ino)


PENDING_PREFIX = b"P"


def pending_key(chunk_id: int) -> bytes:
    return PENDING_PREFIX + U64.pack(chunk_id)


def server_key(node_id: str) -> bytes:
    return b"S" + node_id.encode()


TENANT_PREFIX = b"T"


def tenant_key(name: str) -> bytes:
    return TENANT_PREFIX + name.encode()


COUNTERS_KEY = b"N"
KV_LEASE_FLAG_KEY = b"L"  # present: a meta granted KV map leases, so a starting meta holds binding ops one lease period

TOKEN_KEY_PREFIX = b"H"


def token_key_key(key_id: int) -> bytes:
    return TOKEN_KEY_PREFIX + key_id.to_bytes(4, "big")


encode = msgspec.msgpack.Encoder().encode
_inode_decoder = msgspec.msgpack.Decoder(Inode)
_chunk_decoder = msgspec.msgpack.Decoder(ChunkRecord)
_server_decoder = msgspec.msgpack.Decoder(ServerRecord)
_pending_decoder = msgspec.msgpack.Decoder(PendingRecord)
_counters_decoder = msgspec.msgpack.Decoder(Counters)
_tenant_decoder = msgspec.msgpack.Decoder(TenantRecord)
decode_inode = _inode_decoder.decode
decode_chunk = _chunk_decoder.decode
decode_server = _server_decoder.decode
decode_pending = _pending_decoder.decode
decode_counters = _counters_decoder.decode
decode_tenant = _tenant_decoder.decode
decode_token_key = msgspec.msgpack.Decoder(TokenKeyRecord).decode
