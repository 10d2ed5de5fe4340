"""``kvfs policy``: set, show and apply KV-cache policies (loaded by kvfs.cli through ``add_parser``).

    kvfs policy set /kv --quota 10G --ttl 3600 [--window 60]
    kvfs policy get /kv
    kvfs policy clear /kv
    kvfs policy evict            # run one eviction pass now and print the KV status
"""

from __future__ import annotations

import argparse

from kvfs import config


def _client(args):
    from kvfs.client import ClientOptions, SyncClient

    return SyncClient(args.meta, ClientOptions(timeout=args.timeout))


def cmd_policy(args) -> None:
    from kvfs.kv import policy as pol

    with _client(args) as c:
        if args.action == "set":
            quota = config.parse_size(args.quota) if args.quota is not None else None
            ttl = pol.parse_duration(args.ttl) if args.ttl is not None else None
            window = pol.parse_duration(args.window) if args.window is not None else None
            p = pol.set_policy(c, args.path, quota=quota, ttl=ttl, window=window)
            print(_describe(args.path, p))
        elif args.action == "get":
            p = pol.get_policy(c, args.path)
            print(_describe(args.path, p) if p else f"{args.path}: no policy (never evicted)")
        elif args.action == "clear":
            pol.clear_policy(c, args.path)
        else:
            pol.evict_now(c)
            print(pol.format_rows(pol.kv_status_rows(c)) or "no KV directories")


def _describe(path: str, p) -> str:
    quota = config.format_size(p.quota) if p.quota else "none"
    ttl = f"{p.ttl:g}s" if p.ttl else "none"
    return f"{path}: quota {quota}, ttl {ttl}, lru window {p.window:g}s"


def add_parser(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("policy", help="KV-cache policy of a directory (quota, TTL, LRU eviction)")
    sp.add_argument("action", choices=["set", "get", "clear", "evict"])
    sp.add_argument("path", nargs="?", default="/", help="a kvfs path (not a mount path), e.g. /kv")
    sp.add_argument("--quota", help="capacity, e.g. 10G (0 = none)")
    sp.add_argument("--ttl", help="evict blocks not accessed for this long, e.g. 3600, 2h (0 = none)")
    sp.add_argument("--window", help="LRU window: accesses within one count as equally recent (default 60s)")
    sp.add_argument("--meta", default=config.default_meta_address())
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_policy)
