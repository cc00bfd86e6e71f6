"""The metadata of a shared volume's namespace, kept in etcd.

Every change is one transaction that compares the revision of every key it
read (parents, entries, inodes) and retries on conflict, so two nodes never
both create the same name or both rename into one: the loser's compare fails,
its body runs again and sees the winner's entry.  A change to a directory's
entries always rewrites the directory's inode (mtime, ctime), which is what
makes ``rmdir``'s emptiness check safe against a create racing it.
"""

from __future__ import annotations

import errno
import stat
import time

import trio

from .. import codec
from ..errors import AlreadyExists, InvalidArgument, NotFound, PxfsError
from ..meta import keys
from ..meta.txn import run_txn
from .records import (ROOT_INO, SYMLINK_MAX, XATTR_NAME_MAX, XATTR_SIZE_MAX, Inode,
                      check_name, pack_ino, unpack_ino)

#: inode numbers a node takes from the shared counter at a time
INO_BATCH = 1024
#: file data lives in chunk ``ino << 24 | n``: inode numbers stay below 2**40
INO_MAX = (1 << 40) - 1
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
XATTR_CREATE, XATTR_REPLACE = 1, 2


def _err(code: int, msg: str) -> PxfsError:
    return PxfsError(msg, errno=code)


def root_ops(cid: str, volid: int, *, uid: int = 0, gid: int = 0, mode: int = 0o755):
    """(key, value) pairs that make an empty namespace: the root directory
    and the inode counter."""
    now = time.time_ns()
    root = Inode(ROOT_INO, stat.S_IFDIR | mode, uid, gid, nlink=2, atime=now, mtime=now,
                 ctime=now, parent=ROOT_INO)
    return [(keys.ns_inode_key(cid, volid, ROOT_INO), root.pack()),
            (keys.ns_next_key(cid, volid), codec.pack(ROOT_INO + 1))]


