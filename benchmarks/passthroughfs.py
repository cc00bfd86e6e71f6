#!/usr/bin/env python3
"""A bare pyfuse3 passthrough of a directory: the ceiling for any Python FUSE
filesystem on this machine, used as a baseline by shared_meta.py and
block_fio.py (an image file under it, loop-attached like a pxfs volume).

    /opt/pxfs/bin/python benchmarks/passthroughfs.py SOURCE MOUNTPOINT

Every request is one system call on SOURCE, done on the trio thread; no
caching beyond the kernel's one-second attribute and entry caches.  A file
opened with O_DIRECT (a direct-I/O loop device's image) is served without
the page cache of the mount, as pxfs serves its block volumes, and opened
buffered on SOURCE: pyfuse3's buffers are not aligned for O_DIRECT there.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str):
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: source}
        self.lookups: dict[int, int] = {}

    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        a = pyfuse3.EntryAttributes()
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks"):
            setattr(a, f, getattr(st, f))
        a.st_ino = st.st_ino
        a.attr_timeout = a.entry_timeout = 1
        self.paths[st.st_ino] = path
        return a

    @staticmethod
    def _do(fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def lookup(self, parent_inode, name, ctx=None):
        return self._attr(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def getattr(self, inode, ctx=None):
        return self._attr(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            self._do(os.truncate, path, attr.st_size)
        if fields.update_mode:
            self._do(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            self._do(os.chown, path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            self._do(lambda: os.utime(path, ns=times))
        return self._attr(path)

    async def readlink(self, inode, ctx):
        return os.fsencode(self._do(os.readlink, self._path(inode)))

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        names = sorted(self._do(os.listdir, path))
        for i, name in enumerate(names[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attr(os.path.join(path, name)), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        self._do(os.mkdir, path, mode)
        return self._attr(path)

    async def rmdir(self, parent_inode, name, ctx):
        self._do(os.rmdir, os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def unlink(self, parent_inode, name, ctx):
        self._do(os.unlink, os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def symlink(self, parent_inode, name, target, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        self._do(os.symlink, os.fsdecode(target), path)
        return self._attr(path)

    async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):
        self._do(os.rename, os.path.join(self._path(p_old), os.fsdecode(n_old)),
                 os.path.join(self._path(p_new), os.fsdecode(n_new)))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = os.path.join(self._path(new_parent_inode), os.fsdecode(new_name))
        self._do(os.link, self._path(inode), path)
        return self._attr(path)

    async def open(self, inode, flags, ctx):
        fd = self._do(os.open, self._path(inode), flags & ~(os.O_CREAT | os.O_DIRECT))
        return pyfuse3.FileInfo(fh=fd, direct_io=bool(flags & os.O_DIRECT))

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        fd = self._do(os.open, path, flags | os.O_CREAT | os.O_TRUNC, mode)
        return pyfuse3.FileInfo(fh=fd), self._attr(path)

    async def read(self, fh, off, size):
        return self._do(os.pread, fh, size, off)

    async def write(self, fh, off, buf):
        return self._do(os.pwrite, fh, buf, off)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        self._do(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh):
        os.close(fh)

    async def statfs(self, ctx):
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(s, f, getattr(st, f))
        return s


def main() -> None:
    source, mountpoint = sys.argv[1:3]
    pyfuse3.init(Passthrough(os.path.abspath(source)), mountpoint,
                 {"fsname=passthrough", "default_permissions", "allow_other"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
