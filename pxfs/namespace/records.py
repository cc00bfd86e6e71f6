"""The records of a shared volume's namespace, as stored in etcd.

An inode is one msgpack array, short fields first and trailing defaults
dropped, so a small file costs about 40 bytes of value::

    [mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev, parent, target, writer]

``parent`` is kept for directories only (a directory has one parent; rename
uses it to refuse moving a directory into itself); ``target`` is a symlink's
target.  ``writer`` names the mount that created a file and has not yet
recorded its size and attributes since (an open elsewhere waits for it; see
SharedVolume).  A directory entry's value is the child's inode number.
"""

from __future__ import annotations

import dataclasses
import stat

from .. import codec
from ..errors import InvalidArgument, PxfsError

ROOT_INO = 1
NAME_MAX = 255
#: etcd's default request limit is 1.5 MiB; Linux's own xattr limit is 64 KiB
XATTR_SIZE_MAX = 64 * 1024
XATTR_NAME_MAX = 255
SYMLINK_MAX = 4095


@dataclasses.dataclass
class Inode:
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    rdev: int = 0
    parent: int = 0
    target: bytes | None = None
    writer: str = ""        # the creating mount, until its first record (shared.py)
    rev: int = 0            # etcd mod revision it was read at (not stored)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def apply(self, fields: dict) -> None:
        """Apply setattr fields (mode permission bits, uid, gid, atime,
        mtime, ctime; absent or None = unchanged)."""
        if fields.get("mode") is not None:
            self.mode = (self.mode & ~0o7777) | (fields["mode"] & 0o7777)
        for f in ("uid", "gid", "atime", "mtime", "ctime"):
            if fields.get(f) is not None:
                setattr(self, f, fields[f])

    def pack(self) -> bytes:
        fields = [self.mode, self.uid, self.gid, self.nlink, self.size, self.atime, self.mtime,
                  self.ctime, self.rdev, self.parent, self.target, self.writer]
        defaults = [None, 0, 0, 1, 0, 0, 0, 0, 0, 0, None, ""]
        while len(fields) > 1 and fields[-1] == defaults[len(fields) - 1]:
            fields.pop()
        return codec.pack(fields)

    @classmethod
    def unpack(cls, ino: int, raw: bytes, rev: int = 0) -> "Inode":
        try:
            fields = codec.unpack(raw)
            return cls(ino, *fields, rev=rev)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"inode {ino}: bad record: {exc}") from None


def pack_ino(ino: int) -> bytes:
    return codec.pack(ino)


def unpack_ino(raw: bytes) -> int:
    v = codec.unpack(raw)
    if not isinstance(v, int):
        raise InvalidArgument("bad directory entry")
    return v


def check_name(name: bytes) -> None:
    """POSIX names: no ``/``, no NUL, not ``.``/``..``, at most 255 bytes."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid file name {name!r}")
    if len(name) > NAME_MAX:
        raise InvalidArgument("file name longer than 255 bytes", errno=36)  # ENAMETOOLONG


def ns_error(code: int, msg: str) -> PxfsError:
    """A namespace error carrying the POSIX errno a caller should see."""
    return PxfsError(msg, errno=code)
