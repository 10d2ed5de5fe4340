"""Start real kvfs processes for tests and benchmarks: meta, chunkservers and FUSE mounts.

Every service runs as its own ``python -m kvfs.cli ...`` process on loopback ports; nothing is mocked.
Services run ``--insecure`` (plaintext) unless ``Cluster(tls=True)``: then a CA and a certificate per
process are made under ``root/tls`` (``make_tls``) and every process, mount and client uses them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import kvfs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    args: list[str]
    log_path: str
    popen: subprocess.Popen | None = None
    # The interpreter (and so the kvfs checkout) that runs it: KVFS_TEST_PYTHON when the Proc was made, so a
    # benchmark can run a baseline checkout's processes beside this one's.
    python: str = field(default_factory=lambda: os.environ.get("KVFS_TEST_PYTHON") or sys.executable)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        # Another checkout's interpreter must not import this checkout's kvfs/ from the working directory.
        cwd = None if self.python == sys.executable else os.path.dirname(os.path.abspath(self.log_path))
        self.popen = subprocess.Popen([self.python, "-m", "kvfs.cli", *self.args], stdout=log, stderr=log,
                                      start_new_session=True, cwd=cwd)
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def scrape_metrics(port: int) -> str:
    """The Prometheus exposition text a kvfs process serves on ``port`` of this host."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def mount_requests(port: int) -> dict[tuple[str, str], float]:
    """FUSE requests a mount started with ``--metrics-port port`` answered so far: (op, status) -> count."""
    return {(m.group(1), m.group(2)): float(m.group(3)) for m in re.finditer(
        r'^kvfs_fuse_requests_total\{op="(\w+)",status="(\w+)"\} (\S+)$', scrape_metrics(port), re.MULTILINE)}


def start_mount(root: str, meta_address: str, mountpoint: str, index: int, *extra: str) -> Proc:
    """A `kvfs mount` process; returns once the mount is up (its log is ``root/mount-<index>.log``)."""
    proc = Proc(["mount", mountpoint, "--meta", meta_address, "--timeout", "10", *extra],
                os.path.join(root, f"mount-{index}.log"))
    proc.start()

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"mount exited:\n{proc.log()}")
        return is_mounted(mountpoint)

    wait_for(ready, 20, f"mount at {mountpoint}")
    return proc


TLS_ROLES = ("admin", "client")  # certificates make_tls issues besides meta's and the chunkservers'


def make_tls(root: str, chunkservers: int) -> dict[str, str]:
    """A cluster CA and TLS directories under ``root/tls``: name -> dir for "meta", "cs0".., "admin",
    "client" (kept when they exist, so a restarted cluster keeps its certificates)."""
    from kvfs import certs

    base = os.path.join(root, "tls")
    ca = os.path.join(base, "ca")
    if not os.path.exists(os.path.join(ca, certs.CA_KEY)):
        certs.init_ca(ca)
    dirs = {}
    wanted = [("meta", "meta"), *[(f"cs{i}", "chunkserver") for i in range(chunkservers)],
              *[(r, r) for r in TLS_ROLES]]
    for name, role in wanted:
        dirs[name] = out = os.path.join(base, name)
        if not os.path.exists(os.path.join(out, "key.pem")):
            certs.issue(ca, out, role=role, name=name, sans=("127.0.0.1",) if role in ("meta", "chunkserver") else ())
    return dirs


