"""The ``kvfs`` command: start services (``up``, ``meta``, ``chunkserver``, ``mount``) and inspect them.

Errors the user can act on (bad mountpoint, unreachable meta, read-only data dir) print one line
``kvfs: error: ...`` and exit 1; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

import trio

from kvfs import config, metrics
from kvfs.errors import one_line
from kvfs.tasks import open_nursery

log = logging.getLogger("kvfs")


class UsageError(Exception):
    pass


# --------------------------------------------------------------------------- service starters


def _split_listen(listen: str) -> tuple[str, int]:
    from kvfs.rpc import parse_address

    try:
        return parse_address(listen)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_writable_dir(path: str, what: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".kvfs-write-probe")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{what} {path} is not writable: {exc.strerror or exc}") from None
    return path


def _check_namespace_options(chunk_size: int, lease_seconds: float, pending_grace: float) -> None:
    from kvfs.protocol import MAX_CHUNK_SIZE

    if chunk_size % (64 << 10) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"chunk size must be a positive multiple of 64 KiB, at most {MAX_CHUNK_SIZE >> 20} MiB")
    if lease_seconds <= 0 or pending_grace <= 0:
        raise UsageError("--lease-seconds and --pending-grace must be positive")


def namespace_on(engine, *, chunk_size: int, replication: int, heartbeat_timeout: float = 10.0,
                 lease_seconds: float = 60.0, pending_grace: float = 120.0):
    """The namespace over an opened engine, with orphans of crashed clients purged."""
    from kvfs.meta.namespace import Namespace
    from kvfs.meta.service import orphan_cutoff_ns

    ns = Namespace(engine, chunk_size=chunk_size, replication=replication, lease_seconds=lease_seconds,
                   pending_grace=pending_grace)
    ns.registry.heartbeat_timeout = heartbeat_timeout
    purged = ns.purge_orphans(orphan_cutoff_ns())
    if purged:
        log.info("purged %d orphaned inodes left by crashed clients", purged)
    return ns


def open_namespace(data_dir: str, *, chunk_size: int, replication: int, sync: bool, heartbeat_timeout: float = 10.0,
                   lease_seconds: float = 60.0, pending_grace: float = 120.0):
    from kvfs.meta.engine_rocksdb import RocksEngine

    path = _check_writable_dir(data_dir, "meta data dir")
    try:
        engine = RocksEngine(os.path.join(path, "meta.rocksdb"), sync=sync)
    except Exception as exc:  # rocksdict raises plain Exceptions (e.g. the LOCK is held by another meta)
        raise UsageError(f"cannot open metadata store in {path}: {exc}") from None
    _check_namespace_options(chunk_size, lease_seconds, pending_grace)
    return namespace_on(engine, chunk_size=chunk_size, replication=replication, heartbeat_timeout=heartbeat_timeout,
                        lease_seconds=lease_seconds, pending_grace=pending_grace)


async def serve_meta(args, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from kvfs.meta.service import MetaService

    host, port = _split_listen(args.listen)
    options = {"chunk_size": config.parse_size(args.chunk_size), "replication": args.replication,
               "heartbeat_timeout": args.heartbeat_timeout, "lease_seconds": args.lease_seconds,
               "pending_grace": args.pending_grace}
    if args.engine:
        # HA: one of several meta processes on etcd (meta/leader.py); leader or standby.
        from kvfs.meta.engine_etcd import parse_url
        from kvfs.meta.leader import HaMeta

        parse_url(args.engine)  # a bad URL is one line now, not a retry loop later
        _check_namespace_options(options["chunk_size"], args.lease_seconds, args.pending_grace)
        if args.leader_ttl < 2:
            raise UsageError("--leader-ttl must be at least 2 seconds (etcd's shortest lease)")

        def make_service(engine):
            return MetaService(namespace_on(engine, **options), rereplicate_delay=args.rereplicate_delay,
                               remote_allow=_remote_allow(args, ()), **_token_options(args), **_kv_options(args))

        await HaMeta(args.engine, make_service, ttl=int(args.leader_ttl), advertise=args.advertise or "",
                     limits=_server_limits(args), warm_standby=not args.cold_standby).serve(host, port, task_status=task_status)
        return
    if not args.data_dir:
        raise UsageError("kvfs meta needs --data-dir (RocksDB) or --engine etcd://...")
    ns = open_namespace(args.data_dir, sync=not args.no_sync, **options)
    try:
        await MetaService(ns, rereplicate_delay=args.rereplicate_delay, remote_allow=_remote_allow(args, ()),
                          **_token_options(args), **_kv_options(args)).serve(host, port, limits=_server_limits(args),
                                                                           task_status=task_status)
    finally:
        ns.engine.close()


def _kv_options(args) -> dict[str, float]:
    """The KV map lease (meta/kv_leases.py) from ``--kv-lease-seconds``."""
    if args.kv_lease_seconds < 0:
        raise UsageError("--kv-lease-seconds must be 0 (no leases) or positive")
    return {"kv_lease_seconds": args.kv_lease_seconds}


def _token_options(args) -> dict[str, float]:
    """Chunk capability lifetimes (issue 13) from ``--chunk-token-seconds`` / ``--chunk-key-rotate-hours``."""
    options = {"token_seconds": args.chunk_token_seconds}
    rotate_hours = getattr(args, "chunk_key_rotate_hours", None)  # `kvfs up` keeps the default
    if rotate_hours is not None:
        options["key_rotate_seconds"] = rotate_hours * 3600
    if options["token_seconds"] < 1 or options.get("key_rotate_seconds", 3600) < 60:
        raise UsageError("--chunk-token-seconds must be at least 1 and --chunk-key-rotate-hours at least 1/60")
    return options


def open_store(args):
    from kvfs.chunkserver.store import ChunkStore

    path = _check_writable_dir(args.data_dir, "chunkserver data dir")
    return ChunkStore(path, capacity=config.parse_size(args.capacity) if args.capacity else 0,
                      fsync=args.fsync == "always")


async def serve_chunkserver(args, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from kvfs.chunkserver.service import ChunkService

    host, port = _split_listen(args.listen)
    service = ChunkService(open_store(args), args.meta)
    await service.serve(host, port, args.advertise, limits=_server_limits(args), task_status=task_status)


def _remote_allow(args, default: tuple[str, ...]) -> tuple[str, ...]:
    from kvfs.remote.allow import from_env

    return tuple(args.remote_allow) if args.remote_allow else (from_env() or default)


def _server_limits(args):
    from kvfs.rpc import ServerLimits

    if min(args.idle_timeout, args.frame_timeout) <= 0 or args.max_connections_per_peer <= 0:
        raise UsageError("--idle-timeout, --frame-timeout and --max-connections-per-peer must be positive")
    return ServerLimits(idle_timeout=args.idle_timeout, frame_timeout=args.frame_timeout,
                        connections_per_peer=args.max_connections_per_peer,
                        inflight_bytes=max(config.parse_size(args.max_inflight), 1 << 20))


async def _until_signal(body: Callable, *a) -> None:
    """Run ``body`` until SIGINT/SIGTERM, then cancel it (finally blocks unmount and close cleanly)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_nursery() as nursery:
            async def watch() -> None:
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            async def run() -> None:
                await body(*a)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run)


