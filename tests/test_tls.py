"""Mutual TLS, certificates and roles (issue 13) against real processes: a whole TLS cluster works, and
everything without the right certificate is refused with a clear error, never a hang."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import stat
import subprocess
import sys

import pytest
import trio
from cluster import Cluster, free_port, wait_for

from kvfs import certs, tls
from kvfs import protocol as P
from kvfs.rpc import RpcClient

MiB = 1 << 20


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("tls")), chunkservers=3, replication=3, tls=True).start()
    try:
        yield c
    finally:
        c.stop()


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def call(address: str, service: str, method: int, request, ssl_context, data=None):
    """One raw RPC with a chosen TLS context (False: plaintext); returns the reply or raises OSError."""
    methods = P.META_METHODS if service == "meta" else P.CHUNK_METHODS

    async def run():
        client = RpcClient(service, address, methods, timeout=10, connect_timeout=5, ssl_context=ssl_context)
        try:
            return (await client.call(method, request, data))[0]
        finally:
            client.close()

    return trio.run(run)


def cs_address(cluster, i: int = 0) -> str:
    args = cluster.servers[i].args
    return args[args.index("--listen") + 1]


def test_tls_cluster_mount_and_native_client_with_replication_3(secure, tmp_path):
    mnt = secure.mount(str(tmp_path / "mnt"))
    data = os.urandom(3 * MiB + 11)
    with open(os.path.join(mnt, "through-mount"), "wb") as f:
        f.write(data)
    with secure.client(local_reads=False) as c:  # every byte crosses a TLS socket
        assert c.read_file("/through-mount") == data
        c.write_file("/native", data[::-1])
        assert c.read_file("/native") == data[::-1]
        # Every chunk has 3 replicas: each chunkserver holds all 8 chunks (4 per file, 1 MiB chunks).
        wait_for(lambda: all(s.chunks >= 8 for s in c.refresh_servers().servers), 10, "3 replicas of each chunk")
    with open(os.path.join(mnt, "native"), "rb") as f:
        assert f.read() == data[::-1]
    secure.unmount(mnt)
    assert "chunkserver 3 registered" in secure.meta.log()
    assert all("Traceback" not in p.log() for p in [secure.meta, *secure.servers])


def test_connection_without_a_certificate_is_refused(secure):
    ctx = ssl.create_default_context(cafile=os.path.join(secure.tls_dirs["client"], "ca.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for service, address in (("meta", secure.meta_address), ("chunkserver", cs_address(secure))):
        with pytest.raises(PermissionError, match=f"{service} {address}: TLS refused.*CERTIFICATE_REQUIRED"):
            call(address, service, P.META_HELLO if service == "meta" else P.CHUNK_STAT,
                 P.Hello(P.PROTOCOL_VERSION) if service == "meta" else P.Empty(), ctx)


def test_certificate_from_another_ca_is_refused(secure, tmp_path):
    other = certs.init_ca(str(tmp_path / "other-ca"))
    # A client certificate signed by another CA, presented to the real cluster (whose CA it trusts).
    forged = certs.issue(other, str(tmp_path / "forged"), role="admin", name="mallory")
    with open(os.path.join(secure.tls_dirs["client"], "ca.pem"), "rb") as src, \
            open(os.path.join(forged, "ca.pem"), "wb") as dst:
        dst.write(src.read())
    with pytest.raises(PermissionError, match="TLS refused.*(UNKNOWN_CA|DECRYPT_ERROR)"):
        call(secure.meta_address, "meta", P.META_HELLO, P.Hello(P.PROTOCOL_VERSION), tls.load(forged).client)
    # The other way round: a client of another cluster does not trust this cluster's servers.
    stranger = certs.issue(other, str(tmp_path / "stranger"), role="client", name="stranger")
    with pytest.raises(PermissionError, match="TLS refused: the server's certificate is not trusted"), \
            secure.client(tls_dir=stranger, timeout=5):
        pass


def test_plaintext_client_against_a_tls_server_gets_a_clear_error(secure):
    for service, address, method, req in (("meta", secure.meta_address, P.META_HELLO, P.Hello(P.PROTOCOL_VERSION)),
                                          ("chunkserver", cs_address(secure), P.CHUNK_STAT, P.Empty())):
        with pytest.raises(PermissionError, match=f"{service}: this server requires TLS"):
            call(address, service, method, req, False)
    # The CLI without --tls-dir: one line, exit 1.
    out = cli("status", "--meta", secure.meta_address, "--timeout", "5")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "requires TLS" in out.stderr, out.stderr
    out = cli("--tls-dir", secure.tls_dirs["client"], "status", "--meta", secure.meta_address, "--timeout", "5")
    assert out.returncode == 0 and "replication 3" in out.stdout, out.stderr


def test_tls_client_against_a_plaintext_server_fails_fast(secure):
    import threading

    with socket.socket() as listener:  # a plaintext server: reads the ClientHello, finds no kvfs frame, hangs up
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve_once():
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)

        server = threading.Thread(target=serve_once, daemon=True)
        server.start()
        with pytest.raises(OSError, match="TLS handshake failed.*does the server speak TLS") as info:
            call(f"127.0.0.1:{listener.getsockname()[1]}", "meta", P.META_HELLO, P.Hello(P.PROTOCOL_VERSION),
                 tls.load(secure.tls_dirs["client"]).client)
        assert info.value.errno == errno.EIO
        server.join(10)


def test_roles_client_may_not_register_attach_evict_or_set_policies(secure, tmp_path):
    client_ctx = tls.load(secure.tls_dirs["client"]).client
    reg = P.RegisterChunkserver("fake", "10.9.9.9:1", "/x", "h", 1 << 50, 0, [])
    with pytest.raises(PermissionError, match="register needs role chunkserver; client"):
        call(secure.meta_address, "meta", P.META_REGISTER, reg, client_ctx)
    with pytest.raises(PermissionError, match="needs role admin"):
        call(secure.meta_address, "meta", P.META_KV_EVICT, P.Empty(), client_ctx)
    # Chunk deletes and re-replication come only from meta.
    with pytest.raises(PermissionError, match="needs role meta"):
        call(cs_address(secure), "chunkserver", P.CHUNK_DELETE, P.DeleteChunks([1, 2, 3]), client_ctx)
    with pytest.raises(PermissionError, match="needs role meta"):
        call(cs_address(secure), "chunkserver", P.CHUNK_REPLICATE, P.ReplicateChunk(1, ["10.9.9.9:1"]),
             tls.load(secure.tls_dirs["admin"]).client)
    # Remote attach through the CLI: refused with the client certificate, done with the admin's.
    target = tmp_path / "remote"
    target.mkdir()
    with secure.client() as c:
        c.mkdir("/r", parents=True)
        c.mkdir("/kv", parents=True)
        ino = c.stat("/kv").ino
        with pytest.raises(PermissionError, match="kvfs.policy xattr needs role admin"):
            c.setxattr(ino, "kvfs.policy", b'{"quota": 1000}')
        c.setxattr(ino, "user.note", b"clients may set other xattrs")
    attach = ["remote", "attach", "/r", f"file://{target}", "--mode", "readonly", "--meta", secure.meta_address]
    out = cli("--tls-dir", secure.tls_dirs["client"], *attach)
    assert out.returncode == 1 and "needs role admin" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = cli(*attach, env={tls.ENV: secure.tls_dirs["admin"]})
    assert out.returncode == 0, out.stderr
    with secure.client(tls_dir=secure.tls_dirs["admin"]) as admin:
        admin.setxattr(ino, "kvfs.policy", b'{"quota": 1000000}')
        assert admin.getxattr(ino, "kvfs.policy") == b'{"quota": 1000000}'
        assert admin.call(admin.client.meta.request, P.META_KV_EVICT, P.Empty()).passes >= 1
    wait_for(lambda: secure.live_servers() == 3, 10, "the real chunkservers, and no fake one")
    with secure.client() as c:
        assert all(s.address != "10.9.9.9:1" for s in c.refresh_servers().servers)


def test_only_admins_decommission_and_verify_and_refused_writes_answer_over_tls(secure):
    client_ctx, admin_ctx = tls.load(secure.tls_dirs["client"]).client, tls.load(secure.tls_dirs["admin"]).client
    address = cs_address(secure)
    with pytest.raises(PermissionError, match="decommission needs role admin"):
        call(secure.meta_address, "meta", P.META_DECOMMISSION, P.Decommission(address), client_ctx)
    decom = ["chunkserver", "decommission", address, "--meta", secure.meta_address]
    out = cli("--tls-dir", secure.tls_dirs["client"], *decom)
    assert out.returncode == 1 and "needs role admin" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    # An admin passes the role check; draining one of 3 servers for replication 3 is refused (ENOSPC).
    with pytest.raises(OSError, match="would leave 2 live chunkservers for replication 3") as refused:
        call(secure.meta_address, "meta", P.META_DECOMMISSION, P.Decommission(address), admin_ctx)
    assert refused.value.errno == errno.ENOSPC
    out = cli("--tls-dir", secure.tls_dirs["admin"], *decom)
    assert out.returncode == 1 and "replication 3" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    with secure.client() as c:
        assert all(s.state == "live" for s in c.refresh_servers().servers)
    # Verifying a chunk (a whole-chunk read) is meta's.
    with pytest.raises(PermissionError, match="needs role meta"):
        call(address, "chunkserver", P.CHUNK_VERIFY, P.VerifyChunk(1), admin_ctx)
    # A write refused by its token before the data arrived still reaches a TLS client as EACCES.
    data = os.urandom(8 * MiB)
    with pytest.raises(PermissionError, match="needs a capability token"):
        call(address, "chunkserver", P.CHUNK_WRITE, P.WriteChunk(1 << 60, [0] * 128, []), client_ctx, data)


def test_servers_refuse_to_start_without_tls_or_insecure(tmp_path):
    env = {tls.ENV: ""}
    for args in (["meta", "--data-dir", str(tmp_path / "m"), "--listen", f"127.0.0.1:{free_port()}"],
                 ["chunkserver", "--data-dir", str(tmp_path / "c"), "--listen", f"127.0.0.1:{free_port()}",
                  "--meta", "127.0.0.1:1"]):
        out = cli(*args, env=env, timeout=30)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert "needs TLS material: --tls-dir DIR" in out.stderr and "--insecure" in out.stderr
    ca = certs.init_ca(str(tmp_path / "ca"))
    wrong = certs.issue(ca, str(tmp_path / "client"), role="client", name="c")
    out = cli("meta", "--tls-dir", wrong, "--data-dir", str(tmp_path / "m"), env=env, timeout=30)
    assert out.returncode == 1 and "has role 'client'" in out.stderr, out.stderr
    out = cli("up", "--listen", "0.0.0.0:9999", "--data-dir", str(tmp_path / "up"), str(tmp_path / "mnt"), timeout=30)
    assert out.returncode == 1 and "loopback only" in out.stderr, out.stderr


def test_certs_cli_writes_private_keys_and_explains_mistakes(tmp_path):
    ca, out = str(tmp_path / "ca"), str(tmp_path / "node")
    assert cli("certs", "init-ca", ca).returncode == 0
    r = cli("certs", "issue", "--ca", ca, "--role", "chunkserver", "--name", "cs-a", "--san", "127.0.0.1",
            "--san", "node-a.example", "--out", out)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(os.path.join(out, "key.pem")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(ca, certs.CA_KEY)).st_mode) == 0o600
    assert tls.load(out).me.role == "chunkserver" and tls.load(out).me.name == "cs-a"
    r = cli("certs", "issue", "--ca", str(tmp_path / "nope"), "--role", "client", "--name", "x", "--out", out)
    assert r.returncode == 1 and "no CA in" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli("certs", "issue", "--ca", ca, "--role", "root", "--name", "x", "--out", out)
    assert r.returncode == 1 and "bad role 'root'" in r.stderr, r.stderr
    r = cli("certs", "init-ca", ca)
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr


def test_upgrade_from_insecure_to_tls_keeps_the_data(tmp_path):
    cluster = Cluster(str(tmp_path / "up"), chunkservers=1, replication=1)
    data = os.urandom(2 * MiB + 3)
    try:
        cluster.start()
        with cluster.client() as c:
            c.write_file("/kept", data)
        cluster.stop()
        cluster.tls = True  # the same data dirs and ports, now with certificates
        cluster.start()
        with cluster.client(local_reads=False) as c:
            assert c.read_file("/kept") == data
        with pytest.raises(PermissionError, match="requires TLS"):
            call(cluster.meta_address, "meta", P.META_HELLO, P.Hello(P.PROTOCOL_VERSION), False)
    finally:
        cluster.stop()
