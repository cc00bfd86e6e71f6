"""Replica flushes (pxfs/replication/syncer.py) on a real chunk store: one
sync per volume in flight, flushes that wait for it, and syncs started
behind small remote writes of a volume flushed after nearly every write."""

import errno
import os
import threading
import time

import pytest
import trio

from pxfs import CSUM_BLOCK
from pxfs.chunk.store import ChunkStore
from pxfs.errors import PxfsError
from pxfs.replication.replica import ReplicaService

VOL = 11
BLOCK = b"\x5a" * CSUM_BLOCK


@pytest.fixture
def svc(tmp_path):
    store = ChunkStore([str(tmp_path / "pool")])
    yield ReplicaService(store)
    store.close()


async def test_a_flush_waits_for_the_sync_in_flight(svc):
    """Two writers flush one volume: the second must not return while the
    first one's fdatasync, which took its writes along, is still running."""
    store = svc.store
    await svc.write(VOL, 0, 0, BLOCK, 1, 1)
    synced = []
    real = store.sync

    picked = threading.Event()

    def slow_sync(volid):
        dirty = not store.clean(volid)
        real(volid)
        if dirty:
            picked.set()
            time.sleep(0.3)            # the fdatasync of a slow disk
            synced.append(volid)

    store.sync = slow_sync
    store.small_sync = lambda volid: False      # a big sync: in a thread
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.flush, VOL, 1)
        assert await trio.to_thread.run_sync(picked.wait, 5)
        assert synced == [] and store.clean(VOL)  # picked up, not yet durable
        await svc.flush(VOL, 1)
        assert synced == [VOL], "the second flush returned before the writes were durable"


async def test_a_flush_of_a_clean_volume_costs_no_sync(svc):
    await svc.write(VOL, 0, 0, BLOCK, 1, 1)
    await svc.flush(VOL, 1)
    n = svc.syncer.stats["syncs"]
    for _ in range(5):
        await svc.flush(VOL, 1)
    assert svc.syncer.stats["syncs"] == n


async def test_syncs_behind_small_remote_writes_of_a_flush_heavy_volume(svc):
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.syncer.run)
        # bulk writing (many writes per flush): nothing is synced behind
        for round_ in range(4):
            for i in range(8):
                await svc.write(VOL, 0, i * CSUM_BLOCK, BLOCK, 1, 1, remote=True)
            await svc.flush(VOL, 1)
        await svc.write(VOL, 0, 0, BLOCK, 1, 1, remote=True)
        await trio.sleep(0.05)
        assert svc.syncer.stats["syncs_behind"] == 0 and not svc.store.clean(VOL)
        await svc.flush(VOL, 1)
        # a commit after every write: the sync starts behind the write
        for i in range(12):
            await svc.write(VOL, 1, i * CSUM_BLOCK, BLOCK, 1, 1, remote=True)
            await svc.flush(VOL, 1)
        before = svc.syncer.stats["syncs_behind"]
        await svc.write(VOL, 1, 0, BLOCK, 1, 1, remote=True)
        with trio.fail_after(5):
            while not svc.store.clean(VOL):
                await trio.sleep(0.005)
        assert svc.syncer.stats["syncs_behind"] > before
        # the writer's own node never syncs behind its local copy: it only
        # starts writing it back, and its flush finishes the job
        started = []
        real = svc.store.start_writeback
        svc.store.start_writeback = lambda volid: (started.append(volid), real(volid))
        before = svc.syncer.stats["syncs_behind"]
        await svc.write(VOL, 1, 0, BLOCK, 1, 1)
        await trio.sleep(0.05)
        assert svc.syncer.stats["syncs_behind"] == before and not svc.store.clean(VOL)
        assert started == [VOL]
        await svc.flush(VOL, 1)
        assert svc.store.clean(VOL)
        nursery.cancel_scope.cancel()
    # once the volume is written in bulk, no early writeback either
    for _ in range(4):
        for i in range(8):
            await svc.write(VOL, 2, i * CSUM_BLOCK, BLOCK, 1, 1)
        await svc.flush(VOL, 1)
    started.clear()
    for i in range(8):
        await svc.write(VOL, 2, i * CSUM_BLOCK, BLOCK, 1, 1)
    assert started == [], "bulk writes started writeback one by one"


async def test_a_sync_behind_that_failed_fails_the_next_flush(svc, monkeypatch):
    """The kernel reports a write-back error once per open file: after a
    sync behind a write failed, the flush's own fdatasync would return 0
    on data that never reached the disk.  The flush must fail instead."""
    store = svc.store
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.syncer.run)
        for i in range(12):             # a commit after every write: syncs go behind
            await svc.write(VOL, 1, i * CSUM_BLOCK, BLOCK, 1, 1, remote=True)
            await svc.flush(VOL, 1)
        real, failed = os.fdatasync, []

        def fdatasync_eio(fd):          # the error is reported once, as by the kernel
            real(fd)
            if not failed:
                failed.append(fd)
                raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fdatasync", fdatasync_eio)
        await svc.write(VOL, 1, 0, BLOCK, 1, 1, remote=True)
        with trio.fail_after(5):        # the sync behind the write ran, and failed
            while not failed:
                await trio.sleep(0.005)
        assert not store.clean(VOL)
        with pytest.raises(PxfsError, match="Input/output error"):
            await svc.flush(VOL, 1)
        nursery.cancel_scope.cancel()
