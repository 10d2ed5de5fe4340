"""Chunk capabilities (issue 13): raw RPCs straight to chunkservers are refused without a valid token
for that chunk and operation; committed chunks are never overwritten; keys survive meta restarts and
reach restarted chunkservers; clients renew tokens that expired while a file stayed open.

Everything runs against real processes (tests/cluster.py). The keys are read the way an attacker on a
plaintext network could: a heartbeat to meta as a registered server (TLS restricts that to chunkservers).
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import time

import pytest
import trio
from cluster import Proc, free_port, wait_for

from kvfs import captoken
from kvfs import protocol as P
from kvfs.chunkserver.store import block_checksums
from kvfs.meta.chunk_keys import KeyRing
from kvfs.meta.engine_memory import MemoryEngine
from kvfs.rpc import ConnectError, RpcClient

KiB = 1024


def call(service: str, address: str, method: int, request, data=None):
    """One raw RPC; returns (reply, bulk data)."""
    methods = P.CHUNK_METHODS if service == "chunkserver" else P.META_METHODS

    async def go():
        client = RpcClient(service, address, methods, timeout=10.0, connect_timeout=5.0)
        try:
            return await client.call(method, request, data)
        finally:
            client.close()

    return trio.run(go)


def read_raw(address: str, chunk_id: int, token: bytes, length: int = 1 << 30) -> bytes:
    _, data = call("chunkserver", address, P.CHUNK_READ, P.ReadChunk(chunk_id, 0, length, token))
    return bytes(data or b"")


def write_raw(address: str, chunk_id: int, data: bytes, token: bytes, chain: list[str] | None = None) -> None:
    call("chunkserver", address, P.CHUNK_WRITE, P.WriteChunk(chunk_id, block_checksums(data), chain or [], True, token),
         data)


def first_chunk(cluster, path: str) -> P.ChunkRef:
    with cluster.client() as c:
        return c.chunk_map(c.stat(path).ino).chunks[0]


def meta_keys(cluster) -> dict[int, bytes]:
    """The keys meta hands chunkservers, fetched with a heartbeat that repeats a live server's numbers."""
    reply, _ = call("meta", cluster.meta_address, P.META_LIST_CHUNKSERVERS, P.Empty())
    s = next(s for s in reply.servers if s.alive)
    hb, _ = call("meta", cluster.meta_address, P.META_HEARTBEAT, P.Heartbeat(s.server_id, s.capacity, s.used, s.chunks))
    assert hb.keys
    return {k.key_id: k.secret for k in hb.keys}


def sign_with_meta_key(cluster, chunk_id: int, ops: int, expires: int) -> bytes:
    key_id, secret = max(meta_keys(cluster).items())  # any accepted key
    return captoken.sign(key_id, secret, chunk_id, ops, expires)


@pytest.fixture(scope="module")
def two_files(cluster):
    a, b = os.urandom(300 * KiB), os.urandom(100 * KiB)
    with cluster.client() as c:
        c.mkdir("/tokens", exist_ok=True)
        c.write_file("/tokens/a", a)
        c.write_file("/tokens/b", b)
    return (a, first_chunk(cluster, "/tokens/a")), (b, first_chunk(cluster, "/tokens/b"))


def test_valid_read_token_reads(two_files):
    (a, ref), _ = two_files
    assert ref.token and len(ref.token) == captoken.TOKEN_SIZE
    for address in ref.replicas:
        assert read_raw(address, ref.chunk_id, ref.token) == a


