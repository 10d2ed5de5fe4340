"""KV map leases (meta/kv_leases.py, kvfs/kv/native_cached.py) against real clusters.

A client that got a block's chunk map with a lease reads it without asking meta until the lease ends;
meta acknowledges a re-put of a leased name only after the lease. These tests check that a leased read
needs no meta (meta stopped), that a delete + re-put by another client is never read as the old bytes
once acknowledged (also across a meta restart), that checksums still catch bad chunk files under a
leased map, that old clients get no lease, and that meta's lease table stays bounded. Orderings are
checked on this process's monotonic clock (every client here runs in it); nothing asserts a duration.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import msgspec
import pytest
import torch
from cluster import wait_for
from test_kv_native_cache import MID, _bounded, block_for, chunk_files, flip_byte, lease_until, outlive_leases

from kvfs import protocol as P
from kvfs.chunkserver.store import SUM_SUFFIX
from kvfs.kv import BlockError, KVStore, block_hashes
from kvfs.meta import records as R
from kvfs.meta.engine_memory import MemoryEngine
from kvfs.meta.kv_leases import KVLeases


def leased_cluster(make_cluster, seconds: float, **kwargs):
    return make_cluster(meta_args=("--kv-lease-seconds", str(seconds)), **kwargs)


def kv_chunks_served(cluster) -> float:
    return sum(n for m, n in cluster.meta_rpcs().items() if m.upper().endswith("KV_CHUNKS"))


def test_leased_reads_skip_meta_until_the_lease_ends(make_cluster):
    """With meta stopped (SIGSTOP), a batch whose maps are leased still reads, bit-exact; past the lease
    the get fails with an OSError within the client's timeout; meta resumed, reads work again."""
    from cluster import free_port

    cluster = leased_cluster(make_cluster, 8, meta_metrics_port=free_port())
    with cluster.client(timeout=3.0) as client:
        s = KVStore("/kvlease/stop", MID, client=client)
        hs = block_hashes(range(16 * 4), 16, salt="stop")
        want = [block_for(MID, h) for h in hs]
        s.put_many(list(zip(hs, want)))
        assert all(torch.equal(g, w) for g, w in zip(s.get_many(hs), want))  # maps cached and leased
        served = kv_chunks_served(cluster)
        for _ in range(5):
            assert all(torch.equal(g, w) for g, w in zip(s.get_many(hs), want))
        assert kv_chunks_served(cluster) == served  # no META_KV_CHUNKS while leased
        cluster.meta.popen.send_signal(signal.SIGSTOP)  # not kill_meta: it waits for an exit
        try:
            assert time.monotonic() < lease_until(s)
            finished, res = _bounded(lambda: s.get_many(hs), 60)
            assert finished and isinstance(res, list), res
            assert all(torch.equal(g, w) for g, w in zip(res, want))
            outlive_leases(s)
            finished, res = _bounded(lambda: s.get_many(hs), 60)
            assert finished, "get_many hung past the lease with meta stopped"
            assert isinstance(res, OSError), res
        finally:
            cluster.meta.popen.send_signal(signal.SIGCONT)
        finished, res = _bounded(lambda: s.get_many(hs), 60)
        assert finished and isinstance(res, list), res
        assert all(torch.equal(g, w) for g, w in zip(res, want))
        s.close()


def keep_old_chunk_files(client, store: KVStore, h: str) -> dict[str, bytes]:
    files = {}
    for path in chunk_files(client, store, h):
        for p in (path, path + SUM_SUFFIX):
            with open(p, "rb") as f:
                files[p] = f.read()
    return files


def put_back(files: dict[str, bytes]) -> None:
    """The old chunk files, as long as meta's lazy deletion has not reached them (else put back): a stale
    map would read them, checksums and all."""
    for p, data in files.items():
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(data)


