"""ChunkStore: chunks of volumes on this node's pool, keyed by (volid, idx).

Blocking calls; the replication layer runs them in worker threads, except
the ones that never wait for the disk (``nowait``/``inline`` reads and
writes, ``prefetch``, ``start_writeback``), which it makes on the trio
thread.  Each
CSUM_BLOCK is checked against its CRC32 on every read (``_crc.c`` computes
them without the GIL when it is built).  Layout on a pool
root::

    <root>/vols/<volid>/TERM            highest attach term seen (fencing)
    <root>/vols/<volid>/<idx:08x>.chk   chunk files (see layout.py)

A volume's chunks live on one root of the pool (the emptiest at first write).
"""

from __future__ import annotations

import array
import collections
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import threading
import zlib

from .. import CHUNK_SIZE, CSUM_BLOCK
from ..errors import ChecksumError, InvalidArgument, NoSpace, PxfsError
from . import xfs
from .layout import HEADER_SIZE, NBLOCKS, Header

try:        # the C helper (setup.py builds it): CRCs at ~13 GB/s without the GIL
    from ._crc import block_crcs as _c_block_crcs
except ImportError:         # not built: zlib.crc32 per block, same results
    _c_block_crcs = None

log = logging.getLogger(__name__)
ZERO_BLOCK = bytes(CSUM_BLOCK)
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _syncfs = _libc.syncfs
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                 ctypes.c_uint]
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
except (OSError, AttributeError):
    _syncfs = _sync_file_range = _fallocate = None
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def _sync_fds(fds: list[int]) -> None:
    """Make the files behind ``fds`` (all on one pool) durable: one syncfs
    (one journal commit) for more than two, an fdatasync each otherwise."""
    if len(fds) > 2 and _syncfs is not None:
        if _syncfs(fds[0]) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        # XFS's syncfs writes the data back but, with no metadata to log,
        # flushes no device cache; an fdatasync of a file with nothing left
        # to write does (xfs_file_fsync), so the data is on stable storage,
        # not only in the disk's write cache
        os.fdatasync(fds[0])
    else:
        for fd in fds:
            os.fdatasync(fd)


def block_crcs(data) -> bytes:
    """The CRC32 of each CSUM_BLOCK of ``data`` (whole blocks), packed as
    the chunk header stores them."""
    if _c_block_crcs is not None:
        return _c_block_crcs(data, CSUM_BLOCK)
    mv = memoryview(data)
    crc = zlib.crc32
    return array.array("I", [crc(mv[i:i + CSUM_BLOCK])
                             for i in range(0, len(mv), CSUM_BLOCK)]).tobytes()


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


MAX_IDX = (1 << 64) - 1
MAX_VOLID = (1 << 64) - 1


def _check_range(off: int, size: int) -> None:
    if off < 0 or size < 0 or off + size > CHUNK_SIZE:
        raise InvalidArgument(f"range {off}+{size} outside a chunk")


def _check_id(volid: int, idx: int) -> None:
    if not 0 <= volid <= MAX_VOLID or not 0 <= idx <= MAX_IDX:
        raise InvalidArgument(f"chunk id {volid}/{idx} out of range")


def _pwrite_all(fd: int, buf, pos: int) -> None:
    """pwrite every byte: a short write (the pool filled up half-way) goes
    on, so it ends in the error that stopped it, never in silence.  That
    error carries ``written``: how many bytes went in before it."""
    view = memoryview(buf)
    done = 0
    try:
        while view:
            n = os.pwrite(fd, view, pos)
            if n <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            view, pos, done = view[n:], pos + n, done + n
    except OSError as exc:
        exc.written = done
        raise


#: descriptors of evicted dirty chunks kept for their volume's next sync
#: (all volumes together), at most; past this they are made durable and
#: closed at once (a mkfs of a huge volume writes to tens of thousands of
#: chunks before its one flush)
UNSYNCED_MAX = 512