class NsMeta:
    def __init__(self, kv, cid: str, volid: int, node: str):
        self.kv, self.cid, self.volid, self.node = kv, cid, volid, node
        self._next = self._end = 0
        self._ino_lock = trio.Lock()

    # -- keys ------------------------------------------------------------------
    def ikey(self, ino: int) -> str:
        return keys.ns_inode_key(self.cid, self.volid, ino)

    def dkey(self, parent: int, name: bytes) -> str:
        return keys.ns_dentry_key(self.cid, self.volid, parent, name)

    # -- reads -----------------------------------------------------------------
    async def _inode(self, txn, ino: int) -> Inode:
        item = await txn.get(self.ikey(ino))
        if item is None:
            raise NotFound(f"no inode {ino}")
        return Inode.unpack(ino, item.value, item.mod_rev)

    async def getattr(self, ino: int) -> Inode:
        return await self._inode(self.kv, ino)

    async def inodes(self, inos: list[int]) -> list[Inode | None]:
        items = await self.kv.get_many([self.ikey(i) for i in inos])
        return [Inode.unpack(i, it.value, it.mod_rev) if it else None for i, it in zip(inos, items)]

    async def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > 255:
            raise InvalidArgument("file name longer than 255 bytes", errno=errno.ENAMETOOLONG)
        item = await self.kv.get(self.dkey(parent, name))
        if item is None:
            raise NotFound(f"{name!r} not found")
        return await self.getattr(unpack_ino(item.value))

    async def listdir(self, ino: int) -> list[tuple[bytes, int]]:
        prefix = keys.ns_dir_prefix(self.cid, self.volid, ino)
        return [(keys.decode_name(it.key[len(prefix):]), unpack_ino(it.value))
                for it in await self.kv.range(prefix)]

    async def _empty(self, ino: int) -> bool:
        return not await self.kv.range(keys.ns_dir_prefix(self.cid, self.volid, ino), limit=1)

    # -- inode numbers -----------------------------------------------------------
    async def _alloc_ino(self) -> int:
        async with self._ino_lock:
            if self._next >= self._end:
                key = keys.ns_next_key(self.cid, self.volid)

                async def body(txn):
                    item = await txn.get(key)
                    start = codec.unpack(item.value) if item else ROOT_INO + 1
                    if start + INO_BATCH > INO_MAX:
                        raise _err(errno.ENOSPC, "no inode numbers left")
                    txn.put(key, codec.pack(start + INO_BATCH))
                    return start
                self._next = await run_txn(self.kv, body, what="take inode numbers")
                self._end = self._next + INO_BATCH
            ino, self._next = self._next, self._next + 1
            return ino

    async def _dir(self, txn, ino: int) -> Inode:
        d = await self._inode(txn, ino)
        if not d.is_dir:
            raise _err(errno.ENOTDIR, f"inode {ino} is not a directory")
        if d.nlink == 0:
            raise NotFound("directory was removed")
        return d

    # -- changes -----------------------------------------------------------------
    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *,
                    rdev: int = 0, target: bytes | None = None) -> Inode:
        """Create a file, directory, symlink, fifo...; EEXIST if the name is taken."""
        check_name(name)
        if target is not None and len(target) > SYMLINK_MAX:
            raise InvalidArgument("symlink target too long", errno=errno.ENAMETOOLONG)
        ino = await self._alloc_ino()
        is_dir = stat.S_ISDIR(mode)

        async def body(txn):
            p = await self._dir(txn, parent)
            if await txn.get(self.dkey(parent, name)) is not None:
                raise AlreadyExists(f"{name!r} exists")
            now = time.time_ns()
            new = Inode(ino, mode, uid, gid, nlink=2 if is_dir else 1, atime=now, mtime=now,
                        ctime=now, rdev=rdev, parent=parent if is_dir else 0, target=target)
            p.mtime = p.ctime = now
            if is_dir:
                p.nlink += 1
            txn.put(self.ikey(ino), new.pack())
            txn.put(self.dkey(parent, name), pack_ino(ino))
            txn.put(self.ikey(parent), p.pack())
            return new
        return await run_txn(self.kv, body, what="create")

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        check_name(name)

        async def body(txn):
            t = await self._inode(txn, ino)
            if t.is_dir:
                raise _err(errno.EPERM, "hard links to directories are not allowed")
            if t.nlink == 0:
                raise NotFound("file was removed")
            p = await self._dir(txn, parent)
            if await txn.get(self.dkey(parent, name)) is not None:
                raise AlreadyExists(f"{name!r} exists")
            now = time.time_ns()
            t.nlink += 1
            t.ctime = p.mtime = p.ctime = now
            txn.put(self.ikey(ino), t.pack())
            txn.put(self.ikey(parent), p.pack())
            txn.put(self.dkey(parent, name), pack_ino(ino))
            return t
        return await run_txn(self.kv, body, what="link")

    def _drop_link(self, txn, t: Inode, is_open) -> bool:
        """One name of ``t`` is gone: write it back, keep it as an orphan
        while it is open here, or delete it.  True if its data can go."""
        if t.nlink > 0:
            txn.put(self.ikey(t.ino), t.pack())
            return False
        if not t.is_dir and is_open(t.ino):
            txn.put(self.ikey(t.ino), t.pack())
            txn.put(keys.ns_orphan_key(self.cid, self.volid, t.ino), codec.pack(self.node))
            return False
        txn.delete(self.ikey(t.ino))
        return True

    async def unlink(self, parent: int, name: bytes, is_open=lambda ino: False) -> tuple[Inode, bool]:
        """Remove a non-directory name; (inode, True if its data must be freed)."""
        async def body(txn):
            p = await self._dir(txn, parent)
            d = await txn.get(self.dkey(parent, name))
            if d is None:
                raise NotFound(f"{name!r} not found")
            t = await self._inode(txn, unpack_ino(d.value))
            if t.is_dir:
                raise _err(errno.EISDIR, f"{name!r} is a directory")
            now = time.time_ns()
            t.nlink -= 1
            t.ctime = p.mtime = p.ctime = now
            txn.delete(self.dkey(parent, name))
            txn.put(self.ikey(parent), p.pack())
            return t, self._drop_link(txn, t, is_open)
        t, free = await run_txn(self.kv, body, what="unlink")
        if free:
            await self.kv.delete_prefix(keys.ns_xattr_prefix(self.cid, self.volid, t.ino))
        return t, free

    async def rmdir(self, parent: int, name: bytes) -> Inode:
        async def body(txn):
            p = await self._dir(txn, parent)
            d = await txn.get(self.dkey(parent, name))
            if d is None:
                raise NotFound(f"{name!r} not found")
            t = await self._inode(txn, unpack_ino(d.value))
            if not t.is_dir:
                raise _err(errno.ENOTDIR, f"{name!r} is not a directory")
            # a create racing this rewrites t (its mtime), failing our compare
            if not await self._empty(t.ino):
                raise _err(errno.ENOTEMPTY, f"{name!r} is not empty")
            now = time.time_ns()
            p.nlink -= 1
            p.mtime = p.ctime = now
            txn.delete(self.dkey(parent, name))
            txn.delete(self.ikey(t.ino))
            txn.put(self.ikey(parent), p.pack())
            return t
        t = await run_txn(self.kv, body, what="rmdir")
        await self.kv.delete_prefix(keys.ns_xattr_prefix(self.cid, self.volid, t.ino))
        return t

    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0,
                     is_open=lambda ino: False) -> tuple[Inode | None, bool]:
        """Atomic rename; (the replaced inode or None, True if its data must
        be freed)."""
        check_name(n2)
        if flags & ~RENAME_NOREPLACE:
            raise InvalidArgument("rename flags other than RENAME_NOREPLACE are not supported")

        async def body(txn):
            sp = await self._dir(txn, p1)
            dp = sp if p2 == p1 else await self._dir(txn, p2)
            sd = await txn.get(self.dkey(p1, n1))
            if sd is None:
                raise NotFound(f"{n1!r} not found")
            s = await self._inode(txn, unpack_ino(sd.value))
            dd = await txn.get(self.dkey(p2, n2))
            d = None
            if dd is not None:
                if flags & RENAME_NOREPLACE:
                    raise AlreadyExists(f"{n2!r} exists")
                if unpack_ino(dd.value) == s.ino:
                    return None, False             # same file: nothing to do
                d = await self._inode(txn, unpack_ino(dd.value))
                if s.is_dir and not d.is_dir:
                    raise _err(errno.ENOTDIR, f"{n2!r} is not a directory")
                if not s.is_dir and d.is_dir:
                    raise _err(errno.EISDIR, f"{n2!r} is a directory")
                if d.is_dir and not await self._empty(d.ino):
                    raise _err(errno.ENOTEMPTY, f"{n2!r} is not empty")
            if s.is_dir and p1 != p2:
                a = dp                              # no directory into itself
                while True:
                    if a.ino == s.ino:
                        raise InvalidArgument("cannot move a directory into itself")
                    if a.ino == ROOT_INO:
                        break
                    a = await self._inode(txn, a.parent)
            now = time.time_ns()
            txn.delete(self.dkey(p1, n1))
            txn.put(self.dkey(p2, n2), pack_ino(s.ino))
            s.ctime = now
            if s.is_dir:
                s.parent = p2
                if p1 != p2:
                    sp.nlink -= 1
                    dp.nlink += 1
            sp.mtime = sp.ctime = dp.mtime = dp.ctime = now
            free = False
            if d is not None:
                if d.is_dir:
                    d.nlink = 0
                    dp.nlink -= 1
                else:
                    d.nlink -= 1
                d.ctime = now
                free = self._drop_link(txn, d, is_open)
            txn.put(self.ikey(s.ino), s.pack())
            txn.put(self.ikey(p1), sp.pack())
            if p2 != p1:
                txn.put(self.ikey(p2), dp.pack())
            return d, free
        replaced, free = await run_txn(self.kv, body, what="rename")
        if free:
            await self.kv.delete_prefix(keys.ns_xattr_prefix(self.cid, self.volid, replaced.ino))
        return replaced, free

    async def setattr(self, ino: int, *, mode=None, uid=None, gid=None, size=None,
                      atime=None, mtime=None, ctime=None) -> tuple[Inode, int]:
        """Change attributes; (new inode, size before)."""
        async def body(txn):
            t = await self._inode(txn, ino)
            old = t.size
            if mode is not None:
                t.mode = (t.mode & ~0o7777) | (mode & 0o7777)
            if uid is not None:
                t.uid = uid
            if gid is not None:
                t.gid = gid
            if size is not None:
                if t.is_dir:
                    raise _err(errno.EISDIR, "cannot truncate a directory")
                t.size = size
                t.mtime = time.time_ns()
            if atime is not None:
                t.atime = atime
            if mtime is not None:
                t.mtime = mtime
            t.ctime = ctime if ctime is not None else time.time_ns()
            txn.put(self.ikey(ino), t.pack())
            return t, old
        return await run_txn(self.kv, body, what="setattr")

    async def set_size(self, ino: int, size: int, mtime: int) -> Inode:
        """Record the size and mtime a node's writes reached (at flush/close)."""
        async def body(txn):
            t = await self._inode(txn, ino)
            t.size, t.mtime, t.ctime = size, max(t.mtime, mtime), max(t.ctime, mtime)
            txn.put(self.ikey(ino), t.pack())
            return t
        return await run_txn(self.kv, body, what="update size")

    async def forget_orphan(self, ino: int) -> Inode | None:
        """The last local close of an unlinked file: delete it; the inode if
        its data must be freed."""
        okey = keys.ns_orphan_key(self.cid, self.volid, ino)

        async def body(txn):
            item = await txn.get(self.ikey(ino))
            if item is None:
                txn.delete(okey)
                return None
            t = Inode.unpack(ino, item.value, item.mod_rev)
            if t.nlink > 0:            # linked again meanwhile
                txn.delete(okey)
                return None
            txn.delete(self.ikey(ino))
            txn.delete(okey)
            return t
        t = await run_txn(self.kv, body, what="drop orphan")
        if t is not None:
            await self.kv.delete_prefix(keys.ns_xattr_prefix(self.cid, self.volid, ino))
        return t

    # -- extended attributes -------------------------------------------------------
    def xkey(self, ino: int, name: bytes) -> str:
        if not name or len(name) > XATTR_NAME_MAX or b"\0" in name:
            raise InvalidArgument("bad extended attribute name", errno=errno.ERANGE)
        return keys.ns_xattr_key(self.cid, self.volid, ino, name)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        item = await self.kv.get(self.xkey(ino, name))
        if item is None:
            await self.getattr(ino)                 # ENOENT for a vanished file
            raise _err(errno.ENODATA, "no such attribute")
        return item.value

    async def listxattr(self, ino: int) -> list[bytes]:
        prefix = keys.ns_xattr_prefix(self.cid, self.volid, ino)
        return [keys.decode_name(it.key[len(prefix):]) for it in await self.kv.range(prefix)]

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        key = self.xkey(ino, name)
        if len(value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG, "extended attribute value larger than 64 KiB")

        async def body(txn):
            t = await self._inode(txn, ino)
            old = await txn.get(key)
            if flags & XATTR_CREATE and old is not None:
                raise AlreadyExists("attribute exists")
            if flags & XATTR_REPLACE and old is None:
                raise _err(errno.ENODATA, "no such attribute")
            t.ctime = time.time_ns()
            txn.put(key, value)
            txn.put(self.ikey(ino), t.pack())
        await run_txn(self.kv, body, what="setxattr")

    async def removexattr(self, ino: int, name: bytes) -> None:
        key = self.xkey(ino, name)

        async def body(txn):
            t = await self._inode(txn, ino)
            if await txn.get(key) is None:
                raise _err(errno.ENODATA, "no such attribute")
            t.ctime = time.time_ns()
            txn.delete(key)
            txn.put(self.ikey(ino), t.pack())
        await run_txn(self.kv, body, what="removexattr")
