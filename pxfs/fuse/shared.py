"""The FUSE filesystem of one shared volume (``mount -t fuse.pxfs``): FUSE
inode numbers are the namespace's own (the root is 1 in both); requests
become SharedVolume calls and PxfsErrors become FUSEErrors.

Attribute caching: directories and entries are cached by the kernel for one
second, so another node's changes show within that; regular files'
attributes are not cached, so the size another node recorded at close is
seen at the next open or stat (close-to-open).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat

import pyfuse3

from ..errors import PxfsError
from ..namespace.records import ROOT_INO, Inode
from . import _lockops

log = logging.getLogger(__name__)
ENTRY_TIMEOUT = 1.0
APPEND_FH = 1 << 62 if _lockops is None else _lockops.APPEND_FH   # see _lockops.c
#: setattr fields: (SharedVolume keyword and SetattrFields.update_<name>, attribute)
_SETATTR = [("mode", "st_mode"), ("uid", "st_uid"), ("gid", "st_gid"), ("size", "st_size"),
            ("atime", "st_atime_ns"), ("mtime", "st_mtime_ns"), ("ctime", "st_ctime_ns")]


class _Dir:
    __slots__ = ("ino", "entries")

    def __init__(self, ino, entries):
        self.ino, self.entries = ino, entries


class SharedFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, sv, locks=None):
        super().__init__()
        self.sv = sv
        self.locks = locks            # LockService, or None: locks per node (the kernel's)
        self._fhs: dict[int, object] = {}
        self._fh_ids = itertools.count(1)
        # The kernel sends an O_APPEND write at the size it cached, which
        # another mount may have grown since (the name stays cached for
        # ENTRY_TIMEOUT), so pxfs appends at the end it knows, as a
        # passthrough filesystem's pwrite() on an O_APPEND file does.  With
        # the lock operations installed, _lockops marks each appending write
        # (APPEND_FH in its fh, from the flags sent with it); without them,
        # handles opened O_APPEND are remembered here.
        self._marks = False           # set by mount()
        self._appending: set[int] = set()

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode, a.st_uid, a.st_gid, a.st_nlink = node.mode, node.uid, node.gid, node.nlink
        a.st_size, a.st_rdev = node.size, node.rdev
        if stat.S_ISLNK(node.mode) and node.target is not None:
            a.st_size = len(node.target)        # as lstat(2) says; no data blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.atime, node.mtime, node.ctime
        a.st_blksize = 128 * 1024
        a.st_blocks = -(-node.size // 512)
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = 0 if stat.S_ISREG(node.mode) else ENTRY_TIMEOUT
        return a

    @staticmethod
    async def _call(coro):
        try:
            return await coro
        except PxfsError as exc:
            if exc.errno in (errno.EIO, errno.EAGAIN):
                log.warning("request failed: %s", exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("unexpected error in a shared-volume request")
            raise pyfuse3.FUSEError(errno.EIO) from None

    # -- lookups and attributes ---------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        sv = self.sv
        if name == b".":
            return self._attr(await self._call(sv.getattr(parent_inode)))
        if name == b"..":
            node = await self._call(sv.getattr(parent_inode))
            return self._attr(await self._call(sv.getattr(node.parent or ROOT_INO)))
        return self._attr(sv.overlay(await self._call(sv.meta.lookup(parent_inode, name))))

    async def getattr(self, inode, ctx=None):
        return self._attr(await self._call(self.sv.getattr(inode)))

    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {key: getattr(attr, src) for key, src in _SETATTR
              if getattr(fields, f"update_{key}")}
        return self._attr(await self._call(self.sv.setattr(inode, **kw)))

    async def readlink(self, inode, ctx):
        node = await self._call(self.sv.getattr(inode))
        if node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def forget(self, inode_list):
        pass

    # -- creating and removing ------------------------------------------------------------
    async def _make(self, parent, name, mode, ctx, **kw) -> Inode:
        return await self._call(self.sv.mknod(parent, name, mode, ctx.uid, ctx.gid, **kw))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._attr(await self._make(parent_inode, name, mode, ctx, rdev=rdev))

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(await self._make(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx,
                                           fresh=True))

    async def symlink(self, parent_inode, name, target, ctx):
        return self._attr(await self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx,
                                           target=target))

    async def create(self, parent_inode, name, mode, flags, ctx):
        try:
            node = await self._make(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx,
                                    fresh=True)
        except pyfuse3.FUSEError as exc:
            # another node created it a moment ago; without O_EXCL that is an open
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            node = await self._call(self.sv.meta.lookup(parent_inode, name))
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR) from None
            info = await self.open(node.ino, flags, ctx)
            return info, self._attr(self.sv.overlay(await self._call(self.sv.getattr(node.ino))))
        node = await self._call(self.sv.open(node.ino, node))
        return self._handle(node.ino, flags), self._attr(node)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = await self._call(self.sv.meta.link(inode, new_parent_inode, new_name))
        return self._attr(self.sv.overlay(node))

    async def unlink(self, parent_inode, name, ctx):
        await self._call(self.sv.unlink(parent_inode, name))

    async def rmdir(self, parent_inode, name, ctx):
        await self._call(self.sv.rmdir(parent_inode, name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._call(self.sv.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                        flags))

    # -- files --------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        node = await self._call(self.sv.open(inode))
        if flags & os.O_TRUNC and node.size:      # atomic_o_trunc: truncating is ours
            try:
                await self._call(self.sv.setattr(inode, size=0))
            except BaseException:
                await self.sv.release(inode)
                raise
        return self._handle(inode, flags)

    def _handle(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        fh = next(self._fh_ids)
        self._fhs[fh] = ino
        if flags & os.O_APPEND and not self._marks:
            self._appending.add(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    def _ino(self, fh) -> int:
        ino = self._fhs.get(fh)
        if not isinstance(ino, int):
            raise pyfuse3.FUSEError(errno.EBADF)
        return ino

    async def read(self, fh, off, size):
        return await self._call(self.sv.read(self._ino(fh), off, size))

    async def write(self, fh, off, buf):
        if fh & APPEND_FH:
            fh, append = fh & ~APPEND_FH, True
        else:
            append = fh in self._appending
        return await self._call(self.sv.write(self._ino(fh), off, buf, append=append))

    async def flush(self, fh):
        # recorded before the closing process's locks go: the mount that
        # takes one of them next must see what was written under it
        try:
            await self._call(self.sv.close(self._ino(fh)))
        finally:
            if self.locks is not None:
                await self.locks.closed(fh)

    async def fsync(self, fh, datasync):
        await self._call(self.sv.fsync(self._ino(fh)))

    async def release(self, fh):
        if self.locks is not None:
            await self.locks.released(fh)
        ino = self._fhs.pop(fh, None)
        self._appending.discard(fh)
        if isinstance(ino, int):
            await self._call(self.sv.release(ino))

    # -- directories ------------------------------------------------------------------
    async def opendir(self, inode, ctx):
        node = await self._call(self.sv.getattr(inode))
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries = [(b".", inode), (b"..", node.parent or ROOT_INO)]
        entries += await self._call(self.sv.meta.listdir(inode))
        fh = next(self._fh_ids)
        self._fhs[fh] = _Dir(inode, entries)
        return fh

    async def readdir(self, fh, start_id, token):
        d = self._fhs.get(fh)
        if not isinstance(d, _Dir):
            raise pyfuse3.FUSEError(errno.EBADF)
        i = start_id
        while i < len(d.entries):
            batch = d.entries[i:i + 128]
            nodes = await self._call(self.sv.meta.inodes([ino for _, ino in batch]))
            for n, ((name, _), node) in enumerate(zip(batch, nodes)):
                if node is None:                 # removed since the listing
                    continue
                if not pyfuse3.readdir_reply(token, name, self._attr(self.sv.overlay(node)),
                                             i + n + 1):
                    return
            i += len(batch)

    async def releasedir(self, fh):
        self._fhs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        # entries are durable in etcd once a change returned, except files
        # made in memory in a directory this mount holds
        await self._call(self.sv.meta.flush_local())

    async def statfs(self, ctx):
        cap, used, inodes = await self._call(self.sv.statfs())
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = cap // 4096
        s.f_bfree = s.f_bavail = max(0, cap - used) // 4096
        s.f_files = inodes + (1 << 32)
        s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # -- extended attributes ------------------------------------------------------------
    async def getxattr(self, inode, name, ctx):
        return await self._call(self.sv.meta.getxattr(inode, name))

    async def setxattr(self, inode, name, value, ctx):
        await self._call(self.sv.meta.setxattr(inode, name, value))

    async def listxattr(self, inode, ctx):
        return await self._call(self.sv.meta.listxattr(inode))

    async def removexattr(self, inode, name, ctx):
        await self._call(self.sv.meta.removexattr(inode, name))


# -- the mount program's session (pxfs/mount.py) ----------------------------------------
def mount(fs: SharedFS, mountpoint: str, options: set[str]) -> None:
    """Make this process's FUSE session for ``fs``: with the lock
    operations when ``fs`` has a LockService (set before the session is)."""
    if fs.locks is not None:
        fs.locks.install()
    pyfuse3.init(fs, mountpoint, options)
    fs._marks = fs.locks is not None and fs.locks.active()


async def serve() -> None:
    await pyfuse3.main(max_tasks=64)


def terminate() -> None:
    pyfuse3.terminate()


def unmount() -> None:
    pyfuse3.close(unmount=True)
