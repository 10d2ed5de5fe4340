"""Chunk capabilities: short-lived tokens, signed by meta, that a chunkserver checks before it reads,
writes, deletes or replicates a chunk (like HDFS block tokens; issue 13).

A token names its key, the chunk id, an expiry (unix seconds) and the operations it allows
(``P.TOKEN_*`` bits), followed by a truncated HMAC-SHA256 over all of that (layout: ``P.CHUNK_TOKEN``).
Meta holds the keys (meta/chunk_keys.py: generated, persisted, rotated) and hands them to
chunkservers in register and heartbeat replies; ``Verifier`` is the chunkserver's side.

Error handling: ``check`` raises ``PermissionError(EACCES)`` with a one-line reason (no token,
malformed, unknown key, bad signature, expired, wrong chunk, wrong operation), or
``BlockingIOError(EAGAIN)`` while the verifier has no keys yet (meta not reached).
"""

from __future__ import annotations

import errno
import hmac
import time

from kvfs import protocol as P

OPS = {P.TOKEN_READ: "read", P.TOKEN_WRITE: "write", P.TOKEN_DELETE: "delete", P.TOKEN_REPLICATE: "replicate"}
TOKEN_SIZE = P.CHUNK_TOKEN.size + P.CHUNK_TOKEN_MAC


def _mac(secret: bytes, header: bytes) -> bytes:
    return hmac.digest(secret, P.CHUNK_TOKEN_DOMAIN + header, "sha256")[:P.CHUNK_TOKEN_MAC]


def sign(key_id: int, secret: bytes, chunk_id: int, ops: int, expires: int) -> bytes:
    """A token for ``ops`` on ``chunk_id`` until unix second ``expires``, signed with key ``key_id``."""
    header = P.CHUNK_TOKEN.pack(key_id, chunk_id, expires, ops)
    return header + _mac(secret, header)


def fields(token: bytes) -> tuple[int, int, int, int]:
    """(key id, chunk id, expires, ops) of a well-formed token, unverified (tests and logs)."""
    return P.CHUNK_TOKEN.unpack_from(token)


def _refuse(message: str) -> PermissionError:
    return PermissionError(errno.EACCES, message)


class Verifier:
    """The keys a chunkserver accepts (the latest set meta sent) and the check of one token."""

    def __init__(self, clock=time.time) -> None:
        self.keys: dict[int, bytes] = {}
        self.clock = clock

    def set_keys(self, keys: list[P.ChunkKey]) -> None:
        if keys:  # an empty list (a meta that predates capabilities) must not erase what we have
            self.keys = {k.key_id: k.secret for k in keys}

    def check(self, token: bytes, chunk_id: int, op: int) -> None:
        """Allow ``op`` on ``chunk_id`` only with a valid token (see the module's error handling)."""
        name = OPS.get(op, str(op))
        if not self.keys:
            raise BlockingIOError(errno.EAGAIN, "chunkserver has no capability keys yet (meta not reached); retry")
        if not token:
            raise _refuse(f"chunk {chunk_id:x}: {name} needs a capability token")
        if len(token) != TOKEN_SIZE:
            raise _refuse(f"chunk {chunk_id:x}: malformed capability token")
        header, mac = token[:P.CHUNK_TOKEN.size], token[P.CHUNK_TOKEN.size:]
        key_id, token_chunk, expires, ops = P.CHUNK_TOKEN.unpack(header)
        secret = self.keys.get(key_id)
        if secret is None:
            raise _refuse(f"chunk {chunk_id:x}: capability token signed with unknown key {key_id}")
        if not hmac.compare_digest(mac, _mac(secret, header)):
            raise _refuse(f"chunk {chunk_id:x}: capability token has a bad signature")
        if expires < self.clock():
            raise _refuse(f"chunk {chunk_id:x}: capability token expired")
        if token_chunk != chunk_id:
            raise _refuse(f"chunk {chunk_id:x}: capability token is for chunk {token_chunk:x}")
        if not ops & op:
            raise _refuse(f"chunk {chunk_id:x}: capability token does not allow {name}")
