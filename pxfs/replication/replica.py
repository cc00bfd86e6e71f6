"""ReplicaService: what a node does with the chunk requests it receives,
whether from its own attached volumes or over the data port.  It enforces
fencing: a request carrying an attach term older than the highest this
replica has seen for the volume is refused with Fenced.
"""

from __future__ import annotations

import array
import collections
import contextlib
import functools
import logging
import secrets
import time

import trio

from .. import CSUM_BLOCK
from ..chunk.store import ChunkStore
from ..errors import Fenced, FrameError, InvalidArgument, PxfsError
from ..rpc.server import FollowUp
from .syncer import Syncer

log = logging.getLogger(__name__)

#: Reads up to this size are first tried on the trio thread from the page
#: cache only (RWF_NOWAIT); larger ones go to a worker thread.  Writes up to
#: this size to an open chunk are done on the trio thread.
INLINE_IO = 64 * 1024
#: chunk indices per chunk_ids answer (8 bytes each: well inside a frame)
CHUNK_IDS_PAGE = 65536
#: A small read that missed the page cache yields at most this many times
#: while its blocks are read in (ReplicaService._read_cached)
PREFETCH_ROUNDS = 8
#: A small read that still has to wait for the disk after those rounds is
#: done on the trio thread while such waits take less than this on average
#: (s): a fast device answers in ~20 us, a thread hop costs ~130 us.  A slow
#: device sends them to threads (without the rounds).
INLINE_READ_MAX = 0.0005


