"""ChunkStore: chunks of volumes on this node's pool, keyed by (volid, idx).

Blocking calls; the replication layer runs them in worker threads, except
the ones that never wait for the disk (``nowait``/``inline`` reads and
writes, ``prefetch``, ``start_writeback``), which it makes on the trio
thread.  Each CSUM_BLOCK is checked against its CRC32 on every read
(``_crc.c`` computes them without the GIL when it is built).  Layout on a
pool root::

    <root>/vols/<volid>/TERM            highest attach term seen (fencing)
    <root>/vols/<volid>/<idx:08x>.chk   chunk files (see layout.py)

A volume's chunks live on one root of the pool (the emptiest at first write).
This module holds the open chunk files and the block reads and writes;
durability.py what a sync does, wholechunks.py the copies and terms.
"""

from __future__ import annotations

import array
import collections
import errno
import logging
import os
import shutil
import threading

from .. import CSUM_BLOCK
from ..errors import ChecksumError, InvalidArgument, NoSpace, PxfsError
from . import fileio, xfs
from .durability import Durability
from .layout import HEADER_SIZE, NBLOCKS, Header, block_crcs, check_id, check_range
from .wholechunks import WholeChunks

log = logging.getLogger(__name__)
ZERO_BLOCK = bytes(CSUM_BLOCK)


class _Chunk:
    __slots__ = ("fd", "hdr", "lock", "dirty", "dirty_bytes", "meta_dirty", "punch")

    def __init__(self, fd: int, hdr: Header):
        self.fd, self.hdr, self.lock, self.dirty = fd, hdr, threading.Lock(), False
        self.dirty_bytes = 0        # written since the last sync (an upper bound)
        #: the file may have metadata to make durable (a block allocated, the
        #: size grown) since its last fdatasync; only a file without any can
        #: be synced by writing its data back (see ChunkStore.sync).  True
        #: until the first fdatasync of this descriptor.
        self.meta_dirty = True
        #: block ranges trimmed since the last sync: their space is given
        #: back once that sync has made the header that unmarks them durable
        self.punch: list[tuple[int, int]] = []


#: descriptors of evicted dirty chunks kept for their volume's next sync
#: (all volumes together), at most; past this they are made durable and
#: closed at once (a mkfs of a huge volume writes to tens of thousands of
#: chunks before its one flush)
UNSYNCED_MAX = 512


