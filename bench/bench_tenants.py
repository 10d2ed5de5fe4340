"""What the tenant guard costs a tenant's metadata requests (issue 13).

One TLS cluster (``kvfs meta`` + one chunkserver, separate processes, from ``tests/cluster.py``), two
callers side by side over raw RPC connections to meta: an admin certificate (no tenant: the guard only
reads the peer) and a tenant's client certificate (every named inode checked, uid/gid forced, quotas,
paths under its root). Each runs the same loop in its own directory: MKNODE, GETATTR, LOOKUP, RESOLVE,
UNLINK of ``--files`` files; rounds alternate ``--repeat`` times; medians. Reported: operations per
second for each, and tenant/admin. Nothing here asserts on time.

    python bench/bench_tenants.py --files 2000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from cluster import Cluster  # noqa: E402

from kvfs import certs, tls  # noqa: E402
from kvfs import protocol as P  # noqa: E402
from kvfs.rpc import RpcClient  # noqa: E402

OPS_PER_FILE = 5


async def one_round(address: str, tls_dir: str, directory: str, files: int) -> float:
    """Operations per second of one caller's loop (its directory is created at the caller's "/")."""
    client = RpcClient("meta", address, P.META_METHODS, timeout=30, ssl_context=tls.load(tls_dir).client)
    try:
        root = (await client.request(P.META_HELLO, P.Hello(P.PROTOCOL_VERSION))).root_ino
        d = (await client.request(P.META_MKNODE, P.MkNode(root, directory, stat.S_IFDIR | 0o755))).ino
        started = time.perf_counter()
        for i in range(files):
            name = f"f{i:06d}"
            attr = await client.request(P.META_MKNODE, P.MkNode(d, name, stat.S_IFREG | 0o644))
            await client.request(P.META_GETATTR, P.GetAttr(attr.ino))
            await client.request(P.META_LOOKUP, P.Lookup(d, name))
            await client.request(P.META_RESOLVE, P.ResolvePath(f"/{directory}/{name}"))
            await client.request(P.META_UNLINK, P.Unlink(d, name, keep_open=[]))
        took = time.perf_counter() - started
        await client.request(P.META_RMDIR, P.Unlink(root, directory))
        return files * OPS_PER_FILE / took
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="kvfs-bench-tenants-")
    cluster = Cluster(root, chunkservers=1, replication=1, tls=True)
    try:
        cluster.start()
        admin = cluster.tls_dirs["admin"]
        subprocess.run([sys.executable, "-m", "kvfs.cli", "--tls-dir", admin, "tenant", "add", "bench",
                        "--meta", cluster.meta_address], check=True, capture_output=True)
        tenant = os.path.join(root, "tls", "tenant-bench")
        certs.issue(os.path.join(root, "tls", "ca"), tenant, role="client", name="bench", tenant="bench")
        rates: dict[str, list[float]] = {"admin": [], "tenant": []}
        for r in range(args.repeat):
            for who, tls_dir in (("admin", admin), ("tenant", tenant)):
                rates[who].append(trio.run(one_round, cluster.meta_address, tls_dir, f"{who}-{r}", args.files))
        a, t = statistics.median(rates["admin"]), statistics.median(rates["tenant"])
        print(f"metadata ops/s over TLS, {args.files} files x {OPS_PER_FILE} ops, median of {args.repeat}:")
        print(f"  admin (no tenant)  {a:10.0f}   rounds {' '.join(f'{x:.0f}' for x in rates['admin'])}")
        print(f"  tenant (guarded)   {t:10.0f}   rounds {' '.join(f'{x:.0f}' for x in rates['tenant'])}")
        print(f"  tenant/admin       {t / a:10.3f}")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
