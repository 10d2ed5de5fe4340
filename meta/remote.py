"""The remote capacity tier on the meta side: bindings, per-file remote state, the durable upload queue,
the write-back uploader, listing sync, staleness checks and eviction of clean data.

A binding ties a kvfs directory to a remote location (``kvfs.remote.open_store``). Under it, every
regular file has a ``FileRecord``: its remote key, state (dirty / uploading / clean) and the version
(etag, size, mtime) of the remote object it matches. Files listed from the remote start *clean* with
no chunks: clients fetch missing chunks from the remote and record them (``fill_alloc`` /
``fill_commit``). Local changes make a file *dirty* and put it in the upload queue; the uploader,
a trio task in the meta process, reads the file through ``kvfs.Client`` and uploads it.

``RemoteTier.wrap`` layers the tier over the plain namespace handlers: it syncs listings before
lookups, refuses writes in read-only bindings (EROFS), and marks files dirty after commits. The
namespace itself knows nothing about remotes.

Files: this one (bindings, listing sync, staleness), ``remote_handlers.py`` (the handler layer),
``remote_fills.py`` (read-through fills, eviction), ``remote_uploads.py`` (the write-back uploader),
``remote_records.py`` (records, keys and tunables).

Error handling: remote failures never fail a local write; they are retried with exponential
backoff and shown as the file's ``error``. Attach validates the location and fails with one line.
"""

from __future__ import annotations

import errno
import itertools
import logging
import stat

import trio

from kvfs import protocol as P
from kvfs.errors import error
from kvfs.meta import records as R
from kvfs.meta.engine import Batch
from kvfs.meta.names import check_name, now_ns
from kvfs.meta.namespace import ROOT_INO, Namespace
from kvfs.meta.remote_fills import RemoteFills
from kvfs.meta.remote_records import (
    CLEAN,
    DIRTY,
    MODES,
    UPLOADING,
    BindingRecord,
    DeleteJob,
    FileRecord,
    TierOptions,
    _dec_binding,
    _dec_file,
    _enc,
    binding_key,
    delete_key,
    file_key,
    norm_path,
    upload_key,
)
from kvfs.meta.remote_uploads import RemoteUploads
from kvfs.meta.tenants import scope_root
from kvfs.remote.allow import check as check_allowed

log = logging.getLogger("kvfs.meta.remote")



