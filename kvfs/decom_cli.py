"""``kvfs chunkserver decommission ADDRESS [--cancel]`` (admin) and the STATE column of ``kvfs status``.

    kvfs chunkserver decommission 10.0.0.7:9500     # drain it: no new chunks, its chunks copied away
    kvfs status                                     # ... draining (12 chunks left) ... decommissioned
    kvfs chunkserver decommission 10.0.0.7:9500 --cancel
    kvfs chunkserver decommission 10.0.0.7:9500 --forget   # once stopped: drop it from the list

Once ``kvfs status`` says ``decommissioned`` the server may be stopped: every chunk it held has its full
replica count on other live servers (meta/decommission.py).
"""

from __future__ import annotations

from kvfs import protocol as P


def cmd_decommission(args) -> None:
    from kvfs.client import ClientOptions, SyncClient

    if args.action != "decommission" or not args.address:
        raise ValueError("usage: kvfs chunkserver decommission ADDRESS [--cancel | --forget]")
    if args.cancel and args.forget:
        raise ValueError("--cancel and --forget exclude each other")
    if args.tls_dir:
        from kvfs import tls

        tls.configure(args.tls_dir)  # an admin certificate
    with SyncClient(args.meta, ClientOptions(timeout=args.timeout)) as c:
        info = c.call(c.client.meta.request, P.META_DECOMMISSION, P.Decommission(args.address, args.cancel, args.forget))
    print(f"chunkserver {info.address}: {server_state(info)}")


def server_state(s: P.ChunkserverInfo) -> str:
    """One word or a few for the STATE column (a meta that predates decommissioning: up/DOWN)."""
    down = "" if s.alive else ", DOWN"
    if s.state == "draining":
        return f"draining ({s.chunks_left} chunks left){down}"
    if s.state == "forgotten":
        return "forgotten (no longer listed)"
    if s.state == "decommissioned":
        return "decommissioned" + (", stopped" if not s.alive else "")
    return "up" if s.alive else "DOWN"
