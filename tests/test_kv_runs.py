"""KV runs (``kvfs.kv.run``: consecutive blocks of one prefix in one file) on every backend: a local
directory, the native client on a real cluster, the FUSE mount.

Checked: runs load bit-exact, copied into the caller's tensors and (native client, chunk on this host)
mapped instead, with the same verdicts; ``runs_prefix`` finds the same prompt, a longer one and a shorter one that
ends where a stored run ends, to the block, and a prompt that diverges inside a run up to that run's
start; a run is published once; a corrupt block keeps the blocks before it, a truncated run, a run of
another layout or other blocks, and a corrupt header load nothing; block and run readers refuse each
other's files.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvfs.kv import BlockError, KVLayout, KVStore, block_hashes
from kvfs.kv.run import run_spans

LAYOUT = KVLayout("bfloat16", block_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8)
RUN = 4


@pytest.fixture(params=["local", "native", "mount"])
def make(request, tmp_path):
    """make(name, layout) -> a KVStore on the chosen backend; closed after the test."""
    made: list[KVStore] = []
    client = None
    test = request.node.name.replace("[", "_").replace("]", "")
    if request.param == "local":
        base = str(tmp_path)
    elif request.param == "native":
        client = request.getfixturevalue("cluster").client()
        base = f"/kvruns/{test}"
    else:
        base = f"{request.getfixturevalue('mounted').mountpoint}/kvruns/{test}"

    def mk(name: str, layout: KVLayout = LAYOUT) -> KVStore:
        s = KVStore(f"{base}/{name}", layout, client=client)
        made.append(s)
        return s

    yield mk
    for s in made:
        s.close()
    if client is not None:
        client.close()


def blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *LAYOUT.block_shape), generator=g).to(torch.bfloat16)


def store_prompt(s: KVStore, tokens: list[int], data: torch.Tensor) -> list[str]:
    hashes = block_hashes(tokens, LAYOUT.block_tokens)
    s.put_runs([(hashes[a:a + n], data[a:a + n]) for a, n in run_spans(len(hashes), RUN)])
    return hashes


def get(s: KVStore, runs: list[list[str]], outs: list[torch.Tensor]) -> list[tuple[int, BlockError | None]]:
    """(blocks, error) per run, read both ways (into ``outs``; mapped where the backend can), which must
    agree: same blocks, same errors, same verified bytes."""
    copied = s.get_runs(runs, outs)
    mapped = s.get_runs(runs, [torch.empty_like(o) for o in outs], map_local=True)
    for c, m in zip(copied, mapped):
        assert (c.blocks, str(c.error)) == (m.blocks, str(m.error))
        assert c.data is not None and torch.equal(c.data[:c.blocks], m.data[:m.blocks])
    return [(r.blocks, r.error) for r in copied]


def meta_methods_asked(client) -> list[int]:
    """The meta methods ``client`` (a ``kvfs.SyncClient``) sends from now on, appended as they go out."""
    asked: list[int] = []
    real = client.client.meta.request

    async def counting(method, *args, **kwargs):
        asked.append(method)
        return await real(method, *args, **kwargs)

    client.client.meta.request = counting
    return asked


def load(s: KVStore, hashes: list[str]) -> list[tuple[int, BlockError | None]]:
    return get(s, [hashes], [torch.empty((len(hashes), *LAYOUT.block_shape), dtype=torch.bfloat16)])


def raw_write(s: KVStore, path: str, data: bytes) -> None:
    if s.backend.__class__.__name__ == "NativeBackend":
        s.backend.sync.write_file(path, data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def raw_read(s: KVStore, path: str) -> bytes:
    if s.backend.__class__.__name__ == "NativeBackend":
        return s.backend.sync.read_file(path)
    with open(path, "rb") as f:
        return f.read()


def test_runs_roundtrip_and_prefix(make):
    s = make("m")
    tokens = list(range(10 * 4))  # 10 blocks: runs of 4, 4 and 2
    data = blocks(10, 1)
    hashes = block_hashes(tokens, 4)
    assert s.runs_prefix(hashes, RUN).blocks == 0
    assert store_prompt(s, tokens, data) == hashes
    assert s.put_runs([(hashes[:4], data[:4])]) == [False]  # already there: not rewritten
    found = s.runs_prefix(hashes, RUN)
    assert (found.blocks, found.runs) == (10, [(0, 4), (4, 4), (8, 2)])
    assert s.runs_prefix(hashes, RUN, usable=9).blocks == 9
    outs = [torch.empty((n, *LAYOUT.block_shape), dtype=torch.bfloat16) for _, n in found.runs]
    assert get(s, [hashes[a:a + n] for a, n in found.runs], outs) == [(4, None), (4, None), (2, None)]
    assert torch.equal(torch.cat(outs), data)
    mapped = s.get_runs([hashes[:4]], [torch.empty_like(outs[0])], map_local=True)[0].data
    assert torch.equal(mapped, data[:4])
    if s.backend.__class__.__name__ == "NativeBackend":  # one chunk, on this host: mapped, not copied
        assert mapped.data_ptr() != outs[0].data_ptr() and not mapped.untyped_storage().resizable()
    # A longer prompt finds every block of the stored one, a shorter one those up to its last full run.
    assert s.runs_prefix(block_hashes(tokens + [7] * 12, 4), RUN).blocks == 10
    assert s.runs_prefix(hashes[:8], RUN).blocks == 8
    assert s.runs_prefix(hashes[:7], RUN).blocks == 4
    # A prompt that diverges inside a run finds the runs before it only ...
    diverging = tokens[:6 * 4] + [999] * 8  # blocks 0-5 shared, then other tokens
    assert s.runs_prefix(block_hashes(diverging, 4), RUN).blocks == 4
    # ... unless a run ends where it diverges (here: a stored 6-block prompt's last run).
    store_prompt(s, tokens[:6 * 4], data[:6])
    assert s.runs_prefix(block_hashes(diverging, 4), RUN).runs == [(0, 4), (4, 2)]
    assert s.runs_prefix(hashes[:3] + block_hashes([1] * 16, 4)[3:], RUN).blocks == 0
    assert s.delete_run(hashes[8:10]) and not s.delete_run(hashes[8:10])
    assert s.runs_prefix(hashes, RUN).blocks == 8


def test_bad_runs_are_refused(make):
    s = make("m")
    tokens = list(range(8 * 4))
    data = blocks(8, 2)
    hashes = store_prompt(s, tokens, data)
    first, second = hashes[:4], hashes[4:]
    good = raw_read(s, s.run_path(first))
    # A corrupt block: the blocks before it load, verified; it and the rest do not.
    bad = bytearray(good)
    bad[len(bad) - 2 * LAYOUT.nbytes + 5] ^= 0xFF  # in block 2 of 4
    raw_write(s, s.run_path(first), bytes(bad))
    out = torch.empty((4, *LAYOUT.block_shape), dtype=torch.bfloat16)
    [(n, err)] = get(s, [first], [out])
    assert n == 2 and "block 2 payload checksum" in str(err)
    assert torch.equal(out[:2], data[:2])
    # Truncated, corrupt header, another run's blocks at this name, another layout: nothing loads.
    raw_write(s, s.run_path(first), good[:-100])
    assert load(s, first)[0][0] == 0 and "truncated" in str(load(s, first)[0][1])
    header = bytearray(good)
    header[60] ^= 0xFF
    raw_write(s, s.run_path(first), bytes(header))
    assert "header checksum" in str(load(s, first)[0][1])
    raw_write(s, s.run_path(first), raw_read(s, s.run_path(second)))
    assert "holds other blocks" in str(load(s, first)[0][1])
    other = make("m", KVLayout("bfloat16", block_tokens=4, num_layers=2, num_kv_heads=4, head_dim=4))  # same bytes
    os_dir = other.run_path(second).rpartition("/")[0]
    if s.backend.__class__.__name__ == "NativeBackend":
        s.backend.sync.mkdir(os_dir, parents=True, exist_ok=True)
    else:
        os.makedirs(os_dir, exist_ok=True)
    raw_write(s, other.run_path(second), raw_read(s, s.run_path(second)))
    [(n, err)] = get(other, [second], [torch.empty((4, *other.layout.block_shape), dtype=torch.bfloat16)])
    assert n == 0 and "layout" in str(err)
    # Block and run readers refuse each other's files.
    raw_write(s, s.path(hashes[7]), raw_read(s, s.run_path(second)))
    with pytest.raises(BlockError, match="version 2"):
        s.get(hashes[7])
    s.put(hashes[3], data[3])
    raw_write(s, s.run_path(first), raw_read(s, s.path(hashes[3])))
    assert "version 1" in str(load(s, first)[0][1])
    # A miss is (0, None); the good run still loads.
    assert load(s, block_hashes([5] * 8, 4)) == [(0, None)]
    assert load(s, second) == [(4, None)]


def test_mapping_falls_back_to_reads_when_the_lock_is_refused(cluster, monkeypatch):
    """Without CAP_IPC_LOCK, mlock is bounded by RLIMIT_MEMLOCK (often 8 MiB): a refused lock makes the
    native client read runs into the caller's tensors instead, then and from then on."""
    import ctypes
    import errno

    from kvfs import chunkio

    class NoLock:
        def mlock(self, *args):
            ctypes.set_errno(errno.ENOMEM)
            return -1

    with cluster.client() as client, KVStore("/kvruns/refused", LAYOUT, client=client) as s:
        data = blocks(4, 3)
        hashes = store_prompt(s, list(range(16)), data)
        monkeypatch.setattr(chunkio, "_libc", NoLock())
        locations = s.runs_prefix(hashes, RUN).locations
        for given in (locations, None):  # mapped from the lookup's chunk maps, or after asking meta
            s.backend._map_refused = False
            out = torch.empty_like(data)
            [read] = s.get_runs([hashes], [out], map_local=True, locations=given)
            assert (read.blocks, read.error) == (4, None) and read.data is out and torch.equal(out, data)
            assert s.backend._map_refused


