"""A shared volume as one node serves it: the namespace in etcd (NsMeta),
file data in the replicated chunk store, and the files open on this node.

File data: byte ``o`` of inode ``ino`` lives in chunk ``ino << 24 | o //
CHUNK_SIZE`` of the volume, so a file holds at most 16 TiB and every
chunk-level mechanism (checksums, fan-out, flush, resync) is the block
volumes' own.

Consistency across nodes is close-to-open: ``open`` reads the inode from
etcd; writes extend a size kept here, recorded in etcd at flush (close),
fsync and last release; a reader elsewhere sees it at its next open.

Two things keep untar-like work off the critical path.  Writes go to the
replicas behind the caller's back (in order per file, at most
``WRITE_BEHIND`` at once); whatever needs them done -- a read here, a size
change, fsync, the record of the file's size -- waits for the file's queue
first.  And a file this mount created carries a writer mark (its client id)
in etcd from its creation on: its close does not wait for the record of its
size, which a batcher commits for many files at once a few milliseconds
later, after their data has landed, clearing the marks.  An open on another
mount that finds a foreign mark waits until it goes (or until the marking
mount's record is gone, when it clears the mark itself), so what was closed
here is what the next open elsewhere sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import time

import trio

from .. import CHUNK_SIZE, CSUM_BLOCK
from ..errors import Fenced, NoSpace, PxfsError
from ..meta import keys
from ..meta.kv import Put
from .. import codec
from .meta import NsMeta
from .records import Inode

log = logging.getLogger(__name__)
CHUNK_BITS = 24
FILE_MAX = CHUNK_SIZE << CHUNK_BITS          # 16 TiB
#: a ReplicatedVolume spanning every chunk index
SPAN = 1 << (64 + 20)
#: replicated writes in flight behind callers' backs, per mount
WRITE_BEHIND = 64
#: files whose records one batch commits (etcd allows 128 operations)
BATCH = 100
#: how long a closed file's record may wait for others to share its transaction (s)
BATCH_WINDOW = 0.03


@dataclasses.dataclass
class OpenFile:
    inode: Inode
    count: int = 0
    size: int = 0
    mtime: int = 0
    dirty: bool = False            # size/mtime/attrs not yet recorded in etcd
    attrs: dict = dataclasses.field(default_factory=dict)   # deferred setattr fields
    since: float = 0.0             # when it became dirty (monotonic)
    fresh: bool = False            # created here; its writer mark is still in etcd
    recording: int = 0             # records of it in flight (etcd is behind us till done)
    inflight: dict = dataclasses.field(default_factory=dict)  # attrs those records carry
    tail: trio.Event | None = None # set when the last queued write is done
    error: PxfsError | None = None # a queued write's failure, for the next waiter


class Usage:
    """Bytes and inodes this node added to the volume, recorded under
    ``use/<node>`` now and then; statfs sums every node's record."""

    def __init__(self, kv, cid: str, volid: int, node: str):
        self.kv, self.key = kv, keys.ns_use_key(cid, volid, node)
        self.prefix = keys.ns_use_prefix(cid, volid)
        self.bytes = self.inodes = 0
        self.others = (0, 0)
        self._recorded = None

    async def load(self) -> None:
        item = await self.kv.get(self.key)
        if item is not None:
            self.bytes, self.inodes = codec.unpack(item.value)
        await self.refresh()

    async def refresh(self) -> None:
        total_b = total_i = 0
        for it in await self.kv.range(self.prefix):
            if it.key != self.key:
                b, i = codec.unpack(it.value)
                total_b, total_i = total_b + b, total_i + i
        self.others = (total_b, total_i)

    async def record(self) -> None:
        now = (self.bytes, self.inodes)
        if now != self._recorded:
            await self.kv.txn([], [Put(self.key, codec.pack(list(now)))])
            self._recorded = now

    @property
    def used(self) -> tuple[int, int]:
        return max(0, self.bytes + self.others[0]), max(0, self.inodes + self.others[1])


