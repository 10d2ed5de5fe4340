"""Bad-chunk reports (issue 13) with real processes: meta asks the named chunkserver to verify its copy
(CHUNK_VERIFY) before it drops a replica, so a false report (any client's) changes nothing, and a real
corruption found by a reader is dropped and copied again from a good replica."""

from __future__ import annotations

import os

from cluster import wait_for

from kvfs import protocol as P
from kvfs.chunkserver.store import chunk_path

MiB = 1 << 20


def holders(cl, path: str) -> set[str]:
    with cl.client() as c:
        return set(c.chunk_map(c.stat(path).ino).chunks[0].replicas)


def test_false_report_keeps_the_replica_and_real_corruption_is_replaced(make_cluster):
    cl = make_cluster(chunkservers=3, replication=2)
    addresses = [p.args[p.args.index("--listen") + 1] for p in cl.servers]
    healthy, victim = os.urandom(MiB + 3), os.urandom(MiB - 11)
    with cl.client() as c:
        c.write_file("/healthy", healthy)
        c.write_file("/victim", victim)
        ref = c.chunk_map(c.stat("/healthy").ino).chunks[0]
        # Anyone may report; nothing is dropped on their word.
        c.call(c.client.meta.request, P.META_REPORT_BAD_CHUNK, P.ReportBadChunk(ref.chunk_id, ref.replicas[0], "lies"))
        bad = c.chunk_map(c.stat("/victim").ino).chunks[0]
    where = bad.replicas[0]  # the copy a reader without local reads tries first
    path = chunk_path(os.path.join(cl.root, f"cs{addresses.index(where)}"), bad.chunk_id)
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))

    with cl.client(local_reads=False) as c:
        assert c.read_file("/victim") == victim  # the checksum mismatch is reported, the good copy served
    wait_for(lambda: where not in holders(cl, "/victim") and len(holders(cl, "/victim")) == 2, 30,
             "the bad copy dropped and the chunk copied again")
    wait_for(lambda: not os.path.exists(path), 30, "the bad copy deleted from its server")
    # Reports are checked in order: the false one was checked before, and its replica stays.
    assert holders(cl, "/healthy") == set(ref.replicas)
    assert "checked out fine: bad-chunk report ignored" in cl.meta.log()
    assert "confirmed bad (checksum mismatch)" in cl.meta.log()
    with cl.client(local_reads=False) as c:
        assert c.read_file("/victim") == victim and c.read_file("/healthy") == healthy
