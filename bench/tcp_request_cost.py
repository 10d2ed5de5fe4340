"""What one CHUNK_READ over loopback TCP costs: wall time and CPU on each side, from one thread.

Starts a kvfs cluster (tests/cluster.py, one chunkserver), writes one 4 MiB chunk, then reads it
``--count`` times per size with ``kvfs.rpc_blocking.BlockingChunkClient`` from one thread, verified as
the client does. Reported per request: wall time, this process's CPU and the chunkserver's CPU (from
/proc). One thread and one connection, so the figures are per-request costs rather than what a loaded
machine shares out: on a busy machine they hold up better than GB/s.

    PYTHONPATH=/tmp/site python3 bench/tcp_request_cost.py --sizes 64K,4M
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def size_of(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp/kvfs-tcp-request-cost")
    p.add_argument("--sizes", default="64K,4M")
    p.add_argument("--count", type=int, default=0, help="requests per size (0: about 1.2 GiB, 100 to 2000)")
    args = p.parse_args(argv)

    from cluster import Cluster
    from gpu_load_kvfs import proc_cpu

    import kvfs
    from kvfs import chunkio, rpc_blocking
    from kvfs import protocol as P
    from kvfs.models.reader import _local_chunks

    # Older clients returned the data unverified; verify it here then, as their callers did.
    verifies = hasattr(rpc_blocking, "_receive_verified")
    cluster = Cluster(args.dir, chunkservers=1, replication=1, chunk_size="4M",
                      chunkserver_args=("--fsync", "never")).start()
    try:
        with kvfs.SyncClient(cluster.meta_address, kvfs.ClientOptions(timeout=60)) as c:
            c.write_file("/f", os.urandom(4 << 20))
            st = c.open(c.resolve("/f").ino)
            _, local = c.call(_local_chunks, c.client, st.ino)
            chunk, token = local[0], c.client.files[st.ino].chunks[0].token
            client = rpc_blocking.BlockingChunkClient(chunk.address, timeout=60)
            server = [cluster.servers[0].popen.pid]
            buf = memoryview(bytearray(4 << 20))

            def one(n: int) -> None:
                reply, data = client.read(P.ReadChunk(chunk.chunk_id, 0, n, token), buf[:n])
                if not verifies:
                    chunkio.verify(chunk.chunk_id, chunk.address, data, reply.data_offset, reply.checksums,
                                   reply.chunk_length)

            print(f"one thread, one connection; client verifies as it receives: {verifies}")
            for n in (size_of(s) for s in args.sizes.split(",")):
                count = args.count or max(100, min(2000, (1200 << 20) // n))
                for _ in range(20):
                    one(n)
                cpu0, srv0, t0 = time.process_time(), proc_cpu(server), time.perf_counter()
                for _ in range(count):
                    one(n)
                wall = time.perf_counter() - t0
                cpu, srv = time.process_time() - cpu0, proc_cpu(server) - srv0
                print(f"  {n >> 10:6d} KiB x {count}: {wall / count * 1e6:7.0f} us/request, {n * count / wall / 1e9:5.2f} "
                      f"GB/s; CPU per request: client {cpu / count * 1e6:6.0f} us, chunkserver {srv / count * 1e6:6.0f} us")
            client.close()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
