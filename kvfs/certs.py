"""``kvfs certs``: a cluster CA and the certificates of its nodes, admins and clients.

    kvfs certs init-ca DIR
    kvfs certs issue --ca DIR --role ROLE --name NAME [--tenant T] [--san ADDR ...] [--days N] --out DIR

``init-ca`` writes ``ca.pem`` and ``ca-key.pem`` (mode 0600). ``issue`` writes a TLS directory
(``ca.pem``, ``cert.pem``, ``key.pem`` with mode 0600) that ``--tls-dir``/``KVFS_TLS_DIR`` take:
CN = name, OU = role, O = tenant (clients only). Keys are ECDSA P-256.

SANs: meta and chunkserver certificates need a SAN for every address clients dial them by (clients
check it). A meta certificate always gets 127.0.0.1 too: meta's own background client (remote-tier
uploads) dials meta on loopback.

Error handling: a missing CA, a bad role, or an unwritable directory raise ``ValueError`` with one line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from kvfs import identity

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_CREAT


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _outdir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {path}: {exc.strerror or exc}") from None
    return path


def init_ca(directory: str, *, name: str = "kvfs cluster CA", days: int = 3650) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = _outdir(directory)
    if os.path.exists(os.path.join(directory, CA_KEY)):
        raise ValueError(f"{directory} already holds a CA ({CA_KEY}); refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    _write(os.path.join(directory, CA_KEY), _key_pem(key), 0o600)
    _write(os.path.join(directory, CA_CERT), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory


def _load_ca(directory: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        with open(os.path.join(directory, CA_CERT), "rb") as f:
            ca_pem = f.read()
        with open(os.path.join(directory, CA_KEY), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as exc:
        raise ValueError(f"no CA in {directory} ({exc.strerror or exc}); make one with `kvfs certs init-ca {directory}`") from None
    return ca_pem, x509.load_pem_x509_certificate(ca_pem), ca_key


def _san(value: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def issue(ca_dir: str, out: str, *, role: str, name: str, tenant: str = "", sans: tuple[str, ...] = (),
          days: int = 365) -> str:
    """Write a TLS directory for one holder; returns its path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if role not in identity.ROLES:
        raise ValueError(f"bad role {role!r}: expected one of {', '.join(identity.ROLES)}")
    if tenant and role != identity.ROLE_CLIENT:
        raise ValueError("--tenant is for client certificates only")
    if not name:
        raise ValueError("--name must not be empty")
    if days <= 0:
        raise ValueError("--days must be positive")
    ca_pem, ca_cert, ca_key = _load_ca(ca_dir)
    out = _outdir(out)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]
    if tenant:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant))
    if role == identity.ROLE_META and "127.0.0.1" not in sans:
        sans = (*sans, "127.0.0.1")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               # Every holder is both a TLS client and (nodes) a server: meta and chunkservers dial each other.
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(os.path.join(out, "key.pem"), _key_pem(key), 0o600)
    _write(os.path.join(out, "cert.pem"), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(os.path.join(out, "ca.pem"), ca_pem, 0o644)
    return out


# --------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("certs", help="make a cluster CA and issue node, admin and client certificates")
    csub = p.add_subparsers(dest="certs_command", required=True)
    sp = csub.add_parser("init-ca", help="create a cluster CA in DIR (ca.pem, ca-key.pem)")
    sp.add_argument("dir")
    sp.add_argument("--days", type=int, default=3650)
    sp.set_defaults(func=_cmd_init_ca)
    sp = csub.add_parser("issue", help="issue a certificate: writes ca.pem, cert.pem, key.pem to --out")
    sp.add_argument("--ca", required=True, help="the CA directory (from init-ca)")
    sp.add_argument("--role", required=True, help=f"one of {', '.join(identity.ROLES)}")
    sp.add_argument("--name", required=True, help="the holder's name (CN), shown in logs and refusals")
    sp.add_argument("--tenant", default="", help="client certificates: the tenant (O)")
    sp.add_argument("--san", action="append", default=[], metavar="ADDR",
                    help="an IP or DNS name clients dial this node by (repeatable; meta and chunkservers)")
    sp.add_argument("--days", type=int, default=365)
    sp.add_argument("--out", required=True, help="the TLS directory to write (--tls-dir)")
    sp.set_defaults(func=_cmd_issue)


def _cmd_init_ca(args) -> None:
    print(f"CA written to {init_ca(args.dir, days=args.days)} (keep {CA_KEY} secret)")


def _cmd_issue(args) -> None:
    out = issue(args.ca, args.out, role=args.role, name=args.name, tenant=args.tenant, sans=tuple(args.san),
                days=args.days)
    print(f"{args.role} certificate for {args.name!r} written to {out}")
