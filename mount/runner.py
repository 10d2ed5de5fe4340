"""Mount lifecycle: check the mountpoint, clean a stale mount, run pyfuse3 under trio, unmount cleanly."""

from __future__ import annotations

import logging
import os

import pyfuse3
import trio

from kvfs.client import Client, ClientOptions
from kvfs.mount.fs import KvfsOperations
from kvfs.mount.mountpoint import MountError as MountError
from kvfs.mount.mountpoint import check_mountpoint
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs.mount")


def _device_of_mount(mountpoint: str) -> str | None:
    """major:minor of the mount, read from mountinfo (a stat would send FUSE a request we can't serve yet,
    so only the parent directory is resolved)."""
    head, tail = os.path.split(os.path.abspath(mountpoint))
    real = os.path.join(os.path.realpath(head), tail)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real:
                return fields[2]
    return None


def set_readahead(mountpoint: str, readahead_kb: int) -> None:
    """Raise the kernel readahead of the mount, so sequential reads reach us as 1 MiB requests, not
    128 KiB ones (the FUSE default). Best effort: needs root and sysfs."""
    dev = _device_of_mount(mountpoint)
    if not dev or readahead_kb <= 0:
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(readahead_kb))
    except OSError as exc:
        log.info("could not set readahead of %s to %d KiB (%s); sequential reads will use smaller requests",
                 mountpoint, readahead_kb, exc.strerror)


async def _raise_readahead_after_init(mountpoint: str, readahead_kb: int) -> None:
    """The kernel sets the mount's readahead when it processes our INIT reply, which happens once
    pyfuse3.main runs; set ours after that, and check that it stuck."""
    dev = _device_of_mount(mountpoint)
    for _ in range(100):
        await trio.sleep(0.05)
        set_readahead(mountpoint, readahead_kb)
        await trio.sleep(0.05)
        try:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
                if int(f.read()) == readahead_kb:
                    return
        except (OSError, ValueError):
            return


async def run_mount(meta_address: str, mountpoint: str, *, options: ClientOptions | None = None,
                    attr_timeout: float = 1.0, entry_timeout: float = 1.0, writeback_cache: bool = False,
                    readahead_kb: int = 4096, kv_timeout: float = 300.0,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount until cancelled or the filesystem is unmounted; always unmounts on the way out."""
    path = check_mountpoint(mountpoint)
    client = Client(meta_address, options)
    async with open_nursery() as nursery:
        await client.connect(nursery)
        ops = KvfsOperations(client, attr_timeout=attr_timeout, entry_timeout=entry_timeout,
                             writeback_cache=writeback_cache, kv_timeout=kv_timeout)
        fuse_options = set(pyfuse3.default_options)
        fuse_options.update({f"fsname=kvfs:{meta_address.replace(',', '+')}", "subtype=kvfs", "allow_other"})
        pyfuse3.init(ops, path, fuse_options)
        nursery.start_soon(_raise_readahead_after_init, path, readahead_kb)
        log.info("mounted kvfs (meta %s) at %s", meta_address, path)
        try:
            task_status.started(path)
            await pyfuse3.main()
        finally:
            # Unmount even when cancelled (Ctrl-C): never leave a dead mount behind.
            pyfuse3.close(unmount=True)
            client.close()
            nursery.cancel_scope.cancel()
            log.info("unmounted %s", path)
