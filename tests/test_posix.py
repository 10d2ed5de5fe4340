"""POSIX behaviour through a real FUSE mount (meta + 3 chunkservers + mount, separate processes).

Every check uses plain ``os`` calls on the mountpoint; a few errno checks also go through the client
library, because the kernel answers some error cases (EEXIST on O_EXCL, EISDIR, ...) from its own
dentry cache before kvfs sees them, and the core must return the right errno on its own too.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from cluster import wait_for

from kvfs import protocol as P

CHUNK = 1 << 20  # the shared cluster's chunk size


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def chunk_file(cluster, i: int, chunk_id: int) -> str:
    name = f"{chunk_id:016x}"
    return os.path.join(cluster.root, f"cs{i}", "chunks", name[-2:], name)


def expect_errno(code: int, fn, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


# --------------------------------------------------------------------------- lookup, attributes


def test_lookup_and_getattr(mnt):
    path = os.path.join(mnt, "f")
    write(path, b"hello")
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 5
    assert st.st_nlink == 1
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    dst = os.stat(mnt)
    assert stat.S_ISDIR(dst.st_mode)
    assert dst.st_nlink == 2
    assert os.stat(os.path.join(mnt, ".")).st_ino == dst.st_ino
    assert os.stat(os.path.join(mnt, "..")).st_ino == os.stat(os.path.dirname(mnt)).st_ino
    expect_errno(errno.ENOENT, os.stat, os.path.join(mnt, "missing"))


def test_chmod_chown(mnt):
    path = os.path.join(mnt, "f")
    write(path, b"x")
    os.chmod(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o4755)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o4755
    assert stat.S_ISREG(os.stat(path).st_mode)  # chmod keeps the file type
    os.chown(path, 1234, 5678)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(path, -1, 42)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    d = os.path.join(mnt, "d")
    os.mkdir(d, 0o700)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_truncate(mnt):
    path = os.path.join(mnt, "f")
    data = os.urandom(CHUNK + 5000)
    write(path, data)
    os.truncate(path, 1000)
    assert os.stat(path).st_size == 1000
    assert read(path) == data[:1000]
    os.truncate(path, 3 * CHUNK + 10)  # extension reads as zeros, also past the old data
    assert os.stat(path).st_size == 3 * CHUNK + 10
    assert read(path) == data[:1000] + bytes(3 * CHUNK + 10 - 1000)
    os.truncate(path, 0)
    assert read(path) == b""


def test_ftruncate_open_file(mnt):
    path = os.path.join(mnt, "f")
    with open(path, "w+b") as f:
        f.write(b"a" * 10000)
        f.flush()
        os.ftruncate(f.fileno(), 10)
        f.seek(0)
        assert f.read() == b"a" * 10
        f.seek(20)
        f.write(b"b")
    assert read(path) == b"a" * 10 + bytes(10) + b"b"


def test_utime_ns(mnt):
    path = os.path.join(mnt, "f")
    write(path, b"x")
    os.utime(path, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(path)
    assert st.st_atime_ns == 1_000_000_123
    assert st.st_mtime_ns == 2_000_000_456
    os.utime(path)  # now
    assert os.stat(path).st_mtime_ns > 2_000_000_456


def test_mknod_regular(mnt):
    path = os.path.join(mnt, "node")
    os.mknod(path, stat.S_IFREG | 0o640)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 0
    with open(path, "r+b") as f:
        f.write(b"data")
    assert read(path) == b"data"
    expect_errno(errno.EEXIST, os.mknod, path, stat.S_IFREG | 0o640)


# --------------------------------------------------------------------------- directories


def test_mkdir_rmdir(mnt):
    d = os.path.join(mnt, "d")
    os.mkdir(d)
    assert os.stat(mnt).st_nlink == 3  # ".", its entry in the parent, and d's ".."
    os.mkdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 3
    expect_errno(errno.EEXIST, os.mkdir, d)
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    os.rmdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 2
    os.rmdir(d)
    assert not os.path.exists(d)
    assert os.stat(mnt).st_nlink == 2
    expect_errno(errno.ENOENT, os.rmdir, d)


def test_readdir_large_directory(mnt):
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(3000)}
    for name in names:
        os.close(os.open(os.path.join(mnt, name), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(os.path.join(mnt, "subdir"))
    listed = os.listdir(mnt)
    assert len(listed) == len(names) + 1  # each name exactly once
    assert set(listed) == names | {"subdir"}
    with os.scandir(mnt) as it:
        kinds = {e.name: e.is_dir() for e in it}
    assert kinds["subdir"] is True
    assert sum(kinds.values()) == 1


def test_readdir_sees_changes_between_listings(mnt):
    for i in range(10):
        write(os.path.join(mnt, f"f{i}"), b"")
    assert sorted(os.listdir(mnt)) == sorted(f"f{i}" for i in range(10))
    os.unlink(os.path.join(mnt, "f3"))
    os.rename(os.path.join(mnt, "f4"), os.path.join(mnt, "g4"))
    assert sorted(os.listdir(mnt)) == sorted([f"f{i}" for i in range(10) if i not in (3, 4)] + ["g4"])


# --------------------------------------------------------------------------- file data


def test_create_write_read_fsync(mnt):
    path = os.path.join(mnt, "f")
    data = os.urandom(2 * CHUNK + 12345)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        assert os.write(fd, data[:100]) == 100
        os.fsync(fd)
        assert os.stat(path).st_size == 100
        assert os.pwrite(fd, data[100:], 100) == len(data) - 100
        assert os.pread(fd, 50, CHUNK - 25) == data[CHUNK - 25: CHUNK + 25]  # across a chunk boundary
    finally:
        os.close(fd)
    assert os.stat(path).st_size == len(data)
    assert read(path) == data
    with open(path, "r+b") as f:  # overwrite in the middle of an existing chunk
        f.seek(CHUNK + 10)
        f.write(b"Z" * 10)
    expected = data[: CHUNK + 10] + b"Z" * 10 + data[CHUNK + 20:]
    assert read(path) == expected
    with open(path, "ab") as f:
        f.write(b"tail")
    assert read(path) == expected + b"tail"


def test_sparse_write_reads_zeros(mnt):
    path = os.path.join(mnt, "sparse")
    with open(path, "wb") as f:
        f.seek(3 * CHUNK + 7)
        f.write(b"end")
    assert os.stat(path).st_size == 3 * CHUNK + 10
    assert read(path) == bytes(3 * CHUNK + 7) + b"end"


def test_o_trunc_then_sparse_write_reads_zeros(mnt):
    path = os.path.join(mnt, "f")
    write(path, os.urandom(3 * CHUNK))
    with open(path, "r+b") as f:
        os.ftruncate(f.fileno(), CHUNK // 2)  # shrink, then grow again without closing in between
        os.ftruncate(f.fileno(), 3 * CHUNK)
    assert read(path)[CHUNK // 2:] == bytes(3 * CHUNK - CHUNK // 2)
    with open(path, "w+b") as f:  # O_TRUNC, then a write past the old chunks, then close
        f.seek(2 * CHUNK + 100)
        f.write(b"x")
        f.flush()
        f.seek(0)
        assert os.pread(f.fileno(), 10, CHUNK) == bytes(10)
    assert read(path) == bytes(2 * CHUNK + 100) + b"x"


def test_o_trunc_replaces_content(mnt):
    path = os.path.join(mnt, "f")
    write(path, os.urandom(CHUNK * 2))
    write(path, b"short")
    assert os.stat(path).st_size == 5
    assert read(path) == b"short"


def test_unlink(mnt):
    path = os.path.join(mnt, "f")
    write(path, b"x" * 100)
    os.unlink(path)
    assert not os.path.exists(path)
    assert os.listdir(mnt) == []
    expect_errno(errno.ENOENT, os.unlink, path)


def test_open_unlinked_file_readable_until_close(mnted_client):
    mnt, client = mnted_client
    path = os.path.join(mnt, "f")
    data = os.urandom(CHUNK + 999)
    write(path, data)
    ino = os.stat(path).st_ino
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not os.path.exists(path)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"more", len(data))
        assert os.pread(fd, 4, len(data)) == b"more"
        assert client.getattr(ino).nlink == 0  # still there: the mount holds it open
    finally:
        os.close(fd)

    def purged() -> bool:
        try:
            client.getattr(ino)
            return False
        except FileNotFoundError:
            return True

    # The kernel forgets the inode once the last descriptor closes; the mount then purges it.
    wait_for(purged, 10, "the unlinked inode to be purged after close")


@pytest.fixture
def mnted_client(mounted, mnt):
    with mounted.client() as c:
        yield mnt, c


# --------------------------------------------------------------------------- rename


def test_rename_file(mnt):
    a, b = os.path.join(mnt, "a"), os.path.join(mnt, "b")
    write(a, b"A")
    os.rename(a, b)
    assert not os.path.exists(a)
    assert read(b) == b"A"
    d = os.path.join(mnt, "d")
    os.mkdir(d)
    os.rename(b, os.path.join(d, "c"))
    assert read(os.path.join(d, "c")) == b"A"
    assert os.listdir(mnt) == ["d"]
    expect_errno(errno.ENOENT, os.rename, a, b)


def test_rename_overwrites_file(mnt):
    a, b = os.path.join(mnt, "a"), os.path.join(mnt, "b")
    write(a, b"new")
    write(b, b"old" * 1000)
    os.rename(a, b)
    assert read(b) == b"new"
    assert os.listdir(mnt) == ["b"]


def test_rename_overwrites_open_file_keeps_it_readable(mnt):
    a, b = os.path.join(mnt, "a"), os.path.join(mnt, "b")
    write(a, b"new")
    write(b, b"old")
    with open(b, "rb") as f:
        os.rename(a, b)
        assert f.read() == b"old"
    assert read(b) == b"new"


def test_rename_directories(mnt):
    src, empty, full = (os.path.join(mnt, n) for n in ("src", "empty", "full"))
    for d in (src, empty, full):
        os.mkdir(d)
    write(os.path.join(src, "inside"), b"i")
    write(os.path.join(full, "x"), b"x")
    expect_errno(errno.ENOTEMPTY, os.rename, src, full)
    os.rename(src, empty)  # onto an empty directory: replaces it
    assert os.listdir(empty) == ["inside"]
    assert not os.path.exists(src)
    assert sorted(os.listdir(mnt)) == ["empty", "full"]
    assert os.stat(mnt).st_nlink == 4
    # moving a directory across parents updates both link counts and ".."
    os.rename(empty, os.path.join(full, "moved"))
    assert os.stat(mnt).st_nlink == 3
    assert os.stat(full).st_nlink == 3
    assert os.stat(os.path.join(full, "moved", "..")).st_ino == os.stat(full).st_ino
    assert read(os.path.join(full, "moved", "inside")) == b"i"


def test_rename_type_errors(mnt):
    d, f = os.path.join(mnt, "d"), os.path.join(mnt, "f")
    os.mkdir(d)
    os.mkdir(os.path.join(d, "sub"))
    write(f, b"f")
    expect_errno(errno.ENOTDIR, os.rename, d, f)
    expect_errno(errno.EISDIR, os.rename, f, d)
    expect_errno(errno.EINVAL, os.rename, d, os.path.join(d, "sub", "inner"))
    assert os.path.isdir(d) and read(f) == b"f"


# --------------------------------------------------------------------------- links


def test_hard_links(mnt):
    a, b, c = (os.path.join(mnt, n) for n in "abc")
    write(a, b"shared")
    os.link(a, b)
    os.link(b, c)
    assert os.stat(a).st_nlink == 3
    assert os.stat(a).st_ino == os.stat(b).st_ino == os.stat(c).st_ino
    with open(b, "r+b") as f:
        f.write(b"SH")
    assert read(a) == read(c) == b"SHared"
    os.unlink(a)
    assert os.stat(b).st_nlink == 2
    assert read(c) == b"SHared"
    os.rename(b, c)  # same inode: rename is a no-op
    assert os.stat(c).st_nlink == 2
    os.unlink(b)
    assert os.stat(c).st_nlink == 1
    assert read(c) == b"SHared"
    expect_errno(errno.EEXIST, os.link, c, c)
    d = os.path.join(mnt, "d")
    os.mkdir(d)
    expect_errno(errno.EPERM, os.link, d, os.path.join(mnt, "dlink"))


def test_symlink_readlink(mnt):
    target = os.path.join(mnt, "target")
    write(target, b"pointed")
    link = os.path.join(mnt, "link")
    os.symlink("target", link)
    assert os.readlink(link) == "target"
    assert stat.S_ISLNK(os.lstat(link).st_mode)
    assert os.lstat(link).st_size == len("target")
    assert read(link) == b"pointed"
    dangling = os.path.join(mnt, "dangling")
    os.symlink("/nonexistent/" + "p" * 200, dangling)
    assert os.readlink(dangling) == "/nonexistent/" + "p" * 200
    expect_errno(errno.ENOENT, os.stat, dangling)
    expect_errno(errno.EINVAL, os.readlink, target)
    expect_errno(errno.EEXIST, os.symlink, "x", link)
    os.unlink(link)
    assert read(target) == b"pointed"


# --------------------------------------------------------------------------- statfs, xattrs


def test_statfs(mnt):
    s = os.statvfs(mnt)
    assert s.f_namemax == 255
    assert s.f_bsize > 0 and s.f_frsize > 0
    assert 0 < s.f_bavail <= s.f_blocks
    assert s.f_files > 0 and s.f_ffree > 0


def test_statfs_counts_capacity_and_usage(make_cluster, tmp_path):
    cluster = make_cluster(chunkserver_args=("--capacity", "64M"))  # 3 servers, replication 2
    mnt = cluster.mount(str(tmp_path / "mnt"))
    s = os.statvfs(mnt)
    blocks = 3 * (64 << 20) // 2 // s.f_frsize
    assert s.f_blocks == blocks
    assert s.f_bfree == s.f_bavail == blocks
    write(os.path.join(mnt, "big"), os.urandom(4 * CHUNK))
    # Space is taken on the chunkservers (twice, replication 2); it shows once they heartbeat it.
    wait_for(lambda: os.statvfs(mnt).f_bfree == blocks - 4 * CHUNK // s.f_frsize, 10, "statfs to count the data")
    os.unlink(os.path.join(mnt, "big"))
    wait_for(lambda: os.statvfs(mnt).f_bfree == blocks, 10, "statfs to count the deletion")


def test_xattrs(mnt):
    path = os.path.join(mnt, "f")
    write(path, b"x")
    os.setxattr(path, "user.a", b"1")
    os.setxattr(path, "user.b", b"\x00binary\xff" * 100)
    assert os.getxattr(path, "user.a") == b"1"
    assert os.getxattr(path, "user.b") == b"\x00binary\xff" * 100
    assert sorted(os.listxattr(path)) == ["user.a", "user.b"]
    os.setxattr(path, "user.a", b"22")
    assert os.getxattr(path, "user.a") == b"22"
    os.removexattr(path, "user.a")
    assert os.listxattr(path) == ["user.b"]
    expect_errno(errno.ENODATA, os.getxattr, path, "user.a")
    expect_errno(errno.ENODATA, os.removexattr, path, "user.a")
    d = os.path.join(mnt, "d")
    os.mkdir(d)
    os.setxattr(d, "user.dir", b"v")
    assert os.getxattr(d, "user.dir") == b"v"
    os.rmdir(d)


def test_xattr_create_replace_flags(mnt):
    path = os.path.join(mnt, "f")
    write(path, b"x")
    os.setxattr(path, "user.k", b"1", os.XATTR_CREATE)
    expect_errno(errno.EEXIST, os.setxattr, path, "user.k", b"2", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, path, "user.other", b"2", os.XATTR_REPLACE)
    os.setxattr(path, "user.k", b"3", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.k") == b"3"


# --------------------------------------------------------------------------- errors


def test_errno_cases(mnt):
    f, d = os.path.join(mnt, "f"), os.path.join(mnt, "d")
    write(f, b"x")
    os.mkdir(d)
    expect_errno(errno.ENOENT, open, os.path.join(mnt, "nope"), "rb")
    expect_errno(errno.ENOENT, os.mkdir, os.path.join(mnt, "nope", "sub"))
    expect_errno(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.EEXIST, os.mkdir, f)
    expect_errno(errno.EISDIR, os.open, d, os.O_WRONLY)
    expect_errno(errno.EISDIR, os.unlink, d)
    expect_errno(errno.ENOTDIR, os.rmdir, f)
    expect_errno(errno.ENOTDIR, os.listdir, f)
    expect_errno(errno.ENOTDIR, open, os.path.join(f, "child"), "wb")
    expect_errno(errno.ENOTDIR, os.mkdir, os.path.join(f, "child"))
    long_name = "n" * 256
    expect_errno(errno.ENAMETOOLONG, open, os.path.join(mnt, long_name), "wb")
    expect_errno(errno.ENAMETOOLONG, os.mkdir, os.path.join(mnt, long_name))
    expect_errno(errno.ENAMETOOLONG, os.stat, os.path.join(mnt, long_name))
    ok = os.path.join(mnt, "n" * 255)  # exactly NAME_MAX is fine
    write(ok, b"ok")
    assert read(ok) == b"ok"
    multibyte = "é" * 128  # 256 bytes in UTF-8
    expect_errno(errno.ENAMETOOLONG, open, os.path.join(mnt, multibyte), "wb")


def test_core_errnos_through_client(mounted):
    """The errnos the kernel usually answers itself must come from the core as well."""
    with mounted.client() as c:
        c.mkdir("/core-errs")
        c.write_file("/core-errs/f", b"x")
        c.mkdir("/core-errs/d")
        c.mkdir("/core-errs/full")
        c.write_file("/core-errs/full/x", b"x")
        root = c.resolve("/core-errs").ino
        f = c.resolve("/core-errs/f")
        cases = [
            (errno.EEXIST, lambda: c.create("/core-errs/f", exclusive=True)),
            (errno.EEXIST, lambda: c.mkdir("/core-errs/d")),
            (errno.EEXIST, lambda: c.link(f.ino, root, "d")),
            (errno.ENOENT, lambda: c.unlink("/core-errs/missing")),
            (errno.EISDIR, lambda: c.unlink("/core-errs/d")),
            (errno.EISDIR, lambda: c.open(c.resolve("/core-errs/d").ino, write=True)),
            (errno.ENOTDIR, lambda: c.rmdir("/core-errs/f")),
            (errno.ENOTDIR, lambda: c.readdir(f.ino)),
            (errno.ENOTDIR, lambda: c.lookup(f.ino, "x")),
            (errno.ENOTEMPTY, lambda: c.rmdir("/core-errs/full")),
            (errno.ENOTEMPTY, lambda: c.rename("/core-errs/d", "/core-errs/full")),
            (errno.ENOTDIR, lambda: c.rename("/core-errs/d", "/core-errs/f")),
            (errno.EISDIR, lambda: c.rename("/core-errs/f", "/core-errs/d")),
            (errno.EINVAL, lambda: c.rename("/core-errs", "/core-errs/d/inside")),
            (errno.ENAMETOOLONG, lambda: c.create("/core-errs/" + "n" * 256)),
            (errno.ENAMETOOLONG, lambda: c.lookup(root, "n" * 256)),
            (errno.ENODATA, lambda: c.getxattr(f.ino, "user.none")),
            (errno.EPERM, lambda: c.link(root, root, "dirlink")),
        ]
        for code, call in cases:
            expect_errno(code, call)


# --------------------------------------------------------------------------- two mounts


@pytest.fixture
def second_mount(mounted, tmp_path):
    path = mounted.mount(str(tmp_path / "mnt-b"))
    try:
        yield path
    finally:
        mounted.unmount(path)


def test_close_to_open_between_mounts(mounted, mnt, second_mount):
    name = os.path.basename(mnt)
    a = os.path.join(mnt, "shared")
    b = os.path.join(second_mount, name, "shared")
    v1 = os.urandom(CHUNK + 100)
    write(a, v1)
    assert read(b) == v1
    # Rewritten in A (other size, other bytes): B's next open sees exactly the new version, even
    # though B just read (and cached) the old one.
    v2 = os.urandom(CHUNK // 2 + 3)
    write(a, v2)
    assert read(b) == v2
    v3 = v2 + os.urandom(2 * CHUNK)
    with open(a, "ab") as f:
        f.write(v3[len(v2):])
    with open(b, "rb") as f:
        assert f.read() == v3
    # B caches the attributes of a small version; A then grows the file: B's next open must not
    # cut the read at the size it had cached.
    write(a, b"small")
    assert os.stat(b).st_size == 5
    big = os.urandom(300_000)
    write(a, big)
    assert read(b) == big
    # and the other way round
    write(b, b"from B")
    assert read(a) == b"from B"
    assert os.stat(a).st_size == 6


def test_fsync_publishes_to_other_mount_before_close(mounted, mnt, second_mount):
    name = os.path.basename(mnt)
    a = os.path.join(mnt, "f")
    b = os.path.join(second_mount, name, "f")
    with open(a, "wb") as f:
        f.write(b"first")
        f.flush()
        os.fsync(f.fileno())
        assert read(b) == b"first"
        f.write(b" second")
    assert read(b) == b"first second"


def test_one_writer_at_a_time(mounted, mnt, second_mount):
    name = os.path.basename(mnt)
    a = os.path.join(mnt, "f")
    b = os.path.join(second_mount, name, "f")
    write(a, b"base")
    with open(a, "r+b") as writer:
        writer.write(b"BASE")
        expect_errno(errno.EBUSY, open, b, "r+b")
        expect_errno(errno.EBUSY, open, b, "wb")
        expect_errno(errno.EBUSY, os.truncate, b, 0)
        assert read(b) == b"base"  # readers are fine while A writes; they see the last commit
        # a second writer in the same mount shares the lease (same client)
        with open(a, "r+b") as again:
            again.seek(4)
            again.write(b"!")
    assert read(b) == b"BASE!"
    with open(b, "ab") as f:  # released: B may write now
        f.write(b"?")
        expect_errno(errno.EBUSY, open, a, "r+b")
    assert read(a) == b"BASE!?"


def test_reader_survives_rewrite_from_other_mount(mounted, mnt, second_mount):
    """An open reader in mount B keeps working after mount A replaced the file and the old chunks
    were deleted: it reads pages of the old or the new version, never EIO."""
    name = os.path.basename(mnt)
    a = os.path.join(mnt, "f")
    b = os.path.join(second_mount, name, "f")
    v1 = os.urandom(8 * CHUNK)
    write(a, v1)
    with mounted.client() as c:
        ino = c.resolve(f"/{name}/f").ino
        old_chunks = [r.chunk_id for r in c.call(c.client.meta.request, P.META_GET_CHUNKS, P.GetChunks(ino)).chunks]
    with open(b, "rb", buffering=0) as reader:
        first = reader.read(65536)
        v2 = os.urandom(8 * CHUNK)
        write(a, v2)

        def old_chunks_deleted() -> bool:
            return not any(os.path.exists(chunk_file(mounted, i, cid))
                           for i in range(len(mounted.servers)) for cid in old_chunks)

        wait_for(old_chunks_deleted, 20, "the replaced chunks to be deleted")
        rest = reader.read()
    got = first + rest
    assert first == v1[:65536]
    assert len(got) == len(v1)
    page = 4096
    for off in range(0, len(got), page):
        assert got[off:off + page] in (v1[off:off + page], v2[off:off + page]), f"page at {off}"
    assert got[-page:] == v2[-page:]  # the tail was never cached: it comes from the new version


def test_pending_writes_keep_their_size_through_link_and_lookup(mounted, mnt, second_mount):
    """Replies that carry attributes (link, lookup of another name) must show this mount's pending
    size: the kernel adopts it, and a committed size there would cut the writer's own data off."""
    name = os.path.basename(mnt)
    data = os.urandom(100_000)
    fd = os.open(os.path.join(mnt, "f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, data)  # pending: not flushed yet
        os.link(os.path.join(mnt, "f"), os.path.join(mnt, "via-link"))
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data), 0) == data
        # a name added by the other mount is looked up fresh here
        os.link(os.path.join(second_mount, name, "f"), os.path.join(second_mount, name, "other"))
        assert os.stat(os.path.join(mnt, "other")).st_size == len(data)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert read(os.path.join(second_mount, name, "other")) == data


