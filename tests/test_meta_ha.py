"""HA meta on etcd with real processes: 3 etcd members, 3 meta processes, chunkservers, a mount and
native-client writers; the leader is killed, paused, and etcd loses members (meta/leader.py)."""

from __future__ import annotations

import base64
import errno
import os
import signal
import socket
import stat
import threading
import time

import pytest
import trio
from etcd import EtcdCluster, HaCluster, etcd_binary

from kvfs import protocol as P
from kvfs.meta.engine_etcd import EtcdEngine, Fenced
from kvfs.meta.etcd_mirror import Mirror
from kvfs.meta.leader import Election
from kvfs.rpc import NotLeader, RpcClient

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (./dev.sh test installs it)")


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    c = HaCluster(str(tmp_path_factory.mktemp("ha"))).start()
    try:
        yield c
    finally:
        c.stop()


def test_fenced_engine_of_a_deposed_leader_cannot_write(tmp_path):
    """The fencing itself: writes are conditional on the leader key this process created."""
    etcd = EtcdCluster(str(tmp_path / "etcd"), size=1).start()
    try:
        endpoints = etcd.endpoints
        old = Election(endpoints, b"/f", "old:1", ttl=2)
        new = Election(endpoints, b"/f", "new:1", ttl=2)
        c = old.client()
        lease = old.grant(c)
        rev = old.acquire(c, lease)
        assert rev and new.acquire(c, new.grant(c)) == 0  # one leader at a time
        engine = EtcdEngine(endpoints, b"/f", cache=True)
        engine.fence(old.key, rev)
        engine.write([(b"k", b"1")])
        # The old leader's lease runs out (it was paused or cut off); another meta takes over.
        c.call("/v3/lease/revoke", {"ID": str(lease)})
        rev2 = new.acquire(c, new.grant(c))
        assert rev2 > rev
        with pytest.raises(Fenced) as info:
            engine.write([(b"k", b"2")])
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError):  # and it refuses everything after that (it steps down)
            engine.get(b"k")
        fresh = EtcdEngine(endpoints, b"/f")
        assert fresh.get(b"k") == b"1"
        fresh.close()
        c.close()
        engine.close()
    finally:
        etcd.stop()


def test_etcd_batches_limits_and_pipelined_group_commit(tmp_path):
    """A batch over the transaction limits is refused whole; queued batches are merged into as few
    transactions as the limits allow, whole batches only, in order (last change wins)."""
    etcd = EtcdCluster(str(tmp_path / "etcd"), size=1).start()
    try:
        engine = EtcdEngine(etcd.endpoints, b"/g", cache=True, pipelined=True, max_txn_ops=10)
        with pytest.raises(OSError) as info:
            engine.write([(b"k%d" % i, b"v") for i in range(11)])
        assert info.value.errno == errno.EFBIG and "--max-txn-ops" in str(info.value)
        assert engine.get(b"k0") is None  # nothing of it applied
        for round_ in range(5):
            engine.write([(b"k%d" % i, b"%d" % round_) for i in range(6)])  # 6 keys: two never share a txn
        engine.write([(b"k0", None)])
        assert engine.unsynced and engine.get(b"k1") == b"4"
        plain = EtcdEngine(etcd.endpoints, b"/g")
        assert plain.get(b"k1") is None  # not in etcd before the sync
        engine.sync()
        assert not engine.unsynced
        assert plain.get(b"k1") == b"4" and plain.get(b"k0") is None
        assert [k for k, _ in plain.scan(b"k")] == [b"k%d" % i for i in range(1, 6)]
        plain.close()
        engine.close()
    finally:
        etcd.stop()