class ChunkStore(Durability, WholeChunks):
    def __init__(self, roots: list[str], max_open: int = 4096):
        self.roots = list(roots)
        self._open: collections.OrderedDict[tuple[int, int], _Chunk] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open
        self._voldirs: dict[int, str] = {}
        self._dirty_dirs: set[int] = set()
        self._unsynced: dict[int, list[int]] = {}   # volid -> fds of evicted dirty chunks
        self._dirty: collections.defaultdict[int, set] = collections.defaultdict(set)
        self._open_lock = threading.Lock()
        #: the pool filesystem takes RWF_NOWAIT buffered writes (XFS does,
        #: ext4 does not); cleared on the first refusal
        self.nowait_writes = hasattr(os, "RWF_NOWAIT")
        #: ... and RWF_NOWAIT buffered reads (most do); cleared likewise
        self.nowait_reads = hasattr(os, "RWF_NOWAIT")
        #: the pool filesystem takes fallocate (XFS and ext4 do); cleared
        #: on the first refusal
        self.preallocate = True
        #: ... and punching holes (trimmed blocks give their space back)
        self.punch_holes = True
        self._root_fds: dict[str, int] = {}
        self._no_handles: set[str] = set()
        #: volid -> why a sync failed: Linux reports a write-back error once
        #: and marks the lost pages clean, so a later fdatasync succeeds
        #: although the data is gone; every sync fails until a resync
        #: replaces the chunks (put_chunk)
        self._sync_failed: dict[int, str] = {}
        #: volid -> why a drain of its evicted chunks failed, until a sync
        #: reports it (a resync's put_chunk must not clear it unreported)
        self._drain_failed: dict[int, str] = {}
        #: volid -> drains under way: their chunks are in neither _dirty nor
        #: _unsynced meanwhile, so a sync waits for them (_drained)
        self._draining: collections.Counter = collections.Counter()
        self._drained = threading.Condition(self._lock)
        for root in self.roots:
            os.makedirs(os.path.join(root, "vols"), exist_ok=True)

    # -- volume directories -------------------------------------------------
    def _voldir(self, volid: int, create: bool) -> str | None:
        d = self._voldirs.get(volid)
        if d:
            return d
        for root in self.roots:
            cand = os.path.join(root, "vols", str(volid))
            if os.path.isdir(cand):
                self._voldirs[volid] = cand
                return cand
        if not create:
            return None
        root = max(self.roots, key=lambda r: shutil.disk_usage(r).free)
        cand = os.path.join(root, "vols", str(volid))
        os.makedirs(cand, exist_ok=True)
        self._fsync_dir(os.path.dirname(cand))
        self._voldirs[volid] = cand
        return cand

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def volumes(self) -> list[int]:
        out = []
        for root in self.roots:
            for name in os.listdir(os.path.join(root, "vols")):
                if name.isdigit():
                    out.append(int(name))
        return out

    # -- open chunk cache ---------------------------------------------------
    def _get(self, volid: int, idx: int, create: bool) -> _Chunk | None:
        key = (volid, idx)
        with self._lock:
            ch = self._open.get(key)
            if ch is not None:
                self._open.move_to_end(key)
                return ch
        # opening is serialized so no thread sees a chunk file between its
        # creation and its header write
        with self._open_lock:
            with self._lock:
                ch = self._open.get(key)
            if ch is not None:
                return ch
            ch = self._open_file(volid, idx, create)
            if ch is None:
                return None
            with self._lock:
                self._open[key] = ch
                victims = []
                while len(self._open) > self._max_open:
                    victims.append(self._open.popitem(last=False)[1])
        full: list[int] = []
        for v in victims:
            with v.lock:
                if v.dirty:     # the next sync() of its volume flushes and closes it
                    with self._lock:
                        self._unsynced.setdefault(v.hdr.volid, []).append(v.fd)
                        self._dirty[v.hdr.volid].discard(v)
                        if sum(map(len, self._unsynced.values())) >= UNSYNCED_MAX:
                            full = list(self._unsynced)     # all volumes count
                else:
                    os.close(v.fd)
                v.fd = -1
        for volid in full:
            self._drain_unsynced(volid)
        return ch

    def _nocmtime(self, fd: int, d: str) -> int:
        """``fd``, or on an XFS pool a descriptor that leaves timestamps
        alone, so buffered RWF_NOWAIT writes are not refused (xfs.py)."""
        root = os.path.dirname(os.path.dirname(d))
        if root in self._no_handles:
            return fd
        try:
            rfd = self._root_fds.get(root)
            if rfd is None:
                rfd = self._root_fds[root] = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            new = xfs.reopen_nocmtime(fd, rfd)
        except OSError:
            self._no_handles.add(root)          # not XFS or not allowed: plain fds
            return fd
        os.close(fd)
        return new

    def _open_file(self, volid: int, idx: int, create: bool) -> _Chunk | None:
        d = self._voldir(volid, create)
        if d is None:
            return None
        path = os.path.join(d, f"{idx:08x}.chk")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if not create:
                return None
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            hdr = Header(volid, idx)
            os.pwrite(fd, hdr.pack(), 0)
            with self._lock:
                self._dirty_dirs.add(volid)
            return _Chunk(self._nocmtime(fd, d), hdr)
        fd = self._nocmtime(fd, d)
        try:
            hdr = Header.unpack(os.pread(fd, HEADER_SIZE, 0))
        except ValueError as exc:
            os.close(fd)
            raise ChecksumError(f"chunk {volid}/{idx}: bad header: {exc}") from None
        return _Chunk(fd, hdr)

    def _evict(self, volid: int, idx: int | None = None) -> None:
        with self._lock:
            if idx is None:
                keys = [k for k in self._open if k[0] == volid]
            else:
                keys = [(volid, idx)] if (volid, idx) in self._open else []
            victims = [self._open.pop(k) for k in keys]
            for v in victims:
                self._dirty[volid].discard(v)
        for v in victims:
            with v.lock:
                os.close(v.fd)
                v.fd = -1

    def _locked(self, volid, idx, create, nowait=False):
        """The chunk, locked; retried if it was evicted meanwhile.  With
        ``nowait``, raise BlockingIOError instead of opening a file or
        waiting for another thread's lock (the caller then uses a thread)."""
        while True:
            if nowait:
                with self._lock:
                    ch = self._open.get((volid, idx))
                if ch is None or not ch.lock.acquire(blocking=False):
                    raise BlockingIOError("chunk not open or busy")
                if ch.fd >= 0:
                    return ch
                ch.lock.release()
                continue
            ch = self._get(volid, idx, create)
            if ch is None:
                return None
            ch.lock.acquire()
            if ch.fd >= 0:
                return ch
            ch.lock.release()

    # -- data ------------------------------------------------------------------
    def write(self, volid: int, idx: int, off: int, data: bytes, gen: int, *,
              crcs: bytes | None = None, nowait: bool = False, inline: bool = False) -> None:
        """Write ``data`` at ``off`` in the chunk.  ``crcs`` are the CRC32s
        of its blocks computed where the data entered pxfs (then the range
        must be whole blocks); they are stored as given, so a block damaged
        on the way is caught by the first read, not blessed here.  With
        ``nowait`` the data goes in only if the page cache takes it at once
        (RWF_NOWAIT), else BlockingIOError and nothing changed.  With
        ``inline``, BlockingIOError only if the chunk is not open, is busy
        or the range is not whole blocks (nothing that reads or opens)."""
        check_id(volid, idx)
        check_range(off, len(data))
        if not data:
            return
        first, last = off // CSUM_BLOCK, (off + len(data) - 1) // CSUM_BLOCK
        if crcs is not None and (off % CSUM_BLOCK or len(data) % CSUM_BLOCK
                                 or len(crcs) != 4 * (last - first + 1)):
            raise InvalidArgument("checksums are given for whole blocks only, one CRC32 per block")
        if (nowait and not self.nowait_writes) or (
                (nowait or inline) and (off % CSUM_BLOCK or len(data) % CSUM_BLOCK)):
            raise BlockingIOError("cannot write without waiting")
        try:
            ch = self._locked(volid, idx, True, nowait or inline)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise self._oserror(exc) from exc
        try:
            start = first * CSUM_BLOCK
            head, tail = off - start, (last + 1) * CSUM_BLOCK - off - len(data)
            if head or tail:
                # the bytes kept from a partial block must be good, or the new
                # checksum would bless corruption
                buf = bytearray(self._read_blocks(ch, first, last, verify=False))
                for blk in {first if head else -1, last if tail else -1} - {-1}:
                    self._read_blocks(ch, blk, blk, verify=True)
                buf[head:head + len(data)] = data
            else:
                buf = data
            if crcs is None:
                crcs = block_crcs(buf)
            hdr = ch.hdr
            fresh = not hdr.all_written(first, last)      # a block never written here
            try:
                if fresh and self.preallocate:
                    self._take_space(ch.fd, HEADER_SIZE + start, len(buf))
                if nowait:
                    self._write_nowait(ch.fd, buf, HEADER_SIZE + start)
                else:
                    fileio.pwrite_all(ch.fd, buf, HEADER_SIZE + start)
                if fresh:
                    ch.meta_dirty = True        # its block is allocated now
                hdr.mark_range(first, crcs)
                hdr.gen = max(hdr.gen, gen)
                # the header page was written by every earlier write: cached
                os.pwrite(ch.fd, hdr.pack(), 0)
            except BlockingIOError:
                raise
            except OSError as exc:
                if getattr(exc, "written", 0):
                    self._checksum_what_went_in(ch, first, exc.written)
                raise self._oserror(exc) from exc
            ch.dirty_bytes += len(buf)
            self._mark_dirty(ch)
        finally:
            ch.lock.release()

    def trim(self, volid: int, idx: int, first: int, last: int, gen: int) -> bool:
        """Blocks first..last (inclusive) of the chunk read as zeros from
        now on (a discard): marked never written in its header, durable at
        the next sync like a write.  Their space is given back (a hole
        punched) only after that sync: punched now, the hole could reach the
        disk before the header does, and a crash would then leave blocks
        whose checksum no longer matches.  A chunk left with no written
        block is deleted.  Whether the chunk is gone (or was never there)."""
        check_id(volid, idx)
        if not 0 <= first <= last < NBLOCKS:
            raise InvalidArgument(f"blocks {first}..{last} outside a chunk")
        try:
            ch = self._locked(volid, idx, False)
        except OSError as exc:
            raise self._oserror(exc) from exc
        if ch is None:
            return True
        try:
            hdr = ch.hdr
            hdr.unmark_range(first, last)
            hdr.gen = max(hdr.gen, gen)
            empty = not any(hdr.bitmap)
            if not empty:
                try:
                    os.pwrite(ch.fd, hdr.pack(), 0)
                except OSError as exc:
                    raise self._oserror(exc) from exc
                ch.punch.append((first, last))
                self._mark_dirty(ch)
        finally:
            ch.lock.release()
        if empty:
            self.drop_chunks(volid, idx, 1)
        return empty

    def _take_space(self, fd: int, pos: int, size: int) -> None:
        """Allocate the blocks a write needs before its first byte goes in:
        a pool that is full then fails the write with the chunk as it was.
        Otherwise the write would stop half-way, and two replicas of the
        same write could stop at different blocks and differ from then on."""
        try:
            os.posix_fallocate(fd, pos, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.preallocate = False        # a pool without fallocate: write as is
                return
            raise

    def _checksum_what_went_in(self, ch: _Chunk, first: int, written: int) -> None:
        """A write failed after its first ``written`` bytes went in (a pool
        that filled up half-way): those blocks hold new data now, under the
        old checksums, and would never read again.  Checksum them as they
        are in the file (a failed write may leave any mix of old and new
        data, but what it leaves must read); best effort, the write fails
        anyway."""
        last = first + -(-written // CSUM_BLOCK) - 1
        try:
            raw = os.pread(ch.fd, (last - first + 1) * CSUM_BLOCK,
                           HEADER_SIZE + first * CSUM_BLOCK)
            raw = raw.ljust((last - first + 1) * CSUM_BLOCK, b"\0")
            ch.hdr.mark_range(first, block_crcs(raw))
            os.pwrite(ch.fd, ch.hdr.pack(), 0)
            ch.meta_dirty = True
            self._mark_dirty(ch)
        except OSError as exc:
            log.error("chunk %s/%s: blocks %d..%d changed by a failed write and not "
                      "checksummed again: %s", ch.hdr.volid, ch.hdr.idx, first, last, exc)

    def _mark_dirty(self, ch: _Chunk) -> None:
        """The chunk (locked) has changes the volume's next sync must flush."""
        if not ch.dirty:
            ch.dirty = True
            with self._lock:
                self._dirty[ch.hdr.volid].add(ch)

    def _write_nowait(self, fd: int, buf, pos: int) -> None:
        try:
            n = os.pwritev(fd, [buf], pos, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                # ext4 and others: buffered writes cannot be tried without waiting
                self.nowait_writes = False
                raise BlockingIOError("the pool filesystem cannot write without waiting") from None
            raise
        if n < len(buf):        # the page cache took only part: finish the rest now
            try:
                fileio.pwrite_all(fd, memoryview(buf)[n:], pos + n)
            except OSError as exc:
                exc.written = n + getattr(exc, "written", 0)
                raise

    @staticmethod
    def _oserror(exc: OSError) -> PxfsError:
        if exc.errno == 28:
            return NoSpace("pool is full")
        return PxfsError(f"chunk I/O failed: {exc}")

    def _read_blocks(self, ch: _Chunk, first: int, last: int, verify: bool,
                     nowait: bool = False) -> bytes:
        n, pos = (last - first + 1) * CSUM_BLOCK, HEADER_SIZE + first * CSUM_BLOCK
        if nowait:      # page cache only: EAGAIN (BlockingIOError) if it would wait for the disk
            if not self.nowait_reads:
                raise BlockingIOError("the pool refuses no-wait reads")
            buf = bytearray(n)
            try:
                got = os.preadv(ch.fd, [buf], pos, os.RWF_NOWAIT)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.nowait_reads = False
                    raise BlockingIOError("the pool refuses no-wait reads") from None
                raise
            if got < n:
                # short: the rest is not cached, or was never written (the
                # file ends or has a hole there, and it reads as zeros)
                written = ch.hdr.written
                if any(written(b) for b in range(first + got // CSUM_BLOCK, last + 1)):
                    raise BlockingIOError("partly cached")
                del buf[got:]
            raw = bytes(buf)
        else:
            raw = os.pread(ch.fd, n, pos)
        raw = raw.ljust((last - first + 1) * CSUM_BLOCK, b"\0")
        hdr = ch.hdr
        got = array.array("I", block_crcs(raw)) if verify else None
        if hdr.all_written(first, last) and (got is None or got == hdr.crcs[first:last + 1]):
            return raw          # the common case, without a loop over the blocks
        out = None              # a copy only when blocks never written must read as zeros
        bad = []
        crcs, written = hdr.crcs, hdr.written
        for i, blk in enumerate(range(first, last + 1)):
            if not written(blk):
                if out is None:
                    out = bytearray(raw)
                out[i * CSUM_BLOCK:(i + 1) * CSUM_BLOCK] = ZERO_BLOCK
            elif got is not None and got[i] != crcs[blk]:
                bad.append(blk)
        if bad:
            err = ChecksumError(f"chunk {ch.hdr.volid}/{ch.hdr.idx}: checksum mismatch in blocks {bad}")
            err.blocks = bad
            raise err
        return raw if out is None else bytes(out)

    def read(self, volid: int, idx: int, off: int, size: int, *, nowait: bool = False,
             inline: bool = False) -> bytes:
        """``nowait``: from the page cache only, else BlockingIOError;
        ``inline``: BlockingIOError only if the chunk is not open or busy
        (the read itself may wait for the disk)."""
        check_id(volid, idx)
        check_range(off, size)
        if size == 0:
            return b""
        ch = self._locked(volid, idx, False, nowait or inline)
        if ch is None:
            return bytes(size)
        try:
            first, last = off // CSUM_BLOCK, (off + size - 1) // CSUM_BLOCK
            data = self._read_blocks(ch, first, last, verify=True, nowait=nowait)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise self._oserror(exc) from exc
        finally:
            ch.lock.release()
        start = off - first * CSUM_BLOCK
        return data[start:start + size]

    def prefetch(self, volid: int, idx: int, off: int, size: int) -> bool:
        """Ask the kernel to start reading the blocks of ``off..off+size``
        into the page cache (POSIX_FADV_WILLNEED: it submits the reads and
        does not wait for them); False if the chunk is not open or busy
        (nothing asked)."""
        check_id(volid, idx)
        check_range(off, size)
        if size == 0:
            return False
        try:
            ch = self._locked(volid, idx, False, True)
        except BlockingIOError:
            return False
        if ch is None:
            return False
        try:
            first, last = off // CSUM_BLOCK, (off + size - 1) // CSUM_BLOCK
            os.posix_fadvise(ch.fd, HEADER_SIZE + first * CSUM_BLOCK,
                             (last - first + 1) * CSUM_BLOCK, os.POSIX_FADV_WILLNEED)
            return True
        except OSError:
            return False
        finally:
            ch.lock.release()

    def capacity(self) -> tuple[int, int]:
        """(used, total) bytes of the pool."""
        used = total = 0
        for root in self.roots:
            du = shutil.disk_usage(root)
            used += du.used
            total += du.total
        return used, total

    def close(self) -> None:
        with self._lock:
            victims = list(self._open.values())
            self._open.clear()
            pending = [fd for fds in self._unsynced.values() for fd in fds]
            self._unsynced.clear()
        for fd in pending:
            os.fsync(fd)
            os.close(fd)
        for v in victims:
            with v.lock:
                if v.fd >= 0:
                    if v.dirty:
                        os.fsync(v.fd)
                    os.close(v.fd)
                    v.fd = -1
        for rfd in self._root_fds.values():
            os.close(rfd)
        self._root_fds.clear()