def resident_pages(path: str) -> int:
    """Pages of ``path`` in the kernel's page cache (mincore over a read-only mapping; the open keeps the
    cache when the file is unchanged since the mount last saw it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            assert libc.mincore(addr, size, pages) == 0, os.strerror(ctypes.get_errno())
            return sum(p & 1 for p in pages)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_written_pages_stay_cached_for_the_next_reader(mnt):
    """A file created and written through the mount keeps its create mtime at its first commit (the mtime
    the kernel holds: it does not update a FUSE file's mtime on writes), so attributes fetched after
    the close do not make the kernel drop the pages just written: the next reader on this host reads
    them from the page cache (issue 11: a KV run read right after its put), with the same bytes."""
    import time

    path = os.path.join(mnt, "f")
    data = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    born = os.fstat(fd).st_mtime_ns
    os.write(fd, data)
    os.close(fd)
    time.sleep(1.2)  # past the attribute timeout: the stat fetches attributes from meta
    assert os.stat(path).st_mtime_ns == born
    assert resident_pages(path) == len(data) // 4096
    assert read(path) == data


def test_late_first_commit_takes_the_commit_time(mnt):
    """Past the window (kvfs/client_write.py BORN_MTIME_WINDOW, 2 s) a new file's first commit sets the
    time of the commit, as every later commit does."""
    import time

    path = os.path.join(mnt, "f")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    born = os.fstat(fd).st_mtime_ns
    time.sleep(2.2)
    os.write(fd, b"late")
    os.close(fd)
    assert os.stat(path).st_mtime_ns > born
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, b"again")
    os.close(fd)
    assert read(path) == b"again"
