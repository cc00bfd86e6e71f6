"""The metadata of a shared volume's namespace, kept in etcd.

Every change is one transaction that compares the revision of every key it
read (parents, entries, inodes) and retries on conflict, so two nodes never
both create the same name or both rename into one: the loser's compare fails,
its body runs again and sees the winner's entry.  A change to a directory's
entries always rewrites the directory's inode (mtime, ctime), which is what
makes ``rmdir``'s emptiness check safe against a create racing it.

Round trips: see remembered.py (first attempts compare against remembered
revisions); extended attributes: xattrs.py.
"""

from __future__ import annotations

import dataclasses
import errno
import stat
import time

import trio

from .. import codec
from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..meta import keys
from ..meta.txn import run_txn
from .records import ROOT_INO, SYMLINK_MAX, Inode, check_name, ns_error as _err, unpack_ino
from .delegation import DelegatedDirs
from .remembered import RememberedInodes
from .xattrs import XattrOps

#: inode numbers a node takes from the shared counter at a time
INO_BATCH = 1024
#: file data lives in chunk ``ino << 24 | n``: inode numbers stay below 2**40
INO_MAX = (1 << 40) - 1
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def root_ops(cid: str, volid: int, *, uid: int = 0, gid: int = 0, mode: int = 0o755):
    """(key, value) pairs that make an empty namespace: the root directory
    and the inode counter."""
    now = time.time_ns()
    root = Inode(ROOT_INO, stat.S_IFDIR | mode, uid, gid, nlink=2, atime=now, mtime=now,
                 ctime=now, parent=ROOT_INO)
    return [(keys.ns_inode_key(cid, volid, ROOT_INO), root.pack()),
            (keys.ns_next_key(cid, volid), codec.pack(ROOT_INO + 1))]