def lock_in_use(lock: trio.Lock | None) -> bool:
    return lock is not None and (lock.locked() or lock.statistics().tasks_waiting > 0)


class SharedVolume:
    def __init__(self, name: str, volid: int, capacity: int, meta: NsMeta, vol, *,
                 alive=lambda: True):
        self.name, self.volid, self.capacity = name, volid, capacity
        self.meta, self.vol = meta, vol
        self._alive = alive                  # False: this mount lost the cluster: stop writing
        self.usage = Usage(meta.kv, meta.cid, volid, meta.node)
        self.files: dict[int, OpenFile] = {}
        self._locks: dict[int, trio.Lock] = {}
        self._orphans: set[int] = set()      # unlinked here while open here
        self._nursery = None                 # write-behind and batcher run here (service)
        self._slots = trio.Semaphore(WRITE_BEHIND)
        self._pending: set[int] = set()      # closed fresh files awaiting their record
        self._wake = trio.Event()
        self._gone_writers: set[str] = set()

    def _lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    @staticmethod
    def base(ino: int) -> int:
        return (ino << CHUNK_BITS) * CHUNK_SIZE

    def is_open(self, ino: int) -> bool:
        f = self.files.get(ino)
        return f is not None and f.count > 0

    def overlay(self, inode: Inode) -> Inode:
        """What this node knows beyond etcd: sizes and attribute changes of
        files it has open and has not recorded yet."""
        f = self.files.get(inode.ino)
        if f is not None and (f.dirty or f.recording or f.fresh):
            inode.size, inode.mtime = f.size, max(inode.mtime, f.mtime)
            inode.ctime = max(inode.ctime, f.mtime)
            inode.apply({**f.inflight, **f.attrs})    # etcd may not have them yet
        return inode

    @staticmethod
    def _take(f: OpenFile) -> dict:
        """Start a record of ``f``: its deferred attributes, which stay
        visible to stat() until the record is in etcd."""
        attrs, f.attrs, f.dirty = f.attrs, {}, False
        f.inflight.update(attrs)
        f.recording += 1
        return attrs

    @staticmethod
    def _taken(f: OpenFile) -> None:
        f.recording -= 1
        if not f.recording:
            f.inflight = {}

    def _dirty(self, f: OpenFile) -> None:
        if not f.dirty:
            f.dirty, f.since = True, time.monotonic()

    async def getattr(self, ino: int) -> Inode:
        """Attributes for stat(): answered from what this node read or wrote
        less than a second ago, else read from etcd.  open() always reads."""
        node = self.meta.recent(ino)
        return self.overlay(node if node is not None else await self.meta.getattr(ino))

    # -- namespace changes that touch data or usage --------------------------------
    async def mknod(self, parent, name, mode, uid, gid, *, fresh: bool = False, **kw) -> Inode:
        """``fresh``: a regular file about to be opened here (create()) or
        a directory (mkdir()): it gets this mount's writer mark (a directory:
        delegation.py)."""
        if self.usage.used[0] >= self.capacity:
            raise NoSpace("volume is full")
        writer = self.meta.node if fresh and self._nursery is not None else ""
        inode = await self.meta.mknod(parent, name, mode, uid, gid, writer=writer, **kw)
        self.usage.inodes += 1
        return inode

    async def unlink(self, parent, name) -> None:
        inode, free = await self.meta.unlink(parent, name, self.is_open)
        if free:
            await self._free(inode)
        elif inode.nlink == 0:
            self._orphans.add(inode.ino)        # freed at its last close here

    async def rmdir(self, parent, name) -> None:
        await self.meta.rmdir(parent, name)
        self.usage.inodes -= 1

    async def rename(self, p1, n1, p2, n2, flags=0) -> None:
        replaced, free = await self.meta.rename(p1, n1, p2, n2, flags, self.is_open)
        if replaced is None:
            return
        if replaced.is_dir:
            self.usage.inodes -= 1
        elif free:
            await self._free(replaced)
        elif replaced.nlink == 0:
            self._orphans.add(replaced.ino)

    async def _free(self, inode: Inode) -> None:
        """A file's last name and last open are gone: drop its chunks."""
        f = self.files.get(inode.ino)
        if f is not None:
            await self._drain(f, check=False)      # no queued write may land after the drop
        self._pending.discard(inode.ino)
        self.usage.inodes -= 1
        self.usage.bytes -= inode.size
        n = -(-inode.size // CHUNK_SIZE)
        if n:
            try:
                await self.vol.drop(inode.ino << CHUNK_BITS, n)
            except PxfsError as exc:       # pxfs-fsck finds chunks no file references
                log.warning("%s: could not free the data of inode %d: %s", self.name, inode.ino, exc)
        self.files.pop(inode.ino, None)

    async def setattr(self, ino: int, **fields) -> Inode:
        size = fields.get("size")
        f = self.files.get(ino)
        if size is None and f is not None and (f.count > 0 or ino in self._pending):
            # a file open here: recorded with its size at close, fsync or
            # within a second (tar's fchown/fchmod/futimens cost no round trip)
            fields.setdefault("ctime", time.time_ns())
            f.attrs.update(fields)
            self._dirty(f)
            return self.overlay(dataclasses.replace(f.inode))
        if size is None:
            lock = self._locks.get(ino)
            if lock is None:
                return self.overlay((await self.meta.setattr(ino, **fields))[0])
            async with lock:        # after a record in flight, whose attributes are older
                return self.overlay((await self.meta.setattr(ino, **fields))[0])
        if size > FILE_MAX:
            raise PxfsError("file too large", errno=errno.EFBIG)
        async with self._lock(ino):
            await self._record(ino)             # pending size and attributes first
            cur = await self.meta.getattr(ino)
            if size > cur.size and self.usage.used[0] + size - cur.size > self.capacity:
                raise NoSpace("volume is full")
            if size < cur.size:
                self.check_alive()
                await self._cut(ino, size, cur.size)
            inode, old = await self.meta.setattr(ino, **fields)
            self.usage.bytes += inode.size - old
            if f is not None:
                f.size, f.inode = inode.size, inode
            return inode

    def check_alive(self) -> None:
        """Fence this mount for good once it went too long without renewing
        its record; raise Fenced (ESTALE) if it is fenced."""
        if not self.vol.fenced and not self._alive():
            self.vol.fence_local("this mount could not renew its record in etcd in time; "
                                 "unmount and mount again")
        if self.vol.fenced:
            raise Fenced(self.vol.fenced)

    async def _cut(self, ino: int, size: int, old: int) -> None:
        """Shrink: zero the tail of the chunk the new end falls in and drop
        the chunks after it, so a later extension reads zeros."""
        end_chunk = -(-old // CHUNK_SIZE)
        keep = -(-size // CHUNK_SIZE)
        tail_end = min(old, keep * CHUNK_SIZE)
        if size < tail_end:
            await self.vol.write(self.base(ino) + size, bytes(tail_end - size))
        if end_chunk > keep:
            await self.vol.drop((ino << CHUNK_BITS) + keep, end_chunk - keep)

    # -- open files ------------------------------------------------------------------
    async def open(self, ino: int, created: Inode | None = None) -> Inode:
        # close-to-open: fresh from etcd (a file this node just created is)
        inode = created or await self.meta.getattr(ino)
        if inode.writer and inode.writer != self.meta.node:
            inode = await self._await_writer(inode)
        f = self.files.get(ino)
        if f is None:
            f = self.files[ino] = OpenFile(inode, size=inode.size, mtime=inode.mtime,
                                           fresh=created is not None and bool(inode.writer),
                                           since=time.monotonic())
        else:
            self._take_inode(f, inode)
        f.count += 1
        return self.overlay(inode)

    @staticmethod
    def _take_inode(f: OpenFile, inode: Inode) -> None:
        """An open file takes etcd's size and mtime, unless this mount has
        something of its own not recorded yet or the inode is older."""
        if not f.dirty and not f.recording and inode.rev >= f.inode.rev:
            f.inode, f.size, f.mtime = inode, inode.size, inode.mtime

    async def _await_writer(self, inode: Inode, timeout: float = 30.0) -> Inode:
        """Another mount created this file and has not recorded it since:
        wait for its record (a few ms after its close), or clear the mark if
        that mount is gone."""
        start = time.monotonic()
        checked = 0.0
        while inode.writer and inode.writer != self.meta.node:
            now = time.monotonic()
            if inode.writer in self._gone_writers or now - checked >= 0.2:
                checked = now
                if inode.writer in self._gone_writers or await self.meta.writer_gone(inode.writer):
                    self._gone_writers.add(inode.writer)
                    log.info("%s: inode %d was being written by %s, which is gone",
                             self.name, inode.ino, inode.writer)
                    return await self.meta.clear_writer(inode.ino, inode.writer)
            if now - start > timeout:
                raise PxfsError(f"inode {inode.ino} is still being written by {inode.writer}",
                                errno=errno.EAGAIN)
            await trio.sleep(0.003)
            inode = await self.meta.getattr(inode.ino)
        return inode

    async def _drain(self, f: OpenFile, check: bool = True) -> None:
        """Wait for the writes queued so far (a write queued meanwhile is not
        waited for); raise the first that failed."""
        if f.tail is not None:
            await f.tail.wait()
        if check and f.error is not None:
            err, f.error = f.error, None
            raise err

    async def _write_behind(self, f: OpenFile, prev, done: trio.Event, off: int, data) -> None:
        try:
            if prev is not None:
                await prev.wait()
            await self.vol.write(off, data)
        except PxfsError as exc:
            log.warning("%s: queued write of inode %d failed: %s", self.name, f.inode.ino, exc)
            if f.error is None:
                f.error = exc
        finally:
            done.set()
            self._slots.release()

    @staticmethod
    async def _pass_on(prev, done: trio.Event) -> None:
        """A write that left the queue before its turn: its place is done
        once the writes before it are."""
        try:
            if prev is not None:
                await prev.wait()
        finally:
            done.set()

    async def read(self, ino: int, off: int, size: int) -> bytes:
        f = self.files.get(ino)
        if f is not None:
            fsize = f.size                    # what the writes queued so far reach
            await self._drain(f)
        else:
            fsize = (await self.meta.getattr(ino)).size
        if off >= fsize:
            return b""
        n = min(size, fsize - off)
        return await self.vol.read(self.base(ino) + off, n)

    async def write(self, ino: int, off: int, data: bytes, *, append: bool = False) -> int:
        """Write at ``off``, or at the end this mount knows (fresh from etcd
        at the open) for an O_APPEND handle."""
        f = self.files.get(ino)
        if f is None:
            raise PxfsError("file is not open", errno=errno.EBADF)
        self.check_alive()
        if append:
            off = f.size
        n = len(data)
        end = off + n
        if end > FILE_MAX:
            raise PxfsError("file too large", errno=errno.EFBIG)
        grow = max(0, end - f.size)
        if grow and self.usage.used[0] + grow > self.capacity:
            raise NoSpace("volume is full")
        # Bytes past the end of a file are zeros in its chunks (a shrink
        # zeroes them), so a write reaching the end is padded to whole blocks
        # here instead of reading the old blocks back from a replica.
        start, pad_head, pad_tail = off, 0, 0
        a0 = off - off % CSUM_BLOCK
        if off % CSUM_BLOCK and a0 >= f.size:
            start, pad_head = a0, off - a0
        if end % CSUM_BLOCK and end >= f.size:
            pad_tail = CSUM_BLOCK - end % CSUM_BLOCK
        if pad_head or pad_tail:
            data = bytes(pad_head) + bytes(data) + bytes(pad_tail)
        # The new end is taken before anything waits, so appends that arrive
        # together (the pieces of one large O_DIRECT write) each get their
        # own; the file is dirty from here, so an open or a lock grant
        # meanwhile does not put etcd's older size back over it; and the
        # write joins the queue before waiting for a slot, so a read that
        # sees the new end waits for its data.
        old_size = f.size
        if end > old_size:
            self.usage.bytes += end - old_size
            f.size = end
        self._dirty(f)
        nursery = self._nursery
        try:
            if nursery is None:
                await self.vol.write(self.base(ino) + start, data)
            else:
                prev, done = f.tail, trio.Event()
                f.tail = done
                try:
                    await self._slots.acquire()
                except BaseException:
                    try:
                        nursery.start_soon(self._pass_on, prev, done)
                    except RuntimeError:        # shutting down: nothing waits any more
                        done.set()
                    raise
                nursery.start_soon(self._write_behind, f, prev, done,
                                   self.base(ino) + start, bytes(data))
        except BaseException:
            if end > old_size and f.size == end:     # nothing came after it: undo
                self.usage.bytes -= end - old_size
                f.size = old_size
            raise
        f.mtime = time.time_ns()
        f.attrs.pop("mtime", None)              # a write after utime sets it anew
        f.attrs.pop("ctime", None)
        return n

    async def _record(self, ino: int) -> None:
        f = self.files.get(ino)
        if f is None:
            return
        # the data first: the size makes it visible (a write that reserves
        # its end meanwhile is left to the next record)
        tail, size = f.tail, f.size
        await self._drain(f)
        if f.dirty or f.fresh:
            clear = f.fresh
            attrs = self._take(f)
            try:
                f.inode = await self.meta.set_size(ino, size, f.mtime, attrs, clear_writer=clear)
            except BaseException:
                f.attrs = {**attrs, **f.attrs}
                self._dirty(f)
                raise
            finally:
                self._taken(f)
            if f.tail is not tail or f.size != size:
                self._dirty(f)
            if clear:
                f.fresh = False
                self._pending.discard(ino)

    async def close(self, ino: int) -> None:
        """close(): record the size this node's writes reached, so the next
        open anywhere sees them.  A file created here is recorded by the
        batcher instead: its writer mark holds other mounts' opens till then."""
        f = self.files.get(ino)
        if f is not None and f.fresh and self._nursery is not None:
            self._pending.add(ino)
            self._wake.set()
            return
        await self.publish(ino)

    async def publish(self, ino: int) -> None:
        """Before a lock on the file is released: record what this mount
        wrote, so that the mount that takes the lock next sees it (NFS
        flushes at unlock too)."""
        if ino in self.files:
            async with self._lock(ino):
                await self._record(ino)

    async def revalidate(self, ino: int) -> None:
        """A lock on the file was just granted: an open file here takes the
        size and mtime the mount that held it recorded before releasing it
        (NFS revalidates at a lock too).  The kernel sees the change at its
        next GETATTR, which also drops its cached pages."""
        f = self.files.get(ino)
        if f is None:
            return
        inode = await self.meta.getattr(ino)
        if not f.fresh:
            self._take_inode(f, inode)

    async def commit_pending(self) -> None:
        """Record closed fresh files, many per transaction, after their data."""
        busy: set[int] = set()
        while self._pending:
            batch = [self._pending.pop() for _ in range(min(BATCH, len(self._pending)))]
            files, locks = [], []
            for ino in batch:
                f = self.files.get(ino)
                if f is None or not (f.dirty or f.fresh):
                    continue
                lock = self._lock(ino)
                if lock.locked():           # being recorded by itself: try again later
                    busy.add(ino)
                    continue
                lock.acquire_nowait()      # one record of a file at a time
                files.append((ino, f))
                locks.append(lock)
            try:
                await self._commit_batch(files)
            finally:
                for lock in locks:
                    lock.release()
            for ino, f in files:
                if self.files.get(ino) is None and not lock_in_use(self._locks.get(ino)):
                    self._locks.pop(ino, None)
        if busy:
            self._pending |= busy
            self._wake.set()

    async def _commit_batch(self, files: list) -> None:
        if not files:
            return
        for _, f in files:
            await self._drain(f, check=False)
        recs = []
        for ino, f in files:
            if f.error is not None:
                log.warning("%s: inode %d lost data written before its close: %s",
                            self.name, ino, f.error)
                f.error = None
            recs.append((ino, f.size, f.mtime, self._take(f), f.fresh))
        try:
            got = await self.meta.set_sizes(recs)
        except PxfsError as exc:        # the service records them later
            log.warning("%s: recording %d closed files failed: %s", self.name, len(recs), exc)
            for (ino, f), rec in zip(files, recs):
                f.attrs = {**rec[3], **f.attrs}
                self._dirty(f)
            return
        finally:
            for _, f in files:
                self._taken(f)
        for ino, f in files:
            if ino in got:
                f.inode = got[ino]
            f.fresh = False
            if f.count <= 0 and not f.dirty:
                self.files.pop(ino, None)

    async def _batcher(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # let more closes join: one transaction records up to BATCH files
            with trio.move_on_after(BATCH_WINDOW):
                while len(self._pending) < BATCH // 2:
                    await self._wake.wait()
                    self._wake = trio.Event()
            await self.commit_pending()
            if self.meta.has_local:
                try:                            # whole batches; the rest within a second
                    await self.meta.flush_local(full_only=True)
                except PxfsError as exc:
                    log.warning("%s: new files not recorded: %s", self.name, exc)

    async def finish(self) -> None:
        """At unmount: every queued write done, every file recorded."""
        await self.commit_pending()
        for ino, f in list(self.files.items()):
            with contextlib.suppress(PxfsError):
                async with self._lock(ino):
                    await self._record(ino)
        await self.meta.release(list(self.meta.marked))
        log.info("%s: namespace statistics: %s", self.name, dict(self.meta.stats))

    async def fsync(self, ino: int) -> None:
        """fsync(): data durable on every in-sync replica, then the size
        recorded in etcd (durable there once the transaction returned)."""
        f = self.files.get(ino)
        if f is not None:
            await self._drain(f)
        await self.vol.flush()
        async with self._lock(ino):
            await self._record(ino)

    async def release(self, ino: int) -> None:
        f = self.files.get(ino)
        if f is None:
            return
        f.count -= 1
        if f.count > 0:
            return
        try:
            if f.dirty or f.fresh:
                await self.close(ino)
        finally:
            if f.count <= 0 and ino not in self._pending:
                self.files.pop(ino, None)
                self._locks.pop(ino, None)
        if ino in self._orphans:
            self._orphans.discard(ino)
            freed = await self.meta.forget_orphan(ino)
            if freed is not None:
                await self._free(freed)

    async def statfs(self) -> tuple[int, int, int]:
        """(capacity, bytes used, inodes used)."""
        await self.usage.refresh()
        used, inodes = self.usage.used
        return self.capacity, used, inodes

    async def service(self, *, interval: float = 0.5, task_status=trio.TASK_STATUS_IGNORED):
        """Record what open files changed (so other nodes see it within a
        second) and this node's usage, and learn the others' usage."""
        await self.usage.load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._batcher)
            await nursery.start(self.meta.serve_recalls)
            task_status.started()
            try:
                await self._service(interval)
            finally:
                self._nursery = None

    async def _service(self, interval: float) -> None:
        tick = 0
        while True:
            await trio.sleep(interval)
            tick += 1
            now = time.monotonic()
            for ino, f in list(self.files.items()):
                if (f.dirty or f.fresh) and now - f.since >= interval:
                    try:
                        async with self._lock(ino):
                            await self._record(ino)
                    except PxfsError as exc:
                        log.info("%s: inode %d not recorded: %s", self.name, ino, exc)
                    if f.count <= 0 and not f.dirty and not f.fresh:
                        self.files.pop(ino, None)
                        self._locks.pop(ino, None)
            if self.meta.has_local:          # new files reach etcd within a second
                try:
                    await self.meta.flush_local()
                except PxfsError as exc:
                    log.warning("%s: new files not recorded: %s", self.name, exc)
            if tick % 2 == 0:
                try:
                    await self.usage.record()
                    await self.usage.refresh()
                except PxfsError as exc:
                    log.info("%s: usage not recorded: %s", self.name, exc)
