"""The create path through the mount (issue 12): what a create costs meta, and the write lease of a new file.

A file created through the mount without O_TRUNC takes no write lease at create: its first write does
(META_OPEN_WRITE, whose reply says whether another client wrote the file meanwhile). So a file created
and closed unwritten costs meta a lookup and a create, nothing else, and leaves no lease behind; one
writer at a time still holds, with EBUSY at the write of the loser. An O_TRUNC create (about to be
written) takes the lease in its create. Either way the commit of the close drops it.
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

    calls = counted_calls(counted, creates)
    assert calls.get("mknode") == n
    assert calls.get("lookup", 0) <= n
    for method in ("open_write", "release_write", "commit", "get_chunks"):
        assert calls.get(method, 0) == 0, (method, calls)


def test_an_o_trunc_create_closed_unwritten_releases_its_lease_and_commits_nothing(counted, dirs):
    a, b = dirs
    n = 20

    def creates() -> None:
        for i in range(n):
            with open(os.path.join(a, f"t{i}"), "w"):  # O_TRUNC: nothing to truncate in a new file
                pass

    calls = counted_calls(counted, creates)
    assert calls.get("mknode") == n and calls.get("release_write") == n, calls
    for method in ("open_write", "commit", "get_chunks"):
        assert calls.get(method, 0) == 0, (method, calls)
    with open(os.path.join(b, "t0"), "r+b") as f:  # released
        f.write(b"b")


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
    assert calls.get("mknode") == 1 and calls.get("commit") == 1, calls  # the O_TRUNC create took the lease
    assert calls.get("open_write", 0) == 0 and calls.get("release_write", 0) == 0, calls
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


def test_fsync_keeps_the_lease(counted, dirs):
    a, b = dirs
    with open(os.path.join(a, "f"), "wb") as f:
        f.write(b"one")
        f.flush()
        os.fsync(f.fileno())  # commits, but the writer goes on: no other writer meanwhile
        with pytest.raises(OSError) as busy:
            open(os.path.join(b, "f"), "r+b")
        assert busy.value.errno == errno.EBUSY
        f.write(b" two")
    assert read(os.path.join(b, "f")) == b"one two"


def test_a_write_after_the_close_of_a_duplicate_descriptor_takes_the_lease_again(counted, dirs):
    a, b = dirs
    fd = os.open(os.path.join(a, "f"), os.O_CREAT | os.O_WRONLY, 0o644)
    other = os.dup(fd)
    try:
        os.write(fd, b"x")
        os.close(fd)  # FLUSH: commits and drops the lease (the mount's only handle of the file)
        assert read(os.path.join(b, "f")) == b"x"
        os.write(other, b"y")  # the same open file: its write takes the lease again
        with pytest.raises(OSError) as busy:
            open(os.path.join(b, "f"), "r+b")
        assert busy.value.errno == errno.EBUSY
    finally:
        os.close(other)
    assert read(os.path.join(b, "f")) == b"xy"
