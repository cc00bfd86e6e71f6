"""Advisory locks on a shared volume's files, held across all its mounts:
``fcntl`` byte-range locks and ``flock`` locks, as on a local filesystem.

Each mount keeps its own locks in memory, by the lock owner the kernel
names (a process's file table for fcntl locks, an open file for flock), and
publishes them per inode in etcd under its mount lease:

* ``ns/<vol>/l/<ino>/<client>``: that mount's locks on the inode;
* ``ns/<vol>/l/<ino>/`` (the prefix itself): the inode's lock version,
  with no lease, deleted only with the inode.

Granting reads the prefix (every mount's locks and the version) in one
range, checks for conflicts, then writes this mount's record and the
version in one transaction that requires the version unchanged: of two
mounts granting at once, one transaction fails and that mount reads again.
A release only shrinks a record, so it needs no compare; one that could not
be written is retried (``repair``) until it is.  The version key must not
come and go while locks are held: a grant that read it absent would succeed
again after it vanished and came back, so it has no lease.

A mount that dies (or loses etcd for its lease's TTL) loses its locks when
its lease expires, as an NFS client's locks go with its lease; such a mount
has fenced itself (ESTALE) by then.  Every write of a mount's own record
requires its revision to be the one that mount last wrote, so a record that
expired is never written back: the mount finds out and forgets those locks.
When the mount's lease is replaced while its record still stands (a refresh
failed, the old lease still runs), the record moves to the new lease.

Waiting (F_SETLKW, flock without LOCK_NB): a release in this mount wakes
its waiters at once; one blocked by another mount's lock watches the
file's lock records in etcd, so that mount's release wakes it too, and
also looks again every 20 ms doubling up to 2 s (250 ms if etcd gives no
watch).  No fairness between waiters, and no deadlock detection across
mounts (NFS has none either); within a mount neither does the kernel
forward lock requests anywhere but here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging

import trio

from .. import codec
from ..errors import InvalidArgument, LockConflict, LockUnavailable, PxfsError
from ..meta import keys
from ..meta.kv import Compare, Delete, Put

log = logging.getLogger(__name__)

POSIX, FLOCK = "p", "f"
RD, WR, UN = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
END = 2 ** 63 - 1                 # "to the end of the file" (l_len 0)
REMOTE = -1                       # the owner of another mount's locks
POLL_MIN, POLL_MAX = 0.02, 0.25
WATCHED_POLL_MAX = 2.0            # s; with an etcd watch the poll is only a safety net
REPAIR_EVERY = 0.5                # s; a replaced lease has >= 4 s left (MOUNT_TTL 10, alive < 6)


@dataclasses.dataclass(frozen=True)
class Lock:
    owner: int
    kind: str
    type: int
    start: int
    end: int                      # inclusive
    pid: int = 0


def conflicts(held: Lock, kind: str, owner: int, type_: int, start: int, end: int) -> bool:
    """Whether ``held`` stops ``owner`` from taking [start, end] as ``type_``.
    fcntl and flock locks do not see each other, as on Linux."""
    return (held.kind == kind and held.owner != owner and held.start <= end
            and start <= held.end and WR in (held.type, type_))


def first_conflict(locks, kind: str, owner: int, type_: int, start: int,
                   end: int) -> Lock | None:
    return next((lk for lk in locks if conflicts(lk, kind, owner, type_, start, end)), None)


def apply(locks: list[Lock], owner: int, kind: str, type_: int, start: int, end: int,
          pid: int = 0) -> list[Lock]:
    """The locks after ``owner`` sets [start, end] to ``type_`` (UN unlocks):
    the owner's locks inside the range are replaced and split at its edges,
    and its touching locks of one type merge, as POSIX has it."""
    out, mine = [], []
    for lk in locks:
        if lk.owner != owner or lk.kind != kind:
            out.append(lk)
        elif lk.end < start or lk.start > end:
            mine.append(lk)
        else:
            if lk.start < start:
                mine.append(dataclasses.replace(lk, end=start - 1))
            if lk.end > end:
                mine.append(dataclasses.replace(lk, start=end + 1))
    if type_ != UN:
        mine.append(Lock(owner, kind, type_, start, end, pid))
    mine.sort(key=lambda lk: lk.start)
    merged: list[Lock] = []
    for lk in mine:
        last = merged[-1] if merged else None
        if last is not None and last.type == lk.type and last.end + 1 >= lk.start:
            merged[-1] = dataclasses.replace(last, end=max(last.end, lk.end))
        else:
            merged.append(lk)
    return out + merged


def check_request(kind: str, type_: int, start: int, end: int) -> None:
    if kind not in (POSIX, FLOCK) or type_ not in (RD, WR, UN):
        raise InvalidArgument(f"bad lock request {kind!r} type {type_}")
    if not 0 <= start <= end <= END:
        raise InvalidArgument(f"bad lock range {start}-{end}")


class NsLocks:
    """This mount's locks on one shared volume, and the view of the others'."""

    def __init__(self, kv, cid: str, volid: int, client: str, lease_fn, alive_fn=lambda: True):
        self.kv, self.cid, self.volid, self.client = kv, cid, volid, client
        self._lease = lease_fn                    # -> this mount's etcd lease (0: none)
        self._alive = alive_fn                    # -> False once that lease may have expired
        self._held: dict[int, list[Lock]] = {}    # ino -> this mount's locks
        self._record: dict[int, tuple[int, int]] = {}   # ino -> its record's (revision, lease)
        self._dirty: set[int] = set()             # records that may still show released locks
        self._mutex: dict[int, trio.Lock] = {}
        self._released = trio.Event()             # set (and replaced) on every release

    def held(self, ino: int) -> list[Lock]:
        return list(self._held.get(ino, ()))

    # -- requests -------------------------------------------------------------
    async def test(self, ino: int, kind: str, owner: int, type_: int, start: int,
                   end: int) -> Lock | None:
        """F_GETLK: a lock that would stop this one, or None."""
        check_request(kind, type_, start, end)
        holder = first_conflict(self._held.get(ino, ()), kind, owner, type_, start, end)
        if holder is None:
            others, _, _ = await self._read(ino)
            holder = first_conflict(others, kind, owner, type_, start, end)
        return holder

    async def lock(self, ino: int, kind: str, owner: int, type_: int, start: int, end: int,
                   pid: int = 0, *, wait: bool = False) -> None:
        """Take (or change, or with UN release) a lock; LockConflict when
        another owner holds a conflicting one and ``wait`` is false."""
        check_request(kind, type_, start, end)
        if type_ == UN:
            await self.unlock(ino, kind, owner, start, end)
            return
        if kind == FLOCK and any(lk.owner == owner and lk.kind == FLOCK and lk.type != type_
                                 for lk in self._held.get(ino, ())):
            # Linux converts a flock by dropping the old one first: two
            # holders of a shared lock that both upgrade do not deadlock
            await self.unlock(ino, FLOCK, owner)
        delay = POLL_MIN
        async with contextlib.AsyncExitStack() as stack:
            changes, watched = None, False
            while True:
                released = self._released
                holder = await self._try(ino, kind, owner, type_, start, end, pid)
                if holder is None:
                    return
                if not wait:
                    raise LockConflict(f"inode {ino}: range {start}-{end} is locked " + (
                        "here" if holder.owner != REMOTE else "by another mount"))
                if holder.owner == REMOTE and not watched:
                    watched = True
                    changes = await self._watch(stack, ino)
                    if changes is not None:
                        continue    # a change before the watch began is not reported: look again
                live = changes is not None and not changes.broken
                await _first(delay, released.wait, changes.wait if live else None)
                delay = min(delay * 2, WATCHED_POLL_MAX if live else POLL_MAX)

    async def unlock(self, ino: int, kind: str, owner: int, start: int = 0,
                     end: int = END) -> None:
        try:
            async with self._mx(ino):
                old = self._held.get(ino, [])
                new = apply(old, owner, kind, UN, start, end)
                if new != old:
                    # here first: the kernel holds the owner's locks released
                    # whatever etcd says; until the record says so too, repair()
                    # writes it again
                    self._store(ino, new)
                    self._dirty.add(ino)
                    with trio.CancelScope(shield=True):
                        await self._publish(ino, new)
        finally:
            self._wake()

    async def _watch(self, stack, ino: int):
        """A watch on the inode's lock records (other mounts' releases wake
        the waiter at once), or None if etcd would not give one: polling
        alone then."""
        try:
            return await stack.enter_async_context(
                self.kv.watch(keys.ns_lock_prefix(self.cid, self.volid, ino)))
        except PxfsError as exc:
            log.info("no etcd watch for a lock wait (polling): %s", exc)
            return None

    async def repair(self) -> None:
        """Write again the records a release could not write, and move
        records to the mount's current lease.  Each write requires the record
        to be as this mount last wrote it: one that expired with an old
        lease is not brought back, its locks are lost (``_lost``)."""
        lease = self._lease()
        if not lease:
            return
        for ino in sorted(self._dirty | {i for i in self._held if self._record.get(i, (0, 0))[1] != lease}):
            async with self._mx(ino):
                try:
                    await self._publish(ino, self._held.get(ino, []))
                except PxfsError as exc:
                    log.warning("volume %s: lock record of inode %d not written: %s",
                                self.volid, ino, exc)

    async def service(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(REPAIR_EVERY)
            await self.repair()

    async def drop_owner(self, ino: int, kind: str, owner: int) -> None:
        """Every lock ``owner`` holds on ``ino`` goes (close, last release)."""
        if any(lk.owner == owner and lk.kind == kind for lk in self._held.get(ino, ())):
            await self.unlock(ino, kind, owner)

    # -- internals ----------------------------------------------------------------
    async def _try(self, ino, kind, owner, type_, start, end, pid) -> Lock | None:
        """One attempt: None once granted, else the lock in the way."""
        while True:
            async with self._mx(ino):
                holder = first_conflict(self._held.get(ino, ()), kind, owner, type_, start, end)
                if holder is not None:
                    return holder
                others, version, mine = await self._read(ino)
                if mine != self._record.get(ino, (0, 0))[0]:
                    self._lost(ino)
                holder = first_conflict(others, kind, owner, type_, start, end)
                if holder is not None:
                    return holder
                held = self._held.get(ino, [])
                new = apply(held, owner, kind, type_, start, end, pid)
                if await self._publish(ino, new, version):
                    self._store(ino, new)
                    return None
            # another mount granted a lock on this inode meanwhile: look again

    async def _read(self, ino: int) -> tuple[list[Lock], int, int]:
        """Other mounts' locks on ``ino``, the inode's lock version and the
        revision of this mount's record (0: none)."""
        prefix = keys.ns_lock_prefix(self.cid, self.volid, ino)
        key = keys.ns_lock_key(self.cid, self.volid, ino, self.client)
        others, version, mine = [], 0, 0
        for it in await self.kv.range(prefix):
            if it.key == prefix:
                version = it.mod_rev
            elif it.key == key:
                mine = it.mod_rev
            else:
                others.extend(self._decode(it.key, it.value))
        return others, version, mine

    def _lost(self, ino: int) -> None:
        """This mount's record of ``ino`` is not as it wrote it: it expired
        with a lease this mount lost (or the file was deleted).  Its locks
        there are gone for the rest of the cluster; forget them here too."""
        if self._held.get(ino):
            log.warning("volume %s: the locks on inode %d were lost with this mount's etcd "
                        "lease", self.volid, ino)
        self._held.pop(ino, None)
        self._record.pop(ino, None)
        self._dirty.discard(ino)
        self._wake()

    @staticmethod
    def _decode(key: str, value: bytes) -> list[Lock]:
        try:
            return [Lock(REMOTE, str(k), int(t), int(s), int(e), 0)
                    for k, t, s, e, _pid in codec.unpack(value)]
        except (PxfsError, TypeError, ValueError) as exc:
            # fail safe: an unreadable record of another mount blocks the whole file
            log.warning("unreadable lock record %s (%s): treated as a lock on the whole file",
                        key, exc)
            return [Lock(REMOTE, kind, WR, 0, END) for kind in (POSIX, FLOCK)]

    async def _publish(self, ino: int, locks: list[Lock], version: int | None = None) -> bool:
        """Write this mount's record for ``ino``.  With ``version`` (a grant):
        only if the inode's lock version is still that, bumping it."""
        key = keys.ns_lock_key(self.cid, self.volid, ino, self.client)
        lease = self._lease()
        value = codec.pack([[lk.kind, lk.type, lk.start, lk.end, lk.pid] for lk in locks])
        mine = Compare(key, self._record.get(ino, (0, 0))[0])   # the record is as this mount left it
        if version is None:
            # a release (or repair): only shrinks the record or moves it to
            # the current lease.  Without a lease it waits (dirty) for one
            if not lease:
                self._dirty.add(ino)
                return True
            rev = await self.kv.commit([mine], [Put(key, value, lease) if locks else Delete(key)])
            if not rev:
                self._lost(ino)
                return True
        else:
            if not lease or not self._alive():
                raise LockUnavailable(f"volume {self.volid}: this mount has no live etcd "
                                      "lease; locks cannot be granted")
            prefix = keys.ns_lock_prefix(self.cid, self.volid, ino)
            rev = await self.kv.commit([Compare(prefix, version), mine],
                                       [Put(prefix, b""), Put(key, value, lease)])
            if not rev:
                return False        # _try reads again (and finds out if the record was lost)
        self._dirty.discard(ino)
        if locks:
            self._record[ino] = (rev, lease)
        else:
            self._record.pop(ino, None)
        return True

    def _store(self, ino: int, locks: list[Lock]) -> None:
        if locks:
            self._held[ino] = locks
        else:
            self._held.pop(ino, None)

    def _mx(self, ino: int) -> "_InodeMutex":
        return _InodeMutex(self._mutex, ino)

    def _wake(self) -> None:
        self._released.set()
        self._released = trio.Event()


async def _first(timeout: float, *waits) -> None:
    """Until the first of ``waits`` (async callables; None ignored) returns,
    or ``timeout`` passes."""
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = trio.current_time() + timeout

        async def one(fn):
            await fn()
            nursery.cancel_scope.cancel()
        for fn in waits:
            if fn is not None:
                nursery.start_soon(one, fn)


class _InodeMutex:
    """Serializes one inode's lock changes in this mount; forgets the mutex
    when nobody holds or waits for it, so the map does not grow with every
    file ever locked."""
    __slots__ = ("table", "ino", "mx")

    def __init__(self, table: dict, ino: int):
        self.table, self.ino = table, ino

    async def __aenter__(self):
        self.mx = self.table.setdefault(self.ino, trio.Lock())
        await self.mx.acquire()

    async def __aexit__(self, *exc):
        self.mx.release()
        if not self.mx.locked() and not self.mx.statistics().tasks_waiting:
            if self.table.get(self.ino) is self.mx:
                del self.table[self.ino]
