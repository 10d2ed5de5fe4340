"""The native KV backend's cached chunk maps (kvfs/kv/native_cached.py) against real clusters.

A batch whose maps this client has cached starts reading chunk files at once, while meta checks the
maps. These tests change the blocks under a cached map (re-put by another client, corrupt or truncated
chunk files, meta or chunkservers gone) and check that a get returns the current bytes, a miss or an
error, never the bytes of the old map, and never hangs.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvfs.chunkio import packed_checksums
from kvfs.chunkserver.store import SUM_SUFFIX, chunk_path
from kvfs.kv import BlockError, KVLayout, KVStore, block_hashes
from kvfs.kv import native_cached
from kvfs.protocol import CHECKSUM_BLOCK

MID = KVLayout("float16", block_tokens=16, num_layers=4, num_kv_heads=4, head_dim=64)  # 64 KiB: 1 chunk
BIG = KVLayout("float16", block_tokens=16, num_layers=80, num_kv_heads=8, head_dim=64)  # 2.5 MiB: 3 chunks


def block_for(layout: KVLayout, block_hash: str, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(block_hash[:8], 16) + salt)
    return torch.randn(layout.block_shape, generator=g).to(layout.torch_dtype())


class ReadCounter:
    """Counts the hot path's chunk reads (checked against the chunk checksums, or read whole per block
    with the payload hashed: ``hashed``) and the general path's per-block reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: KVStore):
        self.hot = 0
        self.hashed = 0  # of ``hot``: chunks read by read_files_hashed (not checked against chunk checksums)
        self.general = 0
        real_read = native_cached.read_chunk_start
        real_hashed = native_cached.read_files_hashed
        real_each = store.backend._read_each

        def hot(*args, **kwargs):
            self.hot += 1
            return real_read(*args, **kwargs)

        def hashed(paths, *args, **kwargs):
            self.hot += len(paths)
            self.hashed += len(paths)
            return real_hashed(paths, *args, **kwargs)

        async def general(infos, jobs, settle):
            self.general += len(jobs)
            return await real_each(infos, jobs, settle)

        monkeypatch.setattr(native_cached, "read_chunk_start", hot)
        monkeypatch.setattr(native_cached, "read_files_hashed", hashed)
        monkeypatch.setattr(store.backend, "_read_each", general)


def chunk_files(client, store: KVStore, block_hash: str) -> list[str]:
    """Every replica's chunk file of the block's chunks."""
    servers = {x.address: x.data_dir for x in client.refresh_servers().servers}
    refs = client.chunk_map(client.resolve(store.path(block_hash)).ino).chunks
    return [chunk_path(servers[a], ref.chunk_id) for ref in refs for a in ref.replicas]


def stored_and_cached(client, name: str, layout: KVLayout, n: int) -> tuple[KVStore, list[str], list]:
    """A store with ``n`` blocks put and read once (their maps cached): (store, hashes, contents)."""
    s = KVStore(f"/kvcache/{name}", layout, client=client)
    hs = block_hashes(range(16 * n), 16, salt=name)
    want = [block_for(layout, h) for h in hs]
    s.put_many(list(zip(hs, want)))
    assert all(torch.equal(g, w) for g, w in zip(s.get_many(hs), want))
    assert len(s.backend._cached.cache) == n
    return s, hs, want


def lease_until(store: KVStore) -> float:
    """The latest end (time.monotonic) of the KV map leases this store's client holds (0.0: none)."""
    cache = store.backend._cached.cache
    with cache._lock:
        return max((plan.lease_until for plan in cache._plans.values()), default=0.0)


def outlive_leases(store: KVStore) -> None:
    """Sleep until every lease the store holds has ended: its next read asks meta again."""
    time.sleep(max(0.0, lease_until(store) - time.monotonic()) + 0.01)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("device_io", ["auto", "staged"])
