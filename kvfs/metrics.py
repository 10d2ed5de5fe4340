"""Prometheus metrics for every kvfs process (prometheus-client: the standard exposition format,
no hand-written HTTP). Servers count each RPC in one place (kvfs.rpc.RpcServer)."""

from __future__ import annotations

import errno

from prometheus_client import Counter, Histogram, start_http_server

from kvfs import protocol as P

RPC_REQUESTS = Counter("kvfs_rpc_requests_total", "RPCs served", ["service", "method", "status"])
RPC_SECONDS = Histogram("kvfs_rpc_seconds", "RPC handling time", ["service", "method"],
                        buckets=(0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10))
RPC_BYTES = Counter("kvfs_rpc_bulk_bytes_total", "bulk data bytes", ["service", "direction"])
# The mount's side (mount/fs.py): what the kernel asked of it, per FUSE operation and outcome.
FUSE_REQUESTS = Counter("kvfs_fuse_requests_total", "FUSE requests the mount answered", ["op", "status"])


def _names(prefix: str) -> dict[int, str]:
    return {v: k[len(prefix):].lower() for k, v in vars(P).items() if k.startswith(prefix) and isinstance(v, int)
            and not k.endswith("_METHODS")}


METHOD_NAMES = {"meta": _names("META_"), "chunkserver": _names("CHUNK_")}


def method_name(service: str, method: int) -> str:
    return METHOD_NAMES.get(service, {}).get(method, str(method))


def status_name(status: int) -> str:
    return "ok" if status == 0 else errno.errorcode.get(status, str(status))


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Expose /metrics on ``port`` (a daemon thread; 0 disables)."""
    if port:
        start_http_server(port, addr=host)
