"""Bounded calls from an inference engine into kvfs: a deadline per call and an outage breaker.

An engine must keep serving when kvfs is down or slow: a KV lookup, load or save that does not
answer in time is a cache miss (the engine recomputes), never a hang or a crash. ``Guard.call``
runs one storage operation on a daemon worker thread and waits at most ``timeout`` seconds for it (plus
a second per ``bytes_per_second`` of data the call moves, so a large batch is not mistaken for an
outage). Workers are kept for the next call: starting a thread per call cost 0.3-3 ms on a 2-core VM
running vLLM, per lookup, load and save. A timeout or an ``OSError`` opens the breaker: for
``retry_after`` seconds every call returns at once as failed, without touching storage, then the next
call probes again. An outage is logged once when it starts and once when kvfs answers again (one log
line per outage, not one per request).

A worker that is still stuck (a hung FUSE read) is abandoned, not waited for: it exits when its call
returns, if ever, and the next call uses another worker. It is a daemon thread, so it cannot keep the
engine process from exiting. While the breaker is open no call starts, so at most one abandoned
thread accumulates per ``retry_after`` period.

Error handling: ``call`` returns ``(True, value)`` or ``(False, None)``; ``kvfs.kv.BlockError`` (a
block that must not be loaded: storage answered, the data is bad) is re-raised for the caller to
handle and does not count as an outage; any other exception is logged once per kind and returns
``(False, None)``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from kvfs.kv import BlockError


class Guard:
    def __init__(self, log: logging.Logger, *, timeout: float = 5.0, retry_after: float = 10.0,
                 bytes_per_second: float = 100e6, on_event: Callable[[dict[str, Any]], None] | None = None):
        self.log = log
        self.timeout = timeout
        self.bytes_per_second = bytes_per_second
        self.retry_after = retry_after
        self.on_event = on_event
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._logged_errors: set[str] = set()
        self._idle: list[_Worker] = []  # workers between calls, reused (under _lock)

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def available(self) -> bool:
        """False while the breaker is open (a call would fail at once)."""
        with self._lock:
            return self._down_since is None or time.monotonic() >= self._retry_at

    def call(self, fn: Callable[[], Any], what: str, nbytes: int = 0) -> tuple[bool, Any]:
        """Run ``fn`` with a deadline of ``timeout`` seconds, plus one second per ``bytes_per_second``
        of the ``nbytes`` it moves (a large batch is not an outage)."""
        if not self.available():
            return False, None
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                box["error"] = exc
            finally:
                done.set()

        with self._lock:
            worker = self._idle.pop() if self._idle else _Worker()
        worker.jobs.put(run)
        deadline = self.timeout + nbytes / self.bytes_per_second
        if not done.wait(deadline):
            worker.jobs.put(None)  # abandoned: it exits once the stuck call returns
            self._outage(f"{what}: no answer within {deadline:g} s")
            return False, None
        with self._lock:
            self._idle.append(worker)
        exc = box.get("error")
        if exc is None:
            self._up()
            return True, box.get("value")
        if isinstance(exc, BlockError):
            self._up()
            raise exc
        if isinstance(exc, OSError):
            self._outage(f"{what}: {exc}")
            return False, None
        kind = f"{what}:{type(exc).__name__}"
        if kind not in self._logged_errors:
            self._logged_errors.add(kind)
            self.log.error("kvfs %s failed (%r); treating it as a cache miss", what, exc)
        return False, None

    def close(self) -> None:
        """Let the idle workers exit (a later call starts a new one)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.jobs.put(None)

    def _outage(self, why: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._retry_at = now + self.retry_after
            first = self._down_since is None
            if first:
                self._down_since = now
        if first:
            self.log.warning("kvfs unavailable (%s): recomputing instead; retrying every %g s", why,
                             self.retry_after)
            if self.on_event:
                self.on_event({"event": "outage", "why": why})

    def _up(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            self.log.warning("kvfs available again after %.1f s", time.monotonic() - since)
            if self.on_event:
                self.on_event({"event": "recovered", "after_s": round(time.monotonic() - since, 3)})


class _Worker:
    """A daemon thread running guarded calls one at a time, kept between calls; None makes it exit."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="kvfs-guard", daemon=True).start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            job()