# --------------------------------------------------------------------------- commands


def _server_tls(args, role: str) -> None:
    """Mutual TLS with this node's certificate, or plaintext only when asked for by name."""
    from kvfs import tls

    directory = args.tls_dir or os.environ.get(tls.ENV, "")
    if args.insecure:
        if args.tls_dir:
            raise UsageError("--insecure and --tls-dir exclude each other")
        tls.configure(None)  # kvfs.rpc warns once it listens on a non-loopback address
        return
    if not directory:
        raise UsageError(f"kvfs {role} needs TLS material: --tls-dir DIR or {tls.ENV} (make it with `kvfs certs "
                         f"issue --role {role}`), or --insecure to serve plaintext on a trusted network")
    tls.require_own_role(tls.configure(directory), role, f"kvfs {role}")


def cmd_meta(args) -> None:
    _server_tls(args, "meta")
    metrics.serve_metrics(args.metrics_port)
    trio.run(_until_signal, serve_meta, args)


def cmd_chunkserver(args) -> None:
    if args.action:
        from kvfs.decom_cli import cmd_decommission

        return cmd_decommission(args)
    if not args.data_dir:
        raise UsageError("kvfs chunkserver needs --data-dir")
    _server_tls(args, "chunkserver")
    metrics.serve_metrics(args.metrics_port)
    trio.run(_until_signal, serve_chunkserver, args)