class ReplicaService:
    def __init__(self, store: ChunkStore, threads: int = 16):
        self.store = store
        self._limiter = trio.CapacityLimiter(threads)
        self._terms: dict[int, int] = {}
        self._term_locks: dict[int, trio.Lock] = {}
        self.stats = {"writes": 0, "reads": 0, "bytes_written": 0, "bytes_read": 0,
                      "chunks_put": 0, "fenced": 0}
        # live resync of a shared volume (several writers, no common chunk
        # lock): blocks written here while it runs, and per-chunk exclusion
        self._tracking: dict[int, dict[int, set | None]] = {}
        self._held: dict[tuple[int, int], trio.Event] = {}
        self._inflight: collections.Counter = collections.Counter()
        self._prefetching = 0        # small reads waiting for their blocks (_read_cached)
        self.read_avg = 0.0          # moving average of small reads' waits for the disk (s)
        self.syncer = Syncer(store, self._run)   # flushes; its run() is a node service
        #: this process, in every write and flush answer: a writer whose
        #: unflushed writes were taken by an earlier process of this node
        #: (its host may have lost them with its page cache) sees it change
        self.incarnation = secrets.randbits(62) + 1

    @contextlib.contextmanager
    def _applying(self, key):
        """Count a write or chunk copy being applied (a fence, a shared
        volume's chunk copy wait for those of their chunk or volume)."""
        self._inflight[key] += 1
        try:
            yield
        finally:
            self._inflight[key] -= 1
            if not self._inflight[key]:
                del self._inflight[key]

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _known_term(self, volid: int) -> int:
        known = self._terms.get(volid)
        if known is None:
            loaded = await self._run(self.store.get_term, volid)
            # a fence may have raised the cached term while we were loading it
            known = self._terms[volid] = max(loaded, self._terms.get(volid, 0))
        return known

    def _refuse_older(self, volid: int, term: int, known: int) -> None:
        if term < known:
            self.stats["fenced"] += 1
            raise Fenced(f"volume {volid}: attach term {term} is older than {known}")

    async def check_term(self, volid: int, term: int) -> None:
        known = await self._known_term(volid)
        self._refuse_older(volid, term, known)
        if term > known:
            lock = self._term_locks.setdefault(volid, trio.Lock())
            async with lock:
                if term > self._terms.get(volid, 0):
                    await self._run(self.store.set_term, volid, term)
                    self._terms[volid] = term

    async def check_read_term(self, volid: int, term: int) -> None:
        """A read from an attachment whose term is older than the highest
        this replica was fenced with fails: the volume was attached
        elsewhere since, and its data may have changed there.  A read never
        raises the stored term (only attach's fence and writes do)."""
        self._refuse_older(volid, term, await self._known_term(volid))

    # -- operations (also the RPC surface) -------------------------------------
    async def write(self, volid, idx, off, data, term, gen, crcs=None, remote=False,
                    acked=False):
        """``remote``: from another node, over the data port (Syncer.wrote);
        ``acked``: its writer waits for a second answer when it is durable."""
        await self.check_term(volid, term)
        key = (volid, idx)
        while key in self._held:                 # a resync is replacing this chunk
            await self._held[key].wait()
        self._refuse_older(volid, term, self._terms.get(volid, 0))     # fenced while it waited
        with self._applying(key):
            await self._write(volid, idx, off, data, gen, crcs)
        self.syncer.wrote(volid, len(data), behind=remote, acked=acked)
        marks = self._tracking.get(volid)
        if marks is not None:
            blocks = marks.setdefault(idx, set())
            if blocks is not None:
                blocks.update(range(off // CSUM_BLOCK, -(-(off + len(data)) // CSUM_BLOCK)))

    async def _write(self, volid, idx, off, data, gen, crcs):
        # A small write into an open chunk is a copy of a few pages into the
        # page cache: done on the trio thread, because the thread handoff
        # costs more than the write.  A larger one only if the page cache
        # takes it at once (RWF_NOWAIT); otherwise a buffered pwrite can sleep
        # in dirty-page throttling, which must not stall the event loop.
        try:
            if len(data) <= INLINE_IO:
                self.store.write(volid, idx, off, data, gen, crcs=crcs, inline=True)
            else:
                self.store.write(volid, idx, off, data, gen, crcs=crcs, nowait=True)
        except BlockingIOError:
            await self._run(functools.partial(self.store.write, volid, idx, off, data, gen,
                                              crcs=crcs))
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(data)

    async def read(self, volid, idx, off, size, term=None):
        if term is not None:
            await self.check_read_term(volid, term)
        data = None
        if size <= INLINE_IO:
            try:
                if self.read_avg < INLINE_READ_MAX:     # a fast device
                    if size and self.store.nowait_reads:
                        data = await self._read_cached(volid, idx, off, size)
                    if data is None:
                        data = self._timed_read(volid, idx, off, size, True)
                else:
                    data = self.store.read(volid, idx, off, size, nowait=True)
            except BlockingIOError:     # file not open, chunk busy (or not cached)
                pass
        if data is None:
            if size <= INLINE_IO:       # keep measuring, so a faster device wins it back
                data = await self._run(self._timed_read, volid, idx, off, size, False)
            else:
                data = await self._run(self.store.read, volid, idx, off, size)
        self.stats["reads"] += 1
        self.stats["bytes_read"] += size
        return data

    async def _read_cached(self, volid, idx, off, size) -> bytes | None:
        """A small read from the page cache, if it is there or gets there
        within a few scheduler rounds; None: read it the plain way.  On a
        miss the kernel is asked to start reading its blocks (WILLNEED) and
        the task yields, so that the reads queued behind it (a database's, or
        the loop device's at a deep queue) ask for theirs too: the disk then
        serves them together instead of one after another on this thread."""
        try:
            return self.store.read(volid, idx, off, size, nowait=True)
        except BlockingIOError:
            pass
        if not self.store.prefetch(volid, idx, off, size):
            return None
        self._prefetching += 1
        try:
            for i in range(PREFETCH_ROUNDS):
                await trio.lowlevel.checkpoint()
                try:
                    return self.store.read(volid, idx, off, size, nowait=True)
                except BlockingIOError:
                    # still alone after two rounds (no other read came in):
                    # wait in the kernel, its blocks on the way, not by spinning
                    if i and self._prefetching == 1:
                        return None
        finally:
            self._prefetching -= 1
        return None

    def _timed_read(self, volid, idx, off, size, inline: bool) -> bytes:
        t0 = time.monotonic()
        data = self.store.read(volid, idx, off, size, inline=inline)
        self.read_avg += (time.monotonic() - t0 - self.read_avg) * 0.1
        return data

    async def flush(self, volid, term):
        await self.check_term(volid, term)
        await self.syncer.flush(volid)

    async def _durable(self, volid: int) -> dict:
        await self.syncer.sync_now(volid)
        return {"durable": True}

    async def fence(self, volid, term):
        await self.check_term(volid, term)
        # a write that passed its term check before this fence may still be
        # applying (in a worker thread): answer only once it is done, so that
        # nothing the old attachment sent lands after the new one began
        with trio.move_on_after(30):
            while any(k[0] == volid for k in self._inflight):
                await trio.sleep(0.001)
            return
        raise PxfsError(f"volume {volid}: writes of an older term still applying after 30 s")

    async def get_chunk(self, volid, idx):
        return await self._run(self.store.get_chunk, volid, idx)

    async def put_chunk(self, volid, idx, gen, bitmap, data, term):
        await self.check_term(volid, term)
        with self._applying((volid, idx)):       # a fence waits for it, as for a write
            await self._run(self.store.put_chunk, volid, idx, gen, bitmap, data)
        self.stats["chunks_put"] += 1

    async def trim(self, volid, idx, first, last, term, gen):
        """Blocks first..last of a chunk read as zeros from now on (a
        discard), stamped ``gen`` like a write so that a resync copies the
        chunk as it is now; a chunk left empty is deleted."""
        await self.check_term(volid, term)
        key = (volid, idx)
        while key in self._held:                 # a resync is replacing this chunk
            await self._held[key].wait()
        self._refuse_older(volid, term, self._terms.get(volid, 0))
        with self._applying(key):
            await self._run(self.store.trim, volid, idx, first, last, gen)
        marks = self._tracking.get(volid)
        if marks is not None:
            blocks = marks.setdefault(idx, set())
            if blocks is not None:
                blocks.update(range(first, last + 1))

    async def drop_chunks(self, volid, first, count, term):
        await self.check_term(volid, term)
        while True:                              # a resync is replacing one of them
            ev = next((e for k, e in self._held.items()
                       if k[0] == volid and first <= k[1] < first + count), None)
            if ev is None:
                break
            await ev.wait()
        self._refuse_older(volid, term, self._terms.get(volid, 0))
        marks = self._tracking.get(volid)
        if marks is not None:
            for idx in range(first, first + count):
                marks[idx] = None                # a resync must not bring it back
        # a fence waits for it, as for a write: chunks a new attachment
        # writes after its fence must not be deleted by an older one
        with self._applying((volid, first)):
            return await self._run(self.store.drop_chunks, volid, first, count)

    # -- live resync of a shared volume, on the replica being brought back -----
    def track(self, volid: int) -> None:
        """Note every block written here from now on (before the replica is
        marked resyncing, so no write to it goes unnoted)."""
        self._tracking[volid] = {}

    def untrack(self, volid: int) -> None:
        self._tracking.pop(volid, None)

    async def put_chunk_merged(self, volid, idx, gen, bitmap, data, term):
        """Install a chunk copied from an in-sync replica, keeping the
        blocks live writes put here since tracking began (they are newer
        than or equal to the copy).  Writes to the chunk wait meanwhile."""
        await self.check_term(volid, term)
        key = (volid, idx)
        while key in self._held:
            await self._held[key].wait()
        self._held[key] = trio.Event()
        try:
            while self._inflight.get(key):
                await trio.sleep(0.001)
            marks = self._tracking.get(volid, {})
            if idx in marks and marks[idx] is None:
                return                                # dropped since: leave it gone
            keep = marks.get(idx) or set()
            if data is not None and keep:
                data, bitmap = bytearray(data), bytearray(bitmap)
                for blk in sorted(keep):
                    off = blk * CSUM_BLOCK
                    data[off:off + CSUM_BLOCK] = await self._run(self.store.read, volid, idx, off,
                                                                 CSUM_BLOCK)
                    bitmap[blk >> 3] |= 1 << (blk & 7)
                data, bitmap = bytes(data), bytes(bitmap)
            elif data is None and keep:
                # absent on the source, written here since tracking began:
                # keep those blocks only, not what the source dropped
                got = await self._run(self.store.get_chunk, volid, idx)
                if got is None:
                    return
                gen, old_map, old = got
                data, bitmap = bytearray(len(old)), bytearray(len(old_map))
                for blk in sorted(keep):
                    off = blk * CSUM_BLOCK
                    data[off:off + CSUM_BLOCK] = old[off:off + CSUM_BLOCK]
                    bitmap[blk >> 3] |= 1 << (blk & 7)
                data, bitmap = bytes(data), bytes(bitmap)
            with self._applying(key):
                await self._run(self.store.put_chunk, volid, idx, gen, bitmap, data)
            self.stats["chunks_put"] += 1
        finally:
            self._held.pop(key).set()

    async def list_chunks(self, volid, min_gen):
        return await self._run(self.store.list_chunks, volid, min_gen)

    async def chunk_ids(self, volid, start=0, limit=CHUNK_IDS_PAGE) -> list[int]:
        return await self._run(self.store.chunk_ids, volid, start, limit)

    async def delete_volume(self, volid):
        self._terms.pop(volid, None)
        self.syncer.forget(volid)
        await self._run(self.store.delete_volume, volid)

    async def usage(self, volid):
        return await self._run(self.store.usage, volid)

    # -- the data port's dispatcher ----------------------------------------
    async def handle(self, op: str, msg: dict) -> dict:
        try:
            if op == "write":
                volid, acked = _int(msg, "vol"), msg.get("durable_ack") is True
                await self.write(volid, _int(msg, "idx"), _int(msg, "off"),
                                 _bytes(msg, "data"), _int(msg, "term"), _int(msg, "gen"),
                                 _bytes(msg, "crcs") if "crcs" in msg else None, remote=True,
                                 acked=acked)
                if acked:
                    return FollowUp({"inc": self.incarnation},
                                    functools.partial(self._durable, volid))
                return {"inc": self.incarnation}
            if op == "read":
                return {"data": await self.read(_int(msg, "vol"), _int(msg, "idx"),
                                                _int(msg, "off"), _int(msg, "size"),
                                                _int(msg, "term") if "term" in msg else None)}
            if op == "flush":
                await self.flush(_int(msg, "vol"), _int(msg, "term"))
                return {"inc": self.incarnation}
            if op == "fence":
                await self.fence(_int(msg, "vol"), _int(msg, "term"))
                return {}
            if op == "get_chunk":
                got = await self.get_chunk(_int(msg, "vol"), _int(msg, "idx"))
                if got is None:
                    return {"present": False}
                return {"present": True, "gen": got[0], "bitmap": got[1], "data": got[2]}
            if op == "put_chunk":
                present = bool(msg.get("present"))
                await self.put_chunk(_int(msg, "vol"), _int(msg, "idx"), _int(msg, "gen"),
                                     _bytes(msg, "bitmap") if present else None,
                                     _bytes(msg, "data") if present else None, _int(msg, "term"))
                return {}
            if op == "trim":
                await self.trim(_int(msg, "vol"), _int(msg, "idx"), _int(msg, "first"),
                                _int(msg, "last"), _int(msg, "term"), _int(msg, "gen"))
                return {"inc": self.incarnation}
            if op == "drop_chunks":
                return {"dropped": await self.drop_chunks(_int(msg, "vol"), _int(msg, "first"),
                                                          _int(msg, "count"), _int(msg, "term"))}
            if op == "list_chunks":
                return {"chunks": await self.list_chunks(_int(msg, "vol"), _int(msg, "min_gen"))}
            if op == "chunk_ids":
                ids = await self.chunk_ids(_int(msg, "vol"), _int(msg, "start"),
                                           min(_int(msg, "limit"), CHUNK_IDS_PAGE))
                return {"ids": array.array("Q", ids).tobytes()}
            if op == "delete_volume":
                await self.delete_volume(_int(msg, "vol"))
                return {}
            if op == "usage":
                return {"bytes": await self.usage(_int(msg, "vol"))}
            if op == "ping":
                return {}
        except InvalidArgument as exc:
            raise FrameError(str(exc)) from None
        raise InvalidArgument(f"unknown op {op!r}")


def _int(msg, key) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (1 << 64):
        raise InvalidArgument(f"field {key!r} must be an integer in 0..2**64-1")
    return v


def _bytes(msg, key) -> bytes:
    v = msg.get(key)
    if not isinstance(v, (bytes, bytearray)):
        raise InvalidArgument(f"field {key!r} must be bytes")
    return v
