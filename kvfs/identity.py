"""Who is calling: the identity of the peer on the other end of an RPC connection.

The RPC server sets ``current_peer`` for the task that serves a connection, before any handler runs, so
a handler (or anything it calls) asks ``peer()`` instead of threading the caller through every
signature. On a TLS connection the identity comes from the verified client certificate (see
``kvfs.tls``); on a plaintext connection (``--insecure``, or ``kvfs up`` on loopback) there is no
identity, and the peer is ``INSECURE``: every method is allowed, as on a trusted network.

Roles:
- ``meta``: a metadata server (it calls chunkservers: replication, deletes).
- ``chunkserver``: a storage node (it registers and heartbeats with meta, and forwards writes to the
  next replica).
- ``admin``: an operator (remote attach/detach, policies and quotas, tenants, decommission).
- ``client``: a mount or a native client, confined to its tenant when it has one.
"""

from __future__ import annotations

import errno
from contextvars import ContextVar
from dataclasses import dataclass

ROLE_META = "meta"
ROLE_CHUNKSERVER = "chunkserver"
ROLE_ADMIN = "admin"
ROLE_CLIENT = "client"
ROLES = (ROLE_META, ROLE_CHUNKSERVER, ROLE_ADMIN, ROLE_CLIENT)


@dataclass(frozen=True)
class Peer:
    role: str
    tenant: str = ""  # "" = not confined to a tenant (services, admins, plaintext peers)
    name: str = ""  # the certificate's common name, for logs
    authenticated: bool = False  # True only when a certificate was verified

    def describe(self) -> str:
        who = self.name or "anonymous"
        return f"{who} ({self.role}{', tenant ' + self.tenant if self.tenant else ''})"


# A plaintext connection: nothing is verified, so nothing can be refused by identity.
INSECURE = Peer(role=ROLE_ADMIN, name="insecure")

current_peer: ContextVar[Peer] = ContextVar("kvfs_current_peer", default=INSECURE)


def peer() -> Peer:
    """The identity of whoever sent the request being served (``INSECURE`` outside a TLS connection)."""
    return current_peer.get()


def require_role(*roles: str, what: str = "this request") -> Peer:
    """The current peer, or ``PermissionError(EACCES)`` naming who was refused and why."""
    caller = current_peer.get()
    if caller is INSECURE or caller.role in roles:
        return caller
    raise PermissionError(errno.EACCES, f"{what} needs role {' or '.join(roles)}; {caller.describe()} may not")