def _client_options(args):
    from kvfs.client import ClientOptions

    # A mount's client caches directory listings/attributes no longer than the kernel caches entries.
    ttl = getattr(args, "attr_timeout", ClientOptions.dir_cache_ttl)
    touch = getattr(args, "kv_touch_interval", ClientOptions.kv_lookup_touch_interval)
    return ClientOptions(timeout=args.timeout, local_reads=not args.no_local_reads, dir_cache_ttl=ttl,
                         kv_lookup_touch_interval=touch)


def _mount_runner():
    """The FUSE side is optional (extra "mount"): only mounting needs pyfuse3 and libfuse."""
    try:
        from kvfs.mount.runner import run_mount
    except ModuleNotFoundError as exc:
        if exc.name != "pyfuse3":
            raise
        raise UsageError("mounting needs pyfuse3: pip install 'kvfs[mount]' (builds against libfuse3-dev: "
                         "apt-get install libfuse3-dev pkg-config gcc)") from None
    return run_mount


def cmd_mount(args) -> None:
    from kvfs.mount.mountpoint import check_mountpoint

    check_mountpoint(args.mountpoint)  # before importing pyfuse3: a bad mountpoint is one line either way
    run_mount = _mount_runner()

    metrics.serve_metrics(args.metrics_port, host="127.0.0.1")

    async def body() -> None:
        await run_mount(args.meta, args.mountpoint, options=_client_options(args), attr_timeout=args.attr_timeout,
                        entry_timeout=args.attr_timeout, writeback_cache=args.writeback_cache,
                        readahead_kb=config.parse_size(args.readahead) // 1024, kv_timeout=args.kv_timeout)

    trio.run(_until_signal, body)


def cmd_up(args) -> None:
    """Meta, chunkserver(s) and the mount in one process, on one data dir."""
    from kvfs import tls
    from kvfs.chunkserver.service import ChunkService
    from kvfs.meta.service import MetaService
    from kvfs.mount.mountpoint import check_mountpoint

    run_mount = _mount_runner()
    host, port = _split_listen(args.listen)
    if not _is_loopback(host):
        raise UsageError(f"kvfs up serves plaintext, so it listens on loopback only (not {host}); run `kvfs meta` "
                         "and `kvfs chunkserver` with --tls-dir for a networked cluster")
    tls.configure(None)  # one process, one user, loopback: its own connections need no certificates
    data_dir = _check_writable_dir(args.data_dir, "data dir")
    # The default mountpoint is ours to create; a stale mount there (a kill -9 of the last run) is
    # cleaned first, since the directory cannot even be stat'ed until then.
    mountpoint = check_mountpoint(args.mountpoint or config.default_mountpoint(), create=args.mountpoint is None)
    ns = open_namespace(os.path.join(data_dir, "meta"), chunk_size=config.parse_size(args.chunk_size),
                        replication=args.replication, sync=not args.no_sync)

    async def body() -> None:
        async with open_nursery() as nursery:
            # Loopback, one user: any remote may be attached unless --remote-allow narrows it.
            meta_port = await nursery.start(MetaService(ns, remote_allow=_remote_allow(args, ("*",)),
                                                        **_token_options(args)).serve, host, port)
            meta_address = f"{host}:{meta_port}"
            servers = []
            for i in range(args.chunkservers):
                store_args = argparse.Namespace(data_dir=os.path.join(data_dir, f"chunkserver{i}"),
                                                capacity=args.capacity, fsync=args.fsync)
                service = ChunkService(open_store(store_args), meta_address, heartbeat_interval=0.5)
                cs_port = await nursery.start(service.serve, host, 0)
                servers.append(f"{host}:{cs_port}")
            with trio.fail_after(10):
                while len(ns.registry.live_servers()) < args.chunkservers:
                    await trio.sleep(0.05)
            await nursery.start(lambda task_status: run_mount(
                meta_address, mountpoint, options=_client_options(args), attr_timeout=args.attr_timeout,
                entry_timeout=args.attr_timeout, writeback_cache=args.writeback_cache,
                readahead_kb=config.parse_size(args.readahead) // 1024, kv_timeout=args.kv_timeout,
                task_status=task_status))
            print(f"kvfs is up\n  mount:        {mountpoint}\n  meta:         {meta_address}\n"
                  f"  chunkservers: {', '.join(servers)}\n  data dir:     {data_dir}\n"
                  f"Use it with plain file tools; `kvfs status --meta {meta_address}` shows usage. Ctrl-C stops.",
                  flush=True)

    try:
        trio.run(_until_signal, body)
    finally:
        ns.engine.close()


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_status(args) -> None:
    from kvfs.client import ClientOptions, SyncClient

    try:
        with SyncClient(args.meta, ClientOptions(timeout=args.timeout)) as c:
            reply = c.refresh_servers()
            extra_sections = _status_sections(c)
    except OSError:
        # No meta leader answers: an HA group's standbys still tell what they know (etcd's health).
        section = _ha_section(None, args.meta, args.timeout) if "," in args.meta else ""
        if section:
            print(section)
        raise
    from kvfs.config import format_size
    from kvfs.decom_cli import server_state

    rows = [("ID", "ADDRESS", "STATE", "CHUNKS", "USED", "CAPACITY", "USE%", "DATA DIR")]
    for s in reply.servers:
        pct = f"{100 * s.used / s.capacity:.1f}" if s.capacity else "-"
        rows.append((str(s.server_id), s.address, server_state(s), str(s.chunks), format_size(s.used),
                     format_size(s.capacity), pct, s.data_dir))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"meta {args.meta}: {reply.files} inodes, {format_size(reply.used_bytes)} of file data, "
          f"chunk size {format_size(reply.chunk_size)}, replication {reply.replication}")
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for section in extra_sections:
        print()
        print(section)


