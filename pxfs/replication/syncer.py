"""Making a replica's writes durable: the flush of a volume on this node.

One sync per volume is in flight at a time.  A flush first waits for the
one in flight (it may have picked up writes the flush must cover, and they
are durable only once its fdatasync returned), then syncs what is still
dirty; a volume with nothing dirty costs nothing.

Small syncs (a few chunk files, little data) run on the trio thread while
they stay fast: handing one to a worker thread and back costs ~0.13 ms on a
small VM, more than the fdatasync.  A slow device sends them to threads.

Sync behind: on a replica serving another node's writer, a volume flushed
after almost every write (a database commit, ext4's journal on a block
volume) gets a sync started right after each small write is acknowledged,
while the acknowledgement travels back and the writer's flush travels here;
the flush then finds it done or under way.  The writer's own node does not
sync behind its local copy (its event loop must stay free for the other
replicas' replies); it only starts writing the copy back at once
(sync_file_range, which does not wait), so its flush waits for less.
Volumes written in bulk never pay for either.
"""

from __future__ import annotations

import logging
import time

import trio

from ..chunk import incarnation
from ..chunk.store import ChunkStore
from ..errors import PxfsError

log = logging.getLogger(__name__)

#: small syncs run on the trio thread while they take less than this on average (s)
INLINE_SYNC_MAX = 0.002
#: a flush is expected right after a write up to this size ...
FLUSH_FOLLOWS_MAX_WRITE = 64 * 1024
#: ... to a volume flushed after at most this many writes on average ...
FLUSH_FOLLOWS_WRITES = 3.0
#: ... and flushed within this long (s)
FLUSH_FOLLOWS_RECENT = 0.05


class FlushPattern:
    """How often a volume is flushed: whether a small write just made is
    likely followed by a flush at once (a database commit, ext4's journal on
    a block volume).  Used by the replicas (sync behind) and by the attached
    node (durable acks, ReplicatedVolume)."""
    __slots__ = ("writes", "per_flush", "last_flush")

    def __init__(self):
        self.writes, self.per_flush, self.last_flush = 0, None, 0.0

    def wrote(self, nbytes: int) -> bool:
        """Count a write; whether a flush likely follows it."""
        self.writes += 1
        return (nbytes <= FLUSH_FOLLOWS_MAX_WRITE and self.per_flush is not None
                and self.per_flush <= FLUSH_FOLLOWS_WRITES
                and time.monotonic() - self.last_flush < FLUSH_FOLLOWS_RECENT)

    def flushed(self) -> None:
        self.per_flush = (self.writes if self.per_flush is None
                          else self.per_flush + (self.writes - self.per_flush) * 0.25)
        self.writes, self.last_flush = 0, time.monotonic()


class Syncer:
    def __init__(self, store: ChunkStore, run_in_thread):
        self.store = store
        self._run = run_in_thread               # async fn(*args) in a worker thread
        self._syncing: dict[int, trio.Event] = {}
        self._patterns: dict[int, FlushPattern] = {}
        self._nursery: trio.Nursery | None = None
        self.sync_avg = 0.0                     # moving average of small syncs (s)
        #: a sync behind a write failed: the next flush of the volume reports
        #: it (the kernel reports a write-back error once per open file, so
        #: the flush's own fdatasync would not see it again)
        self._errors: dict[int, PxfsError] = {}
        self.stats = {"syncs": 0, "syncs_behind": 0, "syncs_acked": 0}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Service: the syncs started behind writes run here."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def forget(self, volid: int) -> None:
        self._patterns.pop(volid, None)
        self._errors.pop(volid, None)

    # -- what callers do ------------------------------------------------------
    def wrote(self, volid: int, nbytes: int, behind: bool = False, acked: bool = False) -> None:
        """A write to the volume was applied here; ``behind``: it came over
        the data port and may be followed by a sync (never for the writer's
        own node, whose event loop must stay free for the other replicas'
        replies: it syncs its copy when the flush comes, alongside them)."""
        if acked:
            # a sync_now follows at once, right after this write's first
            # answer: its fdatasync starts the write-back itself.  Starting
            # it here (sync_file_range, ~30 us) would delay that answer.
            return
        p = self._patterns.get(volid)
        if p is None:
            p = self._patterns[volid] = FlushPattern()
        if not p.wrote(nbytes):
            return
        # start writing the data back now, without waiting: the sync that
        # follows (behind this write, or the writer's flush) waits for less
        self.store.start_writeback(volid)
        if behind and self._nursery is not None and volid not in self._syncing:
            self._nursery.start_soon(self._behind, volid)

    async def flush(self, volid: int) -> None:
        """Every write to the volume applied here before this call is durable
        when it returns."""
        p = self._patterns.get(volid)
        if p is not None:
            p.flushed()
        await self._sync(volid)

    async def sync_now(self, volid: int) -> None:
        """Every write applied here so far is durable when it returns: the
        second answer to a write whose writer asked to hear when it is on
        disk (it then sends no flush here)."""
        self.stats["syncs_acked"] += 1
        await self._sync(volid)

    # -- the syncs ---------------------------------------------------------------
    async def _behind(self, volid: int) -> None:
        try:
            if volid not in self._syncing:
                self.stats["syncs_behind"] += 1
                await self._sync(volid)
        except PxfsError as exc:          # the flush that follows reports it
            self._errors[volid] = exc

    async def _sync(self, volid: int) -> None:
        while (ev := self._syncing.get(volid)) is not None:
            await ev.wait()
        exc = self._errors.pop(volid, None)
        if exc is not None:
            raise exc
        if self.store.clean(volid):
            return
        ev = self._syncing[volid] = trio.Event()
        try:
            self.stats["syncs"] += 1
            if not self.store.small_sync(volid):
                await self._run(self.store.sync, volid)
            elif self.sync_avg < INLINE_SYNC_MAX:
                self._timed_sync(volid)
            else:                    # keep measuring, so a faster device wins it back
                await self._run(self._timed_sync, volid)
        except PxfsError:
            # the kernel reports a write-back error once: a later process
            # of this node must not pass for this one (chunk/incarnation.py)
            await trio.to_thread.run_sync(incarnation.forfeit)
            raise
        finally:
            del self._syncing[volid]
            ev.set()

    def _timed_sync(self, volid: int) -> None:
        t0 = time.monotonic()
        try:
            self.store.sync(volid)
        finally:
            self.sync_avg += (time.monotonic() - t0 - self.sync_avg) * 0.2
