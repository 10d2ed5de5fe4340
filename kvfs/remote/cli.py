"""``kvfs remote attach|detach|list|sync|evict``, ``kvfs flush``, ``kvfs warm``, ``kvfs stat``.

PATH arguments are kvfs paths (``/models/x``) or paths inside a kvfs FUSE mount
(``~/kvfs/models/x``); a mount path also supplies the meta address when ``--meta`` is not given.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

import trio

from kvfs import config
from kvfs import protocol as P
from kvfs.tasks import open_nursery


def _kvfs_mounts() -> list[tuple[str, str]]:
    """(mountpoint, meta address) of every kvfs FUSE mount on this machine."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(rfields) >= 2 and rfields[0] == "fuse.kvfs" and rfields[1].startswith("kvfs:"):
                    mp = fields[4].encode().decode("unicode_escape")
                    out.append((mp, rfields[1][len("kvfs:"):]))
    except OSError:
        pass
    return out


def split_target(path: str, meta: str | None) -> tuple[str, str]:
    """(meta address, kvfs path) for a PATH argument."""
    real = os.path.realpath(path) if os.path.isabs(path) or os.path.exists(path) else None
    if real is not None:
        for mp, address in sorted(_kvfs_mounts(), key=lambda m: -len(m[0])):
            if real == mp or real.startswith(mp.rstrip("/") + "/"):
                return meta or address, "/" + os.path.relpath(real, mp).lstrip(".").lstrip("/")
    if not path.startswith("/"):
        raise ValueError(f"{path}: give an absolute kvfs path (/models/x) or a path inside a kvfs mount")
    return meta or config.default_meta_address(), path


async def _with_client(meta: str, fn, timeout: float = 30.0):
    from kvfs.client import Client, ClientOptions

    client = Client(meta, ClientOptions(timeout=timeout))
    async with open_nursery() as nursery:
        try:
            await client.connect(nursery)
            return await fn(client)
        finally:
            nursery.cancel_scope.cancel()
            client.close()


def _run(args, path: str | None, fn):
    meta, kpath = split_target(path, args.meta) if path is not None else (args.meta or config.default_meta_address(), "")
    return trio.run(_with_client, meta, lambda c: fn(c, kpath), args.timeout)


async def _walk_files(client, path: str) -> list[tuple[str, P.Attr]]:
    attr = await client.resolve(path)
    if not stat.S_ISDIR(attr.mode):
        return [(path, attr)]
    out: list[tuple[str, P.Attr]] = []
    stack = [(path.rstrip("/") or "/", attr.ino)]
    while stack:
        d, ino = stack.pop()
        after = ""
        while True:
            reply = await client.readdir(ino, after, 4096)
            for e in reply.entries:
                child = f"{d.rstrip('/')}/{e.name}"
                if stat.S_ISDIR(e.attr.mode):
                    stack.append((child, e.attr.ino))
                elif stat.S_ISREG(e.attr.mode):
                    out.append((child, e.attr))
            if not reply.more or not reply.entries:
                break
            after = reply.entries[-1].name
    return sorted(out)


# --------------------------------------------------------------------------- commands


def cmd_attach(args) -> None:
    async def body(c, path):
        b = await c.meta.request(P.META_REMOTE_ATTACH, P.RemoteAttach(path, args.url, args.mode, os.getuid(),
                                                                      os.getgid()), timeout=args.timeout)
        print(f"{b.path} -> {b.url} ({b.mode})")

    _run(args, args.path, body)


def cmd_detach(args) -> None:
    async def body(c, path):
        await c.meta.request(P.META_REMOTE_DETACH, P.RemotePath(path))
        print(f"{path}: detached")

    _run(args, args.path, body)


def binding_rows(bindings: list[P.RemoteBinding]) -> list[str]:
    rows = [("PATH", "REMOTE", "MODE", "DIRTY", "DELETES")]
    rows += [(b.path, b.url, b.mode, str(b.dirty), str(b.queued_deletes)) for b in bindings]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def status_section(c) -> str:
    """The bindings table for ``kvfs status`` (``c`` is a SyncClient); empty when nothing is bound."""
    bindings = c.call(c.client.meta.request, P.META_REMOTE_LIST, P.Empty()).bindings
    return "\n".join(["remote bindings:"] + ["  " + line for line in binding_rows(bindings)]) if bindings else ""


def cmd_list(args) -> None:
    async def body(c, _):
        reply = await c.meta.request(P.META_REMOTE_LIST, P.Empty())
        if not reply.bindings:
            print("no remote bindings")
        for line in binding_rows(reply.bindings):
            print(line)

    _run(args, None, body)


def cmd_sync(args) -> None:
    async def body(c, path):
        r = await c.meta.request(P.META_REMOTE_SYNC, P.RemotePath(path), timeout=args.timeout)
        print(f"{path}: {r.added} added, {r.updated} changed, {r.removed} removed")

    _run(args, args.path, body)


def cmd_evict(args) -> None:
    from kvfs.config import format_size

    async def body(c, path):
        r = await c.meta.request(P.META_REMOTE_EVICT, P.RemotePath(path))
        print(f"{path}: dropped the local copy of {r.files} clean file(s), {format_size(r.bytes)}")

    _run(args, args.path, body)