def test_reput_is_acknowledged_after_the_lease_and_never_read_old(make_cluster):
    """Client A holds a lease on a block's map; client B deletes the block and puts other bytes under
    the name. B's put returns only after A's lease ended, and A then reads the new bytes, though the
    old chunk files are still there. Then the same while A reads in a loop: no read that started after
    the put returned gives the old bytes."""
    cluster = leased_cluster(make_cluster, 2)
    with cluster.client() as a, cluster.client() as b:
        sa = KVStore("/kvlease/reput", MID, client=a)
        sb = KVStore("/kvlease/reput", MID, client=b)
        h = block_hashes(range(16), 16, salt="reput")[0]
        versions = [block_for(MID, h, salt=k) for k in range(3)]
        sb.put(h, versions[0])
        assert torch.equal(sa.get(h), versions[0])
        held = lease_until(sa)
        assert held > 0
        old_files = keep_old_chunk_files(a, sa, h)
        assert sb.delete(h)
        assert sb.put(h, versions[1])
        acked = time.monotonic()
        assert acked >= held  # the put's acknowledgement waited for A's lease
        put_back(old_files)
        assert torch.equal(sa.get(h), versions[1])

        reads: list[tuple[float, torch.Tensor | None]] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                started = time.monotonic()
                got = sa.get(h)
                reads.append((started, None if got is None else got.clone()))

        t = threading.Thread(target=reader)
        t.start()
        try:
            time.sleep(0.5)
            assert sb.delete(h)
            assert sb.put(h, versions[2])
            acked = time.monotonic()
            time.sleep(0.5)
        finally:
            stop.set()
            t.join(60)
        after = [got for started, got in reads if started > acked]
        assert after, "the reader made no read after the re-put"
        assert all(got is not None and torch.equal(got, versions[2]) for got in after)
        assert all(got is None or any(torch.equal(got, v) for v in versions[1:]) for _, got in reads)
        sa.close()
        sb.close()


def test_restarted_meta_holds_publishes_for_a_lease_period(make_cluster):
    """Meta restarts and has lost its lease table: a delete + re-put right after the restart is still
    acknowledged only after the lease A got from the previous meta ended."""
    cluster = leased_cluster(make_cluster, 12)
    with cluster.client() as a:
        sa = KVStore("/kvlease/restart", MID, client=a)
        h = block_hashes(range(16), 16, salt="restart")[0]
        old, new = block_for(MID, h), block_for(MID, h, salt=1)
        sa.put(h, old)
        assert torch.equal(sa.get(h), old)
        held = lease_until(sa)
        old_files = keep_old_chunk_files(a, sa, h)
        cluster.restart_meta()
        cluster.wait_servers(3)
        with cluster.client(timeout=30.0) as b:  # its put is held for up to the lease period
            sb = KVStore("/kvlease/restart", MID, client=b)
            assert time.monotonic() < held  # else this test would check nothing
            assert sb.delete(h)
            assert sb.put(h, new)
            acked = time.monotonic()
            sb.close()
        assert acked >= held
        put_back(old_files)
        assert torch.equal(sa.get(h), new)
        sa.close()


def test_bad_chunk_files_under_a_leased_map_are_caught(make_cluster):
    """A corrupt or truncated chunk file read through a leased map (no meta round trip) fails its
    checksums: the block comes from the other replica, or the get fails; never wrong bytes."""
    cluster = leased_cluster(make_cluster, 30)
    with cluster.client() as client:
        s = KVStore("/kvlease/bad", MID, client=client)
        hs = block_hashes(range(16 * 3), 16, salt="bad")
        want = [block_for(MID, h) for h in hs]
        s.put_many(list(zip(hs, want)))
        assert all(torch.equal(g, w) for g, w in zip(s.get_many(hs), want))
        files = [chunk_files(client, s, h) for h in hs]
        flip_byte(files[0][0], 10_000)  # one replica of block 0
        os.truncate(files[1][0], os.path.getsize(files[1][0]) - 5000)  # one replica of block 1
        for path in files[2]:  # every replica of block 2
            flip_byte(path, 20_000)
        assert time.monotonic() < lease_until(s)
        got = s.get_many(hs[:2])
        assert all(torch.equal(g, w) for g, w in zip(got, want[:2]))
        out = torch.full(MID.block_shape, 7, dtype=MID.torch_dtype())
        with pytest.raises((OSError, BlockError)):
            s.get(hs[2], out)
        s.close()


class OldKVChunksReply(msgspec.Struct, array_like=True):
    files: list[P.GetChunksReply | None]