def test_refusals_are_eacces(cluster, two_files):
    (a, ref), (_, other) = two_files
    cid, where = ref.chunk_id, ref.replicas[0]
    now = int(time.time())
    flipped = ref.token[:-1] + bytes([ref.token[-1] ^ 1])
    cases = {
        "needs a capability token": b"",
        "malformed": b"x" * 7,
        "expired": sign_with_meta_key(cluster, cid, P.TOKEN_READ, now - 5),
        "bad signature": flipped,
        "is for chunk": other.token,
        "unknown key": captoken.sign(4242, secrets.token_bytes(32), cid, P.TOKEN_READ, now + 600),
    }
    for reason, token in cases.items():
        with pytest.raises(PermissionError, match=reason):
            read_raw(where, cid, token)
    # A read token neither writes, deletes nor replicates.
    with pytest.raises(PermissionError, match="does not allow write"):
        write_raw(where, cid, b"evil" * 100, ref.token)
    with pytest.raises(PermissionError, match="does not allow delete"):
        call("chunkserver", where, P.CHUNK_DELETE, P.DeleteChunks([cid], [ref.token]))
    with pytest.raises(PermissionError, match="does not allow replicate"):
        call("chunkserver", where, P.CHUNK_REPLICATE, P.ReplicateChunk(cid, [other.replicas[0]], ref.token, ref.token))
    with pytest.raises(PermissionError, match="one capability token per chunk"):
        call("chunkserver", where, P.CHUNK_DELETE, P.DeleteChunks([cid]))
    # Nothing of the above touched the chunk.
    assert read_raw(where, cid, ref.token) == a


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        assert got, "connection closed before the reply"
        buf += got
    return buf


