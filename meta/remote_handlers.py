"""The remote tier's layer over meta's namespace handlers (``RemoteTier.wrap``): what each request does
around the plain namespace when a remote binding is involved.

- Before: lookups and listings sync the directory from the remote; reads of a clean file check it is
  still current; writes, links, publishes and renames into read-only or remote-bound trees are refused
  (EROFS, EXDEV, EBUSY) before the namespace changes anything.
- After: a new file, a commit, an unlink or a rename in a bound tree updates the file's remote record
  and the upload/delete queue in one engine write, then wakes the uploader (write-through commits wait
  for the upload); KV lookups of remote-bound files carry no leased map.
- Added: the remote RPCs (attach, detach, list, sync, info, fills, evict, refill).

The state and its rules live in ``RemoteTier`` (meta/remote.py); this module only wires requests to it.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta.engine import Batch
from kvfs.meta.remote_records import DIRTY, STATE_XATTR, FileRecord, file_key, upload_key

if TYPE_CHECKING:
    from kvfs.meta.remote import RemoteTier


def wrap_handlers(tier: RemoteTier, handlers: dict) -> dict:
    """``handlers`` (method -> handler) with the tier layered over them and the remote RPCs added."""
    ns = tier.ns
    h = dict(handlers)
    orig = handlers

    def before(method, check):
        async def handler(r, data):
            await check(r)
            return await orig[method](r, data)
        h[method] = handler

    async def lookup(r):
        await tier.sync_dir(r.parent)

    async def readdir(r):
        if not r.after:
            await tier.sync_dir(r.ino)

    async def resolve(r):
        await tier.resolve(r.path)

    async def get_chunks(r):
        await tier.validate(r.ino)

    async def dir_writable(r):
        tier._check_dir_writable(r.parent)

    async def file_writable(r):
        tier._check_file_writable(r.ino)

    async def link(r):
        tier._check_file_writable(r.ino)
        if tier.binding_of_file(r.ino) is not None or tier.locate_dir(r.new_parent) is not None:
            raise error(errno.EXDEV, "hard links into or out of a remote-bound directory are not supported")

    async def publish(r):
        if tier.locate_dir(r.parent) is not None:
            # A file born whole would skip the upload queue: writers use create/write/commit there.
            raise error(errno.EXDEV, "one-step publish into a remote-bound directory is not supported")

    before(P.META_LOOKUP, lookup)
    before(P.META_READDIR, readdir)
    before(P.META_KV_PUBLISH, publish)
    before(P.META_RESOLVE, resolve)
    before(P.META_GET_CHUNKS, get_chunks)
    before(P.META_SYMLINK, dir_writable)
    before(P.META_LINK, link)
    for m in (P.META_SETATTR, P.META_OPEN_WRITE, P.META_ALLOC_CHUNK, P.META_SETXATTR, P.META_REMOVEXATTR):
        before(m, file_writable)

    async def mknode(r, data):
        tier._check_dir_writable(r.parent)
        attr = await orig[P.META_MKNODE](r, data)
        loc = tier.locate_dir(r.parent)
        if loc is not None and stat.S_ISREG(attr.mode) and tier.file(attr.ino) is None:
            b, rel = loc
            batch: Batch = []
            tier._enqueue(batch, attr.ino, FileRecord(b.path, f"{rel}/{r.name}" if rel else r.name, DIRTY))
            ns.engine.write(batch)
            tier._kick()
        return attr

    async def commit(r, data):
        tier._check_file_writable(r.ino)
        attr = await orig[P.META_COMMIT](r, data)
        found = tier.binding_of_file(r.ino)
        if found is not None:
            b, rec = found
            rec.error = ""
            batch: Batch = []
            tier._enqueue(batch, r.ino, rec)
            ns.engine.write(batch)
            tier._backoff.pop(r.ino, None)
            tier._kick()
            if b.mode == "writethrough":
                await tier.wait_clean(r.ino, tier.opts.writethrough_timeout)
        return attr

    async def unlink(r, data):
        tier._check_dir_writable(r.parent)
        child = ns._child(r.parent, r.name)
        attr = await orig[P.META_UNLINK](r, data)
        if child is not None and attr.nlink <= 0:
            found = tier.binding_of_file(child)
            if found is not None:
                b, rec = found
                batch: Batch = [(file_key(child), None), (upload_key(child), None)]
                tier._queue_delete(batch, b.url, rec.key)
                ns.engine.write(batch)
                tier._kick()
        return attr

    async def rename(r, data):
        tier._check_dir_writable(r.parent)
        tier._check_dir_writable(r.new_parent)
        src = ns._child(r.parent, r.name)
        src_loc, dst_loc = tier.locate_dir(r.parent), tier.locate_dir(r.new_parent)
        if src is not None and stat.S_ISDIR(ns.inode(src).mode):
            if src_loc is not None or dst_loc is not None:
                raise error(errno.EXDEV, "renaming directories inside a remote-bound tree is not supported")
            if any(ns._is_ancestor(src, b.root_ino) for b in tier.bindings.values()):
                raise error(errno.EBUSY, "the directory holds a remote binding: detach it first")
        replaced = ns._child(r.new_parent, r.new_name)
        reply = await orig[P.META_RENAME](r, data)
        if src is not None and stat.S_ISDIR(ns.inode(src).mode):
            tier._forget_dirs()  # directory paths changed (file renames leave them alone)
        if src is None or (src_loc is None and dst_loc is None):
            return reply
        batch: Batch = []
        if replaced is not None and replaced != src and tier.file(replaced) is not None:
            batch += [(file_key(replaced), None), (upload_key(replaced), None)]
        rec = tier.file(src)
        if rec is not None and rec.binding in tier.bindings:
            tier._queue_delete(batch, tier.bindings[rec.binding].url, rec.key)
        if dst_loc is not None and stat.S_ISREG(ns.inode(src).mode):
            b, rel = dst_loc
            new = FileRecord(b.path, f"{rel}/{r.new_name}" if rel else r.new_name, DIRTY,
                             version=rec.version if rec else 0)
            tier._enqueue(batch, src, new)
        elif rec is not None:
            batch += [(file_key(src), None), (upload_key(src), None)]
        ns.engine.write(batch)
        tier._kick()
        return reply

    def no_remote_map(reply: P.KVLookupReply | None) -> None:
        if reply is not None and reply.file is not None and tier.binding_of_file(reply.attr.ino) is not None:
            # A remote-bound file's map is validated against the remote at each GET_CHUNKS: the
            # client's open asks for it (the lease taken stays harmless: changes wait out 2 s).
            reply.file, reply.lease_seconds = None, 0.0

    async def kv_lookup(r, data):
        await tier.sync_dir(r.parent)
        reply = await orig[P.META_KV_LOOKUP](r, data)
        no_remote_map(reply)
        return reply

    async def kv_lookup_many(r, data):
        for parent in dict.fromkeys(r.parents):
            await tier.sync_dir(parent)
        reply = await orig[P.META_KV_LOOKUP_MANY](r, data)
        for one in reply.replies:
            no_remote_map(one)
        return reply

    async def getxattr(r, data):
        if r.name == STATE_XATTR:
            rec = tier.file(r.ino)
            if rec is not None:
                return P.XattrValue(rec.state.encode())
        return await orig[P.META_GETXATTR](r, data)

    async def listxattr(r, data):
        reply = await orig[P.META_LISTXATTR](r, data)
        if tier.file(r.ino) is not None:
            reply.names.append(STATE_XATTR)
        return reply

    async def rmdir(r, data):
        tier._check_dir_writable(r.parent)
        return await orig[P.META_RMDIR](r, data)

    async def attach(r, _):
        return await tier.attach(r)

    async def detach(r, _):
        tier.detach(r.path)
        return P.Empty()

    async def list_(r, _):
        return tier.list()

    async def sync(r, _):
        return await tier.sync_path(r.path)

    async def info(r, _):
        return tier.info(r.ino)

    async def fill_alloc(r, _):
        return tier.fill_alloc(r)

    async def fill_commit(r, _):
        return tier.fill_commit(r)

    async def evict(r, _):
        return await tier.evict_path(r.path)

    async def refill(r, _):
        tier.refill(r)
        return P.Empty()

    h.update({
        P.META_MKNODE: mknode, P.META_COMMIT: commit, P.META_UNLINK: unlink, P.META_RENAME: rename,
        P.META_GETXATTR: getxattr, P.META_LISTXATTR: listxattr, P.META_RMDIR: rmdir, P.META_KV_LOOKUP: kv_lookup,
        P.META_KV_LOOKUP_MANY: kv_lookup_many,
        P.META_REMOTE_ATTACH: attach, P.META_REMOTE_DETACH: detach, P.META_REMOTE_LIST: list_,
        P.META_REMOTE_SYNC: sync, P.META_REMOTE_INFO: info, P.META_REMOTE_FILL_ALLOC: fill_alloc,
        P.META_REMOTE_FILL_COMMIT: fill_commit, P.META_REMOTE_EVICT: evict,
        P.META_REMOTE_REFILL: refill,
    })
    return h
