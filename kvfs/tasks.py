"""Nurseries whose errors read like plain exceptions.

Trio wraps every error that leaves a nursery in an ExceptionGroup. kvfs' contract is "errors are
errnos": callers (the FUSE boundary, the RPC dispatcher, the CLI) catch ``OSError``. ``open_nursery``
re-raises the most meaningful leaf instead: the first OSError, else the first other error; a group made
only of ``Cancelled`` is re-raised as one ``Cancelled`` so cancel scopes still catch it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


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