class ChunkStore:
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

    def _drain_unsynced(self, volid: int) -> None:
        """Make the evicted dirty chunks of ``volid`` durable and close them
        (in the caller's thread: a chunk is opened in a worker thread).  A
        sync meanwhile waits for this one; a failure is kept for the
        volume's next sync to report."""
        with self._lock:
            fds = self._unsynced.pop(volid, [])
            if not fds:
                return
            self._draining[volid] += 1
        try:
            _sync_fds(fds)
        except OSError as exc:
            log.error("volume %s: syncing %d evicted chunk files failed: %s", volid, len(fds), exc)
            from . import incarnation       # (it imports this module)
            incarnation.forfeit()           # as a failed sync does (syncer.py)
            with self._lock:
                self._drain_failed.setdefault(volid, str(exc))
        finally:
            for fd in fds:
                os.close(fd)
            with self._lock:
                self._draining[volid] -= 1
                if not self._draining[volid]:
                    del self._draining[volid]
                self._drained.notify_all()

    def _wait_drained(self, volid: int) -> None:
        """Until no drain of the volume is under way; raise what one that
        failed left to report (then every sync fails, as after its own)."""
        with self._lock:
            while self._draining.get(volid):
                self._drained.wait()
            why = self._drain_failed.pop(volid, None)
            if why is not None:
                self._sync_failed[volid] = why
        if why is not None:
            raise PxfsError(f"volume {volid}: writing back chunk files failed ({why}); writes "
                            "since the sync before it may be lost here until a resync")

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
        _check_id(volid, idx)
        _check_range(off, len(data))
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
                    _pwrite_all(ch.fd, buf, HEADER_SIZE + start)
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
        _check_id(volid, idx)
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
                _pwrite_all(fd, memoryview(buf)[n:], pos + n)
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
        _check_id(volid, idx)
        _check_range(off, size)
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
        _check_id(volid, idx)
        _check_range(off, size)
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

    def get_chunk(self, volid: int, idx: int) -> tuple[int, bytes, bytes] | None:
        """(gen, bitmap, data) of a whole chunk, verified; None if absent."""
        _check_id(volid, idx)
        ch = self._locked(volid, idx, False)
        if ch is None:
            return None
        try:
            data = self._read_blocks(ch, 0, NBLOCKS - 1, verify=True)
            return ch.hdr.gen, bytes(ch.hdr.bitmap), data
        except OSError as exc:
            raise self._oserror(exc) from exc
        finally:
            ch.lock.release()

    def put_chunk(self, volid: int, idx: int, gen: int, bitmap: bytes | None, data: bytes | None) -> None:
        """Replace a whole chunk (resync).  ``data`` None deletes it."""
        _check_id(volid, idx)
        # a resync began: the chunks a failed sync may have lost are among
        # the ones it copies (stamped since the last good flush)
        self._sync_failed.pop(volid, None)
        d = self._voldir(volid, True)
        path = os.path.join(d, f"{idx:08x}.chk")
        # Evicting and replacing happen under the open lock: a thread that
        # opened the chunk between the two would keep (and write to) a
        # descriptor of the file that is being replaced.
        if data is None:
            with self._open_lock:
                self._evict(volid, idx)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self._fsync_dir(d)
            return
        if len(data) != CHUNK_SIZE or bitmap is None or len(bitmap) != NBLOCKS // 8:
            raise InvalidArgument("whole chunk expected")
        hdr = Header(volid, idx, gen, bitmap)
        tmp = path + ".tmp"
        try:
            self._write_file(tmp, hdr, data)
            with self._open_lock:
                self._evict(volid, idx)
                os.rename(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._oserror(exc) from exc
        self._fsync_dir(d)

    @staticmethod
    def _write_file(tmp: str, hdr: Header, data: bytes) -> None:
        """A whole chunk file at ``tmp``, on stable storage."""
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            crcs = array.array("I", block_crcs(data))
            for blk in range(NBLOCKS):
                if hdr.written(blk):
                    hdr.crcs[blk] = crcs[blk]
                    os.pwrite(fd, data[blk * CSUM_BLOCK:(blk + 1) * CSUM_BLOCK],
                              HEADER_SIZE + blk * CSUM_BLOCK)
            os.pwrite(fd, hdr.pack(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def drop_chunks(self, volid: int, first: int, count: int) -> int:
        """Delete chunks first..first+count-1 (a shared volume's file that
        went or shrank); the number that existed."""
        _check_id(volid, first)
        _check_id(volid, first + max(count, 1) - 1)
        d = self._voldir(volid, False)
        if d is None or count <= 0:
            return 0
        gone = 0
        for idx in range(first, first + count):
            self._evict(volid, idx)
            try:
                os.unlink(os.path.join(d, f"{idx:08x}.chk"))
                gone += 1
            except FileNotFoundError:
                pass
        if gone:
            self._fsync_dir(d)
        return gone

    def list_chunks(self, volid: int, min_gen: int = 0) -> dict[int, int]:
        """{idx: gen} of this volume's chunks whose gen >= min_gen."""
        d = self._voldir(volid, False)
        out = {}
        if d is None:
            return out
        for name in os.listdir(d):
            if not name.endswith(".chk"):
                continue
            idx = int(name[:-4], 16)
            with self._lock:
                ch = self._open.get((volid, idx))
            if ch is not None:
                gen = ch.hdr.gen
            else:
                try:
                    with open(os.path.join(d, name), "rb") as fh:
                        gen = Header.read_gen(fh.read(64))
                except FileNotFoundError:
                    continue                    # deleted meanwhile
                except Exception as exc:        # noqa: BLE001 - any damage
                    # a header that cannot be read may hide any stamp: list
                    # it, so that a resync replaces it rather than keep it
                    log.warning("chunk %d/%s: unreadable header (%s); listed for resync",
                                volid, name, exc)
                    gen = min_gen
            if gen >= min_gen:
                out[idx] = gen
        return out

    def chunk_ids(self, volid: int, start: int = 0, limit: int = 1 << 30) -> list[int]:
        """The sorted indices of this volume's chunks from ``start`` on, at
        most ``limit`` (names only: no header is read)."""
        d = self._voldir(volid, False)
        if d is None:
            return []
        ids = sorted(i for i in (int(n[:-4], 16) for n in os.listdir(d)
                                 if n.endswith(".chk")) if i >= start)
        return ids[:limit]

    def start_writeback(self, volid: int) -> None:
        """Start writing back the volume's dirty chunk files without waiting
        (sync_file_range): a later sync finds the pages on their way.  Only
        chunks whose lock is free; nothing here may block for long."""
        if _sync_file_range is None:
            return
        with self._lock:
            chunks = list(self._dirty.get(volid, ()))
        for ch in chunks[:2]:
            if ch.lock.acquire(blocking=False):
                try:
                    if ch.fd >= 0:
                        _sync_file_range(ch.fd, 0, 0, SYNC_FILE_RANGE_WRITE)
                finally:
                    ch.lock.release()

    def clean(self, volid: int) -> bool:
        """Whether the volume has nothing a sync would flush."""
        with self._lock:
            return (not self._dirty.get(volid) and volid not in self._dirty_dirs
                    and not self._unsynced.get(volid) and volid not in self._sync_failed
                    and not self._draining.get(volid) and volid not in self._drain_failed)

    def small_sync(self, volid: int, max_files: int = 2, max_bytes: int = 256 * 1024) -> bool:
        """Whether a sync of the volume now is at most ``max_files``
        fdatasyncs of at most ``max_bytes`` written since the last one (no
        directory to sync, no syncfs): short enough to do without a thread."""
        with self._lock:
            if (volid in self._dirty_dirs or self._unsynced.get(volid)
                    or self._draining.get(volid) or volid in self._drain_failed):
                return False
            chunks = self._dirty.get(volid, ())
            return len(chunks) <= max_files and sum(c.dirty_bytes for c in chunks) <= max_bytes

    def sync(self, volid: int) -> None:
        """Make every write to this volume so far durable.

        The chunk locks are held only to pick the dirty files (their fds are
        dup'ed), not during the flush, so writes go on meanwhile.  Several
        dirty files are flushed with one syncfs (one journal commit) instead
        of one fdatasync each.
        """
        why = self._sync_failed.get(volid)
        if why is not None:
            raise PxfsError(f"volume {volid}: an earlier sync failed ({why}); writes since "
                            "the sync before it may be lost here until a resync")
        with self._lock:
            chunks = list(self._dirty.pop(volid, ()))
            dir_dirty = volid in self._dirty_dirs
            self._dirty_dirs.discard(volid)
        fds = []                # (chunk, dup'ed fd, metadata to log?)
        punches = []            # (chunk, ranges its header, synced now, unmarks)
        for ch in chunks:
            with ch.lock:
                if ch.fd >= 0 and ch.dirty:
                    fds.append((ch, os.dup(ch.fd), ch.meta_dirty))
                    ch.dirty, ch.dirty_bytes, ch.meta_dirty = False, 0, False
                    if ch.punch:
                        punches.append((ch, ch.punch))
                        ch.punch = []
        # after the loop: a chunk evicted meanwhile moved its fd here under its lock
        fds += [(None, fd, True) for fd in self._take_unsynced(volid)]
        fds.sort(key=lambda e: e[2])          # files with nothing to log first
        try:
            if len(fds) == 2 and not fds[0][2] and _sync_file_range is not None:
                # Two files (a commit's data and journal blocks), one device
                # cache flush: a file that only overwrote blocks it holds
                # has no metadata to log, so writing its pages back and
                # waiting is enough before the other's fdatasync, whose
                # flush then covers both.  Two fdatasyncs would flush twice.
                if _sync_file_range(fds[0][1], 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE
                                    | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER):
                    err = ctypes.get_errno()
                    raise OSError(err, f"sync_file_range: {os.strerror(err)}")
                os.fdatasync(fds[1][1])
            else:
                _sync_fds([fd for _, fd, _ in fds])
            if dir_dirty:               # new chunk files' names
                d = self._voldir(volid, False)
                if d:
                    self._fsync_dir(d)
        except OSError as exc:
            self._sync_failed[volid] = str(exc)
            raise self._oserror(exc) from exc
        finally:
            for _, fd, _ in fds:
                os.close(fd)
        # chunks evicted before their turn here may be in a drain's hands
        self._wait_drained(volid)
        for ch, ranges in punches:
            self._punch(ch, ranges)

    def _punch(self, ch: _Chunk, ranges: list[tuple[int, int]]) -> None:
        """Give back the space of the blocks in ``ranges`` that are still
        unwritten (a write may have taken some again since the trim).  A
        block trimmed again since the sync began is left to the next sync:
        a write between the two trims may have put a header that marks it
        written on the disk, and only that next sync makes it unmarked
        there again.  Best effort: a crash before it, or a pool without
        hole punching, only keeps the space allocated; the blocks read as
        zeros either way."""
        if _fallocate is None or not self.punch_holes:
            return
        with ch.lock:
            if ch.fd < 0:
                return                  # evicted: the space stays
            pending = ch.punch

            def keep(b: int) -> bool:
                return ch.hdr.written(b) or any(f <= b <= t for f, t in pending)

            for first, last in ranges:
                blk = first
                while blk <= last:
                    if keep(blk):
                        blk += 1
                        continue
                    end = blk
                    while end < last and not keep(end + 1):
                        end += 1
                    if _fallocate(ch.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  HEADER_SIZE + blk * CSUM_BLOCK,
                                  (end - blk + 1) * CSUM_BLOCK):
                        err = ctypes.get_errno()
                        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                            self.punch_holes = False
                            return
                        log.info("cannot give back the space of trimmed blocks: %s",
                                 os.strerror(err))
                    blk = end + 1

    def _take_unsynced(self, volid: int) -> list[int]:
        with self._lock:
            return self._unsynced.pop(volid, [])

    def delete_volume(self, volid: int) -> None:
        self._sync_failed.pop(volid, None)
        self._drain_failed.pop(volid, None)
        for fd in self._take_unsynced(volid):
            os.close(fd)
        self._evict(volid)
        d = self._voldir(volid, False)
        self._voldirs.pop(volid, None)
        if d:
            shutil.rmtree(d, ignore_errors=True)

    def usage(self, volid: int) -> int:
        d = self._voldir(volid, False)
        if d is None:
            return 0
        total = 0
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith(".chk"):
                    total += e.stat().st_blocks * 512
        return total

    # -- fencing term ------------------------------------------------------
    def get_term(self, volid: int) -> int:
        d = self._voldir(volid, False)
        if d is None:
            return 0
        try:
            with open(os.path.join(d, "TERM")) as fh:
                return int(fh.read().strip() or 0)
        except FileNotFoundError:
            return 0

    def set_term(self, volid: int, term: int) -> None:
        try:
            self._set_term(volid, term)
        except OSError as exc:
            raise self._oserror(exc) from exc

    def _set_term(self, volid: int, term: int) -> None:
        d = self._voldir(volid, True)
        text = f"{term:020d}\n".encode()
        try:
            # in place: one sector, written whole or not at all, and no block
            # to allocate, so a replica whose pool is full can still be fenced
            # (not over an older, shorter form: its size would change too)
            fd = os.open(os.path.join(d, "TERM"), os.O_WRONLY)
        except FileNotFoundError:
            fd = -1
        if fd >= 0 and os.fstat(fd).st_size != len(text):
            os.close(fd)
            fd = -1
        if fd >= 0:
            try:
                _pwrite_all(fd, text, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        tmp = os.path.join(d, "TERM.tmp")
        with open(tmp, "wb") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, os.path.join(d, "TERM"))
        self._fsync_dir(d)

    def sync_pools(self) -> None:
        """Make everything in the pools durable (at start, before the data
        port opens).  The page cache outlives a killed process: writes its
        earlier run took and answered may still be only there, and the
        flushes this process serves cover only the writes it takes itself."""
        sync_roots(self.roots)

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


def sync_roots(roots: list[str]) -> None:
    """Make everything in the pool roots durable; OSError if a pool cannot
    (its filesystem shut down after an I/O error)."""
    for root in roots:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs is None:
                os.sync()
            elif _syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs of {root} failed")
        finally:
            os.close(fd)
        # XFS's syncfs flushes no device cache when it has no metadata to
        # log; an fsync of a file always does
        fd = os.open(os.path.join(root, "SYNCED"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