def test_etcd_sync_on_the_event_loop_is_fenced_and_ordered(tmp_path):
    """``sync_async`` (group commit without a worker thread): queued batches reach etcd in order over
    the trio client; a deposed leader's queue is refused (Fenced); a sync cancelled mid-transaction
    leaves the engine refusing everything (its outcome is unknown)."""
    etcd = EtcdCluster(str(tmp_path / "etcd"), size=1).start()
    try:
        endpoints = etcd.endpoints
        old = Election(endpoints, b"/a", "old:1", ttl=2)
        c = old.client()
        lease = old.grant(c)
        rev = old.acquire(c, lease)
        engine = EtcdEngine(endpoints, b"/a", cache=True, pipelined=True, max_txn_ops=10)
        engine.fence(old.key, rev)
        for round_ in range(5):
            engine.write([(b"k%d" % i, b"%d" % round_) for i in range(6)])
        engine.write([(b"k0", None), (b"big", b"x" * 100_000)])  # a request and a reply over one segment
        plain = EtcdEngine(endpoints, b"/a")
        cancelled = EtcdEngine(endpoints, b"/b", cache=True, pipelined=True)

        async def main():
            await engine.sync_async()
            assert not engine.unsynced
            assert [(k, v) for k, v in plain.scan(b"k")] == [(b"k%d" % i, b"4") for i in range(1, 6)]
            assert plain.get(b"big") == b"x" * 100_000
            engine.write([(b"k1", b"5")])
            c.call("/v3/lease/revoke", {"ID": str(lease)})  # deposed: another meta may lead now
            with pytest.raises(Fenced):
                await engine.sync_async()
            assert plain.get(b"k1") == b"4" and engine.broken
            await engine.aclose()

            cancelled.write([(b"x", b"1")])
            with trio.move_on_after(0):  # cancelled at its first checkpoint: the request may be out
                await cancelled.sync_async()
            assert cancelled.broken
            with pytest.raises(OSError):
                cancelled.get(b"x")
            await cancelled.aclose()

        trio.run(main)
        plain.close()
        c.close()
    finally:
        etcd.stop()


def test_standby_copy_follows_every_change_and_hands_over_at_the_election_revision(tmp_path):
    """The warm standby copy (meta/etcd_mirror.py) equals a fresh load of the namespace at the revision
    the new leader won at, including changes the old leader acknowledged just before it lost the key,
    deletes, and changes made while the watch was broken or past a compaction (reloaded)."""
    etcd = EtcdCluster(str(tmp_path / "etcd"), size=3).start()
    try:
        endpoints = etcd.endpoints
        old, new = Election(endpoints, b"/w", "old:1", ttl=2), Election(endpoints, b"/w", "new:1", ttl=2)
        c = old.client()
        lease = old.grant(c)
        rev = old.acquire(c, lease)
        leader = EtcdEngine(endpoints, b"/w", cache=True, pipelined=True)
        leader.fence(old.key, rev)
        leader.write([(b"before-%d" % i, b"%d" % i) for i in range(50)])
        leader.sync()
        mirror = Mirror(endpoints, b"/w")
        follower = threading.Thread(target=mirror.run)
        follower.start()
        for i in range(200):  # puts, overwrites and deletes, in batches of several keys
            leader.write([(b"f%03d" % i, b"v%d" % i), (b"before-%d" % (i % 50), None if i % 3 else b"again%d" % i)])
            if i % 7 == 0:
                leader.sync()
            if i == 100:  # the watch breaks (the member it reads from dies): reopened elsewhere
                with mirror._cond:
                    conn = mirror._conn
                if conn is not None and conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
        leader.sync()  # acknowledged just before the old leader loses its key
        c.call("/v3/lease/revoke", {"ID": str(lease)})
        won = new.acquire(c, new.grant(c))
        copy = mirror.take(won, timeout=10)
        follower.join(10)
        assert copy is not None and not follower.is_alive()
        fresh = EtcdEngine(endpoints, b"/w", cache=True)
        assert dict(copy) == dict(fresh.scan(b"")) and len(copy) > 200
        assert mirror.events > 0 and mirror.loads == 1

        # A copy that falls behind a compaction is loaded again, then follows on.
        behind = Mirror(endpoints, b"/w")
        behind.revision, behind.cache = 1, copy.copy()  # as if stopped at revision 1
        reply = c.call("/v3/kv/put", {"key": base64.b64encode(b"/w/m/late").decode(), "value": "eA=="})
        c.call("/v3/kv/compaction", {"revision": reply["header"]["revision"]})
        follower = threading.Thread(target=behind.run)
        follower.start()
        reply = c.call("/v3/kv/put", {"key": base64.b64encode(b"/w/m/later").decode(), "value": "eQ=="})
        copy = behind.take(int(reply["header"]["revision"]), timeout=10)
        follower.join(10)
        assert copy is not None and copy[b"late"] == b"x" and copy[b"later"] == b"y" and behind.loads == 1
        fresh.close()
        leader.close()
        c.close()
    finally:
        etcd.stop()


