"""Storage nodes and native-client hosts need no libfuse (issue 10): with pyfuse3 impossible to import,
meta and chunkservers start and serve, the native client reads and writes, and only mounting fails,
with one line saying what to install."""

from __future__ import annotations

import os
import subprocess
import sys

from cluster import Cluster, free_port

HIDE_PYFUSE3 = "raise ModuleNotFoundError(\"No module named 'pyfuse3'\", name='pyfuse3')\n"


def test_services_and_native_client_run_without_pyfuse3(tmp_path, monkeypatch):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "pyfuse3.py").write_text(HIDE_PYFUSE3)  # shadows the installed pyfuse3 in every child process
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])))
    check = subprocess.run([sys.executable, "-c", "import pyfuse3"], capture_output=True, text=True)
    assert check.returncode != 0 and "pyfuse3" in check.stderr  # really hidden

    cluster = Cluster(str(tmp_path / "c"), chunkservers=2, replication=2).start()
    try:
        data = os.urandom(3 << 20)
        client = (f"import sys, kvfs\nwith kvfs.SyncClient({cluster.meta_address!r}) as c:\n"
                  f"    c.write_file('/w.bin', sys.stdin.buffer.read())\n"
                  f"    sys.stdout.buffer.write(c.read_file('/w.bin'))\n"
                  f"assert 'pyfuse3' not in sys.modules or sys.modules['pyfuse3'] is None\n")
        res = subprocess.run([sys.executable, "-c", client], input=data, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr.decode()
        assert res.stdout == data
        status = subprocess.run([sys.executable, "-m", "kvfs.cli", "status", "--meta", cluster.meta_address],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "up" in status.stdout, status.stderr
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        for cmd in (["mount", str(mnt), "--meta", cluster.meta_address],
                    ["up", str(mnt), "--data-dir", str(tmp_path / "up"), "--listen", f"127.0.0.1:{free_port()}"]):
            res = subprocess.run([sys.executable, "-m", "kvfs.cli", *cmd], capture_output=True, text=True, timeout=60)
            assert res.returncode == 1
            assert res.stderr.strip().splitlines() == [
                "kvfs: error: mounting needs pyfuse3: pip install 'kvfs[mount]' (builds against libfuse3-dev: "
                "apt-get install libfuse3-dev pkg-config gcc)"], res.stderr
    finally:
        cluster.stop()
    assert "Traceback" not in cluster.meta.log()
    assert all("Traceback" not in s.log() for s in cluster.servers)