def cmd_flush(args) -> None:
    """Wait until every file under PATH is uploaded (clean)."""

    async def body(c, path):
        files = await _walk_files(c, path)
        await c.meta.request(P.META_REMOTE_SYNC, P.RemotePath(path), timeout=args.timeout)  # retry now
        deadline = time.monotonic() + args.wait if args.wait else None
        reported: dict[str, str] = {}
        pending = [(p, a.ino) for p, a in files]
        while pending:
            still = []
            for p, ino in pending:
                try:
                    info = await c.meta.request(P.META_REMOTE_INFO, P.RemoteInfo(ino))
                except (FileNotFoundError, OSError):
                    continue  # not remote-backed, or removed meanwhile
                if info.state != "clean":
                    still.append((p, ino))
                    if info.error and reported.get(p) != info.error:
                        reported[p] = info.error
                        print(f"{p}: {info.state}, retrying: {info.error}", file=sys.stderr)
            pending = still
            if not pending:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, f"{len(pending)} file(s) still not uploaded after {args.wait:g}s "
                                   f"(e.g. {pending[0][0]})")
            await trio.sleep(0.2)
        print(f"{path}: clean ({len(files)} file(s))")

    _run(args, args.path, body)


def cmd_warm(args) -> None:
    """Read every file under PATH once, so its data is cached on the chunkservers."""
    from tqdm import tqdm

    async def body(c, path):
        files = await _walk_files(c, path)
        total = sum(a.size for _, a in files)
        # Reads of whole chunks, 64 MiB or more at a time (each file's own chunk size).
        blocks = {ino: max(cs, 64 << 20) // cs * cs for ino, cs in ((a.ino, c.file_chunk_size(a)) for _, a in files)}
        buf = memoryview(bytearray(max(blocks.values(), default=0)))
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="warm",
                  disable=args.quiet) as bar:
            for p, attr in files:
                await c.open(attr.ino)
                try:
                    size, block = c.files[attr.ino].size, blocks[attr.ino]
                    for off in range(0, size, block):
                        n = await c.read_into(attr.ino, off, buf[: min(block, size - off)])
                        bar.update(n)
                finally:
                    await c.release(attr.ino)
        print(f"{path}: {len(files)} file(s) warm")

    _run(args, args.path, body)


def cmd_stat(args) -> None:
    from kvfs.config import format_size

    async def body(c, path):
        attr = await c.resolve(path)
        kind = "directory" if stat.S_ISDIR(attr.mode) else "file" if stat.S_ISREG(attr.mode) else "other"
        print(f"  path: {path}\n  type: {kind}\n  size: {attr.size} ({format_size(attr.size)})\n"
              f"  mode: {stat.filemode(attr.mode)}\n inode: {attr.ino}\n mtime: "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(attr.mtime_ns / 1e9))}")
        if not stat.S_ISREG(attr.mode):
            return
        chunks = await c.meta.request(P.META_GET_CHUNKS, P.GetChunks(attr.ino))
        cached = sum(ch.length for ch in chunks.chunks)
        print(f"cached: {format_size(cached)} of {format_size(attr.size)} in kvfs")
        try:
            info = await c.meta.request(P.META_REMOTE_INFO, P.RemoteInfo(attr.ino))
        except OSError:
            print("remote: none")
            return
        print(f"remote: {info.url}/{info.key} ({info.mode})\n state: {info.state}"
              + (f"\n  etag: {info.etag}" if info.etag else "") + (f"\n error: {info.error}" if info.error else ""))

    _run(args, args.path, body)


def add_parser(sub) -> None:
    def common(sp, *, path: bool = True, timeout: float = 60.0) -> None:
        if path:
            sp.add_argument("path", help="kvfs path (/models) or a path inside a kvfs mount")
        sp.add_argument("--meta", default=None, help="meta address (default: $KVFS_META, or the mount's)")
        sp.add_argument("--timeout", type=float, default=timeout, help="seconds per request")

    sp = sub.add_parser("remote", help="bind directories to S3 / HDFS / other remote stores")
    rsub = sp.add_subparsers(dest="remote_command", required=True)
    a = rsub.add_parser("attach", help="bind a kvfs directory to a remote location")
    common(a)
    a.add_argument("url", help="s3://bucket/prefix, hdfs://namenode:8020/path, file:///dir, ...")
    a.add_argument("--mode", choices=["writeback", "writethrough", "readonly"], default="writeback")
    a.set_defaults(func=cmd_attach)
    d = rsub.add_parser("detach", help="remove a binding (refused while uploads are pending)")
    common(d)
    d.set_defaults(func=cmd_detach)
    ls = rsub.add_parser("list", help="show bindings and pending uploads")
    common(ls, path=False)
    ls.set_defaults(func=cmd_list)
    s = rsub.add_parser("sync", help="re-list a bound tree from the remote now (and retry its uploads)")
    common(s, timeout=600.0)
    s.set_defaults(func=cmd_sync)
    e = rsub.add_parser("evict", help="drop the local copy of clean remote-backed files under PATH")
    common(e)
    e.set_defaults(func=cmd_evict)

    f = sub.add_parser("flush", help="wait until PATH (a file or tree) is uploaded to its remote")
    common(f)
    f.add_argument("--wait", type=float, default=0.0, help="give up after this many seconds (default: never)")
    f.set_defaults(func=cmd_flush)

    w = sub.add_parser("warm", help="pull a file or tree into the kvfs cache, with a progress bar")
    common(w, timeout=120.0)
    w.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_warm)

    st = sub.add_parser("stat", help="show a file's size, cached bytes and remote state")
    common(st)
    st.set_defaults(func=cmd_stat)
