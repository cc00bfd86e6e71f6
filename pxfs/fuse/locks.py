"""Lock requests from the kernel for a shared volume's mount: GETLK, SETLK,
SETLKW and flock arrive through ``_lockops`` and go to NsLocks, which holds
them across every mount of the volume.  The locks a closing process held on
a file go at its flush (fcntl) or at the open file's last release (flock),
before pyfuse3's handlers for those answer.
"""

from __future__ import annotations

import collections
import errno
import logging

import trio

from ..errors import PxfsError
from ..namespace.locks import FLOCK, POSIX, RD, UN, NsLocks
from . import _lockops

log = logging.getLogger(__name__)


class LockService:
    def __init__(self, locks: NsLocks, files=None):
        self.locks = locks
        # the SharedVolume: what was written under a lock is recorded before
        # it is released, and an open file is revalidated when one is granted
        self.files = files
        self._nursery: trio.Nursery | None = None
        self._waiting: dict[int, trio.CancelScope] = {}   # request -> its wait
        self._interrupted: set[int] = set()
        self._at_flush: dict[int, list] = collections.defaultdict(list)    # fh -> (ino, owner)
        self._at_release: dict[int, list] = collections.defaultdict(list)
        # (ino, owner) -> the open file its last fcntl lock came through: an
        # open file description's own (OFD) locks are released with it, and
        # the kernel sends no owner for them
        self._via: dict[tuple[int, int], int] = {}

    def install(self) -> None:
        """Before pyfuse3.init: the session it makes gets the lock operations."""
        if _lockops is None:
            log.warning("pxfs.fuse._lockops is not built: flock/fcntl locks hold on this "
                        "node only")
            return
        _lockops.set_handler(self._request)

    def active(self) -> bool:
        """Whether the kernel sends this mount's lock requests here."""
        return _lockops is not None and _lockops.installed() > 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            await nursery.start(self.locks.service)
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- from the C side, on the trio thread ---------------------------------
    def _request(self, kind, req, ino, fh, owner, type_, start, end, pid):
        try:
            self._dispatch(kind, req, ino, fh, owner, type_, start, end, pid)
        except BaseException:
            # the C side answers the request (EIO): nothing of it may stay here
            self._interrupted.discard(req)
            raise

    def _dispatch(self, kind, req, ino, fh, owner, type_, start, end, pid):
        if kind == "flush":
            self._at_flush[fh].append((ino, owner))
        elif kind == "release":
            self._at_release[fh].append((ino, owner))
        elif kind == "interrupt":
            scope = self._waiting.get(req)
            if scope is not None:
                scope.cancel()
            else:                   # interrupted before its task began
                self._interrupted.add(req)
        elif self._nursery is None:
            self._interrupted.discard(req)
            _lockops.reply_err(req, errno.ENOLCK)
        else:
            self._nursery.start_soon(self._serve, kind, req, ino, fh, owner, type_, start, end,
                                     pid)

    async def _serve(self, kind, req, ino, fh, owner, type_, start, end, pid) -> None:
        err = errno.EINTR
        try:
            with trio.CancelScope() as scope:
                self._waiting[req] = scope
                if req in self._interrupted:
                    scope.cancel()
                lk_kind = FLOCK if kind.startswith("flock") else POSIX
                if kind == "getlk":
                    holder = await self.locks.test(ino, POSIX, owner, type_, start, end)
                    if holder is None:
                        _lockops.reply_lock(req, UN, start, end, pid)
                    else:
                        _lockops.reply_lock(req, holder.type, holder.start, holder.end,
                                            holder.pid)
                    err = None
                    return
                if type_ == UN:
                    # not interruptible: a process cannot keep a lock it let go
                    with trio.CancelScope(shield=True):
                        await self._publish(ino)
                        await self.locks.lock(ino, lk_kind, owner, UN, start, end, pid)
                    err = 0
                    return
                if type_ == RD:         # a downgrade lets readers in: they see it all
                    await self._publish(ino)
                await self.locks.lock(ino, lk_kind, owner, type_, start, end, pid,
                                      wait=kind in ("setlkw", "flockw"))
                err = 0                 # granted: an interrupt now changes nothing
                if lk_kind == POSIX:
                    self._via[ino, owner] = fh
                with trio.CancelScope(shield=True):
                    await self._revalidate(ino)
        except PxfsError as exc:
            err = exc.errno
        except Exception:
            log.exception("lock request %s failed", kind)
            err = errno.ENOLCK
        finally:
            self._waiting.pop(req, None)
            self._interrupted.discard(req)
            if err is not None:
                _lockops.reply_err(req, err)

    async def _publish(self, ino: int) -> None:
        if self.files is not None:
            try:
                await self.files.publish(ino)
            except PxfsError as exc:    # the unlock goes on: a process cannot keep it
                log.warning("inode %d: not recorded before its unlock: %s", ino, exc)

    async def _revalidate(self, ino: int) -> None:
        if self.files is not None:
            try:
                await self.files.revalidate(ino)
            except PxfsError as exc:    # the lock is held: its process goes on
                log.warning("inode %d: not revalidated at its lock: %s", ino, exc)
            except Exception:
                log.exception("inode %d: not revalidated at its lock", ino)

    # -- from SharedFS -------------------------------------------------------
    async def closed(self, fh: int) -> None:
        """flush(fh): the closing process's fcntl locks on the file go."""
        await self._drop(self._at_flush.pop(fh, ()), POSIX)

    async def released(self, fh: int) -> None:
        """release(fh), the open file's last close: its flock goes, and so do
        the fcntl locks taken last through it.  Those of processes went at
        their flush already (every descriptor of the file has been closed),
        so what is left are its OFD locks (F_OFD_SETLK)."""
        self._at_flush.pop(fh, None)
        await self._drop(self._at_release.pop(fh, ()), FLOCK)
        await self._drop([k for k, via in self._via.items() if via == fh], POSIX)

    async def _drop(self, owners, kind: str) -> None:
        for ino, owner in owners:
            if kind == POSIX:
                self._via.pop((ino, owner), None)
            try:
                await self.locks.drop_owner(ino, kind, owner)
            except PxfsError as exc:     # the close itself went well
                log.warning("locks of a closed file not released in etcd: %s", exc)
