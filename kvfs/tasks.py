"""Nurseries whose errors read like plain exceptions.

Trio wraps every error that leaves a nursery in an ExceptionGroup. kvfs' contract is "errors are
errnos": callers (the FUSE boundary, the RPC dispatcher, the CLI) catch ``OSError``. ``open_nursery``
re-raises the most meaningful leaf instead: the first OSError, else the first other error; a group made
only of ``Cancelled`` is re-raised as one ``Cancelled`` so cancel scopes still catch it.

``run_in_thread`` hands blocking work to trio's worker threads with less ceremony than
``trio.to_thread.run_sync``, for calls made once per chunk on the read path.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

T = TypeVar("T")


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(leaves(inner))
        return out
    return [exc]


def collapse(exc: BaseException) -> BaseException:
    """The one exception to raise for ``exc`` (itself when it is not a group)."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    found = leaves(exc)
    for kind in (KeyboardInterrupt, SystemExit, OSError, Exception):
        for leaf in found:
            if isinstance(leaf, kind):
                return leaf
    return found[0] if found else exc


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise collapse(group) from None


async def run_in_thread(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter) -> T:
    """``fn(*args)`` in one of trio's cached worker threads, at most ``limiter``'s total at once; its
    result or its exception. Not cancellable once started: it waits for ``fn`` (which may be filling a
    buffer the caller owns), like ``trio.to_thread.run_sync`` without ``abandon_on_cancel``.

    Why not that function: it also copies the context and names the OS thread before and after each
    call, two ``prctl`` calls that each give the GIL back. A worker taking the GIL back from the event
    loop's thread, busy serving FUSE requests, costs both threads a futex round trip.
    """
    async with limiter:
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: Any) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        trio.lowlevel.start_thread_soon(functools.partial(fn, *args), deliver)
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
