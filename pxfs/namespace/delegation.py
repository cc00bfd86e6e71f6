"""Directories delegated to the mount that made them.

A directory made by a mount carries that mount's writer mark (its client
id) from its creation on.  While the mark is there the mount is the only
one that changes the directory's entries, so it knows them all, and a new
file in it needs no round trip: the mount checks the name against its own
listing, gives the file an inode number from its batch and keeps the
inode, the entry and the directory's new mtime in memory.  They reach etcd
in one transaction per ~40 files, before any other change this mount makes
(``_run`` flushes first), at fsync, and at least every half second.

Any other mount that is about to look into, list or change a marked
directory recalls it first: it puts ``recall/<dir>``, and the holder (which
polls for recalls while it holds marks) commits what it keeps and clears the
mark; if the holder's mount record is gone, the recaller clears the mark
itself (what the dead mount kept in memory is lost, as un-fsynced changes
are).  A commit of the holder compares the directory's revision, so after a
mark was cleared behind its back (it was cut off for longer than its record
lives, and fenced itself) nothing it kept can land.  Stat of a marked
directory from elsewhere needs no recall (it may be a second old anyway).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import stat
import time

import trio

from .. import codec
from ..errors import AlreadyExists, Fenced, NotFound, PxfsError
from ..meta import keys
from ..meta.kv import Compare, Delete, Put
from .records import Inode, ns_error as _err, pack_ino

log = logging.getLogger(__name__)

#: new files one transaction commits (2 operations each; etcd allows 128)
LOCAL_BATCH = 40
#: how often a mount holding directories looks for recalls (s)
RECALL_POLL = 0.05
#: held directories are given up after this long without a change made in memory (s)
IDLE_RELEASE = 10.0


class Delegated(PxfsError):
    """A directory another mount holds; recall it and try again."""

    errno = errno.EAGAIN

    def __init__(self, ino: int, writer: str):
        super().__init__(f"directory {ino} is held by {writer}")
        self.ino, self.writer = ino, writer


class DelegatedDirs:
    """Mixin for NsMeta (needs RememberedInodes' cache and listings)."""

    def _init_delegation(self) -> None:
        self.marked: set[int] = set()          # directories this mount holds
        self._local: dict[int, tuple[int, bytes]] = {}    # new ino -> (dir, name), not in etcd
        self._local_inodes: dict[int, Inode] = {}
        self._dir_mtime: dict[int, int] = {}    # held dirs changed in memory -> new mtime
        self._dir_links: dict[int, int] = {}    # ... -> subdirectories made in memory
        self._dir_attrs: dict[int, dict] = {}   # ... -> attribute changes made in memory
        self._flush_lock = trio.Lock()
        self._last_local = 0.0                  # when something was last made in memory

    def recall_key(self, ino: int) -> str:
        return keys.ns_recall_key(self.cid, self.volid, ino)

    def _check_held(self, node: Inode) -> None:
        """Inside a change: a directory another mount holds must be recalled."""
        if node.is_dir and node.writer and node.writer != self.node:
            raise Delegated(node.ino, node.writer)

    # -- the holder -------------------------------------------------------------
    def local_inode(self, ino: int) -> Inode | None:
        node = self._local_inodes.get(ino)
        return dataclasses.replace(node) if node is not None else None

    @property
    def has_local(self) -> bool:
        return bool(self._local or self._dir_mtime or self._dir_attrs)

    def setattr_local(self, ino: int, fields: dict) -> Inode | None:
        """chmod/chown/utime of a directory this mount holds, kept in memory
        (tar sets every directory's attributes when it is done with it)."""
        if self._held_listing(ino) is None:
            return None
        fields = {"ctime": time.time_ns(), **{k: v for k, v in fields.items() if v is not None}}
        t = self._local_inodes.get(ino)
        if t is not None:
            t.apply(fields)
        else:
            self._dir_attrs.setdefault(ino, {}).update(fields)
        node = self._cache[ino]
        node.apply(fields)
        self._seen[ino] = self._last_local = time.monotonic()
        return dataclasses.replace(node)

    def _held_listing(self, parent: int):
        """(entries, directory inode) of a directory this mount holds and
        knows whole, or None."""
        got = self._listing.get(parent)
        dnode = self._local_inodes.get(parent) or self._cache.get(parent)
        if parent not in self.marked or got is None or dnode is None or got[1] != dnode.rev:
            return None
        return got[0], dnode

    async def create_local(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode | None:
        """A regular file or a directory in a directory this mount holds,
        made in memory; None when the directory is not held (the caller
        goes to etcd).  A directory made so is held too."""
        if self._held_listing(parent) is None:
            return None
        ino = await self._alloc_ino()
        async with self._flush_lock:            # not while a flush takes the parent to etcd
            held = self._held_listing(parent)
            if held is None:
                return None                     # given up meanwhile: go to etcd
            entries, dnode = held
            if name in entries:
                raise AlreadyExists(f"{name!r} exists")
            now = time.time_ns()
            is_dir = stat.S_ISDIR(mode)
            g, m = gid, mode
            if dnode.mode & stat.S_ISGID:       # setgid directories pass their group on
                g = dnode.gid
                if is_dir:
                    m |= stat.S_ISGID
            new = Inode(ino, m, uid, g, nlink=2 if is_dir else 1, atime=now, mtime=now, ctime=now,
                        parent=parent if is_dir else 0, writer=self.node)
            entries[name] = ino
            self._local[ino] = (parent, name)
            self._local_inodes[ino] = new
            pl = self._local_inodes.get(parent)
            if pl is not None:                  # the parent is itself only in memory
                pl.mtime = pl.ctime = now
                pl.nlink += is_dir
                self._cache[parent] = dataclasses.replace(pl)
            else:
                self._dir_mtime[parent] = now
                if is_dir:
                    self._dir_links[parent] = self._dir_links.get(parent, 0) + 1
            self._cache[ino] = dataclasses.replace(new)
            self._seen[ino] = time.monotonic()
            if is_dir:
                self.marked.add(ino)
                self._listing[ino] = ({}, 0)
            else:
                self._bare[ino] = time.monotonic()
            self.stats["local creates"] += 1
            self._last_local = time.monotonic()
            return dataclasses.replace(new)

    def update_local(self, ino: int, size: int, mtime: int, attrs: dict, clear: bool) -> Inode | None:
        """set_size for a file still only in memory."""
        t = self._local_inodes.get(ino)
        if t is None:
            return None
        t.size, t.mtime, t.ctime = size, max(t.mtime, mtime), max(t.ctime, mtime)
        t.apply(attrs)
        if clear and t.writer == self.node:
            t.writer = ""
        self._cache[ino] = dataclasses.replace(t, rev=0)
        self._seen[ino] = time.monotonic()
        return dataclasses.replace(t)

    async def flush_local(self, full_only: bool = False) -> None:
        """Commit the files made in memory and the held directories' changes
        (``full_only``: only whole batches of files, the oldest first)."""
        async with self._flush_lock:
            races = 0
            while True:
                inos = list(self._local)[:LOCAL_BATCH]
                if len(inos) >= (LOCAL_BATCH if full_only else 1):
                    dirs = {self._local[i][0] for i in inos} - set(inos)
                    if dirs & self._local_inodes.keys():
                        # never: _local keeps a directory made in memory before its children
                        raise Fenced("a directory made in memory is not in etcd yet")
                elif not full_only and self._dir_attrs:
                    inos, dirs = [], list(self._dir_attrs)[:60]   # attributes alone changed
                else:
                    break
                compares, ops, out = await self._dir_puts(dirs)
                for i in inos:
                    parent, name = self._local[i]
                    ops.append(Put(self.dkey(parent, name), pack_ino(i)))
                    ops.append(Put(self.ikey(i), self._local_inodes[i].pack()))
                rev = await self.kv.commit(compares, ops)
                if not rev and races < 20:
                    # a change of ours to one of these directories landed meanwhile
                    races += 1
                    self._forget_dirs(dirs)
                    continue
                if not rev:
                    lost = len(self._local)
                    for pending in (self._local, self._local_inodes, self._dir_mtime,
                                    self._dir_links, self._dir_attrs):
                        pending.clear()
                    self.marked.difference_update(dirs)
                    self._forget_dirs(dirs)
                    raise Fenced(f"a directory this mount held was taken from it; {lost} new "
                                 "file(s) were lost")
                for i in inos:
                    self._local.pop(i)
                    t = self._local_inodes.pop(i)
                    t.rev = rev
                    self._cache[i] = dataclasses.replace(t)
                    got = self._listing.get(i)        # a directory made in memory
                    if got is not None and got[1] == 0:
                        self._listing[i] = (got[0], rev)
                self._dirs_committed(out, rev)
                self.stats["local batches"] += 1

    async def _held(self, d: int) -> Inode | None:
        """A copy of held directory ``d`` as remembered (or read back if it
        fell out of the cache); None if it is not ours any more."""
        node = self._cache.get(d)
        if node is None or not node.rev:
            item = await self.kv.get(self.ikey(d))
            if item is None:
                return None
            node = Inode.unpack(d, item.value, item.mod_rev)
        if node.writer != self.node:
            return None
        return dataclasses.replace(node)

    async def _dir_puts(self, dirs, *, release: bool = False):
        """(compares, puts, {dir: (revision read, new record)}) writing held
        directories with what changed in memory (and, ``release``, without
        the mark; a directory no longer ours is then skipped)."""
        compares, ops, out = [], [], {}
        for d in dirs:
            node = await self._held(d)
            if node is None:
                if release:
                    continue
                raise Fenced(f"directory {d} is no longer held by this mount")
            old, mt = node.rev, self._dir_mtime.get(d, 0)
            node.mtime, node.ctime = max(node.mtime, mt), max(node.ctime, mt)
            node.nlink += self._dir_links.get(d, 0)
            node.apply(self._dir_attrs.get(d, {}))
            if release:
                node.writer = ""
            compares.append(Compare(self.ikey(d), old))
            ops.append(Put(self.ikey(d), node.pack()))
            out[d] = (old, node)
        return compares, ops, out

    def _dirs_committed(self, out: dict, rev: int) -> None:
        for d, (old, node) in out.items():
            for pending in (self._dir_mtime, self._dir_links, self._dir_attrs):
                pending.pop(d, None)
            node.rev = rev
            self._cache[d] = node
            got = self._listing.get(d)
            if got is not None and got[1] == old:
                self._listing[d] = (got[0], rev)
            else:
                self._listing.pop(d, None)    # no longer known whole: etcd decides

    def _forget_dirs(self, dirs) -> None:
        for d in dirs:
            self._cache.pop(d, None)
            self._listing.pop(d, None)

    async def release(self, inos: list[int], recalls: list[str] = ()) -> None:
        """Give up held directories: what is in memory first, then the marks."""
        inos = [i for i in inos if i in self.marked]
        self.marked.difference_update(inos)     # no new files in memory in them from now
        await self.flush_local()
        for start in range(0, len(inos), 60):
            part = inos[start:start + 60]
            for _ in range(20):   # our own changes to them may be landing meanwhile
                compares, ops, out = await self._dir_puts(part, release=True)
                ops += [Delete(k) for k in recalls if k.endswith(tuple(f"/{d:x}" for d in part))]
                rev = await self.kv.commit(compares, ops) if ops else 1
                if rev:
                    break
                self._forget_dirs(part)
            else:
                raise PxfsError("could not give up held directories: too many races")
            self._dirs_committed(out, rev)

    async def serve_recalls(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """While this mount holds directories, answer recalls of them."""
        task_status.started()
        prefix = keys.ns_recall_prefix(self.cid, self.volid)
        while True:
            await trio.sleep(RECALL_POLL)
            if not self.marked:
                continue
            try:
                if time.monotonic() - self._last_local > IDLE_RELEASE:
                    # nothing made here for a while: stop holding (and polling)
                    await self.release(list(self.marked))
                    continue
                items = await self.kv.range(prefix)
                wanted = [int(keys.last_part(i.key), 16) for i in items]
                held = [d for d in wanted if d in self.marked]
                if held:
                    await self.release(held, [i.key for i in items])
            except PxfsError as exc:
                log.info("answering recalls failed: %s", exc)

    # -- everyone else ------------------------------------------------------------
    async def writer_gone(self, writer: str) -> bool:
        return await self.kv.get(keys.nsmount_key(self.cid, self.volid, writer)) is None

    async def recall(self, ino: int, writer: str, timeout: float = 30.0) -> None:
        """Ask the mount holding directory ``ino`` to give it up; wait."""
        key = self.recall_key(ino)
        await self.kv.txn([], [Put(key, codec.pack(self.node))])
        start = checked = time.monotonic()
        try:
            while True:
                item = await self.kv.get(self.ikey(ino))
                if item is None:
                    break
                node = Inode.unpack(ino, item.value, item.mod_rev)
                if node.writer != writer:
                    break
                now = time.monotonic()
                if now - checked >= 0.2:
                    checked = now
                    if await self.writer_gone(writer):
                        node.writer = ""
                        if await self.kv.txn([Compare(self.ikey(ino), node.rev)],
                                             [Put(self.ikey(ino), node.pack())]):
                            log.info("directory %d was held by %s, which is gone", ino, writer)
                            break
                        continue
                if now - start > timeout:
                    raise _err(errno.EAGAIN, f"directory {ino} is still held by {writer}")
                await trio.sleep(0.003)
        finally:
            self._cache.pop(ino, None)
            self._listing.pop(ino, None)
            self.stats["recalls"] += 1
            await self.kv.txn([], [Delete(key)])

    async def usable_dir(self, ino: int) -> None:
        """Before reading a directory's entries: recall it if someone else holds it."""
        node = self._cache.get(ino)
        if node is None:
            try:
                node = await self.getattr(ino)
            except NotFound:
                return
        if node.is_dir and node.writer and node.writer != self.node:
            await self.recall(ino, node.writer)
