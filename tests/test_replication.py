"""Chain replication and re-replication after a chunkserver dies, with real processes."""

import os
import time

from cluster import wait_for


def _holders(cluster, path):
    with cluster.client() as c:
        return [set(ref.replicas) for ref in c.chunk_map(c.stat(path).ino).chunks]


def test_every_chunk_written_to_r_replicas(cluster):
    data = os.urandom(5 * 1024 * 1024 + 99)
    with cluster.client() as c:
        c.write_file("/replicated", data)
    holders = _holders(cluster, "/replicated")
    assert len(holders) == 6
    assert all(len(h) == cluster.replication for h in holders)


def _write_then_lose_a_holder(make_cluster, path: str, size: int):
    """A 3-server R=2 cluster holding ``path``; a server holding its first chunk is killed and every
    chunk is back to 2 live copies. Returns (cluster, data, server addresses, index of the dead one)."""
    cl = make_cluster(chunkservers=3, replication=2, heartbeat_timeout=1.5, rereplicate_delay=0.5)
    data = os.urandom(size)
    with cl.client() as c:
        c.write_file(path, data)
    addresses = [f"127.0.0.1:{p.args[p.args.index('--listen') + 1].split(':')[1]}" for p in cl.servers]
    victim = addresses.index(min(_holders(cl, path)[0]))
    cl.kill_chunkserver(victim)
    wait_for(lambda: all(len(h - {addresses[victim]}) >= 2 for h in _holders(cl, path)), 30,
             "re-replication to 2 live copies")
    return cl, data, addresses, victim


def test_dead_chunkserver_chunks_are_rereplicated(make_cluster):
    cl, data, _, victim = _write_then_lose_a_holder(make_cluster, "/f", 4 * 1024 * 1024 + 1)
    # Kill one more original holder: the data must still be readable from the new copies.
    survivors = [i for i in range(3) if i != victim]
    cl.kill_chunkserver(survivors[0])
    time.sleep(2)  # let meta mark it down so reads go to the live copy first
    with cl.client() as c:
        assert c.read_file("/f") == data


def test_returning_server_extra_copies_are_trimmed(make_cluster):
    """After re-replication, the dead server's return makes R+1 copies: meta deletes the extras (no leak)."""
    cl, data, _, victim = _write_then_lose_a_holder(make_cluster, "/t", 3 * 1024 * 1024 + 5)
    cl.start_chunkserver(victim)  # comes back with its old copies

    def chunk_files() -> int:
        return sum(len([f for f in files if not f.endswith((".sum", ".tmp"))])
                   for i in range(3) for _, _, files in os.walk(os.path.join(cl.root, f"cs{i}", "chunks")))

    with cl.client() as c:
        chunks = len(c.chunk_map(c.stat("/t").ino).chunks)
    wait_for(lambda: chunk_files() == 2 * chunks and all(len(h) == 2 for h in _holders(cl, "/t")), 30,
             "extra copies trimmed to R=2")
    with cl.client() as c:
        assert c.read_file("/t") == data


def test_open_file_follows_chunks_that_moved(make_cluster):
    """A client that opened a file before its replicas moved (one holder died, the chunk was copied
    elsewhere, then the other holder died too) asks meta where the chunk is now instead of failing."""
    cl = make_cluster(chunkservers=3, replication=2, heartbeat_timeout=1.5, rereplicate_delay=0.5)
    data = os.urandom(1024 * 1024 - 7)  # one chunk
    with cl.client() as c:
        c.write_file("/moved", data)
    addresses = [f"127.0.0.1:{p.args[p.args.index('--listen') + 1].split(':')[1]}" for p in cl.servers]
    first, second = sorted(_holders(cl, "/moved")[0])
    with cl.client(local_reads=False) as reader:  # over TCP: a dead server's files are not read behind its back
        ino = reader.resolve("/moved").ino
        reader.open(ino)  # chunk map with replicas [first, second]
        try:
            cl.kill_chunkserver(addresses.index(first))
            wait_for(lambda: len(_holders(cl, "/moved")[0] - {first}) >= 2, 30, "re-replication")
            cl.kill_chunkserver(addresses.index(second))
            assert reader.read(ino, 0, len(data)) == data
        finally:
            reader.release(ino)
