"""A ``redis-server`` (Debian's package) for benchmarks: started on a free loopback port, stopped after.

``bench_kv.py`` runs it without persistence (a cache, like KV blocks); ``juicefs_redis.py`` with
``DURABLE`` (every write on disk before its reply) as JuiceFS's metadata engine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from cluster import free_port

NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
# Redis's strictest setting: the append-only file is fsynced before each write command is answered.
DURABLE = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")


class RedisServer:
    def __init__(self, workdir: str, persistence: tuple[str, ...] = NO_PERSISTENCE):
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server not found: apt-get install redis-server")
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", *persistence,
                                      "--dir", workdir, "--protected-mode", "no", "--proto-max-bulk-len", "1gb"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
        self.version = out.split()[2].removeprefix("v=")  # "Redis server v=7.0.15 sha=..."

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def flush(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=self.port).flushall()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
