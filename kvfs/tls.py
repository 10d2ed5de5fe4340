"""TLS material and contexts: mutual TLS against a cluster CA, and the identity a certificate carries.

A TLS directory (``--tls-dir DIR`` or ``KVFS_TLS_DIR``; written by ``kvfs certs issue``) holds:

* ``ca.pem``: the cluster CA; every peer's certificate must chain to it (both directions);
* ``cert.pem`` / ``key.pem``: this process's certificate and key.

A certificate names its holder: CN = name, OU = role (``meta|chunkserver|admin|client``, see
``kvfs.identity``), O = tenant (clients only, optional).

Hostname checking: a client checks that a server's certificate names the address it dialled (an IP
or DNS SAN, given with ``kvfs certs issue --san``) and that its role is the service it meant to
reach (a chunkserver's certificate cannot pass for meta). Servers do not check client addresses:
clients have no fixed address; their certificate alone identifies them.

The process-wide material: ``configure(dir)`` (the CLI, once at start) or, when nothing was
configured, ``KVFS_TLS_DIR`` on first use. Every ``RpcServer`` and ``RpcClient`` that is not given a
context uses it, so meta's calls to chunkservers and a chunkserver's calls to meta and its peers use
the process's own certificate without threading a parameter through every constructor.

Error handling: unreadable or missing material raises ``TlsConfigError`` (a ValueError: the CLI
prints it as one line).
"""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass

from kvfs import identity

ENV = "KVFS_TLS_DIR"
FILES = ("ca.pem", "cert.pem", "key.pem")


class TlsConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Material:
    """The two contexts built from one TLS directory."""

    directory: str
    server: ssl.SSLContext
    client: ssl.SSLContext
    me: identity.Peer  # who this process is (its own certificate)


def _paths(directory: str) -> tuple[str, str, str]:
    directory = os.path.abspath(os.path.expanduser(directory))
    paths = tuple(os.path.join(directory, f) for f in FILES)
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise TlsConfigError(f"TLS dir {directory} lacks {', '.join(missing)} (make them with `kvfs certs issue`)")
    return paths  # type: ignore[return-value]


def _context(purpose: ssl.Purpose, ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: servers demand a client certificate too
    try:
        ctx.load_verify_locations(cafile=ca)
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"cannot load TLS material ({cert}, {key}, {ca}): {exc}") from None
    return ctx


@functools.lru_cache(maxsize=16)
def load(directory: str) -> Material:
    """The server and client contexts of a TLS directory (cached: contexts are reusable)."""
    ca, cert, key = _paths(directory)
    server = _context(ssl.Purpose.CLIENT_AUTH, ca, cert, key)
    # No session tickets: TLS 1.3 sends them after the handshake, and an idle pooled client connection
    # with unread ticket bytes would look closed (RpcClient drops readable idle connections).
    server.num_tickets = 0
    client = _context(ssl.Purpose.SERVER_AUTH, ca, cert, key)
    client.check_hostname = True
    return Material(os.path.abspath(directory), server, client, _own_identity(cert))


def _own_identity(cert_path: str) -> identity.Peer:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    names = {"commonName": NameOID.COMMON_NAME, "organizationalUnitName": NameOID.ORGANIZATIONAL_UNIT_NAME,
             "organizationName": NameOID.ORGANIZATION_NAME}
    subject = [((k, str(a.value)),) for k, oid in names.items() for a in cert.subject.get_attributes_for_oid(oid)]
    return peer_from_cert({"subject": tuple(subject)})


def require_own_role(material: Material, role: str, command: str) -> None:
    """Refuse to serve as ``command`` with another role's certificate (one line for the CLI)."""
    if material.me.role != role:
        raise TlsConfigError(f"{command}: the certificate in {material.directory} has role {material.me.role!r}; "
                             f"issue one with `kvfs certs issue --role {role}`")


# --------------------------------------------------------------------------- the process-wide material

_UNSET = object()
_configured: object | Material | None = _UNSET


def configure(directory: str | None) -> Material | None:
    """Set this process's TLS material (None: plaintext, whatever ``KVFS_TLS_DIR`` says)."""
    global _configured
    _configured = load(directory) if directory else None
    return _configured


def current() -> Material | None:
    """The process's material: what ``configure`` set, else ``KVFS_TLS_DIR``, else None (plaintext)."""
    global _configured
    if _configured is _UNSET:
        directory = os.environ.get(ENV, "")
        _configured = load(directory) if directory else None
    return _configured  # type: ignore[return-value]


def server_context() -> ssl.SSLContext | None:
    m = current()
    return m.server if m else None


def client_context() -> ssl.SSLContext | None:
    m = current()
    return m.client if m else None


# --------------------------------------------------------------------------- certificates -> identities


def _subject(cert: dict) -> dict[str, str]:
    return {k: v for rdn in cert.get("subject", ()) for k, v in rdn}


def peer_from_cert(cert: dict) -> identity.Peer:
    """The identity in a verified certificate (``SSLSocket.getpeercert()`` form).

    Error handling: ``PermissionError(EACCES)`` when the certificate names no known role."""
    subject = _subject(cert)
    role = subject.get("organizationalUnitName", "")
    if role not in identity.ROLES:
        raise PermissionError(13, f"certificate {subject.get('commonName', '?')!r} names no kvfs role (OU={role!r})")
    tenant = subject.get("organizationName", "") if role == identity.ROLE_CLIENT else ""
    return identity.Peer(role=role, tenant=tenant, name=subject.get("commonName", ""), authenticated=True)
