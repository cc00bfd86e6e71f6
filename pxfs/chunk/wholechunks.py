"""Whole-chunk operations of a ChunkStore: the copies a resync reads and
writes, chunks listed by stamp and dropped in runs, a volume's usage and
removal, and the fencing term kept beside its chunks.  A mixin of
ChunkStore (store.py), whose state it shares."""

from __future__ import annotations

import array
import logging
import os
import shutil

from .. import CHUNK_SIZE, CSUM_BLOCK
from ..errors import InvalidArgument
from . import fileio
from .layout import HEADER_SIZE, NBLOCKS, Header, block_crcs, check_id

log = logging.getLogger(__name__)


class WholeChunks:
    def get_chunk(self, volid: int, idx: int) -> tuple[int, bytes, bytes] | None:
        """(gen, bitmap, data) of a whole chunk, verified; None if absent."""
        check_id(volid, idx)
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
        check_id(volid, idx)
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
        check_id(volid, first)
        check_id(volid, first + max(count, 1) - 1)
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
                fileio.pwrite_all(fd, text, 0)
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
