"""``kvfs tenant add|set|list|remove`` and the tenants table of ``kvfs status`` (issue 13).

    kvfs tenant add team-a --uid 1000 --gid 1000 --quota-bytes 10G --quota-files 100000 --quota-kv-blocks 50000
    kvfs tenant set team-a --quota-bytes 20G
    kvfs tenant list
    kvfs tenant remove team-a        # refused while /tenants/team-a holds anything

Managing tenants needs an admin credential; a tenant's own client may list (its own row only).
"""

from __future__ import annotations

import argparse
from typing import Any

from kvfs import config
from kvfs import protocol as P


def _request(c: Any, method: int, request: P.Struct) -> Any:
    return c.call(c.client.meta.request, method, request)


def _spec(args) -> P.TenantSpec:
    def size(text: str | None) -> int | None:
        return config.parse_size(text) if text is not None else None

    return P.TenantSpec(args.name, args.uid, args.gid, size(args.quota_bytes), args.quota_files, args.quota_kv_blocks)


def cmd_tenant(args) -> None:
    from kvfs.client import ClientOptions, SyncClient

    with SyncClient(args.meta, ClientOptions(timeout=args.timeout)) as c:
        if args.action in ("add", "set"):
            if not args.name:
                raise ValueError(f"tenant {args.action} needs a NAME")
            method = P.META_TENANT_ADD if args.action == "add" else P.META_TENANT_SET
            print(format_tenants([_request(c, method, _spec(args))]))
        elif args.action == "remove":
            if not args.name:
                raise ValueError("tenant remove needs a NAME")
            _request(c, P.META_TENANT_REMOVE, P.TenantName(args.name))
        else:
            print(format_tenants(_request(c, P.META_TENANT_LIST, P.Empty()).tenants) or "no tenants")


def _used(used: int, quota: int, fmt=str) -> str:
    return f"{fmt(used)} / {fmt(quota)}" if quota else f"{fmt(used)} / -"


def format_tenants(tenants: list[P.TenantInfo]) -> str:
    """A table, one row per tenant: usage against quotas ("-": unlimited). "" when there is none."""
    from kvfs.kv.policy import format_rows

    if not tenants:
        return ""
    rows = [("TENANT", "ROOT", "UID:GID", "BYTES USED/QUOTA", "FILES USED/QUOTA", "KV BLOCKS USED/QUOTA")]
    for t in tenants:
        rows.append((t.name, t.root_path or f"#{t.root_ino}", f"{t.uid}:{t.gid}",
                     _used(t.used_bytes, t.quota_bytes, config.format_size), _used(t.files, t.quota_files),
                     _used(t.kv_blocks, t.quota_kv_blocks)))
    return format_rows(rows)


def status_section(c: Any) -> str:
    """The tenants table for ``kvfs status`` ("" when there are none, or meta predates tenants)."""
    try:
        return format_tenants(_request(c, P.META_TENANT_LIST, P.Empty()).tenants)
    except OSError:
        return ""


def add_parser(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("tenant", help="tenants: isolated roots (/tenants/NAME), their uid/gid and quotas (admin)")
    sp.add_argument("action", choices=["add", "set", "list", "remove"])
    sp.add_argument("name", nargs="?", default="")
    sp.add_argument("--uid", type=int, help="uid of every file the tenant's clients create (add: default 0)")
    sp.add_argument("--gid", type=int, help="gid of every file the tenant's clients create (add: default 0)")
    sp.add_argument("--quota-bytes", help="file data, e.g. 10G (0 = unlimited)")
    sp.add_argument("--quota-files", type=int, help="files and directories (0 = unlimited)")
    sp.add_argument("--quota-kv-blocks", type=int, help="KV-cache blocks (0 = unlimited)")
    sp.add_argument("--meta", default=config.default_meta_address())
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_tenant)
