"""The create path through the mount (issue 12): what a create costs meta, and the write lease of a new file.

A file created through the mount takes no write lease at create: its first write does (META_OPEN_WRITE,
whose reply says whether another client wrote the file meanwhile), and the commit of the last close
drops it. So a file created and closed unwritten costs meta a lookup and a create, nothing else, and
leaves no lease behind; one writer at a time still holds, with EBUSY at the write of the loser.
Meta's RPCs are counted with its Prometheus counters (kvfs_rpc_requests_total).
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from cluster import Cluster, free_port


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """A cluster whose meta serves metrics, with two mounts (two clients): ``a`` and ``b``."""
    root = tmp_path_factory.mktemp("create-path")
    c = Cluster(str(root / "cluster"), chunkservers=1, replication=1, meta_metrics_port=free_port()).start()
    try:
        c.a = c.mount(str(root / "mnt-a"))
        c.b = c.mount(str(root / "mnt-b"))
        yield c
    finally:
        c.stop()


@pytest.fixture
def dirs(counted, request):
    """A fresh directory for one test, as seen through mount a and through mount b."""
    name = request.node.name
    os.mkdir(os.path.join(counted.a, name))
    return os.path.join(counted.a, name), os.path.join(counted.b, name)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def counted_calls(cluster, fn) -> dict[str, float]:
    before = cluster.meta_rpcs()
    fn()
    time.sleep(0.5)  # the kernel sends RELEASE after close() returns: let any late call land
    after = cluster.meta_rpcs()
    return {m: n - before.get(m, 0.0) for m, n in after.items() if n != before.get(m, 0.0)}


def test_a_create_closed_unwritten_costs_a_lookup_and_a_create(counted, dirs):
    a, _ = dirs
    n = 20

    def creates() -> None:
        for i in range(n):
            os.close(os.open(os.path.join(a, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
        for i in range(n):
            with open(os.path.join(a, f"t{i}"), "w"):  # O_TRUNC: nothing to truncate in a new file
                pass

    calls = counted_calls(counted, creates)
    assert calls.get("mknode") == 2 * n
    assert calls.get("lookup", 0) <= 2 * n
    for method in ("open_write", "release_write", "commit", "get_chunks"):
        assert calls.get(method, 0) == 0, (method, calls)


def test_a_created_file_is_visible_and_free_to_write_for_another_client_at_once(counted, dirs):
    a, b = dirs
    for i in range(5):
        os.close(os.open(os.path.join(a, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
        assert os.stat(os.path.join(b, f"f{i}")).st_size == 0
        with open(os.path.join(b, f"f{i}"), "r+b") as f:  # no lease left behind by the create
            f.write(b"from b")
        assert read(os.path.join(a, f"f{i}")) == b"from b"


def test_the_commit_of_the_last_close_drops_the_lease(counted, dirs):
    a, b = dirs

    def write() -> None:
        with open(os.path.join(a, "w"), "wb") as f:
            f.write(b"data")

    calls = counted_calls(counted, write)
    assert calls.get("commit") == 1 and calls.get("open_write") == 1, calls
    assert calls.get("release_write", 0) == 0, calls
    with open(os.path.join(b, "w"), "r+b") as f:  # released with the commit
        f.write(b"DA")
    assert read(os.path.join(a, "w")) == b"DAta"


def test_a_new_files_first_write_takes_the_lease_and_builds_on_what_another_client_wrote(counted, dirs):
    a, b = dirs
    fd = os.open(os.path.join(a, "f"), os.O_CREAT | os.O_WRONLY, 0o644)  # created, not written yet
    try:
        with open(os.path.join(b, "f"), "r+b") as other:  # the lease is free: b takes it
            other.write(b"hello world")
            other.flush()
            with pytest.raises(OSError) as busy:
                os.write(fd, b"HE")  # one writer at a time: a's first write loses
            assert busy.value.errno == errno.EBUSY
        # b closed (committed, lease dropped): a's write takes the lease and starts from b's version.
        assert os.write(fd, b"HE") == 2
    finally:
        os.close(fd)
    assert read(os.path.join(b, "f")) == b"HEllo world"
    assert read(os.path.join(a, "f")) == b"HEllo world"
