"""Mountpoint checks and cleanup: stale mounts of crashed runs, unmounting, one-line errors.

Kept apart from the pyfuse3 adapter so the CLI (and hosts that never mount) need no libfuse.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess

log = logging.getLogger("kvfs.mount")


class MountError(Exception):
    """A mountpoint problem, reported to the user as one line."""


def _is_stale(mountpoint: str) -> bool:
    try:
        os.stat(mountpoint)
        return False
    except OSError as exc:
        return exc.errno == errno.ENOTCONN


def _mounted(mountpoint: str) -> bool:
    real = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == real for line in f)
    except OSError:
        return False


def unmount(mountpoint: str, lazy: bool = True) -> bool:
    for cmd in (["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint], ["umount", "-l", mountpoint]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                return True
        except (OSError, subprocess.TimeoutExpired):
            continue
    return False


def clean_stale_mount(path: str) -> None:
    """Unmount a dead FUSE mount left at ``path`` by a crashed (kill -9) run; a stat of one fails with
    ENOTCONN, so this must come before anything that looks at the directory. Error handling:
    MountError if it cannot be unmounted, or if a live filesystem is mounted there."""
    if _is_stale(path):
        log.warning("%s: stale mount from a crashed run; unmounting it", path)
        if not unmount(path):
            raise MountError(f"{path}: stale FUSE mount could not be unmounted (try: fusermount3 -u -z {path})")
    elif _mounted(path):
        raise MountError(f"{path}: something is already mounted here")


def check_mountpoint(mountpoint: str, *, create: bool = False) -> str:
    """Validate (and clean up after a crashed run); ``create`` makes a missing directory (the default
    mountpoint). Error handling: MountError with a one-line reason."""
    path = os.path.abspath(os.path.expanduser(mountpoint))
    clean_stale_mount(path)
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise MountError(f"{path}: cannot create mountpoint: {exc.strerror}") from None
    if not os.path.exists(path):
        raise MountError(f"{path}: mountpoint does not exist (create it with mkdir -p {path})")
    if not os.path.isdir(path):
        raise MountError(f"{path}: mountpoint is not a directory")
    if os.listdir(path):
        raise MountError(f"{path}: mountpoint is not empty")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: install fuse3 (apt-get install fuse3) or run with --device /dev/fuse")
    return path
