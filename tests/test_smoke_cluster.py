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