def test_refused_write_is_answered_before_its_data(two_files):
    """A CHUNK_WRITE's token is checked before its data is received (RpcServer pre-check): a bad token
    declaring 64 MiB is refused while not one byte of the data was sent, then the connection is closed."""
    (a, ref), _ = two_files
    address = ref.replicas[0]
    host, port = address.rsplit(":", 1)
    size = 64 << 20
    bad = captoken.sign(4242, secrets.token_bytes(32), ref.chunk_id + 1, P.TOKEN_WRITE, int(time.time()) + 600)
    payload = P.encode(P.WriteChunk(ref.chunk_id + 1, [0] * (size // P.CHECKSUM_BLOCK), [], True, bad))
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_WRITE, 0, 7, len(payload), size) + payload)
        frame = P.unpack_header(_recv_exactly(sock, P.HEADER_SIZE))  # a socket timeout here: it waited for data
        message = P.decode(P.ErrorReply, _recv_exactly(sock, frame.payload_len)).message
        assert (frame.status, frame.request_id) == (errno.EACCES, 7)
        assert "unknown key 4242" in message
        try:
            assert sock.recv(1) == b""  # closed: the unsent data can't be mistaken for a next frame
        except ConnectionResetError:
            pass
    # A client that sends the whole 64 MiB anyway gets the refusal too (not a broken pipe), and the
    # server keeps serving.
    with pytest.raises(PermissionError, match="unknown key 4242"):
        write_raw(address, ref.chunk_id + 1, os.urandom(size), bad)
    assert read_raw(address, ref.chunk_id, ref.token) == a


def test_committed_chunk_is_never_overwritten(cluster):
    """A write token (handed to a legitimate writer) cannot replace a chunk once it holds data."""
    alloc, _ = call("meta", cluster.meta_address, P.META_KV_ALLOC, P.KVAlloc(64 * KiB))
    assert alloc.token and captoken.fields(alloc.token)[3] == P.TOKEN_READ | P.TOKEN_WRITE
    good, evil = os.urandom(64 * KiB), os.urandom(64 * KiB)
    write_raw(alloc.replicas[0], alloc.chunk_id, good, alloc.token, alloc.replicas[1:])
    for address in alloc.replicas:
        with pytest.raises(FileExistsError):
            write_raw(address, alloc.chunk_id, evil, alloc.token)
        assert read_raw(address, alloc.chunk_id, alloc.token) == good
    # The same bytes again (a retried write) succeed without rewriting.
    write_raw(alloc.replicas[0], alloc.chunk_id, good, alloc.token, alloc.replicas[1:])
    assert read_raw(alloc.replicas[0], alloc.chunk_id, alloc.token) == good


def test_delete_needs_a_delete_token(cluster):
    alloc, _ = call("meta", cluster.meta_address, P.META_KV_ALLOC, P.KVAlloc(4 * KiB))
    data = os.urandom(4 * KiB)
    where = alloc.replicas[0]
    write_raw(where, alloc.chunk_id, data, alloc.token)
    with pytest.raises(PermissionError, match="does not allow delete"):
        call("chunkserver", where, P.CHUNK_DELETE, P.DeleteChunks([alloc.chunk_id], [alloc.token]))
    assert read_raw(where, alloc.chunk_id, alloc.token) == data
    token = sign_with_meta_key(cluster, alloc.chunk_id, P.TOKEN_DELETE, int(time.time()) + 60)
    call("chunkserver", where, P.CHUNK_DELETE, P.DeleteChunks([alloc.chunk_id], [token]))
    with pytest.raises(FileNotFoundError):
        read_raw(where, alloc.chunk_id, alloc.token)


def test_tokens_survive_meta_and_chunkserver_restarts(make_cluster):
    cluster = make_cluster(chunkservers=2, replication=2)
    data = os.urandom(200 * KiB)
    with cluster.client() as c:
        c.write_file("/f", data)
    ref = first_chunk(cluster, "/f")
    key_before = captoken.fields(ref.token)[0]

    cluster.restart_meta()
    cluster.wait_servers(2)
    for address in ref.replicas:  # chunkservers re-registered with the restarted meta: same keys
        assert read_raw(address, ref.chunk_id, ref.token) == data
    assert captoken.fields(first_chunk(cluster, "/f").token)[0] == key_before

    cluster.kill_chunkserver(0)
    cluster.start_chunkserver(0)
    cluster.wait_servers(2)

    def relearned() -> bool:
        try:
            return all(read_raw(a, ref.chunk_id, ref.token) == data for a in ref.replicas)
        except (ConnectError, BlockingIOError):  # restarting, or not registered yet
            return False

    wait_for(relearned, 20, "the restarted chunkserver to learn the keys", interval=0.2)


def test_chunkserver_without_keys_refuses_with_eagain(tmp_path):
    port = free_port()
    proc = Proc(["chunkserver", "--insecure", "--meta", f"127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{port}",
                 "--data-dir", str(tmp_path / "cs")], str(tmp_path / "cs.log"))
    proc.start()
    try:
        def refused() -> OSError | None:
            try:
                read_raw(f"127.0.0.1:{port}", 1, b"\0" * captoken.TOKEN_SIZE)
            except BlockingIOError as exc:
                return exc
            except ConnectionError:
                return None
            except OSError as exc:
                if "connect" in str(exc).lower():
                    return None  # not listening yet
                raise
            return None

        exc = wait_for(refused, 20, "the chunkserver to listen", interval=0.2)
        assert exc.errno == errno.EAGAIN and "no capability keys" in str(exc)
    finally:
        proc.kill()


def test_client_reads_past_token_expiry(make_cluster):
    """A file that stays open longer than its tokens live still reads (the client renews them)."""
    cluster = make_cluster(chunkservers=2, replication=1, meta_args=("--chunk-token-seconds", "1"))
    data = os.urandom(3 * 1024 * KiB + 5)  # 4 chunks of 1 MiB
    with cluster.client() as c:
        c.write_file("/long", data)
    # Through the chunkservers (which check tokens), nothing read ahead or cached before the wait.
    with cluster.client(local_reads=False, prefetch=False, read_cache_chunks=0) as c:
        ino = c.stat("/long").ino
        c.open(ino)
        assert c.read(ino, 5, 1000) == data[5:1005]
        ref = c.client.files[ino].chunks[2]
        stale = ref.token
        time.sleep(2.5)
        with pytest.raises(PermissionError, match="expired"):
            read_raw(ref.replicas[0], ref.chunk_id, stale)
        assert c.read(ino, 7, len(data)) == data[7:]
        assert ref.token != stale  # renewed in place: later reads of the chunk use the new one
        c.release(ino)


def test_mount_reads_past_token_expiry(make_cluster, tmp_path):
    """The mount keeps chunk maps (and their tokens) of open files: a read after they expired works."""
    cluster = make_cluster(chunkservers=1, replication=1, meta_args=("--chunk-token-seconds", "1"))
    data = os.urandom(8 * 1024 * KiB)  # 8 chunks of 1 MiB
    with cluster.client() as c:
        c.write_file("/big", data)
    mnt = cluster.mount(str(tmp_path / "mnt"), "--no-local-reads")
    with open(os.path.join(mnt, "big"), "rb") as f:
        assert f.read(4096) == data[:4096]
        time.sleep(2.5)  # past the tokens of the chunk map the mount fetched at open
        f.seek(7 * 1024 * KiB)  # a chunk nothing has read or prefetched yet
        assert f.read() == data[7 * 1024 * KiB:]
    cluster.unmount(mnt)


def test_key_ring_rotates_and_persists():
    now = [1_000_000.0]
    engine = MemoryEngine()
    ring = KeyRing(engine, token_seconds=600, rotate_seconds=3600, clock=lambda: now[0])
    assert [k.key_id for k in ring.accepted()] == [1, 2]  # the signing key and the next one, sent ahead
    assert captoken.fields(ring.issue(7, P.TOKEN_READ))[0] == 1
    now[0] += 3600
    assert captoken.fields(ring.issue(7, P.TOKEN_READ))[0] == 2
    assert [k.key_id for k in ring.accepted()] == [1, 2, 3]  # key 1's tokens may still be alive
    now[0] += 602
    assert [k.key_id for k in ring.accepted()] == [2, 3]
    again = KeyRing(engine, token_seconds=600, rotate_seconds=3600, clock=lambda: now[0])
    assert again.accepted() == ring.accepted()
    verifier = captoken.Verifier(clock=lambda: now[0])
    verifier.set_keys(again.accepted())
    verifier.check(ring.issue(9, P.TOKEN_READ | P.TOKEN_WRITE), 9, P.TOKEN_WRITE)


def test_standby_that_takes_over_accepts_the_leaders_tokens(tmp_path):
    """HA on etcd: the keys live in etcd, so tokens the old leader issued still read after a failover,
    and the new leader signs with the same key."""
    import signal

    from etcd import HaCluster, etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd is not installed (./dev.sh test installs it)")
    ha = HaCluster(str(tmp_path / "ha"), metas=2, chunkservers=2, replication=2).start()
    try:
        data = os.urandom(150 * KiB)
        with ha.client() as c:
            c.write_file("/f", data)
            ref = c.chunk_map(c.stat("/f").ino).chunks[0]
        ha.meta_procs[ha.leader()].kill(signal.SIGKILL)
        ha.wait_leader()
        ha.wait_servers(2)
        for address in ref.replicas:
            assert read_raw(address, ref.chunk_id, ref.token) == data
        with ha.client() as c:
            fresh = c.chunk_map(c.stat("/f").ino).chunks[0]
        assert captoken.fields(fresh.token)[0] == captoken.fields(ref.token)[0]
    finally:
        ha.stop()


def test_a_young_token_is_handed_out_again_and_an_aging_one_is_not():
    """Meta reuses the token it signed a moment ago for the same chunk and operations (a KV lookup
    stamps the same chunk maps again and again), but never one with less than a token's life minus
    ``reuse_seconds`` left, nor one of a key that no longer signs."""
    now = [1_000_000.0]
    ring = KeyRing(MemoryEngine(), token_seconds=600, rotate_seconds=3600, clock=lambda: now[0])
    first = ring.issue(7, P.TOKEN_READ)
    now[0] += 30
    assert ring.issue(7, P.TOKEN_READ) == first  # 570 s of 600 left: reused
    assert ring.issue(7, P.TOKEN_READ | P.TOKEN_WRITE) != first  # other operations: its own token
    assert ring.issue(8, P.TOKEN_READ) != first
    now[0] += 31  # 61 s since it was signed: more than reuse_seconds (60) of its life gone
    fresh = ring.issue(7, P.TOKEN_READ)
    assert fresh != first and captoken.fields(fresh)[2] >= now[0] + 600
    now[0] += 3600  # the next key signs now
    rotated = ring.issue(7, P.TOKEN_READ)
    assert captoken.fields(rotated)[0] == captoken.fields(fresh)[0] + 1
    verifier = captoken.Verifier(clock=lambda: now[0])
    verifier.set_keys(ring.accepted())
    verifier.check(rotated, 7, P.TOKEN_READ)
