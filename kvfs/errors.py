"""Errors are errnos: one table from errno to exception, one helper to raise it.

Servers raise ``OSError(errno, message)`` (or ``KvfsError``); the RPC layer sends the errno in the
reply header and the message in an ``ErrorReply``; the client re-raises the same ``OSError`` subclass
(``FileNotFoundError`` for ENOENT, ...). The mount turns any OSError into ``FUSEError(errno)`` at one
boundary and the CLI prints one line.
"""

from __future__ import annotations

import errno
import os


class KvfsError(OSError):
    """An error with an errno that did not map to a more specific builtin OSError subclass."""


# Python's own OSError constructor already picks FileNotFoundError, FileExistsError, ... from the errno;
# this table only names the extra ones kvfs raises so messages read well.
_DESCRIPTIONS = {
    errno.EIO: "I/O error",
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EBUSY: "file is being written by another client",
    errno.ESTALE: "stale file handle",
    errno.ETIMEDOUT: "timed out",
    errno.EPROTO: "protocol error",
}


def error(code: int, message: str = "") -> OSError:
    """Build the OSError subclass for ``code`` (``OSError(ENOENT, ...)`` is a FileNotFoundError)."""
    text = message or _DESCRIPTIONS.get(code) or os.strerror(code)
    exc = OSError(code, text)
    return exc


def errno_of(exc: BaseException) -> int:
    """The errno to report for any exception: OSErrors keep theirs, anything else is EIO."""
    if isinstance(exc, OSError) and exc.errno:
        return int(exc.errno)
    return errno.EIO


def one_line(exc: BaseException) -> str:
    """A one-line human message for the CLI."""
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        detail = exc.strerror or str(exc)
        target = f": {exc.filename}" if exc.filename else ""
        return f"{detail}{target}" + (f" ({name})" if name else "")
    return str(exc) or type(exc).__name__
