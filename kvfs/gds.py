"""kvikio (GPUDirect Storage, or its POSIX compat mode) helpers shared by the model loader and the KV store.

* ``kvikio_available()``: kvikio imports (it needs libcufile/libcudart underneath, and libcuda to do I/O).
* ``mount_fstype(path)``: the file system type of the mount ``path`` lies on (``fuse.kvfs`` for the kvfs
  mount); ``is_fuse`` / ``is_kvfs_mount`` answer from it.
* ``kvikio_settings(path, ...)``: the ``kvikio.defaults`` settings for reading ``path``: compat mode "on"
  on a FUSE file system (GDS cannot reach a FUSE daemon's files), "auto" elsewhere, unless given.

Importing this module imports neither torch nor kvikio.
"""

from __future__ import annotations

import errno
import os
from typing import Any

KVFS_FSTYPE = "fuse.kvfs"  # mount/runner.py mounts with subtype=kvfs


def kvikio_available() -> bool:
    try:
        import kvikio  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a missing libcufile/libcudart underneath)
        return False
    return True


def mount_fstype(path: str) -> str:
    """The type (``ext4``, ``fuse.kvfs``, ...) of the file system holding ``path``; "" if unknown."""
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return ""


def is_fuse(path: str) -> bool:
    """True when ``path`` lies on a FUSE file system (kvikio must use compat mode there)."""
    return mount_fstype(path).startswith("fuse")


def is_kvfs_mount(path: str) -> bool:
    """True when ``path`` lies on a kvfs FUSE mount (every byte read is checksum-verified by its client)."""
    return mount_fstype(path) == KVFS_FSTYPE


def kvikio_settings(path: str, *, compat_mode: str | None = None, **knobs: Any) -> dict[str, Any]:
    """A ``kvikio.defaults.set`` dict for reading ``path``: ``compat_mode`` ("on" | "off" | "auto"; None:
    "on" for FUSE paths, else "auto") plus any other kvikio knob given (``num_threads``, ``task_size``,
    ``gds_threshold``, ``bounce_buffer_size``)."""
    import kvikio

    mode = compat_mode or ("on" if is_fuse(path) else "auto")
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"kvikio compat mode must be 'on', 'off' or 'auto', not {mode!r}")
    modes = {"on": kvikio.CompatMode.ON, "off": kvikio.CompatMode.OFF, "auto": kvikio.CompatMode.AUTO}
    return {"compat_mode": modes[mode], **knobs}


def wait_all(futures: list, what: str) -> int:
    """Wait for every ``pread`` future (kvikio's, or ``kvfs.chunkfiles``'), even after one fails: each
    writes into the caller's buffer. The bytes read, or the first error (kvikio reports system errors
    as RuntimeError: EIO naming ``what``)."""
    got, first_error = 0, None
    for fut in futures:
        try:
            got += fut.get()
        except Exception as exc:  # noqa: BLE001
            first_error = first_error or exc
    if first_error is not None:
        if isinstance(first_error, OSError):
            raise first_error
        raise OSError(errno.EIO, f"{what} failed: {first_error}") from first_error
    return got
