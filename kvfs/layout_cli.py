"""``kvfs layout`` and ``kvfs cp``: per-file chunk sizes from the command line (kvfs/layout.py).

    kvfs layout set /models --chunk-size 16M   # new files under /models get 16 MiB chunks
    kvfs layout get /models/llama/model.safetensors
    kvfs layout clear /models
    kvfs cp ./llama /models/ --chunk-size 16M  # local files or trees into kvfs (kvfs paths, not mount paths)
"""

from __future__ import annotations

import argparse
import os
import stat

from kvfs import config
from kvfs.layout import CHUNK_SIZE_XATTR, parse_chunk_size


def _client(args):
    from kvfs.client import ClientOptions, SyncClient

    return SyncClient(args.meta, ClientOptions(timeout=args.timeout))


def cmd_layout(args) -> None:
    with _client(args) as c:
        ino = c.resolve(args.path).ino
        if args.action == "set":
            if not args.chunk_size:
                raise ValueError("layout set needs --chunk-size")
            c.setxattr(ino, CHUNK_SIZE_XATTR, str(parse_chunk_size(args.chunk_size)).encode())
        elif args.action == "clear":
            c.removexattr(ino, CHUNK_SIZE_XATTR)
            print(f"{args.path}: no chunk-size policy (new files: the cluster's {config.format_size(c.chunk_size)})")
            return
        print(describe(c, args.path))


def describe(c, path: str) -> str:
    attr = c.resolve(path)
    if stat.S_ISREG(attr.mode):
        return f"{path}: chunk size {config.format_size(c.client.file_chunk_size(attr))}"
    try:
        size = int(c.getxattr(attr.ino, CHUNK_SIZE_XATTR))
        return f"{path}: new files get chunk size {config.format_size(size)}"
    except OSError:
        return f"{path}: no chunk-size policy here (the nearest directory above with one applies)"


def cmd_cp(args) -> None:
    from tqdm import tqdm

    from kvfs.copy import copy_file, plan_copies

    chunk_size = parse_chunk_size(args.chunk_size) if args.chunk_size else 0  # a bad size fails before any copy
    for src in args.sources:
        if not os.path.exists(src):
            raise FileNotFoundError(2, "No such file or directory", src)
    with _client(args) as c:
        try:
            dest_is_dir = stat.S_ISDIR(c.resolve(args.dest).mode)
        except FileNotFoundError:
            dest_is_dir = args.dest.endswith("/")
        pairs = plan_copies(args.sources, args.dest, dest_is_dir)
        total = sum(os.path.getsize(s) for s, _ in pairs)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="cp", disable=args.quiet) as bar:
            for src, dest in pairs:
                head = dest.rpartition("/")[0]
                if head:
                    c.mkdir(head, parents=True, exist_ok=True)
                c.call(copy_file, c.client, src, dest, chunk_size=chunk_size, progress=bar.update)
        if not args.quiet:
            print(f"copied {len(pairs)} file(s), {config.format_size(total)}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    def common(sp) -> None:
        sp.add_argument("--meta", default=config.default_meta_address())
        sp.add_argument("--timeout", type=float, default=60.0)

    sp = sub.add_parser("layout", help="chunk size of a file, or the chunk-size policy of a directory")
    sp.add_argument("action", choices=["get", "set", "clear"])
    sp.add_argument("path", help="a kvfs path (not a mount path), e.g. /models")
    sp.add_argument("--chunk-size", help="a power of two from 64K to 256M, e.g. 16M")
    common(sp)
    sp.set_defaults(func=cmd_layout)
    cp = sub.add_parser("cp", help="copy local files or trees into kvfs")
    cp.add_argument("sources", nargs="+", help="local files or directories")
    cp.add_argument("dest", help="a kvfs path (a directory when it ends in / or exists as one)")
    cp.add_argument("--chunk-size", help="the new files' chunk size (default: the destination's policy, "
                    "else the cluster's), a power of two from 64K to 256M")
    cp.add_argument("--quiet", action="store_true", help="no progress bar")
    common(cp)
    cp.set_defaults(func=cmd_cp)
