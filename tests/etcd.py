"""Start real etcd members for tests: each its own process, data dir and loopback ports.

Needs the ``etcd`` binary (Debian's ``etcd-server``; ``./dev.sh test`` installs it). Members are started
with the transaction limits kvfs needs (``kvfs.meta.engine_etcd.ETCD_FLAGS``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import dataclass, field

from cluster import free_port, wait_for

from kvfs.meta.engine_etcd import MAX_REQUEST_BYTES, MAX_TXN_OPS


def etcd_binary() -> str | None:
    return shutil.which("etcd")


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    popen: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class EtcdCluster:
    root: str
    size: int = 3
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i in range(self.size):
            name = f"e{i}"
            self.members.append(Member(name, free_port(), free_port(), os.path.join(self.root, name),
                                       os.path.join(self.root, f"{name}.log")))

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def url(self, prefix: str = "/kvfs") -> str:
        return f"etcd://{','.join(self.endpoints)}{prefix}"

    def _start(self, m: Member, state: str) -> None:
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        log = open(m.log_path, "ab")
        m.popen = subprocess.Popen([
            etcd_binary() or "etcd", "--name", m.name, "--data-dir", m.data_dir,
            "--listen-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", os.path.basename(self.root),
            # Short raft timers: a member's loss is noticed within a second on loopback.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--max-txn-ops", str(MAX_TXN_OPS), "--max-request-bytes", str(MAX_REQUEST_BYTES),
            "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m",
            "--logger", "zap", "--log-level", "warn",
        ], stdout=log, stderr=log, start_new_session=True)
        log.close()

    def start(self) -> EtcdCluster:
        os.makedirs(self.root, exist_ok=True)
        for m in self.members:
            self._start(m, "new")
        self.wait_healthy()
        return self

    def healthy(self, m: Member) -> bool:
        try:
            req = urllib.request.Request(f"http://{m.endpoint}/v3/kv/range", data=json.dumps({"key": "AA=="}).encode(),
                                         method="POST")
            with urllib.request.urlopen(req, timeout=1.0) as resp:
                return resp.status == 200
        except OSError:
            return False

    def raft_leader(self) -> int:
        """Index of the member that leads etcd's raft group now."""
        def find() -> int | None:
            for i, m in enumerate(self.members):
                if not m.alive():
                    continue
                try:
                    req = urllib.request.Request(f"http://{m.endpoint}/v3/maintenance/status", data=b"{}", method="POST")
                    with urllib.request.urlopen(req, timeout=1.0) as resp:
                        st = json.load(resp)
                except OSError:
                    continue
                if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                    return i
            return None

        def found() -> tuple[int] | None:
            i = find()
            return None if i is None else (i,)  # a tuple: index 0 is a valid answer

        return wait_for(found, 20, "an etcd raft leader", interval=0.1)[0]

    def wait_healthy(self, timeout: float = 30) -> None:
        for m in self.members:
            if m.alive():
                wait_for(lambda m=m: self.healthy(m), timeout, f"etcd member {m.name}", interval=0.1)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        m = self.members[i]
        if m.alive():
            assert m.popen is not None
            m.popen.send_signal(sig)
            m.popen.wait(timeout=15)

    def restart(self, i: int) -> None:
        self.kill(i)
        self._start(self.members[i], "existing")

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill(i, signal.SIGTERM)


def wait_leader_key(url: str, timeout: float = 20) -> str:
    """The address of the current meta leader (blocking until one is elected)."""
    from kvfs.meta.engine_etcd import EtcdClient, parse_url

    endpoints, prefix = parse_url(url)
    client = EtcdClient(endpoints)
    try:
        def leader() -> str | None:
            try:
                kvs = client.range(prefix + b"/leader")
            except OSError:
                return None
            return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

        return wait_for(leader, timeout, "a meta leader", interval=0.1)
    finally:
        client.close()


@dataclass
class HaCluster:
    """3 etcd members, several ``kvfs meta --engine etcd://...`` processes (one leads), chunkservers, mounts."""

    root: str
    metas: int = 3
    chunkservers: int = 3
    replication: int = 2
    leader_ttl: int = 3  # survives an etcd raft election (about a second) without stepping down
    meta_args: tuple[str, ...] = ()
    etcd: EtcdCluster | None = None
    meta_procs: list = field(default_factory=list)
    meta_ports: list[int] = field(default_factory=list)
    servers: list = field(default_factory=list)
    mounts: dict = field(default_factory=dict)

    @property
    def meta_address(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.meta_ports)

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.meta_ports[i]}"

    def start(self) -> HaCluster:
        from cluster import Proc

        os.makedirs(self.root, exist_ok=True)
        self.etcd = EtcdCluster(os.path.join(self.root, "etcd"), size=3).start()
        for i in range(self.metas):
            port = free_port()
            self.meta_ports.append(port)
            self.meta_procs.append(Proc(
                ["meta", "--insecure", "--engine", self.etcd.url(), "--listen", f"127.0.0.1:{port}", "--leader-ttl",
                 str(self.leader_ttl), "--replication", str(self.replication), "--chunk-size", "1M",
                 "--heartbeat-timeout", "3", *self.meta_args], os.path.join(self.root, f"meta{i}.log")))
            self.meta_procs[-1].start()
        self.wait_leader()
        for i in range(self.chunkservers):
            port = free_port()
            proc = Proc(["chunkserver", "--insecure", "--meta", self.meta_address, "--listen", f"127.0.0.1:{port}",
                         "--data-dir", os.path.join(self.root, f"cs{i}"), "--fsync", "never"],
                        os.path.join(self.root, f"cs{i}.log"))
            proc.start()
            self.servers.append(proc)
        self.wait_servers(self.chunkservers)
        return self

    def leader(self, timeout: float = 20) -> int:
        """Index of the meta process that leads (waits for one)."""
        assert self.etcd is not None
        address = wait_leader_key(self.etcd.url(), timeout)
        return [self.address(i) for i in range(len(self.meta_ports))].index(address)

    def wait_leader(self, timeout: float = 30) -> int:
        """Index of the leader once it answers requests."""
        def serving():
            try:
                with self.client(timeout=2.0) as c:
                    c.statfs()
                return True
            except OSError:
                return False

        wait_for(serving, timeout, "a meta leader that answers", interval=0.2)
        return self.leader()

    def client(self, **options):
        import kvfs

        return kvfs.SyncClient(self.meta_address, kvfs.ClientOptions(timeout=options.pop("timeout", 10.0), **options))

    def wait_servers(self, count: int, timeout: float = 30) -> None:
        def live() -> bool:
            try:
                with self.client(timeout=3.0) as c:
                    return sum(1 for s in c.refresh_servers().servers if s.alive) >= count
            except OSError:
                return False

        wait_for(live, timeout, f"{count} live chunkservers", interval=0.2)

    def mount(self, mountpoint: str) -> str:
        from cluster import is_mounted, start_mount

        if is_mounted(mountpoint):  # the dead mount of a killed `kvfs mount`: gone before we wait for the new one
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)
        os.makedirs(mountpoint, exist_ok=True)
        self.mounts[mountpoint] = start_mount(self.root, self.meta_address, mountpoint, len(self.mounts))
        return mountpoint

    def stop(self) -> None:
        from cluster import is_mounted

        for mp, proc in self.mounts.items():
            proc.kill(signal.SIGTERM)
            if is_mounted(mp):
                subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        for proc in self.servers + self.meta_procs:
            if proc.alive():
                proc.popen.send_signal(signal.SIGCONT)  # a test may have paused it
            proc.kill(signal.SIGTERM)
        if self.etcd is not None:
            self.etcd.stop()
