"""Durability of a ChunkStore's writes: what a flush (sync) makes durable
and how, the early write-back behind small writes, the evicted dirty files
kept for their volume's next sync (and drained when too many), and the
space of trimmed blocks given back once the header that unmarks them is
durable.  A mixin of ChunkStore (store.py), whose state it shares."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import TYPE_CHECKING

from .. import CSUM_BLOCK
from ..errors import PxfsError
from . import fileio, incarnation
from .layout import HEADER_SIZE

if TYPE_CHECKING:
    from .store import _Chunk

log = logging.getLogger(__name__)


class Durability:
    def _drain_unsynced(self, volid: int) -> None:
        """Make the evicted dirty chunks of ``volid`` durable and close them
        (in the caller's thread: a chunk is opened in a worker thread).  A
        sync meanwhile waits for this one; a failure is kept for the
        volume's next sync to report."""
        with self._lock:
            fds = self._unsynced.pop(volid, [])
            if not fds:
                return
            self._draining[volid] += 1
        try:
            fileio.sync_fds(fds)
        except OSError as exc:
            log.error("volume %s: syncing %d evicted chunk files failed: %s", volid, len(fds), exc)
            incarnation.forfeit()           # as a failed sync does (syncer.py)
            with self._lock:
                self._drain_failed.setdefault(volid, str(exc))
        finally:
            for fd in fds:
                os.close(fd)
            with self._lock:
                self._draining[volid] -= 1
                if not self._draining[volid]:
                    del self._draining[volid]
                self._drained.notify_all()

    def _wait_drained(self, volid: int) -> None:
        """Until no drain of the volume is under way; raise what one that
        failed left to report (then every sync fails, as after its own)."""
        with self._lock:
            while self._draining.get(volid):
                self._drained.wait()
            why = self._drain_failed.pop(volid, None)
            if why is not None:
                self._sync_failed[volid] = why
        if why is not None:
            raise PxfsError(f"volume {volid}: writing back chunk files failed ({why}); writes "
                            "since the sync before it may be lost here until a resync")

    def start_writeback(self, volid: int) -> None:
        """Start writing back the volume's dirty chunk files without waiting
        (sync_file_range): a later sync finds the pages on their way.  Only
        chunks whose lock is free; nothing here may block for long."""
        if fileio.sync_file_range is None:
            return
        with self._lock:
            chunks = list(self._dirty.get(volid, ()))
        for ch in chunks[:2]:
            if ch.lock.acquire(blocking=False):
                try:
                    if ch.fd >= 0:
                        fileio.sync_file_range(ch.fd, 0, 0, fileio.SYNC_FILE_RANGE_WRITE)
                finally:
                    ch.lock.release()

    def clean(self, volid: int) -> bool:
        """Whether the volume has nothing a sync would flush."""
        with self._lock:
            return (not self._dirty.get(volid) and volid not in self._dirty_dirs
                    and not self._unsynced.get(volid) and volid not in self._sync_failed
                    and not self._draining.get(volid) and volid not in self._drain_failed)

    def small_sync(self, volid: int, max_files: int = 2, max_bytes: int = 256 * 1024) -> bool:
        """Whether a sync of the volume now is at most ``max_files``
        fdatasyncs of at most ``max_bytes`` written since the last one (no
        directory to sync, no syncfs): short enough to do without a thread."""
        with self._lock:
            if (volid in self._dirty_dirs or self._unsynced.get(volid)
                    or self._draining.get(volid) or volid in self._drain_failed):
                return False
            chunks = self._dirty.get(volid, ())
            return len(chunks) <= max_files and sum(c.dirty_bytes for c in chunks) <= max_bytes

    def sync(self, volid: int) -> None:
        """Make every write to this volume so far durable.

        The chunk locks are held only to pick the dirty files (their fds are
        dup'ed), not during the flush, so writes go on meanwhile.  Several
        dirty files are flushed with one syncfs (one journal commit) instead
        of one fdatasync each.
        """
        why = self._sync_failed.get(volid)
        if why is not None:
            raise PxfsError(f"volume {volid}: an earlier sync failed ({why}); writes since "
                            "the sync before it may be lost here until a resync")
        with self._lock:
            chunks = list(self._dirty.pop(volid, ()))
            dir_dirty = volid in self._dirty_dirs
            self._dirty_dirs.discard(volid)
        fds = []                # (chunk, dup'ed fd, metadata to log?)
        punches = []            # (chunk, ranges its header, synced now, unmarks)
        for ch in chunks:
            with ch.lock:
                if ch.fd >= 0 and ch.dirty:
                    fds.append((ch, os.dup(ch.fd), ch.meta_dirty))
                    ch.dirty, ch.dirty_bytes, ch.meta_dirty = False, 0, False
                    if ch.punch:
                        punches.append((ch, ch.punch))
                        ch.punch = []
        # after the loop: a chunk evicted meanwhile moved its fd here under its lock
        fds += [(None, fd, True) for fd in self._take_unsynced(volid)]
        fds.sort(key=lambda e: e[2])          # files with nothing to log first
        try:
            if len(fds) == 2 and not fds[0][2] and fileio.sync_file_range is not None:
                # Two files (a commit's data and journal blocks), one device
                # cache flush: a file that only overwrote blocks it holds
                # has no metadata to log, so writing its pages back and
                # waiting is enough before the other's fdatasync, whose
                # flush then covers both.  Two fdatasyncs would flush twice.
                if fileio.sync_file_range(fds[0][1], 0, 0, fileio.SYNC_FILE_RANGE_WAIT_BEFORE
                                    | fileio.SYNC_FILE_RANGE_WRITE | fileio.SYNC_FILE_RANGE_WAIT_AFTER):
                    err = ctypes.get_errno()
                    raise OSError(err, f"sync_file_range: {os.strerror(err)}")
                os.fdatasync(fds[1][1])
            else:
                fileio.sync_fds([fd for _, fd, _ in fds])
            if dir_dirty:               # new chunk files' names
                d = self._voldir(volid, False)
                if d:
                    self._fsync_dir(d)
        except OSError as exc:
            self._sync_failed[volid] = str(exc)
            raise self._oserror(exc) from exc
        finally:
            for _, fd, _ in fds:
                os.close(fd)
        # chunks evicted before their turn here may be in a drain's hands
        self._wait_drained(volid)
        for ch, ranges in punches:
            self._punch(ch, ranges)

    def _punch(self, ch: _Chunk, ranges: list[tuple[int, int]]) -> None:
        """Give back the space of the blocks in ``ranges`` that are still
        unwritten (a write may have taken some again since the trim).  A
        block trimmed again since the sync began is left to the next sync:
        a write between the two trims may have put a header that marks it
        written on the disk, and only that next sync makes it unmarked
        there again.  Best effort: a crash before it, or a pool without
        hole punching, only keeps the space allocated; the blocks read as
        zeros either way."""
        if fileio.fallocate is None or not self.punch_holes:
            return
        with ch.lock:
            if ch.fd < 0:
                return                  # evicted: the space stays
            pending = ch.punch

            def keep(b: int) -> bool:
                return ch.hdr.written(b) or any(f <= b <= t for f, t in pending)

            for first, last in ranges:
                blk = first
                while blk <= last:
                    if keep(blk):
                        blk += 1
                        continue
                    end = blk
                    while end < last and not keep(end + 1):
                        end += 1
                    if fileio.fallocate(ch.fd, fileio.FALLOC_FL_PUNCH_HOLE | fileio.FALLOC_FL_KEEP_SIZE,
                                  HEADER_SIZE + blk * CSUM_BLOCK,
                                  (end - blk + 1) * CSUM_BLOCK):
                        err = ctypes.get_errno()
                        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                            self.punch_holes = False
                            return
                        log.info("cannot give back the space of trimmed blocks: %s",
                                 os.strerror(err))
                    blk = end + 1

    def _take_unsynced(self, volid: int) -> list[int]:
        with self._lock:
            return self._unsynced.pop(volid, [])

    def sync_pools(self) -> None:
        """Make everything in the pools durable (at start, before the data
        port opens).  The page cache outlives a killed process: writes its
        earlier run took and answered may still be only there, and the
        flushes this process serves cover only the writes it takes itself."""
        fileio.sync_roots(self.roots)
