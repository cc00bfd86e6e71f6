"""What a mount remembers of a shared volume's namespace, and the
transaction loop that uses it.

A mount remembers the inodes it last read or wrote with their etcd
revisions.  A change's first attempt does not read them again: it compares
against the remembered revisions (and a new name against "absent") and so
costs one round trip.  If anything changed meanwhile the compare fails, the
remembered inodes are forgotten and the change runs again reading everything
-- the cache is only ever a guess that etcd checks.  The one exception is
what the shared-volume contract lets be up to a second old: ``recent`` (a
stat) and ``_listed`` (a negative lookup in a directory this mount made).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time

import trio

from ..errors import NotFound, TxnConflict
from ..meta import keys
from ..meta.txn import Txn
from .delegation import Delegated
from .records import Inode, pack_ino

#: how stale a remembered inode may be when it answers a stat (seconds)
FRESH = 0.9


class RememberedInodes:
    def __init__(self, kv, cid: str, volid: int, node: str, *, cache_size: int = 20000):
        self.kv, self.cid, self.volid, self.node = kv, cid, volid, node
        self._cache: collections.OrderedDict[int, Inode] = collections.OrderedDict()
        self._cache_size = cache_size
        self._seen: dict[int, float] = {}
        self._bare: dict[int, float] = {}     # created here without xattrs: when
        self._listing: dict[int, tuple[dict, int]] = {}   # dir -> ({name: ino}, dir rev)
        self.stats = collections.Counter()

    # -- keys ------------------------------------------------------------------
    def ikey(self, ino: int) -> str:
        return keys.ns_inode_key(self.cid, self.volid, ino)

    def dkey(self, parent: int, name: bytes) -> str:
        return keys.ns_dentry_key(self.cid, self.volid, parent, name)

    # -- the remembered inodes and the transaction loop ----------------------------
    def _remember(self, node: Inode) -> None:
        old = self._cache.get(node.ino)
        if old is not None and old.rev > node.rev:
            return      # a read that left etcd before our own newer write came back after it
        self._cache[node.ino] = dataclasses.replace(node)
        self._seen[node.ino] = time.monotonic()
        self._cache.move_to_end(node.ino)
        while len(self._cache) > self._cache_size:
            ino, _ = self._cache.popitem(last=False)
            self._seen.pop(ino, None)
            self._bare.pop(ino, None)
            self._listing.pop(ino, None)

    def recent(self, ino: int, max_age: float = FRESH) -> Inode | None:
        """The inode as this node last read or wrote it, if that was less
        than ``max_age`` seconds ago: other nodes' changes may take that
        long to show, which the shared-volume contract allows (one second)."""
        seen = self._seen.get(ino)
        if seen is not None and time.monotonic() - seen < max_age and ino in self._cache:
            return dataclasses.replace(self._cache[ino])
        return None

    def _entry(self, txn, parent: int, name: bytes, ino: int | None) -> None:
        """Record an entry change for the listings this node keeps."""
        txn.entries.append((parent, name, ino))
        if ino is None:
            txn.delete(self.dkey(parent, name))
        else:
            txn.put(self.dkey(parent, name), pack_ino(ino))

    def _listed(self, parent: int) -> dict | None:
        """The complete entries of ``parent`` if this node knows them at the
        directory's current revision, checked less than FRESH seconds ago
        (every entry change rewrites the directory's inode, so a listing
        taken at that revision is whole)."""
        got = self._listing.get(parent)
        node = self._cache.get(parent)
        seen = self._seen.get(parent)
        if got is None or node is None or seen is None or got[1] != node.rev:
            return None
        if parent not in self.marked and time.monotonic() - seen >= FRESH:
            return None          # a directory this mount holds changes only here
        return got[0]

    def _put(self, txn, node: Inode) -> None:
        txn.put(self.ikey(node.ino), node.pack())
        txn.written[node.ino] = node

    def _gone(self, txn, ino: int) -> None:
        """Delete an inode, its extended attributes and its lock records, in
        this transaction."""
        txn.delete(self.ikey(ino))
        txn.delete_prefix(keys.ns_xattr_prefix(self.cid, self.volid, ino))
        txn.delete_prefix(keys.ns_lock_prefix(self.cid, self.volid, ino))
        txn.written[ino] = None

    async def _absent(self, txn, key: str) -> bool:
        """Whether ``key`` is absent; the first attempt assumes it and lets
        etcd check."""
        if txn.attempt == 1:
            txn.expect(key, 0)
            return True
        return await txn.get(key) is None

    async def _run(self, body, what: str, flush: bool = True):
        if flush and self.has_local:           # files made in memory go first
            await self.flush_local()
        for attempt in range(1, 21):
            txn = Txn(self.kv)
            txn.attempt, txn.assumed, txn.written = attempt, set(), {}
            txn.base, txn.entries = {}, []
            try:
                result = await body(txn)
            except Delegated as exc:           # another mount holds a directory we change
                await self.recall(exc.ino, exc.writer)
                continue
            rev = await txn.commit_rev()
            if rev:
                for parent, name, ino in txn.entries:
                    got = self._listing.get(parent)
                    if got is not None and got[1] == txn.base.get(parent):
                        if ino is None:
                            got[0].pop(name, None)
                        else:
                            got[0][name] = ino
                for ino, node in txn.written.items():
                    if node is None:
                        self._cache.pop(ino, None)
                        self._listing.pop(ino, None)
                        continue
                    got = self._listing.get(ino)
                    if got is not None:
                        if got[1] == txn.base.get(ino):
                            self._listing[ino] = (got[0], rev)
                        else:
                            del self._listing[ino]
                    elif node.is_dir and ino not in txn.base:      # a new directory
                        self._listing[ino] = ({}, rev)
                    node.rev = rev
                    self._remember(node)
                self.stats["fast" if attempt == 1 else "retried"] += 1
                self.stats[what] += 1
                return result
            for ino in txn.assumed:                # a guess was wrong: read next time
                self._cache.pop(ino, None)
            if attempt > 1:
                await trio.sleep(random.uniform(0.002, 0.01 * attempt))
        raise TxnConflict(f"{what} lost its race 20 times")

    # -- reading an inode inside a change ------------------------------------------
    async def _inode(self, txn, ino: int) -> Inode:
        if getattr(txn, "attempt", 0) == 1 and ino in self._cache and self._cache[ino].rev:
            node = dataclasses.replace(self._cache[ino])
            txn.expect(self.ikey(ino), node.rev)
            txn.assumed.add(ino)
            txn.base[ino] = node.rev
            self._check_held(node)
            return node
        item = await txn.get(self.ikey(ino))
        if item is None:
            self._cache.pop(ino, None)
            raise NotFound(f"no inode {ino}")
        node = Inode.unpack(ino, item.value, item.mod_rev)
        self._remember(node)
        if hasattr(txn, "base"):
            txn.base[ino] = node.rev
            self._check_held(node)
        return node
