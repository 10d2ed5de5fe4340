"""Decommissioning chunkservers (issue 13) with real processes: a draining server gets no new chunks,
its chunks are copied away until it is `decommissioned`, and then killing it loses nothing. The drain
state survives a meta restart; unknown servers and drains that would leave too few servers are refused;
a decommissioned server that has been stopped can be forgotten (and only such a server).
(Admin-only: tests/test_tls.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cluster import wait_for

from kvfs import protocol as P

MiB = 1 << 20


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfs.cli", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def addresses(cl) -> list[str]:
    return [p.args[p.args.index("--listen") + 1] for p in cl.servers]


def server(cl, address: str) -> P.ChunkserverInfo:
    with cl.client() as c:
        return next(s for s in c.refresh_servers().servers if s.address == address)


def holders(cl, path: str) -> list[set[str]]:
    with cl.client() as c:
        return [set(ref.replicas) for ref in c.chunk_map(c.stat(path).ino).chunks]


def decommission(cl, address: str, *extra: str) -> subprocess.CompletedProcess:
    return cli("chunkserver", "decommission", address, "--meta", cl.meta_address, *extra)


def test_decommissioned_server_can_be_killed_without_losing_data(make_cluster, tmp_path):
    cl = make_cluster(chunkservers=4, replication=2)
    files = {f"/f{i}": os.urandom(i * MiB + 777 * i + 1) for i in range(1, 6)}
    with cl.client() as c:
        for path, data in files.items():
            c.write_file(path, data)
    victim = max(addresses(cl), key=lambda a: sum(a in h for p in files for h in holders(cl, p)))
    assert any(victim in h for p in files for h in holders(cl, p))

    out = decommission(cl, victim)
    assert out.returncode == 0, out.stderr
    assert f"chunkserver {victim}: " in out.stdout and ("draining" in out.stdout or "decommissioned" in out.stdout)
    refused = decommission(cl, victim, "--forget")  # still running: cannot be forgotten
    assert refused.returncode == 1 and "only a decommissioned server that has been stopped" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    # New chunks never land on it, draining or done.
    fresh = {f"/new{i}": os.urandom(3 * MiB + i) for i in range(4)}
    with cl.client() as c:
        for path, data in fresh.items():
            c.write_file(path, data)
    assert all(victim not in h for p in fresh for h in holders(cl, p))
    files.update(fresh)

    wait_for(lambda: server(cl, victim).state == "decommissioned", 60, "the server to be decommissioned")
    info = server(cl, victim)
    assert info.chunks_left == 0 and info.alive  # still running, still serving reads
    status = cli("status", "--meta", cl.meta_address)
    assert status.returncode == 0 and "decommissioned" in status.stdout, status.stderr

    cl.kill_chunkserver(addresses(cl).index(victim))  # kill -9
    wait_for(lambda: not server(cl, victim).alive, 30, "meta to see the server gone")
    with cl.client(local_reads=False) as c:
        for path, data in files.items():
            assert c.read_file(path) == data, path
    mountpoint = cl.mount(str(tmp_path / "mnt"), "--no-local-reads")
    for path, data in files.items():
        with open(mountpoint + path, "rb") as f:
            assert f.read() == data, path
    assert server(cl, victim).state == "decommissioned"  # stopped after it was done: stays so

    # Stopped and decommissioned: an admin drops it from the list; every file still reads back.
    out = decommission(cl, victim, "--forget")
    assert out.returncode == 0 and "forgotten" in out.stdout, out.stderr
    with cl.client(local_reads=False) as c:
        assert victim not in {s.address for s in c.refresh_servers().servers}
        for path, data in files.items():
            assert c.read_file(path) == data, path
    cl.restart_meta()  # the record is gone for good, not just from memory
    cl.wait_servers(3)
    with cl.client(local_reads=False) as c:
        assert victim not in {s.address for s in c.refresh_servers().servers}
        assert all(c.read_file(p) == d for p, d in files.items())


def test_drain_state_survives_meta_restart_and_can_be_cancelled(make_cluster):
    cl = make_cluster(chunkservers=3, replication=2)
    with cl.client() as c:
        c.write_file("/a", os.urandom(2 * MiB + 5))
    victim, other = addresses(cl)[0], addresses(cl)[1]
    assert decommission(cl, victim).returncode == 0

    # A second drain would leave one live server for replication 2: ENOSPC, one line.
    out = decommission(cl, other)
    assert out.returncode == 1 and "would leave 1 live chunkservers for replication 2" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    out = decommission(cl, "127.0.0.1:1")
    assert out.returncode == 1 and "no chunkserver at 127.0.0.1:1" in out.stderr, out.stderr
    with cl.client() as c, pytest.raises(FileNotFoundError):
        c.call(c.client.meta.request, P.META_DECOMMISSION, P.Decommission("127.0.0.1:1"))

    cl.restart_meta()
    cl.wait_servers(3)
    assert server(cl, victim).state in ("draining", "decommissioned")
    with cl.client() as c:
        for i in range(3):
            c.write_file(f"/after{i}", os.urandom(2 * MiB))
    assert all(victim not in h for i in range(3) for h in holders(cl, f"/after{i}"))

    assert decommission(cl, victim, "--cancel").returncode == 0
    assert server(cl, victim).state == "live"
    cl.restart_meta()
    cl.wait_servers(3)
    assert server(cl, victim).state == "live"
