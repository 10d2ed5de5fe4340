"""Per-file chunk sizes in the namespace (a part of ``Namespace``, meta/namespace.py; kvfs/layout.py says
where a file's size comes from).

The chunk size lives in the inode (``Inode.chunk_size``): a regular file's own (0: created before
per-file sizes, the cluster's), a directory's policy for new files below it (0: none). The xattr
``kvfs.chunk_size`` is a view of that field, so it persists, replicates and snapshots with the inode
on every engine, and costs no xattr lookup on a create.
"""

from __future__ import annotations

import errno
import stat

from kvfs.errors import error
from kvfs.layout import CHUNK_SIZE_XATTRS, check_chunk_size, parse_chunk_size
from kvfs.meta import records as R
from kvfs.meta.engine import Batch

MAX_DEPTH = 10000  # a walk up the tree stops here (as _is_ancestor): a corrupt parent loop cannot hang meta


class Layouts:
    """Mixed into Namespace: uses its engine, ``inode``, ``_put``, ``leases`` and ``chunk_size``."""

    def file_chunk_size(self, node: R.Inode) -> int:
        return node.chunk_size or self.chunk_size

    def new_file_chunk_size(self, parent: int, pnode: R.Inode, explicit: int) -> int:
        """A new regular file's chunk size: ``explicit`` (checked: EINVAL), else the nearest directory
        policy at or above ``parent``, else the cluster's."""
        if explicit:
            return _checked(explicit)
        node, ino = pnode, parent
        for _ in range(MAX_DEPTH):
            if node.chunk_size:
                return node.chunk_size
            up = node.parent or 1
            if up == ino:  # the root (its parent is itself)
                break
            ino, node = up, self.inode(up)
        return self.chunk_size

    def split_chunk_size(self, size: int) -> int:
        """The chunk size a writer says it split a new file by (KV_PUBLISH): 0 (an older client) or the
        cluster's, which may be any multiple of 64 KiB, else a checked per-file size (EINVAL)."""
        return self.chunk_size if size in (0, self.chunk_size) else _checked(size)

    def layout_getxattr(self, ino: int, node: R.Inode) -> bytes:
        if stat.S_ISREG(node.mode):
            return str(self.file_chunk_size(node)).encode()
        if stat.S_ISDIR(node.mode) and node.chunk_size:
            return str(node.chunk_size).encode()
        raise error(errno.ENODATA, "no chunk-size policy here")

    def layout_setxattr(self, ino: int, node: R.Inode, value: bytes | None) -> None:
        """Set (``value``) or clear (None) a directory's policy, or an empty file's chunk size.
        Error handling: EINVAL for a bad size or another file type; ENOTEMPTY for a file with data
        (its chunk size never changes after its first chunk); EBUSY while a client writes it."""
        try:
            size = parse_chunk_size(value) if value is not None else 0
        except ValueError as exc:
            raise error(errno.EINVAL, str(exc)) from None
        if stat.S_ISREG(node.mode):
            if not size:
                raise error(errno.EINVAL, "a file's chunk size cannot be removed")
            if node.size or next(iter(self.engine.scan(R.chunk_prefix(ino), limit=1)), None) is not None:
                raise error(errno.ENOTEMPTY, "a file's chunk size is fixed once it has data")
            if self.leases.get(ino) and self.leases[ino][1] > self.clock():
                raise error(errno.EBUSY, "the file is open for writing")
        elif not stat.S_ISDIR(node.mode):
            raise error(errno.EINVAL, "chunk sizes are for regular files and directories")
        node.chunk_size = size
        batch: Batch = []
        self._put(batch, ino, node)
        self.engine.write(batch)


def is_layout_xattr(name: str) -> bool:
    return name in CHUNK_SIZE_XATTRS


def _checked(size: int) -> int:
    try:
        return check_chunk_size(size)
    except ValueError as exc:
        raise error(errno.EINVAL, str(exc)) from None