def test_mapped_runs_are_verified_once_by_their_block_sums(cluster):
    """A mapped run (native client, chunk on this host) is not checked against the chunk checksums as
    well (each byte is hashed once): a chunk file corrupted on disk is caught by the run's per-block
    checksums instead, mapped or read: the blocks before the bad one load, it and the rest do not."""
    from kvfs.chunkserver.store import chunk_path

    with cluster.client() as client, KVStore("/kvruns/disk-rot", LAYOUT, client=client) as s:
        data = blocks(4, 4)
        hashes = store_prompt(s, list(range(16)), data)
        servers = {x.address: x.data_dir for x in client.refresh_servers().servers}
        ref = client.chunk_map(client.resolve(s.run_path(hashes)).ino).chunks[0]
        header_len = ref.length - data.numel() * data.element_size()
        for address in ref.replicas:  # every replica: no good copy to fail over to
            with open(chunk_path(servers[address], ref.chunk_id), "r+b") as f:
                f.seek(header_len + 2 * LAYOUT.nbytes + 3)  # inside block 2
                byte = f.read(1)
                f.seek(header_len + 2 * LAYOUT.nbytes + 3)
                f.write(bytes([byte[0] ^ 0x10]))
        [mapped] = s.get_runs([hashes], [torch.empty_like(data)], map_local=True)
        assert mapped.data.data_ptr() != 0 and not mapped.data.untyped_storage().resizable()  # it was mapped
        assert mapped.blocks == 2 and "block 2 payload checksum" in str(mapped.error)
        assert torch.equal(mapped.data[:2], data[:2])
        try:
            [read] = s.get_runs([hashes], [torch.empty_like(data)])
        except OSError:
            pass  # a copied read checks the chunk checksums and fails: nothing wrong is ever returned
        else:
            assert read.blocks <= 2


