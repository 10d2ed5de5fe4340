import os


def test_cluster_client_roundtrip(cluster):
    data = os.urandom(3 * 1024 * 1024 + 12345)
    with cluster.client() as c:
        c.mkdir("/smoke", exist_ok=True)
        c.write_file("/smoke/f", data)
        assert c.read_file("/smoke/f") == data
        assert c.stat("/smoke/f").size == len(data)


def test_mount_roundtrip(mnt):
    path = os.path.join(mnt, "f")
    data = os.urandom(2 * 1024 * 1024 + 7)
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        assert f.read() == data
    assert os.listdir(mnt) == ["f"]


def test_mount_raises_kernel_readahead(mounted):
    from kvfs.mount.runner import _device_of_mount

    dev = _device_of_mount(mounted.mountpoint)
    with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
        assert int(f.read()) == 4096  # the default --readahead 4M: sequential reads arrive as 1 MiB requests


def test_status_table_lists_servers(cluster):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "kvfs.cli", "status", "--meta", cluster.meta_address],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"meta {cluster.meta_address}:") and "replication 2" in lines[0]
    assert lines[1].split()[:3] == ["ID", "ADDRESS", "STATE"]
    assert sum(1 for line in lines[2:5] if line.split()[2] == "up") == 3
