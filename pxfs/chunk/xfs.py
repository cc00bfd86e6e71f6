"""Opening chunk files on an XFS pool "by handle" (XFS_IOC_OPEN_BY_HANDLE),
which gives the file descriptor FMODE_NOCMTIME: writes through it do not
update mtime/ctime.  That matters because a buffered write with RWF_NOWAIT
is refused (EAGAIN) whenever the timestamps would change -- that is, on the
first write to a file in every clock tick -- and pxfs never reads chunk
timestamps.  Needs CAP_SYS_ADMIN (the node runs as root); anywhere else the
plain descriptor is kept.
"""

from __future__ import annotations

import ctypes
import fcntl
import os


class _HandleReq(ctypes.Structure):          # struct xfs_fsop_handlereq
    _fields_ = [("fd", ctypes.c_uint32), ("path", ctypes.c_void_p), ("oflags", ctypes.c_uint32),
                ("ihandle", ctypes.c_void_p), ("ihandlen", ctypes.c_uint32),
                ("ohandle", ctypes.c_void_p), ("ohandlen", ctypes.c_void_p)]


def _iowr(nr: int) -> int:
    return (3 << 30) | (ctypes.sizeof(_HandleReq) << 16) | (ord("X") << 8) | nr


FD_TO_HANDLE, OPEN_BY_HANDLE = _iowr(106), _iowr(107)


def reopen_nocmtime(fd: int, root_fd: int) -> int:
    """A new descriptor for the file open as ``fd`` that does not touch its
    timestamps; ``root_fd`` is any directory of the same XFS filesystem.
    Raises OSError where that is not possible (not XFS, not root)."""
    handle = ctypes.create_string_buffer(128)
    hlen = ctypes.c_uint32(len(handle))
    req = _HandleReq(fd=fd, ohandle=ctypes.cast(handle, ctypes.c_void_p),
                     ohandlen=ctypes.cast(ctypes.pointer(hlen), ctypes.c_void_p))
    fcntl.ioctl(fd, FD_TO_HANDLE, req)
    req = _HandleReq(oflags=os.O_RDWR, ihandle=ctypes.cast(handle, ctypes.c_void_p),
                     ihandlen=hlen.value)
    return fcntl.ioctl(root_fd, OPEN_BY_HANDLE, req)
