"""Slow writers lose nothing: uploaded, uncommitted chunks live as long as the writer's lease (issue 9).

Meta runs with a 3 s lease and a 2 s pending grace, so minutes of a slow checkpoint writer fit into
seconds: every writer below pauses longer than both between chunks, and only the client's lease
renewal keeps its chunks alive.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

MiB = 1 << 20
SLOW = ("--lease-seconds", "3", "--pending-grace", "2")


@pytest.fixture
def slow_cluster(make_cluster):
    return make_cluster(chunkservers=1, replication=1, meta_args=SLOW)


def test_slow_writer_through_the_mount_and_the_client_keeps_every_chunk(slow_cluster, tmp_path):
    mnt = slow_cluster.mount(str(tmp_path / "mnt"))
    blocks = [os.urandom(MiB) for _ in range(5)]
    path = os.path.join(mnt, "checkpoint.bin")
    with open(path, "wb") as f:  # no fsync: everything is committed by the close
        for block in blocks:
            f.write(block)
            f.flush()  # into the mount (a FUSE write), not a commit
            time.sleep(1.6)  # past the pending grace and half the lease, every chunk
    with open(path, "rb") as f:
        assert f.read() == b"".join(blocks)

    with slow_cluster.client() as c:
        attr = c.create("/native.bin")
        c.open(attr.ino, write=True, created=attr)
        for i, block in enumerate(blocks):
            c.write(attr.ino, i * MiB, block)
            time.sleep(1.6)
        c.release(attr.ino)
        assert c.read_file("/native.bin") == b"".join(blocks)


def test_a_meta_restart_mid_write_loses_no_uploaded_chunk(slow_cluster):
    blocks = [os.urandom(MiB) for _ in range(4)]
    with slow_cluster.client() as c:
        attr = c.create("/across-restart.bin")
        c.open(attr.ino, write=True, created=attr)
        c.write(attr.ino, 0, blocks[0])
        c.write(attr.ino, MiB, blocks[1])
        time.sleep(1.0)  # both full chunks uploaded, not committed
        slow_cluster.restart_meta()
        slow_cluster.wait_servers(1)
        # Longer than the grace after the chunkserver re-reported them: only their persisted pending
        # records keep them from being deleted as unreferenced.
        time.sleep(4)
        c.write(attr.ino, 2 * MiB, blocks[2])
        c.write(attr.ino, 3 * MiB, blocks[3])
        c.release(attr.ino)
        assert c.read_file("/across-restart.bin") == b"".join(blocks)


WRITER = textwrap.dedent("""
    import sys, time, kvfs
    with kvfs.SyncClient(sys.argv[1], kvfs.ClientOptions(timeout=10)) as c:
        attr = c.create("/frozen.bin")
        c.open(attr.ino, write=True, created=attr)
        c.write(attr.ino, 0, b"x" * (1 << 20) + b"tail")
        time.sleep(1)  # the full chunk is uploaded in the background
        print("uploaded", flush=True)
        sys.stdin.readline()
        try:
            c.release(attr.ino)
            print("committed", flush=True)
        except OSError as exc:
            print("error", exc.errno, exc, flush=True)
""")


def test_a_writer_that_lost_its_lease_gets_an_error_not_a_hole(slow_cluster):
    """A writer frozen past its lease (SIGSTOP): meta drops its uploaded chunk, and its close fails
    with EIO instead of committing a file whose chunk is gone."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, slow_cluster.meta_address], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "uploaded", proc.stderr.read()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(5)  # > lease (3 s) + housekeeping: the chunk is garbage now
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        proc.kill()
    assert out.startswith(f"error {errno.EIO} "), (out, err)
    assert "dropped before this commit" in out
    with slow_cluster.client() as c:
        assert c.resolve("/frozen.bin").size == 0  # nothing was committed: no file with a hole
        assert c.read_file("/frozen.bin") == b""