class RemoteTier(RemoteFills, RemoteUploads):
    def __init__(self, ns: Namespace, options: TierOptions | None = None):
        self.ns = ns
        self.opts = options or TierOptions()
        self.bindings: dict[str, BindingRecord] = {}
        for _, raw in ns.engine.scan(b"rb"):
            b = _dec_binding(raw)
            self.bindings[b.path] = b
        self._dir_cache: dict[int, tuple[str, str] | None] = {}  # dir ino -> (binding path, rel) or None
        self._synced: dict[int, float] = {}  # dir ino -> monotonic time of the last listing
        self._syncing: dict[int, trio.Event] = {}
        self._validated: dict[int, float] = {}  # file ino -> last remote HEAD
        self._access: dict[int, float] = {}  # file ino -> last open (eviction order)
        self._backoff: dict[int, tuple[float, int]] = {}  # ino (or -seq for deletes) -> (retry at, attempts)
        self._active: set[int] = set()
        self._changed: dict[int, trio.Event] = {}  # ino -> set when an upload attempt ends
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._client = None
        last = next(iter(reversed(list(ns.engine.scan(b"rd")))), None)
        self._delete_seq = R.U64.unpack(last[0][2:])[0] + 1 if last else 1
        # An upload in flight when meta stopped is simply dirty again.
        batch: Batch = []
        for key, raw in ns.engine.scan(b"rf"):
            rec = _dec_file(raw)
            if rec.state == UPLOADING:
                rec.state = DIRTY
                batch.append((key, _enc(rec)))
        if batch:
            ns.engine.write(batch)

    # ------------------------------------------------------------------ records

    def file(self, ino: int) -> FileRecord | None:
        raw = self.ns.engine.get(file_key(ino))
        return _dec_file(raw) if raw is not None else None

    def binding_of_file(self, ino: int) -> tuple[BindingRecord, FileRecord] | None:
        rec = self.file(ino)
        if rec is None:
            return None
        b = self.bindings.get(rec.binding)
        return (b, rec) if b is not None else None

    def _name_in(self, parent: int, child: int) -> str | None:
        prefix = R.dentry_prefix(parent)
        for key, raw in self.ns.engine.scan(prefix):
            if R.U64.unpack(raw)[0] == child:
                return key[len(prefix):].decode("utf-8", "surrogateescape")
        return None

    def locate_dir(self, ino: int) -> tuple[BindingRecord, str] | None:
        """The binding a directory lies in and its path relative to the binding root."""
        if not self.bindings:
            return None
        if ino in self._dir_cache:
            hit = self._dir_cache[ino]
            return (self.bindings[hit[0]], hit[1]) if hit and hit[0] in self.bindings else None
        roots = {b.root_ino: b for b in self.bindings.values()}
        chain = [ino]  # ino and its ancestors, up to a binding root or the filesystem root
        found: BindingRecord | None = None
        for _ in range(4096):
            cur = chain[-1]
            if cur in roots:
                found = roots[cur]
                break
            if cur == ROOT_INO:
                break
            try:
                chain.append(self.ns.inode(cur).parent or ROOT_INO)
            except OSError:
                break
        if found is None:
            self._dir_cache[ino] = None
            return None
        names = []  # only inside a binding: find each name (bound trees are model repos, small dirs)
        for child, parent in itertools.pairwise(chain):
            name = self._name_in(parent, child)
            if name is None:
                return None
            names.append(name)
        rel = "/".join(reversed(names))
        self._dir_cache[ino] = (found.path, rel)
        return found, rel

    def _forget_dirs(self) -> None:
        self._dir_cache.clear()

    def _enqueue(self, batch: Batch, ino: int, rec: FileRecord) -> None:
        rec.state = DIRTY
        rec.version += 1
        batch.append((file_key(ino), _enc(rec)))
        batch.append((upload_key(ino), b""))

    def _queue_delete(self, batch: Batch, url: str, key: str) -> None:
        batch.append((delete_key(self._delete_seq), _enc(DeleteJob(url, key))))
        self._delete_seq += 1

    def _kick(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ bindings

    async def attach(self, r: P.RemoteAttach) -> P.RemoteBinding:
        from kvfs.remote import open_store

        check_allowed(r.url, self.opts.allow)
        if r.mode not in MODES:
            raise error(errno.EINVAL, f"mode must be one of {', '.join(MODES)}")
        path = norm_path(r.path)
        if path == "/":
            raise error(errno.EINVAL, "cannot bind the root directory")
        for b in self.bindings.values():
            if path == b.path or path.startswith(b.path + "/") or b.path.startswith(path + "/"):
                raise error(errno.EBUSY, f"{path} overlaps the existing binding {b.path} -> {b.url}")
        store = open_store(r.url, cached=False)
        try:
            with trio.fail_after(self.opts.remote_timeout):
                await trio.to_thread.run_sync(store.check, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise error(errno.ETIMEDOUT, f"{r.url}: no answer within {self.opts.remote_timeout:g}s") from None
        # Create the directory (and parents) if needed.
        ino = ROOT_INO
        for part in path.strip("/").split("/"):
            try:
                attr = self.ns.lookup(ino, part)
            except FileNotFoundError:
                attr = self.ns.mknode(ino, part, stat.S_IFDIR | 0o755, r.uid, r.gid)
            if not stat.S_ISDIR(attr.mode):
                raise error(errno.ENOTDIR, f"{path}: not a directory")
            ino = attr.ino
        rec = BindingRecord(path, r.url.rstrip("/"), r.mode, ino, r.uid, r.gid)
        batch: Batch = [(binding_key(path), _enc(rec))]
        self.bindings[path] = rec
        self._forget_dirs()
        if r.mode != "readonly":
            self._adopt_local(batch, rec, ino, "")
        self.ns.engine.write(batch)
        self._kick()
        log.info("bound %s to %s (%s)", path, rec.url, rec.mode)
        await self.sync_dir(ino, force=True, wait=self.opts.sync_wait)
        return self._binding_reply(rec)

    def _adopt_local(self, batch: Batch, b: BindingRecord, dir_ino: int, rel: str) -> None:
        """Files already in a directory when it gets bound are uploaded (writable modes)."""
        prefix = R.dentry_prefix(dir_ino)
        for key, raw in self.ns.engine.scan(prefix):
            name = key[len(prefix):].decode("utf-8", "surrogateescape")
            child = R.U64.unpack(raw)[0]
            node = self.ns.inode(child)
            sub = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(node.mode):
                self._adopt_local(batch, b, child, sub)
            elif stat.S_ISREG(node.mode) and self.file(child) is None:
                self._enqueue(batch, child, FileRecord(b.path, sub, DIRTY))

    def _binding_reply(self, b: BindingRecord) -> P.RemoteBinding:
        dirty = 0
        for _, raw in self.ns.engine.scan(b"rf"):
            rec = _dec_file(raw)
            if rec.binding == b.path and rec.state != CLEAN:
                dirty += 1
        deletes = sum(1 for _ in self.ns.engine.scan(b"rd"))
        return P.RemoteBinding(b.path, b.url, b.mode, b.root_ino, dirty, deletes)

    def detach(self, path: str) -> None:
        """Forget a binding. Refused while files wait for upload; files that came from the remote
        leave the namespace (the remote keeps them), local-only entries stay."""
        path = norm_path(path)
        b = self.bindings.get(path)
        if b is None:
            raise error(errno.ENOENT, f"{path}: not bound to a remote")
        mine = [(R.U64.unpack(k[2:])[0], _dec_file(v)) for k, v in self.ns.engine.scan(b"rf")]
        mine = [(ino, rec) for ino, rec in mine if rec.binding == path]
        pending = [rec.key for _, rec in mine if rec.state != CLEAN]
        if pending:
            raise error(errno.EBUSY, f"{path}: {len(pending)} file(s) not uploaded yet (e.g. {pending[0]}); "
                                     f"run `kvfs flush {path}` first")
        del self.bindings[path]
        self.ns.engine.write([(binding_key(path), None)] + [(file_key(ino), None) for ino, _ in mine]
                             + [(upload_key(ino), None) for ino, _ in mine])
        self._forget_dirs()
        for ino, rec in mine:
            self._remove_file(ino, b.root_ino, rec.key)
        log.info("unbound %s from %s", path, b.url)

    def _remove_file(self, ino: int, root_ino: int, key: str) -> None:
        """Drop one remote-backed file from the namespace (detach, or deleted remotely)."""
        parent = root_ino
        *dirs, name = key.split("/")
        try:
            for d in dirs:
                parent = self.ns.lookup(parent, d).ino
            if self.ns._child(parent, name) == ino:
                self.ns.unlink(parent, name)
                self.ns.purge(ino)
        except OSError as exc:
            log.debug("removing %s: %s", key, exc)

    def list(self) -> P.RemoteListReply:
        return P.RemoteListReply([self._binding_reply(b) for b in sorted(self.bindings.values(), key=lambda b: b.path)])

    # ------------------------------------------------------------------ listing sync (read-through namespace)

    async def sync_dir(self, ino: int, *, force: bool = False, wait: float | None = None) -> P.RemoteSyncReply:
        """Bring a bound directory's entries in line with the remote listing (at most every TTL).

        The listing runs as a task of the tier; callers wait at most ``wait`` seconds for it, so a
        slow or unreachable remote delays a lookup by a bounded time and then the local view answers.
        """
        loc = self.locate_dir(ino)
        if loc is None:
            return P.RemoteSyncReply(0, 0, 0)
        if not force and trio.current_time() - self._synced.get(ino, -1e9) < self.opts.ttl:
            return P.RemoteSyncReply(0, 0, 0)
        done = self._syncing.get(ino)
        result: list[P.RemoteSyncReply] = []
        if done is None:
            done = self._syncing[ino] = trio.Event()

            async def run() -> None:
                try:
                    result.append(await self._sync_now(ino, *loc))
                except (OSError, trio.TooSlowError) as exc:
                    log.warning("listing %s/%s failed: %s", loc[0].url, loc[1], exc)
                finally:
                    self._synced[ino] = trio.current_time()
                    del self._syncing[ino]
                    done.set()

            if self._nursery is None:  # background tasks not started yet: list inline
                await run()
            else:
                self._nursery.start_soon(run)
        with trio.move_on_after(self.opts.sync_wait if wait is None else wait):
            await done.wait()
        return result[0] if result else P.RemoteSyncReply(0, 0, 0)

    async def _sync_now(self, ino: int, b: BindingRecord, rel: str) -> P.RemoteSyncReply:
        from kvfs.remote import open_store

        store = open_store(b.url)
        started = trio.current_time()
        with trio.fail_after(self.opts.remote_timeout):
            entries = await trio.to_thread.run_sync(lambda: list(store.list(rel)), abandon_on_cancel=True)
        added = updated = removed = 0
        if self.bindings.get(b.path) is not b:
            return P.RemoteSyncReply(0, 0, 0)  # detached while listing

        def newer_than_listing(child: int) -> bool:
            """Uploaded or re-validated after the listing started: the listing is the stale side."""
            return self._validated.get(child, -1e9) >= started
        prefix = R.dentry_prefix(ino)
        local = {k[len(prefix):].decode("utf-8", "surrogateescape"): R.U64.unpack(v)[0]
                 for k, v in self.ns.engine.scan(prefix)}
        seen: set[str] = set()
        for e in entries:
            name = e.key.rsplit("/", 1)[-1]
            try:
                check_name(name)
            except OSError:
                log.warning("skipping remote object %r: not a valid file name", e.key)
                continue
            seen.add(name)
            child = self.ns._child(ino, name)  # re-read: the namespace may have changed while listing
            if e.is_dir:
                if child is None:
                    self.ns.mknode(ino, name, stat.S_IFDIR | 0o755, b.uid, b.gid)
                    added += 1
                continue
            if child is None:
                attr = self.ns.mknode(ino, name, stat.S_IFREG | 0o644, b.uid, b.gid)
                self._set_remote_version(attr.ino, FileRecord(b.path, e.key, CLEAN), e, drop_chunks=False)
                added += 1
                continue
            node = self.ns.inode(child)
            if not stat.S_ISREG(node.mode):
                continue
            rec = self.file(child)
            if rec is None:
                if node.size == 0 and not any(True for _ in self.ns.engine.scan(R.chunk_prefix(child), limit=1)):
                    self._set_remote_version(child, FileRecord(b.path, e.key, CLEAN), e, drop_chunks=False)
                    updated += 1
                continue
            if rec.state == CLEAN and (rec.etag != e.etag or rec.size != e.size) and not newer_than_listing(child):
                log.info("%s changed remotely (etag %s -> %s): dropping the cached copy", e.key, rec.etag, e.etag)
                self._set_remote_version(child, rec, e, drop_chunks=True)
                updated += 1
        for name, child in local.items():
            if name in seen:
                continue
            rec = self.file(child)
            if (rec is not None and rec.state == CLEAN and rec.etag and self.ns._child(ino, name) == child
                    and not newer_than_listing(child)):
                log.info("%s was deleted remotely: removing it", rec.key)
                self.ns.engine.write([(file_key(child), None)])
                self.ns.unlink(ino, name)
                self.ns.purge(child)
                removed += 1
        return P.RemoteSyncReply(added, updated, removed)

    def _set_remote_version(self, ino: int, rec: FileRecord, e, *, drop_chunks: bool) -> None:
        """Make ``ino`` a clean copy of remote entry ``e`` (size, mtime), dropping stale chunks."""
        node = self.ns.inode(ino)
        batch: Batch = []
        dropped = self._drop_chunks(batch, ino) if drop_chunks else []
        node.size = e.size
        node.mtime_ns = e.mtime_ns or now_ns()
        node.ctime_ns = now_ns()
        self.ns._put(batch, ino, node)
        rec.state, rec.etag, rec.size, rec.mtime_ns, rec.error = CLEAN, e.etag, e.size, e.mtime_ns, ""
        batch.append((file_key(ino), _enc(rec)))
        batch.append((upload_key(ino), None))
        self.ns.engine.write(batch)
        self._release_chunks(ino, dropped)
        self._validated[ino] = trio.current_time()

    def _drop_chunks(self, batch: Batch, ino: int) -> list[R.ChunkRecord]:
        dropped = []
        for key, raw in self.ns.engine.scan(R.chunk_prefix(ino)):
            rec = R.decode_chunk(raw)
            batch.append((key, None))
            batch.append((R.live_chunk_key(rec.chunk_id), None))
            dropped.append(rec)
        return dropped

    def _release_chunks(self, ino: int, dropped: list[R.ChunkRecord]) -> None:
        self.ns.charge_bytes(ino, -sum(rec.length for rec in dropped))
        for rec in dropped:
            self.ns.registry.drop_chunk(rec.chunk_id)

    async def sync_path(self, path: str) -> P.RemoteSyncReply:
        """``kvfs remote sync``/``kvfs flush``: re-list a directory tree now, and retry its pending uploads."""
        attr = await self.resolve(path)
        total = P.RemoteSyncReply(0, 0, 0)
        if not stat.S_ISDIR(attr.mode):
            self._backoff.pop(attr.ino, None)
            self._kick()
            return total
        stack = [attr.ino]
        while stack:
            d = stack.pop()
            r = await self.sync_dir(d, force=True, wait=self.opts.remote_timeout)
            total.added += r.added
            total.updated += r.updated
            total.removed += r.removed
            prefix = R.dentry_prefix(d)
            for _, raw in self.ns.engine.scan(prefix):
                child = R.U64.unpack(raw)[0]
                if stat.S_ISDIR(self.ns.inode(child).mode):
                    stack.append(child)
                else:
                    self._backoff.pop(child, None)
        self._backoff = {k: v for k, v in self._backoff.items() if k >= 0}
        self._kick()
        return total

    async def resolve(self, path: str) -> P.Attr:
        ino = scope_root(ROOT_INO)  # a tenant's paths start at its root (meta/tenants.py)
        for part in path.split("/"):
            if part in ("", "."):
                continue
            await self.sync_dir(ino)
            ino = self.ns.lookup(ino, part).ino
        return self.ns.attr(ino)

    # ------------------------------------------------------------------ staleness (open)

    async def validate(self, ino: int) -> None:
        """On open of a clean remote-backed file, re-check the remote version at most every TTL."""
        found = self.binding_of_file(ino)
        if found is None:
            return
        self._access[ino] = trio.current_time()
        b, rec = found
        if rec.state != CLEAN or not rec.etag:
            return
        if trio.current_time() - self._validated.get(ino, -1e9) < self.opts.ttl:
            return
        from kvfs.remote import open_store

        store = open_store(b.url)
        with trio.move_on_after(self.opts.sync_wait):
            try:
                e = await trio.to_thread.run_sync(store.head, rec.key, abandon_on_cancel=True)
            except OSError as exc:
                # Unreachable: serve what is cached. Deleted remotely: the next listing removes it.
                log.debug("validating %s: %s", rec.key, exc)
                return
            self._validated[ino] = trio.current_time()
            cur = self.file(ino)
            if cur is not None and cur.state == CLEAN and cur.etag == rec.etag and e.etag != rec.etag:
                log.info("%s changed remotely (etag %s -> %s): dropping the cached copy", rec.key, rec.etag, e.etag)
                self._set_remote_version(ino, cur, e, drop_chunks=True)



    # ------------------------------------------------------------------ layering over the namespace handlers

    def _readonly_dir(self, ino: int) -> BindingRecord | None:
        loc = self.locate_dir(ino)
        return loc[0] if loc is not None else None

    def _check_dir_writable(self, ino: int) -> None:
        b = self._readonly_dir(ino)
        if b is not None and b.mode == "readonly":
            raise error(errno.EROFS, f"{b.path} is bound read-only to {b.url}")

    def _check_file_writable(self, ino: int) -> None:
        found = self.binding_of_file(ino)
        if found is not None and found[0].mode == "readonly":
            raise error(errno.EROFS, f"{found[0].path} is bound read-only to {found[0].url}")

    def wrap(self, handlers: dict) -> dict:
        """Layer the tier over the namespace handlers and add the remote RPCs (meta/remote_handlers.py)."""
        from kvfs.meta.remote_handlers import wrap_handlers

        return wrap_handlers(self, handlers)