class NsMeta(XattrOps, DelegatedDirs, RememberedInodes):
    def __init__(self, kv, cid: str, volid: int, node: str, *, cache_size: int = 20000):
        super().__init__(kv, cid, volid, node, cache_size=cache_size)
        self._init_delegation()
        self._next = self._end = 0
        self._ino_lock = trio.Lock()

    # -- reads -----------------------------------------------------------------
    async def getattr(self, ino: int) -> Inode:
        local = self.local_inode(ino)
        if local is not None:
            return local
        node = await self._inode(self.kv, ino)
        cached = self._cache.get(ino)
        if cached is not None and cached.rev > node.rev:
            # our own newer write committed while this read was on its way
            return dataclasses.replace(cached)
        return node

    async def inodes(self, inos: list[int]) -> list[Inode | None]:
        items = await self.kv.get_many([self.ikey(i) for i in inos])
        out = [Inode.unpack(i, it.value, it.mod_rev) if it else None for i, it in zip(inos, items)]
        for node in out:
            if node is not None:
                self._remember(node)
        return out

    async def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > 255:
            raise InvalidArgument("file name longer than 255 bytes", errno=errno.ENAMETOOLONG)
        listed = self._listed(parent)
        if listed is not None:              # this node knows the whole directory
            child = listed.get(name)
            if child is None:
                self.stats["negative lookups saved"] += 1
                raise NotFound(f"{name!r} not found")
            return await self.getattr(child)
        await self.usable_dir(parent)
        item = await self.kv.get(self.dkey(parent, name))
        if item is None:
            raise NotFound(f"{name!r} not found")
        return await self.getattr(unpack_ino(item.value))

    async def listdir(self, ino: int) -> list[tuple[bytes, int]]:
        if self.has_local:
            await self.flush_local()
        await self.usable_dir(ino)
        prefix = keys.ns_dir_prefix(self.cid, self.volid, ino)
        items = await self.kv.range(prefix)
        return [(keys.decode_name(it.key[len(prefix):]), unpack_ino(it.value)) for it in items]

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
                    rdev: int = 0, target: bytes | None = None, writer: str = "") -> Inode:
        """Create a file, directory, symlink, fifo...; EEXIST if the name is
        taken.  ``writer``: mark the new file as being written by that mount."""
        check_name(name)
        if target is not None and len(target) > SYMLINK_MAX:
            raise InvalidArgument("symlink target too long", errno=errno.ENAMETOOLONG)
        is_dir = stat.S_ISDIR(mode)
        if writer and (is_dir or stat.S_ISREG(mode)) and parent in self.marked:
            made = await self.create_local(parent, name, mode, uid, gid)
            if made is not None:
                return made
        ino = await self._alloc_ino()

        async def body(txn):
            p = await self._dir(txn, parent)
            if not await self._absent(txn, self.dkey(parent, name)):
                raise AlreadyExists(f"{name!r} exists")
            now = time.time_ns()
            g, m = gid, mode
            if p.mode & stat.S_ISGID:             # setgid directories pass their group on
                g = p.gid
                if is_dir:
                    m |= stat.S_ISGID
            new = Inode(ino, m, uid, g, nlink=2 if is_dir else 1, atime=now, mtime=now,
                        ctime=now, rdev=rdev, parent=parent if is_dir else 0, target=target,
                        writer=writer)
            p.mtime = p.ctime = now
            if is_dir:
                p.nlink += 1
            self._put(txn, new)
            self._entry(txn, parent, name, ino)
            self._bare[ino] = time.monotonic()
            self._put(txn, p)
            return new
        made = await self._run(body, "create")
        if is_dir and writer:
            self.marked.add(made.ino)          # held by this mount from its creation
            self._last_local = time.monotonic()
        return made

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        check_name(name)

        async def body(txn):
            t = await self._inode(txn, ino)
            if t.is_dir:
                raise _err(errno.EPERM, "hard links to directories are not allowed")
            if t.nlink == 0:
                raise NotFound("file was removed")
            p = await self._dir(txn, parent)
            if not await self._absent(txn, self.dkey(parent, name)):
                raise AlreadyExists(f"{name!r} exists")
            now = time.time_ns()
            t.nlink += 1
            t.ctime = p.mtime = p.ctime = now
            self._put(txn, t)
            self._put(txn, p)
            self._entry(txn, parent, name, ino)
            return t
        return await self._run(body, "link")

    def _drop_link(self, txn, t: Inode, is_open) -> bool:
        """One name of ``t`` is gone: write it back, keep it as an orphan
        while it is open here, or delete it.  True if its data can go."""
        if t.nlink > 0:
            self._put(txn, t)
            return False
        if not t.is_dir and is_open(t.ino):
            self._put(txn, t)
            txn.put(keys.ns_orphan_key(self.cid, self.volid, t.ino), codec.pack(self.node))
            return False
        self._gone(txn, t.ino)
        return True

    async def _child(self, txn, parent: int, name: bytes) -> tuple[Inode, Inode]:
        """(directory, the inode its entry ``name`` names), both compared."""
        p = await self._dir(txn, parent)
        d = await txn.get(self.dkey(parent, name))
        if d is None:
            raise NotFound(f"{name!r} not found")
        return p, await self._inode(txn, unpack_ino(d.value))

    async def unlink(self, parent: int, name: bytes, is_open=lambda ino: False) -> tuple[Inode, bool]:
        """Remove a non-directory name; (inode, True if its data must be freed)."""
        async def body(txn):
            p, t = await self._child(txn, parent, name)
            if t.is_dir:
                raise _err(errno.EISDIR, f"{name!r} is a directory")
            now = time.time_ns()
            t.nlink -= 1
            t.ctime = p.mtime = p.ctime = now
            self._entry(txn, parent, name, None)
            self._put(txn, p)
            return t, self._drop_link(txn, t, is_open)
        return await self._run(body, "unlink")

    async def rmdir(self, parent: int, name: bytes) -> Inode:
        async def body(txn):
            p, t = await self._child(txn, parent, name)
            if not t.is_dir:
                raise _err(errno.ENOTDIR, f"{name!r} is not a directory")
            # a create racing this rewrites t (its mtime), failing our compare
            if not await self._empty(t.ino):
                raise _err(errno.ENOTEMPTY, f"{name!r} is not empty")
            now = time.time_ns()
            p.nlink -= 1
            p.mtime = p.ctime = now
            self._entry(txn, parent, name, None)
            self._gone(txn, t.ino)
            self._put(txn, p)
            return t
        return await self._run(body, "rmdir")

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
            if txn.attempt == 1:                # assume the common case: a new name
                txn.expect(self.dkey(p2, n2), 0)
                dd = None
            else:
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
            self._entry(txn, p1, n1, None)
            self._entry(txn, p2, n2, s.ino)
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
            self._put(txn, s)
            self._put(txn, sp)
            if p2 != p1:
                self._put(txn, dp)
            return d, free
        return await self._run(body, "rename")

    async def setattr(self, ino: int, *, size=None, **fields) -> tuple[Inode, int]:
        """Change attributes (``size`` and Inode.apply's fields); (new
        inode, size before)."""
        if size is None and ino in self.marked:
            async with self._flush_lock:
                made = self.setattr_local(ino, fields)
            if made is not None:
                return made, made.size

        async def body(txn):
            t = await self._inode(txn, ino)
            old = t.size
            if size is not None:
                if t.is_dir:
                    raise _err(errno.EISDIR, "cannot truncate a directory")
                t.size = size
                t.mtime = time.time_ns()
            t.apply({"ctime": time.time_ns(), **{k: v for k, v in fields.items() if v is not None}})
            self._put(txn, t)
            return t, old
        return await self._run(body, "setattr")

    async def set_size(self, ino: int, size: int, mtime: int, attrs: dict | None = None,
                       clear_writer: bool = False) -> Inode:
        """Record what a node's writes and deferred attribute changes did to a
        file it has open (at close, fsync, or within a second): the size, the
        mtime of the last write, and ``attrs`` (mode, uid, gid, atime, mtime,
        ctime as setattr takes them; an explicit mtime wins over the write's).
        ``clear_writer``: this mount's writer mark goes too."""
        got = await self.set_sizes([(ino, size, mtime, attrs or {}, clear_writer)])
        if ino not in got:
            raise NotFound(f"no inode {ino}")
        if not got[ino].rev:                   # made in memory: in etcd now (fsync needs it)
            await self.flush_local()
            return await self.getattr(ino)
        return got[ino]

    async def set_sizes(self, records: list[tuple]) -> dict[int, Inode]:
        """set_size for many files in one transaction: records of (ino,
        size, mtime, attrs, clear_writer); files gone meanwhile are skipped.
        The inodes written, by number."""
        out: dict[int, Inode] = {}
        rest = []
        async with self._flush_lock:           # not while a flush is taking them to etcd
            for rec in records:                # files still only in memory change there
                made = self.update_local(*rec)
                if made is not None:
                    out[rec[0]] = made
                else:
                    rest.append(rec)
        if not rest:
            return out

        async def body(txn):
            out = {}
            for ino, size, mtime, attrs, clear in rest:
                try:
                    t = await self._inode(txn, ino)
                except NotFound:
                    continue
                t.size, t.mtime, t.ctime = size, max(t.mtime, mtime), max(t.ctime, mtime)
                t.apply(attrs)
                if clear and t.writer == self.node:
                    t.writer = ""
                self._put(txn, t)
                out[ino] = t
            return out
        out.update(await self._run(body, "update size", flush=False))
        return out

    async def clear_writer(self, ino: int, writer: str) -> Inode:
        """Drop the writer mark of a mount that is gone (its changes since
        the file's creation were never recorded, as after a crash)."""
        async def body(txn):
            t = await self._inode(txn, ino)
            if t.writer == writer:
                t.writer = ""
                self._put(txn, t)
            return t
        return await self._run(body, "clear writer mark")

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
            self._gone(txn, ino)
            txn.delete(okey)
            return t
        return await self._run(body, "drop orphan")
