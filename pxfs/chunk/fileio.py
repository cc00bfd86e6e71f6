"""System calls on the pool's files that ``os`` lacks (syncfs,
sync_file_range, fallocate's hole punching, through libc) and the write
and sync steps built on them; each name is None where libc has no such
call, and the callers fall back."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    syncfs = _libc.syncfs
    sync_file_range = _libc.sync_file_range
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                ctypes.c_uint]
    fallocate = _libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
except (OSError, AttributeError):
    syncfs = sync_file_range = fallocate = None
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def sync_fds(fds: list[int]) -> None:
    """Make the files behind ``fds`` (all on one pool) durable: one syncfs
    (one journal commit) for more than two, an fdatasync each otherwise."""
    if len(fds) > 2 and syncfs is not None:
        if syncfs(fds[0]) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        # XFS's syncfs writes the data back but, with no metadata to log,
        # flushes no device cache; an fdatasync of a file with nothing left
        # to write does (xfs_file_fsync), so the data is on stable storage,
        # not only in the disk's write cache
        os.fdatasync(fds[0])
    else:
        for fd in fds:
            os.fdatasync(fd)


def pwrite_all(fd: int, buf, pos: int) -> None:
    """pwrite every byte: a short write (the pool filled up half-way) goes
    on, so it ends in the error that stopped it, never in silence.  That
    error carries ``written``: how many bytes went in before it."""
    view = memoryview(buf)
    done = 0
    try:
        while view:
            n = os.pwrite(fd, view, pos)
            if n <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            view, pos, done = view[n:], pos + n, done + n
    except OSError as exc:
        exc.written = done
        raise


def sync_roots(roots: list[str]) -> None:
    """Make everything in the pool roots durable; OSError if a pool cannot
    (its filesystem shut down after an I/O error)."""
    for root in roots:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs is None:
                os.sync()
            elif syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs of {root} failed")
        finally:
            os.close(fd)
        # XFS's syncfs flushes no device cache when it has no metadata to
        # log; an fsync of a file always does
        fd = os.open(os.path.join(root, "SYNCED"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
