"""Extended attributes of a shared volume's files: one etcd key per
attribute (``ns/<vol>/x/<ino>/<name>``), changed in a transaction that also
bumps the inode's ctime."""

from __future__ import annotations

import errno
import time

from ..errors import AlreadyExists, InvalidArgument
from ..meta import keys
from .records import XATTR_NAME_MAX, XATTR_SIZE_MAX, ns_error as _err
from .remembered import FRESH

XATTR_CREATE, XATTR_REPLACE = 1, 2
#: POSIX ACLs are not kept (the mount does not ask the kernel for ACL
#: support): stored as plain attributes they would change no permission,
#: and cp -p / cp -a / mv, which set a file's mode through a minimal ACL
#: when that works, would leave every file 0600.  Refused, they fall back
#: to chmod, as on a filesystem mounted with noacl.
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")


class XattrOps:
    """Mixed into NsMeta (uses its transaction loop and remembered inodes)."""

    def xkey(self, ino: int, name: bytes) -> str:
        if not name or len(name) > XATTR_NAME_MAX or b"\0" in name:
            raise InvalidArgument("bad extended attribute name", errno=errno.ERANGE)
        if name in _ACL_NAMES:
            raise _err(errno.EOPNOTSUPP, "POSIX ACLs are not supported")
        return keys.ns_xattr_key(self.cid, self.volid, ino, name)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        key = self.xkey(ino, name)
        bare = self._bare.get(ino)
        if bare is not None and time.monotonic() - bare < FRESH:
            # the kernel asks for security.capability before every write
            raise _err(errno.ENODATA, "no such attribute")
        item = await self.kv.get(key)
        if item is None:
            await self.getattr(ino)                 # ENOENT for a vanished file
            raise _err(errno.ENODATA, "no such attribute")
        return item.value

    async def listxattr(self, ino: int) -> list[bytes]:
        prefix = keys.ns_xattr_prefix(self.cid, self.volid, ino)
        return [keys.decode_name(it.key[len(prefix):]) for it in await self.kv.range(prefix)]

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        key = self.xkey(ino, name)
        self._bare.pop(ino, None)
        if len(value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG, "extended attribute value larger than 64 KiB")

        async def body(txn):
            t = await self._inode(txn, ino)
            old = await txn.get(key) if flags else None
            if flags & XATTR_CREATE and old is not None:
                raise AlreadyExists("attribute exists")
            if flags & XATTR_REPLACE and old is None:
                raise _err(errno.ENODATA, "no such attribute")
            t.ctime = time.time_ns()
            txn.put(key, value)
            self._put(txn, t)
        await self._run(body, "setxattr")

    async def removexattr(self, ino: int, name: bytes) -> None:
        key = self.xkey(ino, name)

        async def body(txn):
            t = await self._inode(txn, ino)
            if await txn.get(key) is None:
                raise _err(errno.ENODATA, "no such attribute")
            t.ctime = time.time_ns()
            txn.delete(key)
            self._put(txn, t)
        await self._run(body, "removexattr")
