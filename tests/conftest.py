"""Fixtures that start real kvfs processes (see tests/cluster.py).

* ``cluster``: meta + 3 chunkservers (replication 2, 1 MiB chunks), shared by a test module.
* ``mounted``: ``cluster`` plus a FUSE mount; ``mounted.mountpoint`` is the mounted directory.
* ``make_cluster``: a factory for tests that need their own cluster (fault injection).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cluster import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("cluster"))).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def mounted(cluster, tmp_path_factory):
    mountpoint = str(tmp_path_factory.mktemp("mnt"))
    cluster.mount(mountpoint)
    cluster.mountpoint = mountpoint
    try:
        yield cluster
    finally:
        cluster.unmount(mountpoint)


@pytest.fixture
def make_cluster(tmp_path):
    made: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        c = Cluster(str(tmp_path / f"cluster{len(made)}"), **kwargs).start()
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()


@pytest.fixture
def mnt(mounted, request):
    """A fresh directory inside the shared mount for one test."""
    path = os.path.join(mounted.mountpoint, request.node.name.replace("[", "_").replace("]", "_"))
    os.mkdir(path)
    return path
