"""The data path of an attached volume: reads from one in-sync replica
(local first) with checksum repair, writes fanned out to every in-sync and
resyncing replica in parallel, flushes as durability barriers.

A replica that fails or times out during a write or flush is reported to
``on_replica_failure`` (which marks it out of sync in etcd) *before* the
write is acknowledged; if that cannot be done, or no in-sync replica took
the write, the write fails.

Every write is stamped ``gen << 32 | epoch``: ``gen`` is the replica-set
generation from etcd, ``epoch`` counts this attachment's flushes.  After a
flush succeeded on all in-sync replicas, every stamp below ``durable`` is on
stable storage everywhere; a replica that fails later has missed at most the
chunks stamped ``durable`` or higher, and resync copies only those.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import time

import trio

from .. import CHUNK_SIZE, CSUM_BLOCK
from ..chunk.layout import block_crcs
from ..errors import ChecksumError, Fenced, InvalidArgument, PeerUnavailable, PxfsError
from .syncer import FlushPattern

log = logging.getLogger(__name__)

IN_SYNC, RESYNCING, OUT_OF_SYNC = "in_sync", "resyncing", "out_of_sync"
_STRIPES = 256
#: how long I/O waits while the attachment is suspended (its node lost
#: its etcd lease and does not know yet whether another node took the
#: volume) before it fails for good
SUSPEND_MAX = 120.0
#: A small write likely followed by a flush (FlushPattern) asks each remote
#: replica for a second answer once it is durable there, so that the flush
#: needs no round trip; at most this many such answers wait (each holds a
#: connection), later writes are plain
ACK_HELD_MAX = 8


@dataclasses.dataclass
class IoStats:
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    repairs: int = 0
    discards: int = 0
    bytes_discarded: int = 0
    #: requests that failed for want of a replica, and the last one's error
    #: and time: etcd's view of the replicas lags a node's death by up to a
    #: lease, the attached node knows at once
    errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0


class ReplicatedVolume:
    def __init__(self, volid: int, size: int, term: int, gen: int, states: dict[str, str],
                 target_fn, on_replica_failure, *, local_node: str, timeout: float = 5.0,
                 refresh=None, lease=None):
        self.volid, self.size, self.term, self.gen = volid, size, term, gen
        self.states = dict(states)            # node -> state, as in etcd
        self._target = target_fn              # node -> replica target
        self._on_failure = on_replica_failure  # async (nodes, missed_from) -> new gen
        self.local_node = local_node
        self.timeout = timeout
        self._refresh = refresh               # async: re-read replica states (shared volumes)
        # the node's etcd lease (meta.lease.Membership): ``expired()`` and
        # ``async wait_renewed()``; I/O is held while it may have run out
        self._lease = lease
        self._lease_held = False
        self.fenced: str | None = None
        self._suspended: trio.Event | None = None
        self._suspend_why = ""
        self.stats = IoStats()
        self.locks = [trio.Lock() for _ in range(_STRIPES)]
        self.epoch = 0
        self._inflight: dict[int, int] = {}   # stamp -> writes in flight
        self.durable = gen << 32
        self._max_done = -1                   # highest stamp of a completed write
        self._plain = False                   # a change since the last flush had no durable ack
        self._acks: list = []                 # (node, Pending): durable answers to collect
        self._pattern = FlushPattern()
        self._flush_lock = trio.Lock()
        self._state_lock = trio.Lock()
        # remote replicas' processes (ReplicaService.incarnation): the one
        # that answered last, and the write count when a node last took a
        # write no flush has covered yet
        self._incs: dict[str, int] = {}
        self._unflushed: dict[str, int] = {}
        self._wseq = 0

    # -- helpers -------------------------------------------------------------
    def stamp(self) -> int:
        return (self.gen << 32) | self.epoch

    def set_gen(self, gen: int) -> None:
        if gen != self.gen:
            self.gen, self.epoch = gen, 0

    def chunk_lock(self, idx: int) -> trio.Lock:
        return self.locks[idx % _STRIPES]

    def _pieces(self, off: int, size: int):
        end = off + size
        pos = off
        while pos < end:
            idx, inoff = divmod(pos, CHUNK_SIZE)
            n = min(CHUNK_SIZE - inoff, end - pos)
            yield idx, inoff, pos - off, n
            pos += n

    def _check(self, off: int, size: int) -> None:
        if self.fenced:
            raise Fenced(self.fenced)
        if off < 0 or size < 0:
            raise InvalidArgument("negative offset or size")

    def readers(self) -> list[str]:
        nodes = [n for n, s in self.states.items() if s == IN_SYNC]
        nodes.sort(key=lambda n: n != self.local_node)
        return nodes

    def writers(self) -> list[str]:
        return [n for n, s in self.states.items() if s in (IN_SYNC, RESYNCING)]

    async def never_written(self) -> bool:
        """Whether no in-sync replica holds a chunk of the volume, so every
        byte reads as zeros (mkfs may then skip zeroing).  False when a
        replica cannot tell."""
        nodes = self.readers()
        if not nodes:
            return False
        for n in nodes:
            try:
                if await self._target(n).usage(self.volid):
                    return False
            except PxfsError:
                return False
        return True

    def forget_replica(self, node: str) -> None:
        """The replica on ``node`` left the volume (ha-update): no write goes
        there from now on.  The caller holds the state lock."""
        self.states.pop(node, None)
        self._incs.pop(node, None)
        self._unflushed.pop(node, None)

    def fence_local(self, why: str) -> None:
        if not self.fenced:
            log.warning("volume %s fenced on this node: %s", self.volid, why)
            self.fenced = why
        self.resume()                       # held I/O fails now

    @property
    def suspended(self) -> bool:
        return self._suspended is not None

    def suspend(self, why: str) -> None:
        """Hold new I/O (reads too: another node may be writing the volume)
        until ``resume`` or ``fence_local``, at most SUSPEND_MAX seconds."""
        if not self.fenced and self._suspended is None:
            log.warning("volume %s: I/O held: %s", self.volid, why)
            self._suspended, self._suspend_why = trio.Event(), why

    def resume(self) -> None:
        ev, self._suspended = self._suspended, None
        if ev is not None:
            if not self.fenced:
                log.warning("volume %s: I/O resumed", self.volid)
            ev.set()

    def must_hold(self) -> bool:
        """Whether I/O would be held now (suspended, or the lease may have
        run out)."""
        return self._suspended is not None or (
            self._lease is not None and self._lease.expired())

    async def _hold(self) -> None:
        """Wait while I/O must not run: the attachment is suspended, or this
        node's etcd lease has gone unrefreshed for nearly its TTL (it may
        have expired in etcd, and another node may be taking the volume:
        the node finds out only when a keepalive answers or times out).
        After SUSPEND_MAX the volume is fenced here."""
        why = ""
        with trio.move_on_after(SUSPEND_MAX):
            while not self.fenced:
                ev = self._suspended
                if ev is not None:
                    why = self._suspend_why
                    await ev.wait()
                    continue
                lease = self._lease
                if lease is None or not lease.expired():
                    if self._lease_held:
                        self._lease_held = False
                        log.warning("volume %s: the lease is refreshed; I/O goes on", self.volid)
                    return
                why = "this node's etcd lease was not refreshed in time"
                if not self._lease_held:
                    self._lease_held = True
                    log.warning("volume %s: I/O held: %s", self.volid, why)
                # looking again now and then: a fence or a suspension of
                # this volume must not wait for the next refresh
                with trio.move_on_after(0.2):
                    await lease.wait_renewed()
            return
        self.fence_local(f"I/O held for {SUSPEND_MAX:.0f} s: {why}")

    # -- reads -----------------------------------------------------------------
    async def read(self, off: int, size: int) -> bytes:
        if self.must_hold():
            await self._hold()
        self._check(off, size)
        size = max(0, min(size, self.size - off))
        pieces = list(self._pieces(off, size))
        if len(pieces) == 1:            # within one chunk (the common case): no copy
            idx, inoff, _, n = pieces[0]
            data = bytes(await self._read_piece(idx, inoff, n))
        else:
            out = bytearray(size)
            for idx, inoff, boff, n in pieces:
                out[boff:boff + n] = await self._read_piece(idx, inoff, n)
            data = bytes(out)
        self.stats.reads += 1
        self.stats.bytes_read += size
        return data

    async def _read_piece(self, idx: int, inoff: int, n: int, *, locked: bool = False) -> bytes:
        """Read from the first in-sync replica that can serve the range; a
        replica whose checksum fails is repaired with whole blocks from the
        good copy."""
        a0 = inoff - inoff % CSUM_BLOCK
        a1 = -(-(inoff + n) // CSUM_BLOCK) * CSUM_BLOCK
        bad: list[str] = []
        errors = []
        readers = self.readers()
        # a plain loop, not an async generator over both lists: one that is
        # left early costs trio a finalizer task on every read
        for more in (False, True):
            if more:
                readers = await self._more_readers(readers)
            for node in readers:
                try:
                    data = await self._target(node).read(self.volid, idx, a0, a1 - a0,
                                                         timeout=self.timeout, term=self.term)
                except Fenced as exc:
                    # attached elsewhere since: what this node would read
                    # may be stale
                    self.fence_local(str(exc))
                    raise
                except ChecksumError as exc:
                    log.error("volume %s: replica on %s: %s; reading another replica",
                              self.volid, node, exc)
                    bad.append(node)
                    errors.append(exc)
                    continue
                except PxfsError as exc:
                    errors.append(exc)
                    continue
                for b in bad:
                    await self._repair(b, node, idx, a0, data, locked)
                return data[inoff - a0:inoff - a0 + n]
        why = "; ".join(map(str, errors)) if errors else "no in-sync replica"
        raise self._failed(PxfsError(f"volume {self.volid}: no replica could serve chunk {idx}: "
                                     f"{why}"))

    def _failed(self, exc: PxfsError) -> PxfsError:
        """Count a request that no replica could serve (shown by inspect)."""
        self.stats.errors += 1
        self.stats.last_error, self.stats.last_error_at = str(exc), time.time()
        return exc

    async def _more_readers(self, tried: list[str]) -> list[str]:
        """Shared volumes: another writer may have changed the replica states
        since we last looked; when every replica we know failed, look again."""
        if self._refresh is None:
            return []
        await self._refresh()
        return [r for r in self.readers() if r not in tried]

    async def _repair(self, node: str, good: str, idx: int, inoff: int, data: bytes,
                      locked: bool) -> None:
        try:
            if locked:
                await self._target(node).write(self.volid, idx, inoff, data, self.term,
                                               self.stamp(), timeout=self.timeout)
            else:
                async with self.chunk_lock(idx):
                    # a write may have landed since the read: copy what is there now
                    data = await self._target(good).read(self.volid, idx, inoff, len(data),
                                                         timeout=self.timeout, term=self.term)
                    await self._target(node).write(self.volid, idx, inoff, data, self.term,
                                                   self.stamp(), timeout=self.timeout)
            self.stats.repairs += 1
            log.warning("volume %s: repaired chunk %d on %s from a good replica", self.volid, idx, node)
        except PxfsError as exc:
            log.warning("volume %s: repair on %s failed: %s", self.volid, node, exc)

    # -- writes ------------------------------------------------------------------
    async def write(self, off: int, data: bytes) -> int:
        if self.must_hold():
            await self._hold()
        self._check(off, len(data))
        if off + len(data) > self.size:
            raise InvalidArgument("write past the end of the volume", errno=28)
        mv = memoryview(data)
        acked = self._pattern.wrote(len(data)) and len(self._acks) < ACK_HELD_MAX
        epoch = self.stamp()
        self._inflight[epoch] = self._inflight.get(epoch, 0) + 1
        try:
            for idx, inoff, boff, n in self._pieces(off, len(data)):
                # a write within one chunk (the common case) is sent as it
                # came; a piece of a larger one is a view, not a copy
                piece = data if n == len(data) else mv[boff:boff + n]
                async with _held(self.chunk_lock(idx)):
                    if inoff % CSUM_BLOCK or (inoff + n) % CSUM_BLOCK:
                        # partial blocks: merge with verified old data here so
                        # that replicas only ever take whole, checked blocks
                        a0 = inoff - inoff % CSUM_BLOCK
                        a1 = -(-(inoff + n) // CSUM_BLOCK) * CSUM_BLOCK
                        old = bytearray(await self._read_piece(idx, a0, a1 - a0, locked=True))
                        old[inoff - a0:inoff - a0 + n] = piece
                        piece, inoff = bytes(old), a0
                    stamp = self.stamp()
                    # checksummed once, here, and stored as they are by every
                    # replica: a copy damaged on its way fails its first read
                    crcs = block_crcs(piece)
                    args = dict(vol=self.volid, idx=idx, off=inoff, data=piece,
                                term=self.term, gen=stamp, crcs=crcs)
                    if not acked:
                        await self._fan_out("write", args)
                        continue
                    args["durable_ack"] = True
                    kept: list = []
                    try:
                        await self._fan_out("write", args, keep=kept)
                    finally:
                        # into the list the next flush collects, even if a
                        # flush began meanwhile (it does not cover this write)
                        self._acks += kept
        finally:
            self._inflight[epoch] -= 1
            if not self._inflight[epoch]:
                del self._inflight[epoch]
            if not acked:
                self._plain = True
        self._max_done = max(self._max_done, epoch)
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        return len(data)

    async def drop(self, first: int, count: int) -> None:
        """Delete chunks first..first+count-1 on every writable replica (a
        shared volume's file went or shrank)."""
        if self.fenced:
            raise Fenced(self.fenced)
        self._plain = True
        await self._fan_out("drop_chunks", dict(vol=self.volid, first=first, count=count,
                                                term=self.term), timeout=max(self.timeout, 30))

    async def discard(self, off: int, length: int) -> None:
        """Bytes off..off+length read as zeros from now on: a discard or
        write-zeroes from the loop device (fstrim, blkdiscard, mkfs).  Whole
        chunks are deleted on every writable replica, which gives their
        space back; the whole blocks of a partial chunk are marked never
        written (their space stays until the chunk is rewritten, deleted or
        emptied); bytes of a partial block are written as zeros.  Durable at
        the next flush, like a write.  The part past the end is ignored."""
        if self.must_hold():
            await self._hold()
        self._check(off, length)
        end = min(off + length, self.size)
        a0 = -(-off // CSUM_BLOCK) * CSUM_BLOCK
        a1 = end // CSUM_BLOCK * CSUM_BLOCK
        if a0 >= a1:                            # inside one block, or two partial ones
            if off < end:
                await self.write(off, bytes(end - off))
                self.stats.discards += 1
                self.stats.bytes_discarded += end - off
            return
        if off < a0:
            await self.write(off, bytes(a0 - off))
        if a1 < end:
            await self.write(a1, bytes(end - a1))
        epoch = self.stamp()
        self._inflight[epoch] = self._inflight.get(epoch, 0) + 1
        try:
            c0, c1 = -(-a0 // CHUNK_SIZE), a1 // CHUNK_SIZE     # the whole chunks
            if c0 >= c1:
                for idx, inoff, _, n in self._pieces(a0, a1 - a0):
                    await self._trim_piece(idx, inoff, n)
            else:
                if a0 < c0 * CHUNK_SIZE:
                    await self._trim_piece(c0 - 1, a0 % CHUNK_SIZE, c0 * CHUNK_SIZE - a0)
                held = await self._held_chunks(c0, c1) if c1 - c0 > _STRIPES else None
                for first in range(c0, c1, _STRIPES):
                    if self.must_hold():        # a long discard outlives the lease clock
                        await self._hold()
                    last = min(first + _STRIPES, c1)
                    if held is not None and (bisect.bisect_left(held, first)
                                             == bisect.bisect_left(held, last)):
                        continue                # no writable replica holds one of them
                    await self._drop_run(list(range(first, last)))
                if c1 * CHUNK_SIZE < a1:
                    await self._trim_piece(c1, 0, a1 - c1 * CHUNK_SIZE)
        finally:
            self._inflight[epoch] -= 1
            if not self._inflight[epoch]:
                del self._inflight[epoch]
            self._plain = True          # no durable acks: the next flush goes everywhere
        self._max_done = max(self._max_done, epoch)
        self.stats.discards += 1
        self.stats.bytes_discarded += end - off

    async def _trim_piece(self, idx: int, inoff: int, n: int) -> None:
        """Mark the whole blocks of part of a chunk never written."""
        if self.must_hold():
            await self._hold()
        async with _held(self.chunk_lock(idx)):
            await self._fan_out("trim", dict(
                vol=self.volid, idx=idx, first=inoff // CSUM_BLOCK,
                last=(inoff + n) // CSUM_BLOCK - 1, term=self.term, gen=self.stamp()))

    async def _held_chunks(self, c0: int, c1: int) -> list[int] | None:
        """The sorted chunks in c0..c1-1 that some writable replica holds,
        or None if one cannot tell (then every chunk is dropped): a large
        discard of a thin volume (fstrim of a 10 TiB file system) then visits
        only what was written instead of every 1 MiB of the range.  A chunk
        written after this look is a write racing the discard, which the
        file system does not send for the blocks it discards."""
        held: set[int] = set()
        for node in self.writers():
            try:
                with trio.fail_after(30):
                    held.update(await self._target(node).chunk_ids(self.volid, c0, c1))
            except (PxfsError, trio.TooSlowError):
                return None
        return sorted(held)

    async def _drop_run(self, run: list[int]) -> None:
        """Delete consecutive chunks (at most one per lock stripe) under
        their locks, taken in stripe order so that two runs cannot deadlock:
        a resync copying one of them meanwhile must not bring it back."""
        async with contextlib.AsyncExitStack() as stack:
            for stripe in sorted(idx % _STRIPES for idx in run):
                await stack.enter_async_context(_held(self.locks[stripe]))
            # every write waits meanwhile: a replica that hangs is given up
            # on after the usual timeout, not the 30 s of a shared file's drop
            await self._fan_out("drop_chunks", dict(vol=self.volid, first=run[0], count=len(run),
                                                    term=self.term))

    async def flush(self) -> None:
        if self.must_hold():
            await self._hold()
        if self.fenced:
            raise Fenced(self.fenced)
        async with _held(self._flush_lock):   # a second flush waits for the first's outcome
            await self._flush()

    async def _flush(self) -> None:
        self._pattern.flushed()
        seq = self._wseq              # the writes answered so far are covered
        if self._max_done < self.durable and not self._inflight and not self._acks:
            return                # nothing written since the last flush succeeded
        # every write that completed before this flush is covered by it; one
        # still in flight may not be, so durability stops below the oldest
        low = min(self._inflight, default=self.stamp() + 1)
        self.epoch += 1
        # when every change since the last flush was a write whose remote
        # replicas answer again once it is durable there, those answers stand
        # for the remote flushes: only the local replica syncs
        acks, self._acks = self._acks, []
        plain, self._plain = self._plain, False
        try:
            await self._fan_out("flush", dict(vol=self.volid, term=self.term),
                                local_only=not plain, acks=acks)
        except BaseException:
            self._plain = True
            raise
        if plain:       # the remote replicas flushed and answered from the same process
            for node, n in list(self._unflushed.items()):
                if n <= seq:
                    del self._unflushed[node]
        self.durable = max(self.durable, low)
        self.stats.flushes += 1

    async def _fan_out(self, op: str, args: dict, timeout: float | None = None, *,
                       keep: list | None = None, local_only: bool = False,
                       acks: list = ()) -> None:
        """``op`` (a data-port op and its arguments) on every writable
        replica at once: the remote requests are sent first, then the local
        replica does its copy on this task (usually without a thread hop),
        then the remote replies are collected.  ``keep``: the remote requests
        get a second answer later, and (node, Pending) go there to collect
        it.  ``local_only``: no remote request.  ``acks``: second answers
        to collect now, a failed one failing its replica."""
        nodes = self.writers()
        timeout = timeout or self.timeout
        acks = list(acks)
        failed: dict[str, PxfsError] = {}
        targets = [(n, self._target(n)) for n in nodes]
        pending = []
        try:
            for node, t in targets:
                if t.local or local_only:
                    continue
                try:
                    if len(nodes) == 1 and keep is None:
                        self._same_process(node, op, await t.do(op, args, timeout=timeout),
                                           acked=False)
                    else:
                        pending.append((node, await t.begin(op, args, timeout)))
                except PxfsError as exc:
                    failed[node] = exc
            for node, t in targets:
                if t.local:
                    try:
                        await t.do(op, args, timeout=timeout)
                    except PxfsError as exc:
                        failed[node] = exc
            while pending:
                node, p = pending.pop(0)
                try:
                    reply = await p.result(keep=keep is not None)
                except PxfsError as exc:
                    failed[node] = exc
                    continue
                try:
                    self._same_process(node, op, reply, acked=keep is not None)
                except PxfsError as exc:
                    failed[node] = exc
                    if keep is not None:          # its second answer is not wanted
                        with trio.CancelScope(shield=True):
                            await p.abandon()
                    continue
                if keep is not None:
                    keep.append((node, p))
            while acks:
                node, p = acks.pop(0)
                if node in failed:
                    await p.abandon()
                    continue
                try:
                    await p.follow_up(timeout)
                except PxfsError as exc:
                    failed[node] = exc
        finally:
            for _, p in pending + acks:      # cancelled: no reply is owed on a pooled connection
                with trio.CancelScope(shield=True):
                    await p.abandon()
        fenced = [e for e in failed.values() if isinstance(e, Fenced)]
        if fenced:
            self.fence_local(str(fenced[0]))
            raise Fenced(str(fenced[0]))
        if not failed:
            return
        async with self._state_lock:
            # the states as they are now, not before the wait for the lock:
            # two writes failing on two replicas at once must not each count
            # on the replica the other one is marking out of sync
            ok = [n for n in nodes if n not in failed and self.states.get(n) == IN_SYNC]
            if not ok:
                why = "; ".join(f"{n}: {e}" for n, e in failed.items())
                await self._no_in_sync_took(op, nodes, failed, why)
                raise self._failed(PxfsError(
                    f"volume {self.volid}: no in-sync replica took the write: {why}"))
            still = [n for n in failed if self.states.get(n) in (IN_SYNC, RESYNCING)]
            if still:
                for n in still:
                    log.warning("volume %s: replica on %s failed (%s); marking it out of sync",
                                self.volid, n, failed[n])
                try:
                    self.set_gen(await self._on_failure(still, self.durable))
                except BaseException as exc:
                    # not recorded: we must not ack, and the replicas that
                    # took the write must not serve reads beside the ones
                    # that missed it
                    self.fence_local(f"cannot record that {', '.join(still)} failed: {exc!r}")
                    raise
                for n in still:
                    self.states[n] = OUT_OF_SYNC
                    self._incs.pop(n, None)
                    self._unflushed.pop(n, None)

    def _same_process(self, node: str, op: str, reply, *, acked: bool) -> None:
        """Raise if ``node`` answers from another process than the one that
        took plain writes of ours no flush has covered: its host may have
        lost them (a power loss) and this one would flush nothing.  It keeps
        failing so until the node is marked out of sync (a write with a
        durable ack needs no such record: its second answer comes from the
        same process, on the same connection)."""
        inc = reply.get("inc") if isinstance(reply, dict) else None
        if inc is None or op not in ("write", "trim", "flush"):
            return
        old = self._incs.get(node)
        if old is not None and old != inc and node in self._unflushed:
            # no answer from the process that took them: as unsure as a timeout
            raise _Restarted(f"replica on {node} restarted since it took writes not yet "
                             "flushed there")
        self._incs[node] = inc
        if op in ("write", "trim") and not acked:
            self._wseq += 1
            self._unflushed[node] = self._wseq

    async def _no_in_sync_took(self, op: str, nodes, failed: dict, why: str) -> None:
        """A write, flush or drop that no in-sync replica took fails.

        * An in-sync replica restarted with writes no flush covered: those
          acknowledged writes may be gone and no replica has them, so the
          filesystem above must not go on over this device (I/O stops here);
          a resyncing replica that took the op no longer matches it.
        * Otherwise a failed flush changes nothing (replicas cannot differ
          because of one).
        * A resyncing replica that took a write now holds what the in-sync
          ones lack: out of sync with it.  If an in-sync replica's failure
          leaves open whether it took the write (no answer) while another's
          does not, they may now differ: no more I/O here; the next attach
          reconciles them."""
        took = [n for n in nodes if n not in failed and self.states.get(n) == RESYNCING]
        in_sync = [n for n in failed if self.states.get(n) == IN_SYNC]
        restarted = [n for n in in_sync if isinstance(failed[n], _Restarted)]
        if restarted:
            if took:
                try:
                    self.set_gen(await self._on_failure(took, self.durable))
                    for n in took:
                        self.states[n] = OUT_OF_SYNC
                except PxfsError as exc:
                    log.error("volume %s: cannot record that %s took a failed %s: %s",
                              self.volid, ", ".join(took), op, exc)
            self.fence_local(f"in-sync replica on {', '.join(restarted)} restarted and "
                             "may have lost acknowledged writes no flush covered")
            return
        if op == "flush":
            return
        unsure = [n for n in in_sync if isinstance(failed[n], PeerUnavailable)]
        if unsure and len(in_sync) > 1:
            self.fence_local(f"a {op} failed on every in-sync replica ({why})")
            return
        if took:
            try:
                self.set_gen(await self._on_failure(took, self.durable))
            except BaseException as exc:
                self.fence_local(f"cannot record that {', '.join(took)} took a failed {op}: "
                                 f"{exc!r}")
                raise
            for n in took:
                self.states[n] = OUT_OF_SYNC


class _Restarted(PeerUnavailable):
    """A replica answered from a new process while it held plain writes of
    ours that no flush had covered yet."""


class _held:
    """``async with lock``, without a trip through the scheduler when the
    lock is free (trio.Lock yields on every acquire; the data path takes
    one per write and per flush)."""
    __slots__ = ("lock",)

    def __init__(self, lock: trio.Lock):
        self.lock = lock

    async def __aenter__(self):
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()

    async def __aexit__(self, *exc):
        self.lock.release()