class Writers:
    """Native clients and a mount writing files in a loop; records what was acknowledged and when."""

    def __init__(self, ha: HaCluster, mountpoint: str | None, clients: int = 2):
        self.ha = ha
        self.stop = threading.Event()
        self.acked: dict[str, bytes] = {}  # path (in kvfs) -> content of an acknowledged write
        self.ok_times: list[list[float]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._native, args=(i,)) for i in range(clients)]
        if mountpoint:
            self.threads.append(threading.Thread(target=self._mount, args=(mountpoint,)))
        for _ in self.threads:
            self.ok_times.append([])

    def _record(self, slot: int, path: str, data: bytes) -> None:
        with self.lock:
            self.acked[path] = data
            self.ok_times[slot].append(time.monotonic())

    def _native(self, i: int) -> None:
        with self.ha.client(timeout=5.0) as c:
            c.mkdir(f"/native{i}", exist_ok=True, parents=True)
            n = 0
            while not self.stop.is_set():
                path = f"/native{i}/f{n:05d}"
                data = os.urandom(1000 + n % 5000)
                try:
                    c.write_file(path, data)
                    self._record(i, path, data)
                except OSError as exc:
                    self.errors.append(f"{path}: {exc}")
                    time.sleep(0.05)
                n += 1

    def _mount(self, mountpoint: str) -> None:
        slot = len(self.threads) - 1
        d = os.path.join(mountpoint, "bymount")
        os.makedirs(d, exist_ok=True)
        n = 0
        while not self.stop.is_set():
            name = f"m{n:05d}"
            data = os.urandom(500 + n % 3000)
            try:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
                self._record(slot, f"/bymount/{name}", data)
            except OSError as exc:
                self.errors.append(f"{name}: {exc}")
                time.sleep(0.05)
            n += 1

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def resumed_after(self, t0: float) -> list[float]:
        """Per writer: seconds from ``t0`` to its first acknowledged write after it (inf: none)."""
        with self.lock:
            return [min((t - t0 for t in times if t > t0), default=float("inf")) for times in self.ok_times]


def ask(address: str, method: int, request: P.Struct):
    """One request to one meta process (not through the router)."""
    async def run():
        c = RpcClient("meta", address, P.META_METHODS, timeout=5)
        try:
            return await c.request(method, request)
        finally:
            c.close()

    return trio.run(run)


def check_acked(ha: HaCluster, acked: dict[str, bytes]) -> None:
    with ha.client(timeout=20.0) as c:
        for path, data in sorted(acked.items()):
            assert c.read_file(path) == data, path