@dataclass
class Cluster:
    root: str
    chunkservers: int = 3
    replication: int = 2
    chunk_size: str = "1M"
    heartbeat_timeout: float = 3.0
    rereplicate_delay: float = 30.0
    chunkserver_args: tuple[str, ...] = ()  # extra `kvfs chunkserver` flags, e.g. ("--capacity", "3M")
    meta_args: tuple[str, ...] = ()  # extra `kvfs meta` flags, e.g. ("--lease-seconds", "3")
    remote_allow: tuple[str, ...] = ("*",)  # `kvfs meta --remote-allow` (tests attach moto and tmp dirs)
    meta_metrics_port: int = 0
    tls: bool = False  # mutual TLS with certificates under root/tls (else every service runs --insecure)
    tls_dirs: dict[str, str] = field(default_factory=dict)  # make_tls's: "meta", "cs0", ..., "admin", "client"
    meta_port: int = field(default_factory=free_port)
    meta: Proc | None = None
    servers: list[Proc] = field(default_factory=list)
    mounts: dict[str, Proc] = field(default_factory=dict)

    @property
    def meta_address(self) -> str:
        return f"127.0.0.1:{self.meta_port}"

    def security(self, name: str) -> list[str]:
        """The TLS flags of process ``name`` ("meta", "cs0", "client", ...)."""
        if not self.tls:
            return [] if name in TLS_ROLES else ["--insecure"]
        return ["--tls-dir", self.tls_dirs[name]]

    def start(self) -> Cluster:
        os.makedirs(self.root, exist_ok=True)
        self.servers = []
        if self.tls:
            self.tls_dirs = make_tls(self.root, self.chunkservers)
        self.meta = Proc(["meta", *self.security("meta"), "--listen", self.meta_address,
                          "--data-dir", os.path.join(self.root, "meta"),
                          "--replication", str(self.replication), "--chunk-size", self.chunk_size,
                          "--heartbeat-timeout", str(self.heartbeat_timeout),
                          "--rereplicate-delay", str(self.rereplicate_delay),
                          "--metrics-port", str(self.meta_metrics_port),
                          *[a for prefix in self.remote_allow for a in ("--remote-allow", prefix)], *self.meta_args],
                         os.path.join(self.root, "meta.log"))
        self.meta.start()
        self.wait_meta()
        for i in range(self.chunkservers):
            port = free_port()
            proc = Proc(["chunkserver", *self.security(f"cs{i}"), "--meta", self.meta_address,
                         "--listen", f"127.0.0.1:{port}",
                         "--data-dir", os.path.join(self.root, f"cs{i}"), *self.chunkserver_args],
                        os.path.join(self.root, f"cs{i}.log"))
            proc.start()
            self.servers.append(proc)
        self.wait_servers(self.chunkservers)
        return self

    def wait_meta(self, timeout: float = 20) -> None:
        def up() -> bool:
            assert self.meta is not None
            if not self.meta.alive():
                raise RuntimeError(f"meta exited:\n{self.meta.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.meta_port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(up, timeout, "meta to listen")

    def live_servers(self) -> int:
        with self.client() as c:
            return sum(1 for s in c.refresh_servers().servers if s.alive)

    def wait_servers(self, count: int, timeout: float = 20) -> None:
        wait_for(lambda: self.live_servers() >= count, timeout, f"{count} live chunkservers", interval=0.2)

    def meta_rpcs(self) -> dict[str, float]:
        """Requests meta served so far, by method, every status (kvfs_rpc_requests_total; needs
        ``meta_metrics_port``)."""
        text = scrape_metrics(self.meta_metrics_port)
        out: dict[str, float] = {}
        for m in re.finditer(r'^kvfs_rpc_requests_total\{method="(\w+)",service="meta",status="\w+"\} (\S+)$', text,
                             re.MULTILINE):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    def client(self, **options) -> kvfs.SyncClient:
        """A native client; on a TLS cluster with the "client" certificate unless ``tls_dir`` says otherwise."""
        if self.tls:
            options.setdefault("tls_dir", self.tls_dirs["client"])
        return kvfs.SyncClient(self.meta_address, kvfs.ClientOptions(timeout=options.pop("timeout", 10.0), **options))

    # ------------------------------------------------------------------ faults

    def kill_meta(self, sig: int = signal.SIGKILL) -> None:
        assert self.meta is not None
        self.meta.kill(sig)

    def restart_meta(self) -> None:
        self.kill_meta()
        assert self.meta is not None
        self.meta.start()
        self.wait_meta()

    def kill_chunkserver(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.servers[i].kill(sig)

    def start_chunkserver(self, i: int) -> None:
        self.servers[i].start()

    # ------------------------------------------------------------------ mounts

    def mount(self, mountpoint: str, *extra: str) -> str:
        try:
            os.makedirs(mountpoint, exist_ok=True)
        except FileExistsError:
            pass  # a dead mount from a killed `kvfs mount` (stat fails): the new mount cleans it up
        self.mounts[mountpoint] = start_mount(self.root, self.meta_address, mountpoint, len(self.mounts),
                                              *self.security("client"), *extra)
        return mountpoint

    def unmount(self, mountpoint: str) -> None:
        proc = self.mounts.pop(mountpoint, None)
        if proc is not None:
            proc.kill(signal.SIGTERM)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)

    def stop(self) -> None:
        for mp in list(self.mounts):
            self.unmount(mp)
        for proc in self.servers:
            proc.kill(signal.SIGTERM)
        if self.meta is not None:
            self.meta.kill(signal.SIGTERM)
