"""Group commit: a reply that follows a metadata change leaves meta only once that change is on disk.

The namespace applies each change as one unsynced engine write, so it is visible at once and the
trio thread never blocks on a disk flush. A reply that made changes then waits here; one background
task syncs the engine's log in a worker thread, and every reply whose changes that sync covered is
released together. Under many concurrent clients one fsync acknowledges many operations. A reply with
no other request in flight syncs on the trio thread itself: the handoff to a worker thread and back
costs more than the fsync, and nobody is waiting to be served meanwhile (not for an engine whose
sync is a network round trip that can hang for seconds: ``inline_sync = False``, the etcd engine). An
engine with ``sync_async`` (etcd) is synced by awaiting it on the event loop: no thread hand-off.

If the sync fails, nothing waiting is acknowledged: the waiters get EIO, and so does every later
change (the log's state on disk is unknown after a failed fsync), until meta is restarted.
"""

from __future__ import annotations

import errno
import logging

import trio

from kvfs.errors import error
from kvfs.meta.engine import MetaEngine

log = logging.getLogger("kvfs.meta")


class GroupCommit:
    def __init__(self, engine: MetaEngine):
        self.engine = engine
        self.synced = engine.writes  # everything written before we started is on disk (engine open)
        self.syncs = 0
        self._wanted = trio.Event()
        self._done = trio.Event()
        self._failed: OSError | None = None
        self.active = 0  # requests being handled (wrap)
        self._syncing = False  # the background syncer is inside engine.sync()

    async def wait_durable(self, upto: int) -> None:
        """Return once engine write number ``upto`` is durable. Error handling: EIO if the sync failed."""
        if (self.synced < upto and self.active <= 1 and not self._syncing and self._failed is None
                and getattr(self.engine, "inline_sync", True)):
            self._sync(self.engine.sync)
        while self.synced < upto:
            if self._failed is not None:
                raise error(errno.EIO, f"metadata log could not be synced: {self._failed}")
            self._wanted.set()
            done = self._done
            await done.wait()
        if self._failed is not None:
            raise error(errno.EIO, f"metadata log could not be synced: {self._failed}")

    async def run(self) -> None:
        """The one syncer (owned by the meta service's nursery)."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            if self.synced < self.engine.writes:
                self._syncing = True
                try:
                    await self._sync_async()
                finally:
                    self._syncing = False
            done, self._done = self._done, trio.Event()
            done.set()

    async def _sync_async(self) -> None:
        upto = self.engine.writes
        sync_async = getattr(self.engine, "sync_async", None)
        try:
            if sync_async is not None:
                # On the event loop, without a thread; shielded as a thread would be: a transaction
                # cut off mid-flight has an unknown outcome (bounded by the engine's own timeout).
                with trio.CancelScope(shield=True):
                    await sync_async()
            else:
                await trio.to_thread.run_sync(self.engine.sync)
        except OSError as exc:
            self._fail(exc)
        else:
            self._synced_to(upto)

    def _sync(self, sync) -> None:
        upto = self.engine.writes
        try:
            sync()
        except OSError as exc:
            self._fail(exc)
        else:
            self._synced_to(upto)

    def _synced_to(self, upto: int) -> None:
        self.synced = max(self.synced, upto)
        self.syncs += 1

    def _fail(self, exc: OSError) -> None:
        log.critical("syncing the metadata log failed: %s; refusing every change from now on", exc)
        self._failed = exc

    def close(self, reason: str) -> None:
        """Release every reply still waiting with EIO: the syncer stopped (this meta stepped down)."""
        if self._failed is None:
            self._failed = OSError(errno.EIO, reason)
        self._done.set()

    def wrap(self, handler):
        """``handler`` whose reply waits until the changes it made are durable."""
        engine = self.engine

        async def durable(request, data):
            self.active += 1
            try:
                before = engine.writes
                reply = await handler(request, data)
                if engine.writes != before and engine.durable:
                    await self.wait_durable(engine.writes)
                return reply
            finally:
                self.active -= 1

        return durable