def test_runs_read_from_local_chunk_files_are_checked_as_they_land(cluster):
    """With the lookup's chunk maps (``locations``, as the vLLM connector loads) a run whose chunk is on
    this host is read from its chunk file straight into ``out``, each block checked against the run's own
    sums as it lands, not against the chunk checksums, with no metadata round trip: a chunk file
    corrupted or truncated on disk loads the blocks before the damage, never the damaged ones."""
    from kvfs import protocol as P
    from kvfs.chunkserver.store import chunk_path

    with cluster.client() as client, KVStore("/kvruns/read-local", LAYOUT, client=client) as s:
        data = blocks(4, 9)
        hashes = store_prompt(s, list(range(16)), data)
        found = s.runs_prefix(hashes, RUN)
        servers = {x.address: x.data_dir for x in client.refresh_servers().servers}
        ref = found.locations[0].chunks[0]
        files = [chunk_path(servers[a], ref.chunk_id) for a in ref.replicas]  # every replica: no good copy
        header_len = ref.length - data.numel() * data.element_size()
        asked = meta_methods_asked(client)

        def load() -> tuple[int, str, torch.Tensor]:
            out = torch.zeros_like(data)
            [read] = s.get_runs([hashes], [out], locations=found.locations)
            assert read.data is out  # read into the caller's tensor, not mapped
            return read.blocks, str(read.error), out

        assert load()[:2] == (4, "None") and torch.equal(load()[2], data)
        for path in files:
            with open(path, "r+b") as f:
                f.seek(header_len + 2 * LAYOUT.nbytes + 3)  # inside block 2
                byte = f.read(1)
                f.seek(header_len + 2 * LAYOUT.nbytes + 3)
                f.write(bytes([byte[0] ^ 0x10]))
        n, err, out = load()
        assert n == 2 and "block 2 payload checksum" in err and torch.equal(out[:2], data[:2])
        for path in files:
            os.truncate(path, header_len + LAYOUT.nbytes + LAYOUT.nbytes // 2)  # inside block 1
        n, err, out = load()
        assert n == 1 and "block 1" in err and torch.equal(out[:1], data[:1])
        assert P.META_KV_CHUNKS not in asked


def test_loaded_runs_are_touched(cluster):
    """A hit records an access on every run it loaded (mapped or read, with the lookup's chunk maps or
    not; the touches go out together, in the background), so the eviction engine sees the runs as recent."""
    import time

    with cluster.client() as client, KVStore("/kvruns/touch", LAYOUT, client=client, touch_interval=0) as s:
        data = blocks(12, 5)
        hashes = store_prompt(s, list(range(48)), data)
        runs = [hashes[a:a + n] for a, n in run_spans(len(hashes), RUN)]
        old = time.time_ns() - 3600 * 10**9
        for map_local, located in ((True, False), (False, False), (False, True)):
            for run in runs:
                client.setattr(client.stat(s.run_path(run)).ino, atime_ns=old, mtime_ns=old)
            locations = s.runs_prefix(hashes, RUN).locations if located else None
            reads = s.get_runs(runs, [torch.empty((len(r), *LAYOUT.block_shape), dtype=torch.bfloat16) for r in runs],
                               map_local=map_local, locations=locations)
            assert [r.blocks for r in reads] == [4, 4, 4]
            deadline = time.monotonic() + 10  # touches run in the background: the load does not wait for them
            while not all(client.stat(s.run_path(run)).atime_ns > old for run in runs):
                assert time.monotonic() < deadline, map_local
                time.sleep(0.05)


def test_lookup_locations_spare_the_load_its_metadata_round_trip(cluster):
    """Through the native client ``runs_prefix`` returns each run's chunk map (``RunPrefix.locations``;
    they pickle, as vLLM's scheduler hands them to its worker process). Another client's
    ``get_runs(locations=...)`` then maps the runs without a META_KV_CHUNKS round trip of its own, to the
    same verified bytes, or reads them into tensors, checked against the runs' own block sums as they land,
    with no round trip either; without them it asks meta first."""
    import pickle

    from kvfs import protocol as P

    with cluster.client() as a, cluster.client() as b, KVStore("/kvruns/located", LAYOUT, client=a) as sched, \
            KVStore("/kvruns/located", LAYOUT, client=b) as worker:
        data = blocks(12, 6)
        hashes = store_prompt(sched, list(range(48)), data)
        found = sched.runs_prefix(hashes, RUN)
        assert found.blocks == 12 and found.runs == [(0, 4), (4, 4), (8, 4)]
        assert all(isinstance(loc, P.GetChunksReply) for loc in found.locations) and len(found.locations) == 3
        locations = pickle.loads(pickle.dumps(found.locations))
        runs = [hashes[s:s + n] for s, n in found.runs]
        asked = meta_methods_asked(b)

        def load_all(**kwargs) -> list[int]:
            asked.clear()
            outs = [torch.empty((len(r), *LAYOUT.block_shape), dtype=torch.bfloat16) for r in runs]
            reads = worker.get_runs(runs, outs, **kwargs)
            assert [r.blocks for r in reads] == [4, 4, 4] and torch.equal(torch.cat([r.data for r in reads]), data)
            return [m for m in asked if m == P.META_KV_CHUNKS]

        assert load_all(map_local=True, locations=locations) == []
        assert len(load_all(map_local=True)) == 1
        worker.backend._cached.cache.drop(worker.run_path(runs[0]))
        assert load_all(locations=locations) == []  # read, each block checked as it lands: no round trip either
        with pytest.raises(ValueError):
            worker.get_runs(runs, [torch.empty((4, *LAYOUT.block_shape), dtype=torch.bfloat16)] * 3,
                            locations=locations[:2])


def test_the_lookup_records_the_loads_accesses(cluster):
    """Through the native client ``runs_prefix`` asks meta to record an access on the runs it finds
    (META_KV_CHUNKS ``touch_before_ns``): the locations carry the new access time, meta writes it a
    moment later, and the load that follows sends no SETATTR of its own; runs accessed within the touch
    interval are left alone."""
    import time

    from kvfs import protocol as P

    with cluster.client() as a, cluster.client() as b, \
            KVStore("/kvruns/lookup-touch", LAYOUT, client=a, touch_interval=60) as sched, \
            KVStore("/kvruns/lookup-touch", LAYOUT, client=b, touch_interval=60) as worker:
        hashes = store_prompt(sched, list(range(48)), blocks(12, 10))
        runs = [hashes[s:s + n] for s, n in run_spans(len(hashes), RUN)]
        old = time.time_ns() - 3600 * 10**9
        for run in runs:
            a.setattr(a.stat(sched.run_path(run)).ino, atime_ns=old, mtime_ns=old)
        before = time.time_ns()
        found = sched.runs_prefix(hashes, RUN)
        assert found.blocks == 12 and all(loc.attr.atime_ns >= before for loc in found.locations)
        asked = meta_methods_asked(b)
        reads = worker.get_runs(runs, [torch.empty((len(r), *LAYOUT.block_shape), dtype=torch.bfloat16) for r in runs],
                                locations=found.locations)
        assert [r.blocks for r in reads] == [4, 4, 4]
        time.sleep(0.3)  # a touch the load started would be on its way by now
        assert P.META_SETATTR not in asked and P.META_KV_CHUNKS not in asked
        deadline = time.monotonic() + 10  # meta writes the times just after answering
        while not all(a.stat(sched.run_path(run)).atime_ns >= before for run in runs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stamped = [a.stat(sched.run_path(run)).atime_ns for run in runs]
        again = sched.runs_prefix(hashes, RUN)  # touched within the interval: nothing to record
        assert [loc.attr.atime_ns for loc in again.locations] == stamped
        time.sleep(1.5)
        assert [a.stat(sched.run_path(run)).atime_ns for run in runs] == stamped


def test_a_stale_location_loads_the_current_run(cluster):
    """A run deleted after the lookup and stored again with other bytes: once the old chunk file is gone,
    a load with the old location falls back to meta's current map and loads the new bytes (never a
    failed load, never bytes that fail the run's checks)."""
    import time

    with cluster.client() as client, KVStore("/kvruns/stale", LAYOUT, client=client) as s:
        old, new = blocks(4, 7), blocks(4, 8)
        hashes = store_prompt(s, list(range(16)), old)
        found = s.runs_prefix(hashes, RUN)
        old_chunk = client.client.local_chunk(found.locations[0].chunks[0])
        assert old_chunk is not None and os.path.exists(old_chunk.path)
        assert s.delete_run(hashes)
        s.backend._cached.cache.drop(s.run_path(hashes))
        store_prompt(s, list(range(16)), new)
        deadline = time.monotonic() + 30  # meta's deletions reach the chunkserver with its heartbeats
        while os.path.exists(old_chunk.path):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        [read] = s.get_runs([hashes], [torch.empty_like(new)], map_local=True, locations=found.locations)
        assert read.blocks == 4 and read.error is None and torch.equal(read.data, new)


def test_runs_loaded_through_the_mount_are_touched_in_the_background(mounted):
    """Through a directory (the kvfs mount) a load records its access on a background thread, not on the
    load's path; the access still lands, on every run it loaded."""
    import time

    root = f"{mounted.mountpoint}/kvruns/touch-mount"
    with KVStore(root, LAYOUT, touch_interval=0) as s:
        data = blocks(12, 9)
        hashes = store_prompt(s, list(range(48)), data)
        runs = [hashes[a:a + n] for a, n in run_spans(len(hashes), RUN)]
        old = time.time_ns() - 3600 * 10**9
        for run in runs:
            os.utime(s.run_path(run), ns=(old, old))
        reads = s.get_runs(runs, [torch.empty((len(r), *LAYOUT.block_shape), dtype=torch.bfloat16) for r in runs])
        assert [r.blocks for r in reads] == [4, 4, 4]
        deadline = time.monotonic() + 10
        while not all(os.stat(s.run_path(run)).st_atime_ns > old for run in runs):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert all(os.stat(s.run_path(run)).st_mtime_ns == old for run in runs)  # only the access time moved


def test_lookups_through_the_mount_record_accesses(mounted):
    """The mount looks KV files up with META_KV_LOOKUP asking meta to record an access on those last
    accessed more than a minute ago: ``stat`` answers with the new time and meta stores it a moment
    later, so an engine's load through the mount has no access time left to record; a file looked up
    again within the minute keeps its time; a mount started with ``--kv-touch-interval -1`` records none."""
    import time

    root = f"{mounted.mountpoint}/kvruns/touch-lookup"
    with KVStore(root, LAYOUT) as s, mounted.client() as native:
        hashes = store_prompt(s, list(range(16)), blocks(4, 11))
        path = s.run_path(hashes)
        inside = path[len(mounted.mountpoint):]
        old = time.time_ns() - 3600 * 10**9
        os.utime(path, ns=(old, old))
        time.sleep(1.3)  # past the kernel's entry and attribute timeouts (1 s): the next stat looks it up
        before = time.time_ns()
        assert os.stat(path).st_atime_ns >= before
        deadline = time.monotonic() + 10
        while native.stat(inside).atime_ns < before:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stamped = native.stat(inside).atime_ns
        time.sleep(1.3)
        assert os.stat(path).st_atime_ns == stamped and os.stat(path).st_mtime_ns == old
        # A mount started with --kv-touch-interval -1 records nothing on lookups.
        quiet = mounted.mount(f"{mounted.mountpoint}-quiet", "--kv-touch-interval", "-1")
        try:
            os.utime(path, ns=(old, old))
            deadline = time.monotonic() + 30
            while not os.path.isdir(f"{quiet}/kvruns"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert os.stat(quiet + inside).st_atime_ns == old
            time.sleep(1.0)  # past the flush of any access meta was asked to record
            assert native.stat(inside).atime_ns == old
        finally:
            mounted.unmount(quiet)


def test_lookups_follow_renamed_and_recreated_directories(cluster):
    """Meta resolves the runs' directories of a ``runs_prefix`` (META_KV_CHUNKS) from a cache kept until
    a rmdir or rename: after the store's directory is renamed away the runs are a miss, after it is
    renamed back they hit again, and a run directory removed and made again (a new inode) is looked up
    in, not the old one; another client's lookups see each change at once."""
    with cluster.client() as a, cluster.client() as b, KVStore("/kvruns/moved/s", LAYOUT, client=a) as writer, \
            KVStore("/kvruns/moved/s", LAYOUT, client=b) as reader:
        data = blocks(8, 9)
        hashes = store_prompt(writer, list(range(32)), data)
        assert reader.runs_prefix(hashes, RUN).blocks == 8
        a.rename("/kvruns/moved/s", "/kvruns/moved/t")
        assert reader.runs_prefix(hashes, RUN).blocks == 0
        a.rename("/kvruns/moved/t", "/kvruns/moved/s")
        found = reader.runs_prefix(hashes, RUN)
        assert found.blocks == 8
        # Empty one run's directory, remove it and make it again, then store that run anew.
        first = reader.run_path(hashes[:RUN])
        run_dir = first.rpartition("/")[0]
        for name in a.listdir(run_dir):
            a.unlink(f"{run_dir}/{name}")
        a.rmdir(run_dir)
        assert reader.runs_prefix(hashes, RUN).blocks == 0
        writer.put_runs([(hashes[:RUN], data[:RUN])])
        found = reader.runs_prefix(hashes, RUN)
        assert found.blocks == 8
        runs = [hashes[s:s + n] for s, n in found.runs]
        reads = reader.get_runs(runs, [torch.empty((len(r), *LAYOUT.block_shape), dtype=torch.bfloat16) for r in runs],
                                locations=found.locations)
        assert torch.equal(torch.cat([r.data[:r.blocks] for r in reads]), data)