@pytest.mark.parametrize("layout", [MID, BIG], ids=["1-chunk", "3-chunks"])
def test_cached_maps_read_the_same_bytes(cluster, monkeypatch, layout, device_io):
    """The second get_many of the same blocks reads through cached maps only (no per-block path), into
    CPU tensors (host route) or the staging buffers (staged route), bit-exact; a miss stays a miss."""
    with cluster.client() as client:
        s = KVStore(f"/kvcache/same-{layout.nbytes}-{device_io}", layout, client=client, device_io=device_io)
        s.backend._cached.threads = 2  # on any machine: 5 blocks are then read whole, hashed once
        hs = block_hashes(range(16 * 6), 16, salt=f"same-{device_io}")
        s.put_many([(h, block_for(layout, h)) for h in hs[:5]])  # hs[5]: never stored
        first = s.get_many(hs)
        assert first[5] is None
        assert len(s.backend._cached.cache) == 5
        counter = ReadCounter(monkeypatch, s)
        outs = [torch.full(layout.block_shape, 7, dtype=layout.torch_dtype()) for _ in hs]
        got = s.get_many(hs, outs)
        assert got[5] is None
        for h, g in zip(hs[:5], got[:5]):
            assert torch.equal(g.view(torch.int16), block_for(layout, h).view(torch.int16))
        chunks = -(-(s._header_len_for(hs[0]) + layout.nbytes) // (1 << 20))
        assert counter.hot == 5 * chunks and counter.general == 0
        assert counter.hashed == counter.hot  # verified by the blocks' own checksums, each byte hashed once
        s.close()


def test_reput_by_another_client_is_never_served_from_the_old_chunks(cluster):
    """Client A caches a block's map; client B deletes the block and puts other bytes under the same
    hash. The old chunk files are still on disk (meta deletes them lazily; put back if the deletion
    came first), and their checksums still match, so reading A's cached map alone would return the old
    bytes: A must get the new ones (B's put is acknowledged only after A's lease on the map ended). Then
    B deletes it again: A gets a miss once its lease has ended (until then it may read the deleted bytes,
    which the name held within the lease)."""
    with cluster.client() as a, cluster.client() as b:
        sa = KVStore("/kvcache/reput", MID, client=a)
        sb = KVStore("/kvcache/reput", MID, client=b)
        h = block_hashes(range(16), 16, salt="reput")[0]
        old, new = block_for(MID, h), block_for(MID, h, salt=1)
        assert not torch.equal(old, new)
        sb.put(h, old)
        assert torch.equal(sa.get(h), old)
        old_files = {}
        for path in chunk_files(a, sa, h):
            for p in (path, path + SUM_SUFFIX):
                with open(p, "rb") as f:
                    old_files[p] = f.read()
        assert len(sa.backend._cached.cache) == 1
        assert sb.delete(h)
        assert sb.put(h, new)
        for p, data in old_files.items():  # as long as the lazy deletion has not reached them (if it has)
            if not os.path.exists(p):
                with open(p, "wb") as f:
                    f.write(data)
        assert torch.equal(sa.get(h), new)
        assert torch.equal(sa.get_many([h])[0], new)
        assert sb.delete(h)
        during = sa.get(h)
        assert during is None or torch.equal(during, new)
        outlive_leases(sa)
        assert sa.get(h) is None
        assert sa.get_many([h, h]) == [None, None]
        sa.close()
        sb.close()


def test_corrupt_chunk_after_caching_is_detected(cluster):
    """A chunk file corrupted after its map was cached: the hot path's checksums catch it, the block comes
    from the other replica; with every replica corrupt the get fails, never returns the bytes."""
    with cluster.client() as client:
        s, hs, want = stored_and_cached(client, "corrupt", BIG, 2)
        files = chunk_files(client, s, hs[0])  # chunk 0 replicas, then chunk 1's, then chunk 2's
        flip_byte(files[2], 300_000)  # one replica of the middle chunk
        got = s.get_many(hs)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        # Every replica at once, on other blocks: corrupting them one after the other races meta's repair
        # of the first report (a new healthy copy made from the second replica).
        s2, hs2, want2 = stored_and_cached(client, "corrupt-all", BIG, 2)
        for path in chunk_files(client, s2, hs2[0])[2:4]:  # both replicas of the middle chunk
            flip_byte(path, 300_000)
        with pytest.raises((OSError, BlockError)):
            s2.get_many(hs2)
        assert torch.equal(s2.get(hs2[1]), want2[1])  # the batch's other block is unharmed
        s.close()
        s2.close()


def test_truncated_chunk_after_caching_is_detected(cluster):
    """A chunk file cut short after its map was cached: with one replica cut the block comes from the
    other; with every replica cut the get fails (never a partial block)."""
    with cluster.client() as client:
        s, hs, want = stored_and_cached(client, "truncated", MID, 2)
        path = chunk_files(client, s, hs[0])[0]
        os.truncate(path, os.path.getsize(path) - 5000)
        assert torch.equal(s.get(hs[0]), want[0])
        for path in chunk_files(client, s, hs[1]):
            os.truncate(path, os.path.getsize(path) - 5000)
        out = torch.full(MID.block_shape, 7, dtype=MID.torch_dtype())
        with pytest.raises((OSError, BlockError)):
            s.get(hs[1], out)
        s.close()


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def rewrite_chunk(path: str, data: bytes) -> None:
    """Replace a chunk file and its checksum file so that they agree (the chunk checksums then pass)."""
    with open(path, "wb") as f:
        f.write(data)
    with open(path + SUM_SUFFIX, "wb") as f:
        f.write(packed_checksums(data, CHECKSUM_BLOCK))


@pytest.mark.parametrize("device_io", ["auto", "staged"])
def test_payload_hashed_once_never_returns_wrong_bytes(cluster, monkeypatch, device_io):
    """Cached reads hash each payload byte once (against the block's own checksum, not the chunk
    checksums). Each way a chunk can be wrong is still caught and its bytes never returned: a corrupt
    replica (the checked re-read finds it, the other replica serves); a byte changed with the chunk
    checksums rewritten to match (header right, payload wrong); a chunk swapped for the same chunk of
    another block, with its checksums (a stale or mixed-up chunk); a chunk file cut short."""
    with cluster.client() as client:
        s = KVStore(f"/kvcache/once-{device_io}", BIG, client=client, device_io=device_io)
        s.backend._cached.threads = 2  # on any machine: 5 blocks are then read whole, hashed once
        hs = block_hashes(range(16 * 5), 16, salt=f"once-{device_io}")
        want = [block_for(BIG, h) for h in hs]
        s.put_many(list(zip(hs, want)))
        assert all(torch.equal(g, w) for g, w in zip(s.get_many(hs), want))  # maps cached
        files = {h: chunk_files(client, s, h) for h in hs}  # chunk 0's replicas, chunk 1's, chunk 2's

        counter = ReadCounter(monkeypatch, s)
        flip_byte(files[hs[0]][2], 300_000)  # one replica of block 0's middle chunk
        mid = files[hs[1]][2:4]  # both replicas of block 1's middle chunk: changed, checksums rewritten
        for path in mid:
            data = bytearray(read_file(path))
            data[300_000] ^= 0x10
            rewrite_chunk(path, bytes(data))
        other = read_file(files[hs[4]][2])  # block 4's middle chunk into block 2's place
        for path in files[hs[2]][2:4]:
            rewrite_chunk(path, other)
        for path in files[hs[3]][4:6]:  # block 3's last chunk cut short on both replicas
            os.truncate(path, os.path.getsize(path) - 5000)

        outs = [torch.full(BIG.block_shape, 7, dtype=BIG.torch_dtype()) for _ in hs]
        with pytest.raises((OSError, BlockError)):
            s.get_many(hs, outs)
        assert counter.hashed > 0  # the batch went through the hashed-once reads
        assert torch.equal(s.get(hs[0]), want[0])  # the good replica, after the checked re-read
        for h in hs[1:4]:
            out = torch.full(BIG.block_shape, 7, dtype=BIG.torch_dtype())
            with pytest.raises((OSError, BlockError)):
                s.get(h, out)
        assert torch.equal(s.get(hs[4]), want[4])
        s.close()


def test_fewer_blocks_than_threads_are_read_chunk_by_chunk(cluster, monkeypatch):
    """A batch of fewer blocks than the reader threads its chunks would keep busy (one block of 3 chunks,
    3 threads) is read chunk by chunk, checked against the chunk checksums, not whole by one thread;
    a batch of as many blocks as threads is read whole, hashed once. Both bit-exact."""
    with cluster.client() as client:
        s, hs, want = stored_and_cached(client, "spread", BIG, 3)
        s.backend._cached.threads = 3
        counter = ReadCounter(monkeypatch, s)
        assert torch.equal(s.get(hs[0]), want[0])
        assert (counter.hot, counter.hashed) == (3, 0)
        got = s.get_many(hs)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert (counter.hot, counter.hashed) == (3 + 9, 9)
        s.close()


def _bounded(fn, seconds: float):
    """Run ``fn`` in a thread: (finished, result or exception). A liveness guard, not a timing check."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive()), (box[0] if box else None)


def test_meta_down_with_cached_maps_is_an_error_not_a_hang(make_cluster):
    """Every map cached and every chunk local, but meta gone: the block is not returned unconfirmed; the
    get fails with an OSError within the client's timeout."""
    cluster = make_cluster()
    with cluster.client(timeout=3.0) as client:
        s = KVStore("/kvcache/meta-down", MID, client=client)
        hs = block_hashes(range(32), 16, salt="meta-down")
        s.put_many([(h, block_for(MID, h)) for h in hs])
        assert all(g is not None for g in s.get_many(hs))
        cluster.kill_meta()
        outlive_leases(s)  # within the lease the maps need no meta (test_kv_lease.py)
        finished, res = _bounded(lambda: s.get_many(hs), 120)
        assert finished, "get_many hung with meta down"
        assert isinstance(res, OSError), res
        cluster.restart_meta()
        cluster.wait_servers(3)
        finished, res = _bounded(lambda: s.get_many(hs), 120)
        assert finished and isinstance(res, list), res
        assert all(torch.equal(g, block_for(MID, h)) for g, h in zip(res, hs))
        s.close()


def test_dead_chunkservers_with_cached_maps(make_cluster):
    """Chunkservers killed after the maps were cached: their chunk files on this host are still read
    and verified (the right bytes); once those files are gone too, the get fails within the timeout."""
    cluster = make_cluster()
    with cluster.client(timeout=3.0) as client:
        s = KVStore("/kvcache/cs-down", MID, client=client)
        h = block_hashes(range(16), 16, salt="cs-down")[0]
        want = block_for(MID, h)
        s.put(h, want)
        assert torch.equal(s.get(h), want)
        files = chunk_files(client, s, h)
        for i in range(len(cluster.servers)):
            cluster.kill_chunkserver(i)
        finished, res = _bounded(lambda: s.get(h), 120)
        assert finished and isinstance(res, torch.Tensor) and torch.equal(res, want), res
        for p in files:
            os.unlink(p)
        finished, res = _bounded(lambda: s.get(h), 120)
        assert finished, "get hung with the chunkservers and their files gone"
        assert isinstance(res, OSError), res
        s.close()
