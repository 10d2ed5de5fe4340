"""Group commit (meta/durability.py): replies wait for a sync covering their changes; syncs are shared."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.lowlevel

from kvfs.meta.durability import GroupCommit
from kvfs.meta.engine_rocksdb import RocksEngine


class CountingEngine(RocksEngine):
    """The real RocksDB engine, with its syncs counted and optionally failing."""

    def __init__(self, path: str, **kw):
        super().__init__(path, **kw)
        self.synced_upto: list[int] = []
        self.fail = False

    def sync(self) -> None:
        upto = self.writes
        if self.fail:
            raise OSError(errno.EIO, "disk gone")
        super().sync()
        self.synced_upto.append(upto)


def one_write(engine):
    """A handler that makes one change."""

    async def change(_r, _data) -> str:
        engine.write([(b"k", b"v")])
        return "ok"

    return change


def test_replies_wait_for_a_shared_sync(tmp_path):
    engine = CountingEngine(str(tmp_path / "db"))
    commits = GroupCommit(engine)
    acked: list[int] = []
    write_number: dict[int, int] = {}

    async def change(i: int, _data) -> int:
        engine.write([(b"k%d" % i, b"v")])
        write_number[i] = engine.writes
        await trio.lowlevel.checkpoint()
        return i

    async def read(i: int, _data) -> int:
        return i

    durable_change, durable_read = commits.wrap(change), commits.wrap(read)

    async def client(i: int) -> None:
        assert await durable_change(i, None) == i
        # Acknowledged only once a sync covered this change.
        assert engine.synced_upto and max(engine.synced_upto) >= write_number[i]
        acked.append(i)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commits.run)
            async with trio.open_nursery() as clients:
                for i in range(100):
                    clients.start_soon(client, i)
            syncs = commits.syncs
            assert await durable_read(7, None) == 7  # no change: no sync needed
            assert commits.syncs == syncs
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert sorted(acked) == list(range(100))
    assert 1 <= commits.syncs < 50, commits.syncs  # 100 concurrent changes shared a few syncs
    assert commits.synced == 100
    engine.close()


def test_a_failed_sync_acknowledges_nothing(tmp_path):
    engine = CountingEngine(str(tmp_path / "db"))
    commits = GroupCommit(engine)

    change = one_write(engine)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commits.run)
            engine.fail = True
            for _ in range(2):  # and every later change too
                with pytest.raises(OSError) as info:
                    await commits.wrap(change)(None, None)
                assert info.value.errno == errno.EIO and "could not be synced" in str(info.value)
            nursery.cancel_scope.cancel()

    trio.run(main)
    engine.fail = False
    engine.close()


def test_no_sync_opt_out_acknowledges_at_once(tmp_path):
    engine = CountingEngine(str(tmp_path / "db"), sync=False)
    commits = GroupCommit(engine)

    change = one_write(engine)

    async def main() -> None:
        # No syncer running at all: a durable wait would hang (fail_after turns that into a failure).
        with trio.fail_after(5):
            assert await commits.wrap(change)(None, None) == "ok"

    trio.run(main)
    assert engine.synced_upto == []
    engine.close()


def test_a_lone_change_syncs_on_the_spot(tmp_path):
    """No other request in flight: synced on the trio thread, without the background syncer."""
    engine = CountingEngine(str(tmp_path / "db"))
    commits = GroupCommit(engine)

    change = one_write(engine)

    async def main() -> None:
        with trio.fail_after(5):  # no syncer task is running: only an inline sync can finish this
            assert await commits.wrap(change)(None, None) == "ok"

    trio.run(main)
    assert engine.synced_upto == [1] and commits.synced == 1
    engine.close()