def test_kill_leader_mid_workload_loses_nothing_and_clients_resume(ha, tmp_path):
    mountpoint = ha.mount(str(tmp_path / "mnt"))
    leader = ha.leader()
    with Writers(ha, mountpoint) as w:
        time.sleep(2.0)
        before = len(w.acked)
        killed_at = time.monotonic()
        ha.meta_procs[leader].kill(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and max(w.resumed_after(killed_at)) == float("inf"):
            time.sleep(0.2)
        time.sleep(1.0)
    resumed = w.resumed_after(killed_at)
    print(f"writers resumed {[f'{r:.2f}' for r in resumed]} s after the leader's kill; "
          f"{len(w.acked)} writes acknowledged, {len(w.errors)} failed: {w.errors[-3:]}")
    assert before > 0
    assert max(resumed) < 10.0, (resumed, w.errors[-5:])
    new_leader = ha.leader()
    assert new_leader != leader
    # The new leader took over from its warm standby copy (meta/etcd_mirror.py), not a reload, and that
    # copy had every write acknowledged up to the kill.
    took_over = [line for line in ha.meta_procs[new_leader].log().splitlines() if ": leader (term revision" in line]
    assert took_over and "from the warm standby copy" in took_over[-1], took_over
    check_acked(ha, w.acked)
    # Every file the mount acknowledged is there through the mount as well.
    for path, data in w.acked.items():
        if path.startswith("/bymount/"):
            with open(mountpoint + path, "rb") as f:
                assert f.read() == data
    ha.meta_procs[leader].start()  # back as a standby


def test_cold_standby_takes_over_by_loading_the_namespace(tmp_path):
    """``--cold-standby`` (and a warm copy that cannot catch up) falls back to loading the namespace
    from etcd: nothing acknowledged is lost either way."""
    ha = HaCluster(str(tmp_path / "cold"), metas=2, chunkservers=1, replication=1,
                   meta_args=("--cold-standby",)).start()
    try:
        leader = ha.leader()
        acked = {}
        with ha.client(timeout=10.0) as c:
            c.mkdir("/cold", exist_ok=True)
            for i in range(30):
                acked[f"/cold/f{i}"] = b"%d" % i
                c.write_file(f"/cold/f{i}", acked[f"/cold/f{i}"])
            c.unlink("/cold/f0")
            del acked["/cold/f0"]
        ha.meta_procs[leader].kill(signal.SIGKILL)
        new_leader = ha.wait_leader()
        assert new_leader != leader
        took_over = [line for line in ha.meta_procs[new_leader].log().splitlines() if ": leader (term revision" in line]
        assert took_over and "loaded from etcd" in took_over[-1], took_over
        check_acked(ha, acked)
        with ha.client(timeout=10.0) as c:
            assert sorted(c.listdir("/cold")) == sorted(p.rsplit("/", 1)[1] for p in acked)
    finally:
        ha.stop()


def test_one_etcd_member_down_service_goes_on(ha):
    victim = ha.etcd.raft_leader()  # the hardest one: etcd elects another leader first
    ha.etcd.kill(victim)
    try:
        with ha.client(timeout=10.0) as c:
            c.mkdir("/one-down", exist_ok=True)
            for i in range(20):
                c.write_file(f"/one-down/f{i}", b"x" * i)
            assert sorted(c.listdir("/one-down")) == sorted(f"f{i}" for i in range(20))
    finally:
        ha.etcd.restart(victim)
        ha.etcd.wait_healthy()


def test_two_etcd_members_down_refuses_writes_then_recovers(ha):
    with ha.client(timeout=10.0) as c:
        c.write_file("/before-quorum-loss", b"kept")
    ha.etcd.kill(1)
    ha.etcd.kill(2)
    try:
        with ha.client(timeout=5.0) as c:
            with pytest.raises(OSError) as info:
                c.mkdir("/no-quorum")
            assert info.value.errno == errno.EIO
        # Every meta is a standby now (no split brain): none claims to lead.
        time.sleep(ha.leader_ttl + 1)
        for i in range(len(ha.meta_ports)):
            if ha.meta_procs[i].alive():
                assert ask(ha.address(i), P.META_HA_STATUS, P.Empty()).role == "standby"
    finally:
        ha.etcd.restart(1)
        ha.etcd.restart(2)
    ha.etcd.wait_healthy()
    ha.wait_leader(timeout=40)
    with ha.client(timeout=10.0) as c:
        c.mkdir("/after-quorum-loss")
        assert c.read_file("/before-quorum-loss") == b"kept"
        # The refused mkdir's outcome was unknown (EIO): the surviving etcd member may have had it in
        # its raft log, committed once the quorum came back. Either way it is whole or absent.
        try:
            assert stat.S_ISDIR(c.resolve("/no-quorum").mode)
        except FileNotFoundError:
            pass
    ha.wait_servers(ha.chunkservers)


def test_paused_old_leader_cannot_write_when_it_wakes(ha):
    leader = ha.wait_leader()
    old = ha.meta_procs[leader]
    # A client that was talking to the leader (default 30 s timeout) when it was paused.
    with ha.client(timeout=30.0) as before:
        before.statfs()
        old.popen.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            before.statfs()  # sent to the paused leader: given up once another leads, then resent
            resumed = time.monotonic() - t0
            # A standby takes over once the paused leader's lease runs out.
            new = ha.wait_leader(timeout=30)
            assert new != leader
            assert resumed < 10.0, resumed
            with ha.client(timeout=10.0) as c:
                c.mkdir("/during-pause")
        finally:
            old.popen.send_signal(signal.SIGCONT)

    with pytest.raises(NotLeader) as info:
        ask(ha.address(leader), P.META_MKNODE, P.MkNode(1, "from-old-leader", 0o40755, 0, 0))
    assert info.value.leader in ("", ha.address(new))  # it may not have seen the new leader's key yet
    with ha.client(timeout=10.0) as c:
        with pytest.raises(FileNotFoundError):
            c.resolve("/from-old-leader")
        c.resolve("/during-pause")


def test_status_shows_leader_standbys_and_etcd_health(ha):
    import subprocess
    import sys

    leader = ha.wait_leader()

    def status() -> str:
        out = subprocess.run([sys.executable, "-m", "kvfs.cli", "status", "--meta", ha.meta_address],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    text = status()
    print(text)
    standbys = [ha.address(i) for i in range(len(ha.meta_ports)) if i != leader and ha.meta_procs[i].alive()]
    assert f"meta on etcd: leader {ha.address(leader)}; standbys {', '.join(sorted(standbys))}" in text
    assert "etcd: 3 of 3 members healthy" in text
    for endpoint in ha.etcd.endpoints:
        assert endpoint in text
    victim = 0 if ha.etcd.raft_leader() != 0 else 1
    ha.etcd.kill(victim)
    try:
        text = status()
        assert "etcd: 2 of 3 members healthy" in text and "DOWN" in text
    finally:
        ha.etcd.restart(victim)
        ha.etcd.wait_healthy()
    # With etcd's quorum gone nobody leads: the standbys still report, and the command fails in one line.
    ha.etcd.kill(1)
    ha.etcd.kill(2)
    try:
        time.sleep(ha.leader_ttl + 1)
        out = subprocess.run([sys.executable, "-m", "kvfs.cli", "status", "--meta", ha.meta_address, "--timeout", "2"],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "NO QUORUM" in out.stdout and "leader NONE" in out.stdout, out.stdout
    finally:
        ha.etcd.restart(1)
        ha.etcd.restart(2)
    ha.etcd.wait_healthy()
    ha.wait_leader(timeout=40)
    ha.wait_servers(ha.chunkservers)


# --------------------------------------------------------------------------- fault-injection soak

ABSENT = None


class Model:
    """What acknowledged operations say each path holds: one value when certain; a set of possible
    values after an operation whose outcome is unknown (the path is then left alone)."""

    def __init__(self) -> None:
        self.certain: dict[str, bytes | None] = {}
        self.uncertain: dict[str, set] = {}
        self.lock = threading.Lock()

    def get(self, path: str):
        return self.certain.get(path, ABSENT)

    def done(self, **changes) -> None:
        with self.lock:
            for path, value in changes.items():
                self.certain[path] = value

    def unknown(self, paths: dict[str, set]) -> None:
        with self.lock:
            for path, values in paths.items():
                self.certain.pop(path, None)
                self.uncertain[path] = values


def _soak_client(ha: HaCluster, i: int, model: Model, stop: threading.Event, stats: dict, seed: int) -> None:
    import random

    rnd = random.Random(seed * 100 + i)
    base = f"/soak{i}"
    with ha.client(timeout=5.0) as c:
        for _ in range(100):
            try:
                c.mkdir(base, exist_ok=True)
                break
            except OSError:
                time.sleep(0.2)
        while not stop.is_set():
            names = [f"{base}/n{k}" for k in range(8)]
            path = rnd.choice([p for p in names if p not in model.uncertain] or names)
            if path in model.uncertain:
                time.sleep(0.05)
                continue
            old = model.get(path)
            op = rnd.choice(["write", "write", "unlink", "rename", "read"])
            try:
                if op == "write":
                    data = os.urandom(rnd.choice([0, 100, 5000, 300_000]))
                    try:
                        c.write_file(path, data)
                    except OSError:
                        model.unknown({path: {old, data} | ({b""} if old is ABSENT else set())})
                        raise
                    model.done(**{path: data})
                elif op == "unlink":
                    try:
                        c.unlink(path)
                    except FileNotFoundError:
                        assert old is ABSENT, f"{path} vanished"
                        continue
                    except OSError:
                        model.unknown({path: {old, ABSENT}})
                        raise
                    assert old is not ABSENT, f"{path} existed but the model says it does not"
                    model.done(**{path: ABSENT})
                elif op == "rename":
                    dst = rnd.choice([p for p in names if p != path and p not in model.uncertain] or [path])
                    if dst == path or old is ABSENT:
                        continue
                    dst_old = model.get(dst)
                    try:
                        c.rename(path, dst)
                    except OSError:
                        model.unknown({path: {old, ABSENT}, dst: {dst_old, old}})
                        raise
                    model.done(**{path: ABSENT, dst: old})
                else:
                    try:
                        got = c.read_file(path)
                    except FileNotFoundError:
                        got = ABSENT
                    assert got == old, f"{path}: read does not match the acknowledged state"
                stats["ok"] += 1
            except AssertionError:
                raise
            except OSError as exc:
                stats["failed"] += 1
                stats.setdefault("errors", []).append(f"{op} {path}: {exc}")
                time.sleep(0.1)


def _soak(ha: HaCluster, tmp_path, seconds: float, seed: int = 1) -> None:
    import random

    model = Model()
    stop = threading.Event()
    stats: dict = {"ok": 0, "failed": 0}
    failures: list[BaseException] = []

    def guarded(*a):
        try:
            _soak_client(*a)
        except BaseException as exc:  # surfaced in the test thread
            failures.append(exc)

    mountpoint = ha.mount(str(tmp_path / "soak-mnt"))
    threads = [threading.Thread(target=guarded, args=(ha, i, model, stop, stats, seed)) for i in range(3)]
    for t in threads:
        t.start()
    rnd = random.Random(seed)
    faults = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not failures:
            time.sleep(rnd.uniform(2.0, 4.0))
            fault = rnd.choice(["leader", "leader", "chunkserver", "mount"])
            faults.append(fault)
            if fault == "leader":
                i = ha.leader()
                ha.meta_procs[i].kill(signal.SIGKILL)
                time.sleep(rnd.uniform(0.5, 2.0))
                ha.meta_procs[i].start()
            elif fault == "chunkserver":
                i = rnd.randrange(len(ha.servers))
                ha.servers[i].kill(signal.SIGKILL)
                time.sleep(rnd.uniform(0.5, 2.0))
                ha.servers[i].start()
            else:
                ha.mounts.pop(mountpoint).kill(signal.SIGKILL)
                time.sleep(0.5)
                ha.mount(mountpoint)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    if failures:
        raise failures[0]
    print(f"soak: faults {faults}; {stats['ok']} operations acknowledged, {stats['failed']} failed "
          f"(outcome unknown or refused), {len(model.uncertain)} paths uncertain; last errors "
          f"{stats.get('errors', [])[-3:]}")
    assert stats["ok"] > 0
    ha.wait_leader()
    ha.wait_servers(len(ha.servers))
    with ha.client(timeout=20.0) as c:
        for path, value in sorted(model.certain.items()):
            try:
                got = c.read_file(path)
            except FileNotFoundError:
                got = ABSENT
            assert got == value, path
        for path, values in sorted(model.uncertain.items()):
            try:
                got = c.read_file(path)
            except FileNotFoundError:
                got = ABSENT
            assert got in values, path
        for i in range(len(threads)):
            names = {f"/soak{i}/{n}" for n in c.listdir(f"/soak{i}")}
            assert names <= set(model.certain) | set(model.uncertain)
    # The mount sees the same namespace as the native clients.
    for path, value in sorted(model.certain.items()):
        if value is not ABSENT:
            with open(mountpoint + path, "rb") as f:
                assert f.read() == value, path


def test_chunk_sizes_survive_a_leader_change(ha):
    """Per-file chunk sizes and directory policies live in the inodes on etcd: a new leader (from its
    warm standby copy) serves the same sizes, and new files still inherit the policy."""
    from kvfs.layout import CHUNK_SIZE_XATTR

    data = os.urandom(5 * (1 << 20) + 9)
    ha.wait_servers(ha.chunkservers)  # back with the leader of the tests before (a new chunk needs R of them)
    with ha.client(timeout=20.0) as c:
        c.mkdir("/sized-ha")
        c.setxattr(c.resolve("/sized-ha").ino, CHUNK_SIZE_XATTR, b"2M")
        c.write_file("/sized-ha/policy", data)
        c.write_file("/sized-ha/explicit", data, chunk_size=256 << 10)
    leader = ha.leader()
    ha.meta_procs[leader].kill(signal.SIGKILL)
    new = ha.wait_leader()
    assert new != leader
    ha.wait_servers(ha.chunkservers)
    with ha.client(timeout=20.0) as c:
        for name, size in (("policy", 2 << 20), ("explicit", 256 << 10)):
            reply = c.chunk_map(c.resolve(f"/sized-ha/{name}").ino)
            assert reply.chunk_size == size and len(reply.chunks) == -(-len(data) // size), name
            assert c.read_file(f"/sized-ha/{name}") == data
        c.write_file("/sized-ha/after", data[:3 << 20])
        assert c.chunk_map(c.resolve("/sized-ha/after").ino).chunk_size == 2 << 20
    ha.meta_procs[leader].start()  # back as a standby


def test_soak_short(ha, tmp_path):
    """Random namespace and data operations from 3 clients while meta leaders, chunkservers and the
    mount are killed and restarted; the final state matches the model of acknowledged operations."""
    _soak(ha, tmp_path, seconds=15)


@pytest.mark.slow
def test_soak_long(ha, tmp_path):
    _soak(ha, tmp_path, seconds=180, seed=7)


@pytest.mark.parametrize("args, message", [
    ([], "needs --data-dir (RocksDB) or --engine etcd://"),
    (["--engine", "http://h:2379"], "bad etcd url"),
    (["--engine", "etcd://h:2379", "--leader-ttl", "1"], "--leader-ttl must be at least 2"),
])
def test_meta_engine_usage_errors_are_one_line(args, message):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kvfs.cli", "meta", "--insecure", "--listen", "127.0.0.1:0", *args],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
