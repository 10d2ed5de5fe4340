"""What a refused CHUNK_WRITE costs now that its token is checked before the data (RpcServer
pre-checks), against an accepted write of the same size, side by side in one run.

A cluster (tests/cluster.py: meta + 1 chunkserver, --fsync never) on loopback; per round, each of:
``accepted``: a 64 MiB CHUNK_WRITE with a valid token (KV_ALLOC); ``refused_client``: the same write
with a forged token through RpcClient (it sends the data until the server's reply and close stop
it); ``refused_header``: header and payload only, on a raw socket, then the reply (absent where the
server waits for the data). Medians in ms and each one's ratio to ``accepted``. Run it with another
tree's interpreter (from outside any checkout, so ``-m kvfs.cli`` finds that tree) for the baseline:

    cd /tmp && python /path/to/bench/bench_precheck.py --rounds 5
    cd /tmp && /path/to/main/.venv/bin/python /path/to/bench/bench_precheck.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster import Cluster  # noqa: E402

from kvfs import captoken  # noqa: E402
from kvfs import protocol as P  # noqa: E402
from kvfs.chunkserver.store import block_checksums  # noqa: E402
from kvfs.rpc import RpcClient  # noqa: E402

SIZE = 64 << 20


async def _call(address: str, service: str, method: int, request, data=None):
    methods = P.CHUNK_METHODS if service == "chunkserver" else P.META_METHODS
    client = RpcClient(service, address, methods, timeout=60)
    try:
        return (await client.call(method, request, data))[0]
    finally:
        client.close()


def _raw_refusal(address: str, payload: bytes) -> int | None:
    """The reply's status to a header and payload without the data; None: no reply within 5 s (a server
    that checks the token only after the data)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(P.pack_header(P.KIND_REQUEST, P.CHUNK_WRITE, 0, 1, len(payload), SIZE) + payload)
        head = b""
        try:
            while len(head) < P.HEADER_SIZE:
                head += sock.recv(P.HEADER_SIZE - len(head))
        except TimeoutError:
            return None
        return P.unpack_header(head).status


def run(rounds: int) -> dict[str, float]:
    data = os.urandom(SIZE)
    sums = block_checksums(data)
    times: dict[str, list[float]] = {"accepted": [], "refused_client": [], "refused_header": []}
    with tempfile.TemporaryDirectory() as root:
        cl = Cluster(root, chunkservers=1, replication=1, chunk_size="64M", chunkserver_args=("--fsync", "never"))
        cl.start()
        try:
            for _ in range(rounds):
                alloc = trio.run(_call, cl.meta_address, "meta", P.META_KV_ALLOC, P.KVAlloc(SIZE))
                address = alloc.replicas[0]
                t = time.perf_counter()
                trio.run(_call, address, "chunkserver", P.CHUNK_WRITE,
                         P.WriteChunk(alloc.chunk_id, sums, [], True, alloc.token), data)
                times["accepted"].append(time.perf_counter() - t)
                bad = captoken.sign(4242, secrets.token_bytes(32), alloc.chunk_id + 1, P.TOKEN_WRITE,
                                    int(time.time()) + 600)
                request = P.WriteChunk(alloc.chunk_id + 1, sums, [], True, bad)
                t = time.perf_counter()
                try:
                    trio.run(_call, address, "chunkserver", P.CHUNK_WRITE, request, data)
                    raise AssertionError("a forged token was accepted")
                except PermissionError:
                    pass
                times["refused_client"].append(time.perf_counter() - t)
                t = time.perf_counter()
                status = _raw_refusal(address, P.encode(request))
                if status is not None:
                    assert status == 13  # EACCES
                    times["refused_header"].append(time.perf_counter() - t)
        finally:
            cl.stop()
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}  # refused_header: none before
    return {**{f"{k}_ms": round(v, 2) for k, v in medians.items()},
            **{f"{k}_ratio": round(v / medians["accepted"], 4) for k, v in medians.items()}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    print(json.dumps(run(ap.parse_args().rounds), indent=1))
