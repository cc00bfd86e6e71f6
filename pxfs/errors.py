"""The exceptions pxfs raises.  Every class carries the errno that the FUSE
adapter and the REST API hand to the caller::

    PxfsError                 EIO   anything that went wrong in pxfs
     +-- InvalidArgument      EINVAL  bad user input (flag, spec, name, body)
     |    +-- ConfigError     EINVAL  a config.json key is wrong
     +-- NotFound             ENOENT  no such volume / node / chunk
     +-- AlreadyExists        EEXIST  name taken
     +-- Busy                 EBUSY   attached elsewhere, mounted, in use
     +-- NoSpace              ENOSPC  pool full, not enough nodes
     +-- MetaError            EIO     the key-value store failed
     |    +-- TxnConflict     EAGAIN  optimistic transaction lost its race
     +-- RpcError             EIO     node-to-node call failed
     |    +-- FrameError      EPROTO  malformed or oversized frame
     |    +-- PeerUnavailable EHOSTDOWN  peer refused, reset or timed out
     +-- Fenced               ESTALE  write carried an older attach term
     +-- ChecksumError        EIO     stored block does not match its checksum
     +-- HostError            EIO     losetup/mkfs/mount failed
"""

import errno as _errno


class PxfsError(Exception):
    """Base of every pxfs error."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", *, errno: int | None = None):
        super().__init__(message)
        self.message = message
        if errno is not None:
            self.errno = errno

    def __str__(self) -> str:
        return self.message or self.__class__.__name__


class InvalidArgument(PxfsError):
    """The caller passed something malformed."""

    errno = _errno.EINVAL


class ConfigError(InvalidArgument):
    """A key of the node configuration is missing or wrong."""

    def __init__(self, key: str, expected: str):
        super().__init__(f"config key {key!r}: {expected}")
        self.key = key


class NotFound(PxfsError):
    """The named object does not exist."""

    errno = _errno.ENOENT


class AlreadyExists(PxfsError):
    """An object of that name already exists."""

    errno = _errno.EEXIST


class Busy(PxfsError):
    """The object is in use (attached, mounted) and cannot change now."""

    errno = _errno.EBUSY


class NoSpace(PxfsError):
    """Not enough capacity or nodes."""

    errno = _errno.ENOSPC


class MetaError(PxfsError):
    """The metadata store failed or is unreachable."""


class TxnConflict(MetaError):
    """A transaction kept losing its compare-and-swap race."""

    errno = _errno.EAGAIN


class RpcError(PxfsError):
    """A node-to-node request failed."""


class FrameError(RpcError):
    """A frame on the data port was malformed or too large."""

    errno = _errno.EPROTO


class PeerUnavailable(RpcError):
    """The peer could not be reached in time."""

    errno = _errno.EHOSTDOWN


class Fenced(PxfsError):
    """The request carried an attach term older than one the replica has seen."""

    errno = _errno.ESTALE


class ChecksumError(PxfsError):
    """A stored block failed its checksum."""


class HostError(PxfsError):
    """A host tool (losetup, mkfs, mount) failed."""


class LockConflict(PxfsError):
    """An advisory lock is held by another owner (F_SETLK, LOCK_NB)."""
    errno = _errno.EAGAIN


class LockUnavailable(PxfsError):
    """Locks cannot be granted now: this mount's etcd lease is gone."""
    errno = _errno.ENOLCK


#: errno -> class, so a remote error can be raised again locally.
BY_NAME = {c.__name__: c for c in (
    PxfsError, InvalidArgument, NotFound, AlreadyExists, Busy, NoSpace,
    MetaError, TxnConflict, RpcError, FrameError, PeerUnavailable, Fenced,
    ChecksumError, HostError, LockConflict, LockUnavailable)}


def from_wire(name: str, message: str) -> PxfsError:
    """Rebuild an error sent by a peer (unknown names become PxfsError)."""
    return BY_NAME.get(name, PxfsError)(message)
