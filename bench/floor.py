"""What the machine charges under one durable metadata change, whatever the filesystem on top:
a disk fsync, and etcd's own WAL fsync and backend commit (from its Prometheus metrics)."""

from __future__ import annotations

import os
import re
import statistics
import time
import urllib.request

ETCD_DISK = ("etcd_disk_wal_fsync_duration_seconds", "etcd_disk_backend_commit_duration_seconds")


def fsync_us(directory: str, n: int = 300) -> float:
    """Median microseconds of ``os.fsync`` after a 256-byte append, in ``directory`` (its filesystem)."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        times = []
        for _ in range(n):
            os.write(fd, b"x" * 256)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times) * 1e6


def etcd_disk(endpoints: list[str]) -> dict[str, tuple[float, float]]:
    """(seconds, count) summed over the members, per histogram of ``ETCD_DISK``."""
    out = {name: (0.0, 0.0) for name in ETCD_DISK}
    for endpoint in endpoints:
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as r:
            text = r.read().decode()
        for name in ETCD_DISK:
            s = re.search(rf"^{name}_sum (\S+)$", text, re.MULTILINE)
            c = re.search(rf"^{name}_count (\S+)$", text, re.MULTILINE)
            if s and c:
                out[name] = (out[name][0] + float(s.group(1)), out[name][1] + float(c.group(1)))
    return out


def etcd_disk_mean_us(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean microseconds per WAL fsync / backend commit between two ``etcd_disk`` snapshots."""
    out = {}
    for name in ETCD_DISK:
        seconds, count = after[name][0] - before[name][0], after[name][1] - before[name][1]
        out[name] = seconds / count * 1e6 if count else 0.0
    return out
