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


def test_dead_chunkserver_chunks_are_rereplicated(make_cluster):
    cl = make_cluster(chunkservers=3, replication=2, heartbeat_timeout=1.5, rereplicate_delay=0.5)
    data = os.urandom(4 * 1024 * 1024 + 1)
    with cl.client() as c:
        c.write_file("/f", data)
    addresses = [f"127.0.0.1:{p.args[p.args.index('--listen') + 1].split(':')[1]}" for p in cl.servers]
    # Kill a server that holds the first chunk, wait until every chunk has 2 live replicas again.
    victim = addresses.index(sorted(_holders(cl, "/f")[0])[0])
    cl.kill_chunkserver(victim)
    wait_for(lambda: all(len(h - {addresses[victim]}) >= 2 for h in _holders(cl, "/f")), 30,
             "re-replication to 2 live copies")
    # Kill one more original holder: the data must still be readable from the new copies.
    survivors = [i for i in range(3) if i != victim]
    cl.kill_chunkserver(survivors[0])
    time.sleep(2)  # let meta mark it down so reads go to the live copy first
    with cl.client() as c:
        assert c.read_file("/f") == data
