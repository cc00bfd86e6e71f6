"""The node's FUSE mount: one flat directory in which every volume attached
to this node is a regular file of the volume's size.  Reads, writes and
fsyncs of that file go to the volume's replicated data path; the loop device
sits on top of it.  Its discards (fstrim, blkdiscard) and write-zeroes
arrive as fallocate(PUNCH_HOLE or ZERO_RANGE), which pyfuse3 has no handler
for: ``_lockops`` adds one (see _lockops.c).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pyfuse3
import trio

from ..errors import PxfsError
from . import _lockops

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


class NodeView(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self):
        super().__init__()
        self._by_name: dict[str, int] = {}
        self._vols: dict[int, object] = {}
        self._names: dict[int, str] = {}
        self._next = pyfuse3.ROOT_INODE + 1
        self._t0 = time.time_ns()
        self._nursery: trio.Nursery | None = None

    def install_fallocate(self) -> bool:
        """Before pyfuse3.init: the session it makes takes fallocate here.
        Without the C helper the kernel gets ENOSYS and turns discard off."""
        if _lockops is None:
            log.warning("pxfs.fuse._lockops is not built: discards (fstrim) on block "
                        "volumes are not supported")
            return False
        _lockops.set_fallocate_handler(self._fallocate)
        return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Service: the fallocate requests run here."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- the volume layer's interface ---------------------------------------
    def add(self, name: str, vol) -> None:
        if name in self._by_name:
            self.remove(name)
        ino = self._next
        self._next += 1
        self._by_name[name] = ino
        self._vols[ino] = vol
        self._names[ino] = name

    def remove(self, name: str) -> None:
        ino = self._by_name.pop(name, None)
        if ino is not None:
            self._vols.pop(ino, None)
            self._names.pop(ino, None)
            try:
                pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(), ignore_enoent=True)
            except Exception:       # not mounted (unit tests)
                pass

    # -- attributes ----------------------------------------------------------
    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._t0
        a.attr_timeout = a.entry_timeout = 1
        a.st_blksize = 4096
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            vol = self._vols.get(ino)
            if vol is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = vol.size
            a.st_blocks = vol.size // 512
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == b".":
            return self._attr(pyfuse3.ROOT_INODE)
        ino = self._by_name.get(os.fsdecode(name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = sorted(self._by_name.items(), key=lambda kv: kv[1])
        for name, ino in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name.encode(), self._attr(ino), ino):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        total = sum(v.size for v in self._vols.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._vols) + 1
        s.f_namemax = 255
        return s

    # -- the namespace is pxfs's: files come and go with attach and detach ------
    async def _refuse(self, *args, **kw):
        """EPERM ("Operation not permitted"), not pyfuse3's default ENOSYS
        ("Function not implemented"), which reads like a bug in pxfs."""
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mknod = mkdir = symlink = link = unlink = rmdir = rename = _refuse

    # -- data ------------------------------------------------------------------
    def _vol(self, ino):
        vol = self._vols.get(ino)
        if vol is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return vol

    async def open(self, inode, flags, ctx):
        self._vol(inode)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        return await self._io(self._vol(fh).read(off, size))

    async def write(self, fh, off, buf):
        return await self._io(self._vol(fh).write(off, buf))

    async def fsync(self, fh, datasync):
        await self._io(self._vol(fh).flush())

    async def flush(self, fh):
        vol = self._vols.get(fh)
        if vol is not None and not vol.fenced:
            await self._io(vol.flush())

    async def release(self, fh):
        pass

    # -- fallocate, from _lockops on the trio thread ---------------------------
    def _fallocate(self, req, ino, fh, mode, off, length) -> None:
        if self._nursery is None:
            _lockops.reply_err(req, errno.EIO)
            return
        self._nursery.start_soon(self._serve_fallocate, req, fh, mode, off, length)

    async def _serve_fallocate(self, req, fh, mode, off, length) -> None:
        err = errno.EIO
        try:
            err = await self.fallocate(fh, mode, off, length)
        finally:
            _lockops.reply_err(req, err)

    async def fallocate(self, fh, mode, off, length) -> int:
        """A punched hole or zeroed range reads as zeros (ReplicatedVolume.
        discard); preallocation is refused, since a thin volume reserves no
        space.  Returns the errno to answer (0: done)."""
        vol = self._vols.get(fh)
        if vol is None:
            return errno.EBADF
        kind = mode & ~FALLOC_FL_KEEP_SIZE
        if kind not in (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE):
            return errno.EOPNOTSUPP
        if kind == FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            return errno.EOPNOTSUPP         # as fallocate(2) says
        if off < 0 or length <= 0:
            return errno.EINVAL
        if off + length > vol.size and not mode & FALLOC_FL_KEEP_SIZE:
            return errno.EFBIG              # the image's size is the volume's
        try:
            await vol.discard(off, length)
        except PxfsError as exc:
            log.warning("discard error: %s", exc)
            return exc.errno
        except Exception:
            log.exception("unexpected error in the FUSE data path")
            return errno.EIO
        return 0

    async def _io(self, coro):
        try:
            return await coro
        except PxfsError as exc:
            log.warning("I/O error: %s", exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("unexpected error in the FUSE data path")
            raise pyfuse3.FUSEError(errno.EIO) from None


def mount(view: NodeView, mountpoint: str) -> None:
    os.makedirs(mountpoint, exist_ok=True)
    view.install_fallocate()
    pyfuse3.init(view, mountpoint, {"fsname=pxfs", "subtype=pxfs", "allow_other"})


async def serve() -> None:
    await pyfuse3.main(max_tasks=64)


def unmount() -> None:
    pyfuse3.close(unmount=True)


def terminate() -> None:
    pyfuse3.terminate()
