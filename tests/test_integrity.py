"""Data integrity: a hypothesis state machine does random writes, truncates and reads through the
FUSE mount of a real cluster (small 256 KiB chunks, replication 2) and compares every byte with an
in-memory model. Offsets cluster around chunk boundaries; files grow to several chunks. Handles are
closed and reopened between steps (close-to-open), and files are reread through a fresh descriptor.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

CHUNK = 256 << 10
FILES = ("a", "b")
_example = itertools.count()


def boundary_offsets() -> st.SearchStrategy[int]:
    """Offsets anywhere in the first 5 chunks, often right at or next to a chunk boundary."""
    near = st.builds(lambda k, d: max(0, k * CHUNK + d), st.integers(0, 5), st.integers(-3, 3))
    return st.one_of(near, st.integers(0, 5 * CHUNK))


lengths = st.one_of(st.integers(1, 64), st.integers(1, 2 * CHUNK + 100), st.sampled_from([CHUNK, 4096, 65536]))


def payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def make_machine(root: str) -> type[RuleBasedStateMachine]:
    class MountIntegrity(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = os.path.join(root, f"ex{next(_example)}")
            os.mkdir(self.dir)
            self.model: dict[str, bytearray] = {}
            self.fds: dict[str, int] = {}
            self.steps: list[str] = []  # journal for failure messages (timing bugs do not replay)

        def path(self, name: str) -> str:
            return os.path.join(self.dir, name)

        @initialize()
        def create_files(self) -> None:
            for name in FILES:
                self.fds[name] = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                self.model[name] = bytearray()

        # -------------------------------------------------------------- actions

        @rule(name=st.sampled_from(FILES), offset=boundary_offsets(), length=lengths, seed=st.integers(0, 2**32))
        def write(self, name: str, offset: int, length: int, seed: int) -> None:
            self.steps.append(f"write {name} @{offset} +{length}")
            data = payload(seed, length)
            assert os.pwrite(self.fds[name], data, offset) == length
            model = self.model[name]
            if len(model) < offset:
                model.extend(bytes(offset - len(model)))
            model[offset:offset + length] = data

        @rule(name=st.sampled_from(FILES), offset=boundary_offsets(), length=lengths, seed=st.integers(0, 2**32))
        def write_through_second_handle(self, name: str, offset: int, length: int, seed: int) -> None:
            """Another descriptor of the same file in the same mount: shares the pending writes."""
            self.steps.append(f"write2 {name} @{offset} +{length}")
            data = payload(seed, length)
            fd = os.open(self.path(name), os.O_WRONLY)
            try:
                assert os.pwrite(fd, data, offset) == length
            finally:
                os.close(fd)
            model = self.model[name]
            if len(model) < offset:
                model.extend(bytes(offset - len(model)))
            model[offset:offset + length] = data

        @rule(name=st.sampled_from(FILES), size=boundary_offsets())
        def truncate(self, name: str, size: int) -> None:
            self.steps.append(f"ftruncate {name} {size}")
            os.ftruncate(self.fds[name], size)
            model = self.model[name]
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))

        @rule(name=st.sampled_from(FILES), size=boundary_offsets())
        def truncate_by_path(self, name: str, size: int) -> None:
            self.steps.append(f"truncate {name} {size}")
            os.truncate(self.path(name), size)
            model = self.model[name]
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))

        @rule(name=st.sampled_from(FILES), offset=boundary_offsets(), length=lengths)
        def read(self, name: str, offset: int, length: int) -> None:
            self.steps.append(f"read {name} @{offset} +{length}")
            got = os.pread(self.fds[name], length, offset)
            assert got == bytes(self.model[name][offset:offset + length]), self.journal()

        @rule(name=st.sampled_from(FILES))
        def fsync(self, name: str) -> None:
            self.steps.append(f"fsync {name}")
            os.fsync(self.fds[name])

        @rule(name=st.sampled_from(FILES))
        def reopen(self, name: str) -> None:
            """Close (commit) and open again: the new handle sees exactly the model."""
            self.steps.append(f"reopen {name}")
            os.close(self.fds.pop(name))
            self.fds[name] = os.open(self.path(name), os.O_RDWR)
            self.check_whole(name)

        @rule(name=st.sampled_from(FILES))
        def reopen_truncating(self, name: str) -> None:
            """Close, then open with O_TRUNC: old chunks must not come back, even after a sparse write."""
            self.steps.append(f"reopen_trunc {name}")
            os.close(self.fds.pop(name))
            self.fds[name] = os.open(self.path(name), os.O_RDWR | os.O_TRUNC)
            self.model[name] = bytearray()

        @rule(name=st.sampled_from(FILES))
        def read_through_new_handle(self, name: str) -> None:
            self.steps.append(f"read_new {name}")
            self.check_whole(name)

        # -------------------------------------------------------------- checks

        def check_whole(self, name: str) -> None:
            with open(self.path(name), "rb") as f:
                data = f.read()
            model = self.model[name]
            assert len(data) == len(model), f"{name}: read {len(data)} bytes, model {len(model)}\n{self.journal()}"
            if data != model:
                first = next(i for i, (x, y) in enumerate(zip(data, model)) if x != y)
                raise AssertionError(f"{name}: first differing byte at {first} (chunk {first // CHUNK})\n"
                                     f"{self.journal()}")

        def journal(self) -> str:
            return "steps:\n  " + "\n  ".join(self.steps[-30:])

        @invariant()
        def sizes_match(self) -> None:
            for name, fd in self.fds.items():
                assert os.fstat(fd).st_size == len(self.model[name]), self.journal()

        def teardown(self) -> None:
            for name, fd in self.fds.items():
                os.close(fd)
                self.check_whole(name)  # after the final commit

    return MountIntegrity


@pytest.fixture(scope="module")
def small_chunk_mount(tmp_path_factory):
    from cluster import Cluster

    c = Cluster(str(tmp_path_factory.mktemp("integrity")), chunk_size="256K").start()
    try:
        yield c.mount(str(tmp_path_factory.mktemp("integrity-mnt")))
    finally:
        c.stop()


def test_random_io_matches_model(small_chunk_mount):
    before = len(os.listdir(small_chunk_mount))
    run_state_machine_as_test(
        make_machine(small_chunk_mount),
        settings=settings(max_examples=50, stateful_step_count=40, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    )
    assert len(os.listdir(small_chunk_mount)) - before >= 50  # every example really ran against the mount


@pytest.mark.slow
def test_random_io_matches_model_long(small_chunk_mount):
    run_state_machine_as_test(
        make_machine(small_chunk_mount),
        settings=settings(max_examples=200, stateful_step_count=60, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    )
