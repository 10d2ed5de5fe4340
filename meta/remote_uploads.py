"""The write-back uploader of the remote tier (a part of ``RemoteTier``, meta/remote.py).

A trio task in the meta process takes dirty files from the durable upload queue, reads each through
``kvfs.Client`` and uploads it, retrying failures with exponential backoff; remote deletes queued by
unlink/rename go the same way. An upload only cleans the file version it read.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import trio

from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.meta.engine import Batch
from kvfs.meta.remote_records import (
    CLEAN,
    DIRTY,
    UPLOADING,
    DeleteJob,
    _dec_delete,
    _enc,
    delete_key,
    file_key,
    upload_key,
)
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.meta.remote")


class RemoteUploads:
    """Mixed into RemoteTier: uses its namespace (``self.ns``), options, records and queues."""

    # ------------------------------------------------------------------ write-back uploader

    async def run(self, meta_address: str) -> None:
        """The tier's background tasks: uploader, remote deletes, eviction. Owned by the meta service."""
        from kvfs.client import Client, ClientOptions

        async with open_nursery() as nursery:
            self._nursery = nursery
            client = Client(meta_address, ClientOptions(timeout=30.0), client_id=f"meta-uploader-{os.getpid()}")
            while True:
                try:
                    await client.connect(nursery)
                    break
                except OSError as exc:
                    log.debug("uploader: connecting to meta: %s", exc)
                    await trio.sleep(0.5)
            self._client = client
            nursery.start_soon(self._evictor)
            try:
                await self._dispatch_loop(nursery)
            finally:
                client.close()

    async def _dispatch_loop(self, nursery: trio.Nursery) -> None:
        slots = trio.Semaphore(max(1, self.opts.uploads))
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            next_due = now + 5.0
            for key, _ in list(self.ns.engine.scan(b"ru")):
                ino = R.U64.unpack(key[2:])[0]
                due = self._backoff.get(ino, (0.0, 0))[0]
                if ino in self._active:
                    continue
                if due > now:
                    next_due = min(next_due, due)
                    continue
                if self._being_written(ino):
                    next_due = min(next_due, now + 0.5)  # upload what the writer closes, not a half-written file
                    continue
                if slots.value == 0:
                    break
                await slots.acquire()
                self._active.add(ino)
                nursery.start_soon(self._upload_task, ino, slots)
            for key, raw in list(self.ns.engine.scan(b"rd")):
                seq = R.U64.unpack(key[2:])[0]
                due = self._backoff.get(-seq, (0.0, 0))[0]
                if -seq in self._active:
                    continue
                if due > now:
                    next_due = min(next_due, due)
                    continue
                if slots.value == 0:
                    break
                await slots.acquire()
                self._active.add(-seq)
                nursery.start_soon(self._delete_task, seq, _dec_delete(raw), slots)
            with trio.move_on_after(max(0.05, next_due - trio.current_time())):
                await self._wake.wait()

    def _being_written(self, ino: int) -> bool:
        """A write-back file whose writer still holds the write lease (write-through never waits)."""
        holder = self.ns.leases.get(ino)
        if holder is None or holder[1] <= self.ns.clock() or ino in self._changed:
            return False
        found = self.binding_of_file(ino)
        return found is not None and found[0].mode == "writeback"

    def _failed(self, job: int, what: str, exc: BaseException) -> float:
        _, attempts = self._backoff.get(job, (0.0, 0))
        delay = min(self.opts.max_backoff, 0.5 * 2 ** attempts)
        self._backoff[job] = (trio.current_time() + delay, attempts + 1)
        log.warning("%s failed (attempt %d, retrying in %.1fs): %s", what, attempts + 1, delay, exc)
        return delay

    def _notify(self, ino: int) -> None:
        ev = self._changed.pop(ino, None)
        if ev is not None:
            ev.set()

    async def _upload_task(self, ino: int, slots: trio.Semaphore) -> None:
        try:
            await self._upload(ino)
            self._backoff.pop(ino, None)
        except (OSError, trio.TooSlowError) as exc:
            self._failed(ino, f"upload of inode {ino}", exc)
            rec = self.file(ino)
            if rec is not None and rec.state == UPLOADING:
                rec.state = DIRTY
                rec.error = str(exc)
                self.ns.engine.write([(file_key(ino), _enc(rec))])
        finally:
            self._active.discard(ino)
            slots.release()
            self._notify(ino)
            self._kick()

    async def _upload(self, ino: int) -> None:
        from kvfs.remote import open_store

        found = self.binding_of_file(ino)
        if found is None or found[1].state == CLEAN:
            self.ns.engine.write([(upload_key(ino), None)])
            return
        b, rec = found
        if b.mode == "readonly":
            self.ns.engine.write([(upload_key(ino), None)])
            return
        version, key = rec.version, rec.key
        rec.state = UPLOADING
        self.ns.engine.write([(file_key(ino), _enc(rec))])
        store = open_store(b.url)
        client = self._client
        assert client is not None
        t0 = time.monotonic()
        st = await client.open(ino)
        try:
            size = st.size
            upload = await trio.to_thread.run_sync(store.begin_upload, key, size)
            try:
                step = st.chunk_size
                # Read the next chunk while the previous one is sent.
                send, recv = trio.open_memory_channel(2)

                async def reader() -> None:
                    async with send:
                        for off in range(0, size, step):
                            buf = bytearray(min(step, size - off))
                            with trio.fail_after(self.opts.remote_timeout):
                                await client.read_into(ino, off, memoryview(buf))
                            await send.send(buf)

                async with open_nursery() as inner:
                    inner.start_soon(reader)
                    async with recv:
                        async for buf in recv:
                            with trio.fail_after(self.opts.remote_timeout):
                                await trio.to_thread.run_sync(upload.write, buf, abandon_on_cancel=True)
                with trio.fail_after(self.opts.remote_timeout * 4):
                    entry = await trio.to_thread.run_sync(upload.complete, abandon_on_cancel=True)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(upload.abort)
                raise
        finally:
            await client.release(ino)
        cur = self.file(ino)
        if cur is None or cur.key != key or cur.binding != b.path:
            # Unlinked or renamed while uploading: the object under the old key must not linger.
            batch: Batch = []
            self._queue_delete(batch, b.url, key)
            self.ns.engine.write(batch)
            return
        if cur.version != version:
            cur.state = DIRTY  # changed while uploading: the queue entry stays, the next round sends it
            self.ns.engine.write([(file_key(ino), _enc(cur))])
            return
        cur.state, cur.etag, cur.size, cur.mtime_ns, cur.error = CLEAN, entry.etag, entry.size, entry.mtime_ns, ""
        self.ns.engine.write([(file_key(ino), _enc(cur)), (upload_key(ino), None)])
        self._validated[ino] = trio.current_time()
        log.info("uploaded %s/%s (%d bytes in %.2fs)", b.url, key, size, time.monotonic() - t0)

    async def _delete_task(self, seq: int, job: DeleteJob, slots: trio.Semaphore) -> None:
        from kvfs.remote import open_store

        try:
            store = open_store(job.url)
            with trio.fail_after(self.opts.remote_timeout):
                await trio.to_thread.run_sync(store.delete, job.key, abandon_on_cancel=True)
            self.ns.engine.write([(delete_key(seq), None)])
            self._backoff.pop(-seq, None)
        except (OSError, trio.TooSlowError) as exc:
            self._failed(-seq, f"remote delete of {job.url}/{job.key}", exc)
        finally:
            self._active.discard(-seq)
            slots.release()

    async def wait_clean(self, ino: int, timeout: float) -> None:
        """Write-through: wait until the upload of ``ino`` lands; EIO (data kept, retried) if it fails."""
        with trio.move_on_after(timeout):
            while True:
                rec = self.file(ino)
                if rec is None or rec.state == CLEAN:
                    return
                if rec.error and ino not in self._active:
                    raise error(errno.EIO, f"write-through upload of {rec.key} failed: {rec.error} "
                                           f"(kept locally; retrying in the background)")
                ev = self._changed.setdefault(ino, trio.Event())
                await ev.wait()
        raise error(errno.EIO, f"write-through upload not finished within {timeout:g}s "
                               f"(kept locally; continuing in the background)")
