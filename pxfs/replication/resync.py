"""Incremental resync: copy to a stale replica only the chunks written since
it fell out of sync (those whose gen >= its ``missed_from`` on either side),
and delete those the source no longer has, each under the chunk's lock so
that live writes and the copy never interleave."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import trio

from .. import CHUNK_SIZE
from ..errors import ChecksumError, PxfsError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Progress:
    total: int = 0          # bytes to copy
    done: int = 0
    chunks: int = 0
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def percent(self) -> float:
        return 100.0 if not self.total else round(100.0 * self.done / self.total, 1)


async def resync_replica(volid: int, source, target, *, missed_from: int, term: int,
                         lock_fn=None, report=None, put=None, check=None,
                         fallbacks=None) -> Progress:
    """Bring ``target`` up to date from ``source``; returns what was copied.

    ``lock_fn(idx)`` gives the chunk's lock (the attached node's data path);
    ``report(progress)`` is awaited now and then; ``put`` replaces
    ``target.put_chunk`` (a shared volume's merge with live writes);
    ``check()``, called under each chunk's lock before its copy, returns why
    the copy must stop (the source fell out of sync: writes now pass it by,
    so its chunks would undo them on the target), or None; ``fallbacks()``:
    the other replicas in sync now, to take a chunk from when the source's
    copy fails its checksums.
    """
    put = put or target.put_chunk
    src = await source.list_chunks(volid, missed_from)
    dst = await target.list_chunks(volid, missed_from)
    # and chunks the target still has that the source dropped while it was
    # out (a shared volume's file shrank or went): they carry no new stamp.
    # Each is looked at again under its lock below, so one written (or
    # dropped) on both meanwhile is copied (or deleted) as it is then.
    gone = await target.chunk_ids(volid) - await source.chunk_ids(volid)
    # deletions first: a stale replica that filled its pool while it was
    # out gets the space of the chunks the source trimmed away before any
    # copy needs room (a copy is written whole beside the old file)
    todo = sorted(gone) + sorted((set(src) | set(dst)) - gone)
    prog = Progress(total=len(todo) * CHUNK_SIZE)
    if report:
        await report(prog)
    last = time.monotonic()
    for idx in todo:
        lock = lock_fn(idx) if lock_fn else contextlib.nullcontext()
        async with _as_async(lock):
            why = check() if check else None
            if why:
                raise PxfsError(f"resync of volume {volid} stopped: {why}")
            got = await _get_chunk(volid, idx, source, fallbacks)
            if got is None:
                await put(volid, idx, 0, None, None, term)
            else:
                gen, bitmap, data = got
                await put(volid, idx, gen, bitmap, data, term)
        prog.done += CHUNK_SIZE
        prog.chunks += 1
        if report and time.monotonic() - last > 0.5:
            last = time.monotonic()
            await report(prog)
    if report:
        await report(prog)
    return prog


async def _get_chunk(volid: int, idx: int, source, fallbacks):
    try:
        return await source.get_chunk(volid, idx)
    except ChecksumError as exc:
        for other in (fallbacks() if fallbacks else ()):
            try:
                got = await other.get_chunk(volid, idx)
            except PxfsError:
                continue
            log.warning("volume %s chunk %d: %s; copied from another replica", volid, idx, exc)
            return got
        raise


@contextlib.asynccontextmanager
async def _as_async(lock):
    if isinstance(lock, trio.Lock):
        async with lock:
            yield
    else:
        with lock:
            yield