def test_old_clients_get_no_lease(make_cluster):
    """A META_KV_CHUNKS request without the lease field (an older client) gets ``lease_seconds`` 0 and
    the reply still decodes as the old struct; a meta with ``--kv-lease-seconds 0`` grants none, and its
    clients check every batch with meta as before."""
    from cluster import free_port

    cluster = leased_cluster(make_cluster, 0, meta_metrics_port=free_port())
    with cluster.client() as client:
        s = KVStore("/kvlease/old", MID, client=client)
        h = block_hashes(range(16), 16, salt="old")[0]
        s.put(h, block_for(MID, h))
        path = s.path(h)
        reply = client.call(client.client.meta.request, P.META_KV_CHUNKS, P.KVChunks([path], lease=True))
        assert reply.lease_seconds == 0.0 and reply.files[0] is not None
        served = kv_chunks_served(cluster)
        for _ in range(3):
            assert torch.equal(s.get(h), block_for(MID, h))
        assert kv_chunks_served(cluster) - served == 3
        s.close()
    leased = leased_cluster(make_cluster, 5)
    with leased.client() as client:
        s = KVStore("/kvlease/old", MID, client=client)
        h = block_hashes(range(16), 16, salt="old")[0]
        s.put(h, block_for(MID, h))
        old = client.call(client.client.meta.request, P.META_KV_CHUNKS, P.KVChunks([s.path(h)]))
        assert old.lease_seconds == 0.0
        new = client.call(client.client.meta.request, P.META_KV_CHUNKS, P.KVChunks([s.path(h)], lease=True))
        assert new.lease_seconds == 5.0
        as_old = msgspec.msgpack.decode(P.encode(new), type=OldKVChunksReply)
        assert as_old.files == new.files
        s.close()


def test_lease_table_is_bounded_and_the_restart_flag_clears():
    """Meta's table (in process, on the memory engine, a fake clock): entries go once expired; a meta
    started over an engine whose leases were granted holds every binding op for one lease period, then
    clears the flag if it granted nothing."""
    now = [100.0]
    engine = MemoryEngine()
    leases = KVLeases(engine, 2.0, clock=lambda: now[0])
    assert leases.grace_until == 0.0 and engine.get(R.KV_LEASE_FLAG_KEY) is None
    for i in range(1000):
        leases.grant(1, f"block{i}", 1000 + i)
    assert len(leases) == 1000 and engine.get(R.KV_LEASE_FLAG_KEY) is not None
    assert leases.name_until(1, "block5") == 102.0 and leases.ino_until(1005) == 102.0
    now[0] = 103.0
    leases.grant(1, "late", 5000)
    assert len(leases) == 1 and leases.name_until(1, "block5") == 0.0 and leases.all_until() == 105.0
    restarted = KVLeases(engine, 2.0, clock=lambda: now[0])
    assert restarted.name_until(7, "anything") == 105.0  # the grace window
    now[0] = 106.0
    restarted.tick()
    assert engine.get(R.KV_LEASE_FLAG_KEY) is None
    assert KVLeases(engine, 2.0, clock=lambda: now[0]).grace_until == 0.0


def test_one_renewal_keeps_every_batch_read_lately_leased(make_cluster):
    """Two batches fetched together; past half the lease a read of the first renews the second too, so
    the second, read again after its first lease ended, still needs no META_KV_CHUNKS wait. (Renewing
    only the batch that found the lease due left the others to run out while one renewal was in flight:
    those reads then waited on meta.)"""
    cluster = leased_cluster(make_cluster, 2)
    with cluster.client() as client:
        s = KVStore("/kvlease/renew", MID, client=client)
        hs = block_hashes(range(16 * 8), 16, salt="renew")
        a, b = hs[:4], hs[4:]
        want = {h: block_for(MID, h) for h in hs}
        s.put_many(list(want.items()))
        cached = s.backend._cached
        s.get_many(a)
        s.get_many(b)
        first_lease = lease_until(s)
        waited = cached.waited_fetches
        time.sleep(max(0.0, first_lease - time.monotonic() - 0.6))  # past half, 0.6 s of the lease left
        got = s.get_many(a)  # leased still: no wait, and the renewal starts
        assert cached.waited_fetches == waited and cached.renewals >= 1
        wait_for(lambda: not cached._renewing.locked(), 10, "the lease renewal")
        time.sleep(max(0.0, first_lease - time.monotonic()) + 0.1)  # the first lease has ended
        got += s.get_many(b)
        assert cached.waited_fetches == waited, "b's lease ran out: its read waited on meta"
        assert all(torch.equal(g, want[h]) for g, h in zip(got, a + b))
        s.close()
