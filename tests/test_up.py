"""The embedded default: `kvfs up` in one process, Ctrl-C, crash recovery, and one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from cluster import free_port, is_mounted, wait_for


def _up(mountpoint: str | None, data_dir: str, port: int, log_path: str, home: str | None = None) -> subprocess.Popen:
    """``kvfs up``; with ``mountpoint`` None it takes the default (~/kvfs, with HOME=``home``)."""
    log = open(log_path, "ab")
    env = dict(os.environ, HOME=home) if home else None
    try:
        return subprocess.Popen([sys.executable, "-m", "kvfs.cli", "up", *([mountpoint] if mountpoint else []),
                                 "--data-dir", data_dir, "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=log,
                                start_new_session=True, env=env)
    finally:
        log.close()


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def test_up_serves_files_survives_a_crash_and_stops_cleanly(tmp_path):
    """On the default mountpoint (~/kvfs, created by kvfs up), as a new user runs it: after a kill -9
    the next `kvfs up` cleans the dead mount itself."""
    home = str(tmp_path / "home")
    os.mkdir(home)
    mnt, data, log = os.path.join(home, "kvfs"), str(tmp_path / "data"), str(tmp_path / "up.log")
    port = free_port()
    proc = _up(None, data, port, log, home)
    wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, 30, "kvfs up to mount")
    assert is_mounted(mnt), _read(log)
    assert f"mount:        {mnt}" in _read(log)
    payload = os.urandom(9 * 1024 * 1024 + 3)
    with open(os.path.join(mnt, "weights.bin"), "wb") as f:
        f.write(payload)
    # Crash: kill -9 leaves a dead FUSE mount behind; the next start must detect and clean it.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.stat(mnt)
        stale = False
    except OSError:
        stale = True
    assert stale, "a killed FUSE server leaves an unreachable mount"
    proc = _up(None, data, port, log, home)
    wait_for(lambda: (is_mounted(mnt) and os.path.exists(os.path.join(mnt, "weights.bin"))) or proc.poll() is not None,
             30, "kvfs up to come back")
    assert "stale mount" in _read(log)
    with open(os.path.join(mnt, "weights.bin"), "rb") as f:
        assert f.read() == payload  # acknowledged (closed) data survived the crash
    # Ctrl-C unmounts and exits 0.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, _read(log)
    assert not is_mounted(mnt)


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfs.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_bad_mountpoints_give_one_line_errors(tmp_path):
    missing = _cli("up", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{free_port()}")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"kvfs: error: {tmp_path / 'nope'}: mountpoint does not exist "
                                                   f"(create it with mkdir -p {tmp_path / 'nope'})"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    nonempty = _cli("mount", str(full), "--meta", f"127.0.0.1:{free_port()}")
    assert nonempty.returncode == 1 and "not empty" in nonempty.stderr and "Traceback" not in nonempty.stderr


def test_unreachable_meta_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    res = _cli("mount", str(tmp_path / "m"), "--meta", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvfs: error: meta 127.0.0.1:") and "cannot connect" in lines[0]
    status = _cli("status", "--meta", f"127.0.0.1:{free_port()}")
    assert status.returncode == 1 and status.stderr.count("\n") == 1


def test_mount_cleans_its_own_stale_mount(cluster, tmp_path):
    mnt = str(tmp_path / "m")
    cluster.mount(mnt)
    with open(os.path.join(mnt, "kept"), "wb") as f:
        f.write(b"acknowledged")
    proc = cluster.mounts.pop(mnt)
    proc.kill(signal.SIGKILL)  # the FUSE server dies; the kernel mount stays, dead
    try:
        os.stat(mnt)
        raise AssertionError("a killed FUSE server leaves an unreachable mount")
    except OSError:
        pass
    cluster.mount(mnt)  # a plain `kvfs mount` again: it unmounts the stale one first
    # (the dead mount is still listed in mountinfo, so wait for the new one's own log line)
    wait_for(lambda: cluster.mounts[mnt].log().count("mounted kvfs") == 2 or not cluster.mounts[mnt].alive(),
             20, "the new mount")
    assert "stale mount" in cluster.mounts[mnt].log()
    with open(os.path.join(mnt, "kept"), "rb") as f:
        assert f.read() == b"acknowledged"
    cluster.unmount(mnt)