def _ha_section(c, meta: str = "", timeout: float = 10.0) -> str:
    """Meta leader, standbys and etcd health, when meta runs on etcd (HA); "" for a lone meta.
    ``c`` is a connected SyncClient, or None to ask the processes in ``meta`` directly (no leader)."""
    from kvfs import protocol as P
    from kvfs.config import format_size

    try:
        if c is not None:
            st = c.call(c.client.meta.request, P.META_HA_STATUS, P.Empty())
        else:
            st = trio.run(_ask_any_meta, meta, timeout)
    except OSError:
        return ""  # an older meta without the method, or none answers
    if st.engine != "etcd":
        return ""
    standbys = [m.address for m in st.members if m.role != "leader"]
    leader = st.leader or "NONE (election in progress, or etcd has no quorum)"
    lines = [f"meta on etcd: leader {leader}; standbys {', '.join(standbys) or 'none'}"]
    rows = [("ETCD ENDPOINT", "HEALTH", "RAFT LEADER", "VERSION", "DB SIZE")]
    for e in st.etcd:
        rows.append((e.endpoint, "ok" if e.healthy else f"DOWN ({e.error[:60]})", "yes" if e.is_leader else "",
                     e.version, format_size(e.db_size) if e.healthy else ""))
    healthy = sum(e.healthy for e in st.etcd)
    lines.append(f"etcd: {healthy} of {len(st.etcd)} members healthy"
                 + ("" if healthy > len(st.etcd) // 2 else " — NO QUORUM: metadata changes fail"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


async def _ask_any_meta(meta: str, timeout: float):
    """META_HA_STATUS from the first meta process that answers (standbys answer it too)."""
    from kvfs import protocol as P
    from kvfs.meta_router import meta_addresses
    from kvfs.rpc import RpcClient

    last: OSError = OSError(5, "no meta address")
    for address in meta_addresses(meta):
        client = RpcClient("meta", address, P.META_METHODS, timeout=timeout, connect_timeout=min(timeout, 2.0))
        try:
            return await client.request(P.META_HA_STATUS, P.Empty())
        except OSError as exc:
            last = exc
        finally:
            client.close()
    raise last


def _status_sections(c) -> list[str]:
    """Tables that feature modules add to `kvfs status` (HA meta, KV cache counters, remote bindings)."""
    sections = []
    section = _ha_section(c)
    if section:
        sections.append(section)
    from kvfs.kv.policy import format_rows, kv_status_rows

    rows = kv_status_rows(c)
    if rows:
        sections.append(format_rows(rows))
    from kvfs.remote.cli import status_section

    section = status_section(c)
    if section:
        sections.append(section)
    from kvfs.tenant_cli import status_section as tenants_section

    section = tenants_section(c)
    if section:
        sections.append(section)
    return sections


# --------------------------------------------------------------------------- parser


def build_parser(with_extensions: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvfs", description="Distributed cache filesystem for LLM inference.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--tls-dir", help="TLS material (ca.pem, cert.pem, key.pem from `kvfs certs issue`) for every "
                   "connection; default $KVFS_TLS_DIR, else plaintext")
    sub = p.add_subparsers(dest="command", required=True)

    def tls_flag(sp: argparse.ArgumentParser, server: bool = False) -> None:
        # SUPPRESS: a subcommand's flag must not reset the top-level one (`kvfs --tls-dir D status`).
        sp.add_argument("--tls-dir", default=argparse.SUPPRESS, help="TLS material (ca.pem, cert.pem, key.pem) "
                        "from `kvfs certs issue`; default $KVFS_TLS_DIR")
        if server:
            sp.add_argument("--insecure", action="store_true", help="serve plaintext with no authentication "
                            "(a trusted network only); without it the server needs --tls-dir")

    def client_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--timeout", type=float, default=30.0, help="seconds before a server call fails with EIO")
        sp.add_argument("--no-local-reads", action="store_true", help="never read chunk files directly")

    def server_flags(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("limits on what one peer may cost this server")
        g.add_argument("--idle-timeout", type=float, default=600.0, help="close connections idle this long (s)")
        g.add_argument("--frame-timeout", type=float, default=30.0,
                       help="a request must arrive within this (s), plus 1 s per MB of data (slow senders)")
        g.add_argument("--max-connections-per-peer", type=int, default=1024)
        g.add_argument("--max-inflight", default="4G", help="request data being received, all connections together")

    def remote_allow_flag(sp: argparse.ArgumentParser, default: str) -> None:
        sp.add_argument("--remote-allow", action="append", metavar="URL_PREFIX",
                        help="a remote store URL prefix that `kvfs remote attach` may name (repeatable; '*' allows "
                        f"any; or KVFS_REMOTE_ALLOW=a,b). Default: {default}")

    def no_sync_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-sync", action="store_true",
                        help="acknowledge metadata changes before they are fsynced (faster; survives a killed "
                        "process but not a power loss or VM reset). Default: every acknowledged change is "
                        "on disk (group commit)")

    def token_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--chunk-token-seconds", type=float, default=600.0,
                        help="lifetime of the chunk capability tokens meta hands out with chunk maps (clients renew "
                        "expired ones on their own)")

    def mount_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--attr-timeout", type=float, default=1.0, help="seconds the kernel (and the mount's client: directory listings "
                        "and attributes) may answer from cache; 0 asks meta every time")
        sp.add_argument("--kv-timeout", type=float, default=300.0,
                        help="seconds the kernel may keep the names and attributes of KV block and run files and their "
                        "layout directories (immutable; a removed one costs one retry); 0: as --attr-timeout (docs/kv.md)")
        sp.add_argument("--writeback-cache", action="store_true", help="let the kernel buffer writes (faster)")
        sp.add_argument("--readahead", default="4M", help="kernel readahead for the mount (sequential read size)")
        sp.add_argument("--kv-touch-interval", type=float, default=60.0,
                        help="a lookup of a KV block or run file records an access (eviction recency) when the last "
                        "was longer ago than this (s); -1: lookups record none (docs/kv.md)")

    sp = sub.add_parser("up", help="run meta, chunkserver(s) and the mount in one process")
    sp.add_argument("mountpoint", nargs="?", help=f"default {config.default_mountpoint()} (created if missing)")
    sp.add_argument("--data-dir", default=config.default_data_dir())
    sp.add_argument("--listen", default=f"127.0.0.1:{config.DEFAULT_META_PORT}", help="meta address")
    sp.add_argument("--chunkservers", type=int, default=1)
    sp.add_argument("--replication", type=int, default=1)
    sp.add_argument("--chunk-size", default="4M")
    sp.add_argument("--capacity", default="", help="per-chunkserver capacity (default: the disk)")
    sp.add_argument("--fsync", choices=["always", "never"], default="always",
                    help="chunkservers fsync every chunk before acknowledging it (default always)")
    no_sync_flag(sp)
    token_flag(sp)
    remote_allow_flag(sp, "any (kvfs up listens on loopback)")
    client_flags(sp)
    mount_flags(sp)
    sp.set_defaults(func=cmd_up)

    sp = sub.add_parser("meta", help="run the metadata service")
    sp.add_argument("--listen", default=f"0.0.0.0:{config.DEFAULT_META_PORT}")
    sp.add_argument("--data-dir", help="RocksDB metadata store (one meta process)")
    sp.add_argument("--engine", default="",
                    help="etcd://h1:2379,h2:2379,h3:2379[/prefix]: metadata on etcd, several meta processes of which "
                    "one leads (HA); etcd must run with --max-txn-ops 16384 --max-request-bytes 8388608 "
                    "--auto-compaction-mode periodic --auto-compaction-retention 5m")
    sp.add_argument("--advertise", help="with --engine: the address clients use to reach this meta "
                    "(default: the listen address)")
    sp.add_argument("--leader-ttl", type=float, default=5.0,
                    help="with --engine: seconds a dead leader keeps leadership before a standby takes over")
    sp.add_argument("--cold-standby", action="store_true",
                    help="with --engine: stand by without a copy of the namespace (less memory and CPU; "
                    "a takeover then loads the whole namespace from etcd)")
    sp.add_argument("--replication", type=int, default=3)
    sp.add_argument("--chunk-size", default="4M")
    no_sync_flag(sp)
    sp.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    sp.add_argument("--lease-seconds", type=float, default=60.0,
                    help="a write lease (and the writer's uncommitted chunks) lives this long after its last "
                    "renewal; clients renew three times per period")
    sp.add_argument("--pending-grace", type=float, default=120.0,
                    help="seconds a chunk allocated for a file that does not exist yet (KV block, remote fill) "
                    "may stay unpublished before it is garbage")
    sp.add_argument("--kv-lease-seconds", type=float, default=2.0,
                    help="a client may read KV blocks through chunk maps it got from meta this long without "
                    "asking again; a re-put of a leased name is acknowledged only after it (0: no leases)")
    sp.add_argument("--heartbeat-timeout", type=float, default=10.0,
                    help="seconds without a heartbeat before a chunkserver counts as down")
    sp.add_argument("--rereplicate-delay", type=float, default=30.0,
                    help="seconds a chunkserver must stay down before its chunks are copied elsewhere")
    sp.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port")
    token_flag(sp)
    sp.add_argument("--chunk-key-rotate-hours", type=float, default=24.0,
                    help="a new chunk capability key signs every this many hours (the previous one stays valid "
                    "until its tokens expire)")
    server_flags(sp)
    tls_flag(sp, server=True)
    remote_allow_flag(sp, "none")
    sp.set_defaults(func=cmd_meta)

    sp = sub.add_parser("chunkserver", help="run a chunkserver; `kvfs chunkserver decommission ADDRESS [--cancel | --forget]` "
                        "drains one (admin)")
    sp.add_argument("action", nargs="?", choices=["decommission"], help="drain the chunkserver at ADDRESS: no new "
                    "chunks, its chunks copied to other servers; `kvfs status` says when it is decommissioned")
    sp.add_argument("address", nargs="?", help="with decommission: the server's address as `kvfs status` lists it")
    sp.add_argument("--cancel", action="store_true", help="with decommission: put the server back into placement")
    sp.add_argument("--forget", action="store_true", help="with decommission: drop a decommissioned server that "
                    "has been stopped from the cluster's list")
    sp.add_argument("--timeout", type=float, default=10.0, help="with decommission: seconds before meta calls fail")
    sp.add_argument("--meta", default=config.default_meta_address())
    sp.add_argument("--listen", default="0.0.0.0:9500")
    sp.add_argument("--advertise", help="address clients use to reach this server (default: the listen address)")
    sp.add_argument("--data-dir", help="where chunks are stored (required to run a chunkserver)")
    sp.add_argument("--capacity", default="")
    sp.add_argument("--fsync", choices=["always", "never"], default="always")
    sp.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port")
    server_flags(sp)
    tls_flag(sp, server=True)
    sp.set_defaults(func=cmd_chunkserver)

    sp = sub.add_parser("mount", help="mount the namespace with FUSE")
    sp.add_argument("mountpoint")
    sp.add_argument("--meta", default=config.default_meta_address())
    client_flags(sp)
    mount_flags(sp)
    sp.add_argument("--metrics-port", type=int, default=0,
                    help="serve Prometheus /metrics on this port of 127.0.0.1 (FUSE requests by operation)")
    tls_flag(sp)
    sp.set_defaults(func=cmd_mount)

    sp = sub.add_parser("status", help="show chunkservers, capacity and usage")
    sp.add_argument("--meta", default=config.default_meta_address())
    sp.add_argument("--timeout", type=float, default=10.0)
    tls_flag(sp)
    sp.set_defaults(func=cmd_status)

    from kvfs.certs import add_parser as add_certs_parser
    from kvfs.doctor import add_parser as add_doctor_parser

    add_certs_parser(sub)
    add_doctor_parser(sub)

    if with_extensions:
        for module in EXTENSIONS:
            try:
                ext = __import__(module, fromlist=["add_parser"])
            except ImportError:
                continue
            ext.add_parser(sub)
    return p


# Feature modules that add subcommands. They may import torch, boto3 or pyarrow (seconds of start-up),
# so the service commands, which start often (tests, restarts), do not load them.
EXTENSIONS = ("kvfs.models.cli", "kvfs.kv.cli", "kvfs.remote.cli", "kvfs.tenant_cli", "kvfs.layout_cli")
CORE_COMMANDS = {"up", "meta", "chunkserver", "mount", "status", "certs", "doctor"}


def _needs_extensions(argv: list[str]) -> bool:
    command = next((a for a in argv if not a.startswith("-")), None)
    return command not in CORE_COMMANDS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_needs_extensions(argv)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from kvfs.mount.mountpoint import MountError

    try:
        if args.tls_dir and args.command not in ("meta", "chunkserver", "up"):
            from kvfs import tls

            tls.configure(args.tls_dir)  # every client connection of this command (else KVFS_TLS_DIR)
        status = args.func(args)
    except (UsageError, MountError, ValueError) as exc:
        print(f"kvfs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kvfs: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
