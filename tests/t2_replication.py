"""Replication with several nodes inside one trio process: each node is a
ChunkStore on tmp_path + ReplicaService + RpcServer on a loopback port.
Node "a" is local to the volume (LocalReplica); the others are reached over
the data port (RemoteReplica).  Covers fan-out writes, read repair,
failure reporting, fencing, incremental resync and garbage on the data port."""

import contextlib
import logging
import os
import random
import struct

import pytest
import trio

from pxfs import CHUNK_SIZE, CSUM_BLOCK, codec
from pxfs.chunk.layout import HEADER_SIZE
from pxfs.chunk.store import ChunkStore
from pxfs.errors import ChecksumError, Fenced, MetaError, NoSpace, PeerUnavailable, PxfsError
from pxfs.replication.replica import ReplicaService
from pxfs.replication.resync import resync_replica
from pxfs.replication.targets import LocalReplica, RemoteReplica
from pxfs.replication.volume_io import IN_SYNC, OUT_OF_SYNC, RESYNCING, ReplicatedVolume
from pxfs.rpc.client import Peer
from pxfs.rpc.frames import FrameReader, encode
from pxfs.rpc.server import RpcServer

from conftest import drop_cache

VOL = 11
SIZE = 64 << 20


def pattern(n, seed=1):
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


class Node:
    """One node's data path: store, replica service, data-port server."""

    def __init__(self, name, root):
        self.name, self.root = name, root
        self.store = ChunkStore([root])
        self.svc = ReplicaService(self.store)
        self.server = self.peer = None
        self.port = 0

    async def start(self, nursery, port=0):
        self.server = RpcServer("127.0.0.1", port, self.svc.handle)
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with self._scope:
                    await self.server.run(task_status=task_status)
            finally:
                self._stopped.set()

        listeners = await nursery.start(run)
        self.port = listeners[0].socket.getsockname()[1]
        self.peer = Peer("127.0.0.1", self.port, timeout=3)

    async def stop(self):
        self._scope.cancel()
        await self._stopped.wait()

    async def restart(self, nursery):
        """A new process on the same disk: fresh store, service and port."""
        self.store.close()
        self.store = ChunkStore([self.root])
        self.svc = ReplicaService(self.store)
        await self.peer.aclose()
        await self.start(nursery)

    def chunk_file(self, idx):
        return f"{self.root}/vols/{VOL}/{idx:08x}.chk"

    def corrupt(self, idx, off):
        """Flip one data byte of a chunk file on disk."""
        with open(self.chunk_file(idx), "r+b") as fh:
            fh.seek(HEADER_SIZE + off)
            b = fh.read(1)
            fh.seek(HEADER_SIZE + off)
            fh.write(bytes([b[0] ^ 0xFF]))


class Cluster:
    def __init__(self, nodes, nursery):
        self.nodes, self.nursery = nodes, nursery
        self.failures = []

    def target(self, name):
        node = self.nodes[name]
        if name == "a":
            return LocalReplica(name, node.svc)
        return RemoteReplica(name, node.peer)

    def volume(self, *, term=1, gen=1, states=None, local="a", on_failure=None):
        vol = None

        async def record_failure(nodes, missed_from):
            await trio.sleep(0.05)          # the write must wait for this
            self.failures.append((sorted(nodes), missed_from))
            return vol.gen + 1

        vol = ReplicatedVolume(VOL, SIZE, term, gen, states or {n: IN_SYNC for n in self.nodes},
                               self.target, on_failure or record_failure, local_node=local,
                               timeout=3)
        return vol


@pytest.fixture
async def cluster(tmp_path):
    async with trio.open_nursery() as nursery:
        nodes = {}
        for name in "abc":
            nodes[name] = Node(name, str(tmp_path / name))
            await nodes[name].start(nursery)
        yield Cluster(nodes, nursery)
        nursery.cancel_scope.cancel()
    for n in nodes.values():
        await n.peer.aclose()
        n.store.close()


# -- fan-out writes -----------------------------------------------------------------
async def test_write_reaches_every_replica(cluster):
    vol = cluster.volume()
    off, data = CHUNK_SIZE - 1000, pattern(5000)          # spans chunks 0 and 1
    assert await vol.write(off, data) == len(data)
    for node in cluster.nodes.values():
        assert node.store.read(VOL, 0, off, 1000) == data[:1000]
        assert node.store.read(VOL, 1, 0, 4000) == data[1000:]
        assert node.store.list_chunks(VOL) == {0: 1 << 32, 1: 1 << 32}
        assert node.store.get_term(VOL) == 1
    assert await vol.read(off, len(data)) == data
    assert (vol.stats.writes, vol.stats.bytes_written) == (1, 5000)
    assert cluster.failures == []


async def test_write_skips_out_of_sync_but_feeds_resyncing(cluster):
    vol = cluster.volume(states={"a": IN_SYNC, "b": RESYNCING, "c": OUT_OF_SYNC})
    await vol.write(0, b"hello")
    assert cluster.nodes["a"].store.read(VOL, 0, 0, 5) == b"hello"
    assert cluster.nodes["b"].store.read(VOL, 0, 0, 5) == b"hello"
    assert cluster.nodes["c"].store.list_chunks(VOL) == {}
    assert vol.readers() == ["a"]


async def test_read_prefers_local_replica(cluster):
    vol = cluster.volume()
    await vol.write(0, b"x" * 100)
    before = {n: node.svc.stats["reads"] for n, node in cluster.nodes.items()}
    assert await vol.read(0, 100) == b"x" * 100
    after = {n: node.svc.stats["reads"] for n, node in cluster.nodes.items()}
    assert after["a"] == before["a"] + 1
    assert after["b"] == before["b"] and after["c"] == before["c"]


async def test_write_past_end_refused(cluster):
    vol = cluster.volume()
    with pytest.raises(PxfsError):
        await vol.write(SIZE - 1, b"xx")
    assert all(n.store.list_chunks(VOL) == {} for n in cluster.nodes.values())


# -- read repair ---------------------------------------------------------------------
@pytest.mark.parametrize("local", ["a", "b"])       # b: ChecksumError crosses the wire
async def test_read_repairs_corrupt_replica(cluster, local, caplog):
    vol = cluster.volume(local=local)
    data = pattern(3 * CSUM_BLOCK)
    await vol.write(0, data)
    await vol.flush()
    bad = cluster.nodes[local]
    bad.corrupt(0, CSUM_BLOCK + 17)
    with pytest.raises(PxfsError):
        bad.store.read(VOL, 0, 0, len(data))
    with caplog.at_level(logging.WARNING, logger="pxfs.replication.volume_io"):
        assert await vol.read(0, len(data)) == data
    assert vol.stats.repairs == 1
    assert bad.store.read(VOL, 0, 0, len(data)) == data         # fixed on disk
    assert "repaired chunk 0" in caplog.text
    # a second read finds nothing to repair
    assert await vol.read(0, len(data)) == data
    assert vol.stats.repairs == 1


async def test_read_repair_after_partial_block_read(cluster):
    # The read covers 10 bytes of a corrupted block.  The repair must leave the
    # whole block good (or still detectably bad), never a bad byte with a fresh CRC.
    vol = cluster.volume()
    data = pattern(CSUM_BLOCK)
    await vol.write(0, data)
    bad = cluster.nodes["a"]
    bad.corrupt(0, 3000)
    assert await vol.read(100, 10) == data[100:110]
    assert vol.stats.repairs == 1
    try:
        got = bad.store.read(VOL, 0, 0, CSUM_BLOCK)
    except PxfsError:
        return                                   # still detected: acceptable
    assert got == data


async def test_read_fails_when_every_replica_is_corrupt(cluster):
    vol = cluster.volume()
    await vol.write(0, pattern(CSUM_BLOCK))
    for node in cluster.nodes.values():
        node.corrupt(0, 5)
    with pytest.raises(PxfsError, match="no replica could serve chunk 0"):
        await vol.read(0, CSUM_BLOCK)
    assert vol.stats.repairs == 0


async def test_read_with_no_in_sync_replica_says_so(cluster):
    vol = cluster.volume(states={n: OUT_OF_SYNC for n in cluster.nodes})
    with pytest.raises(PxfsError) as info:
        await vol.read(0, 10)
    assert str(info.value) == f"volume {VOL}: no replica could serve chunk 0: no in-sync replica"
    assert vol.stats.errors == 1 and vol.stats.last_error == str(info.value)


# -- a replica that fails during a write ------------------------------------------------
async def test_stopped_replica_reported_before_write_returns(cluster):
    vol = cluster.volume()
    await cluster.nodes["c"].stop()
    durable = vol.durable
    assert await vol.write(0, b"data") == 4
    assert cluster.failures == [(["c"], durable)]      # awaited before the ack
    assert vol.states == {"a": IN_SYNC, "b": IN_SYNC, "c": OUT_OF_SYNC}
    assert vol.gen == 2 and vol.epoch == 0
    for n in "ab":
        assert cluster.nodes[n].store.read(VOL, 0, 0, 4) == b"data"
    # later writes no longer try c
    await vol.write(4096, b"more")
    assert len(cluster.failures) == 1
    assert cluster.nodes["b"].store.list_chunks(VOL) == {0: 2 << 32}


async def test_stopped_replica_and_failed_report_fails_write(cluster):
    async def cannot_record(nodes, missed_from):
        raise MetaError("etcd is down")

    vol = cluster.volume(on_failure=cannot_record)
    await cluster.nodes["b"].stop()
    with pytest.raises(MetaError):
        await vol.write(0, b"data")
    assert vol.states["b"] == IN_SYNC
    # a and c took it, b may not have: no more I/O until a new attach
    # reconciles them
    assert vol.fenced and "cannot record" in vol.fenced
    with pytest.raises(Fenced):
        await vol.read(0, 4)


class _FailsChunk:
    """A replica target whose writes to one chunk fail."""

    def __init__(self, inner, idx, exc=PxfsError):
        self.inner, self.idx, self.local, self.exc = inner, idx, inner.local, exc

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _check(self, op, args):
        if op == "write" and args["idx"] == self.idx:
            raise self.exc(f"injected failure of chunk {self.idx}")

    async def begin(self, op, args, timeout):
        self._check(op, args)
        return await self.inner.begin(op, args, timeout)

    async def do(self, op, args, timeout=None):
        self._check(op, args)
        return await self.inner.do(op, args, timeout=timeout)


async def test_two_writes_failing_on_two_replicas_at_once(cluster):
    """b fails chunk 0 and c fails chunk 1, at the same moment: one write
    may be acknowledged (on the replica that stays in sync), the other must
    fail; never both, each on a replica the other marks out of sync."""
    vol = cluster.volume(states={"b": IN_SYNC, "c": IN_SYNC})
    fail = {"b": 0, "c": 1}
    vol._target = lambda n: _FailsChunk(cluster.target(n), fail[n])
    results = {}

    async def one(idx):
        try:
            results[idx] = await vol.write(idx * CHUNK_SIZE, b"w" * 4096)
        except PxfsError as exc:
            results[idx] = exc

    async with trio.open_nursery() as n:
        n.start_soon(one, 0)
        n.start_soon(one, 1)
    acked = [i for i, r in results.items() if r == 4096]
    assert len(acked) == 1, results
    in_sync = [n for n, s in vol.states.items() if s == IN_SYNC]
    assert len(in_sync) == 1 and not vol.fenced
    # the acknowledged write is on the replica still in sync
    i = acked[0]
    assert cluster.nodes[in_sync[0]].store.read(VOL, i, 0, 4096) == b"w" * 4096


async def test_a_write_failing_on_two_in_sync_replicas_stops_io(cluster):
    """b did not answer (it may have taken the write), c refused it: they may
    now differ, so no more I/O until a new attach reconciles them."""
    vol = cluster.volume(states={"b": IN_SYNC, "c": IN_SYNC})
    exc = {"b": PeerUnavailable, "c": NoSpace}
    vol._target = lambda n: _FailsChunk(cluster.target(n), 0, exc[n])
    with pytest.raises(PxfsError, match="no in-sync replica took the write"):
        await vol.write(0, b"x" * 4096)
    assert vol.fenced


async def test_a_write_refused_by_every_replica_fails_alone(cluster):
    """Both pools full: each replica refused the write, so they still agree;
    the write fails, the volume stays usable (reads, later writes)."""
    vol = cluster.volume(states={"b": IN_SYNC, "c": IN_SYNC})
    await vol.write(8192, b"k" * 4096)
    vol._target = lambda n: _FailsChunk(cluster.target(n), 0, NoSpace)
    with pytest.raises(PxfsError, match="no in-sync replica took the write"):
        await vol.write(0, b"x" * 4096)
    assert not vol.fenced and vol.states == {"b": IN_SYNC, "c": IN_SYNC}
    assert await vol.read(8192, 4096) == b"k" * 4096
    await vol.flush()


async def test_a_resyncing_replica_that_took_a_failed_write_falls_out(cluster):
    """The in-sync replica refused a write that the resyncing one took: the
    latter now holds what the former lacks, so it must not be marked in
    sync by the resync as it is."""
    vol = cluster.volume(states={"b": IN_SYNC, "c": RESYNCING})
    vol._target = lambda n: _FailsChunk(cluster.target(n), 0, NoSpace) if n == "b" \
        else cluster.target(n)
    with pytest.raises(PxfsError, match="no in-sync replica took the write"):
        await vol.write(0, b"x" * 4096)
    assert vol.states == {"b": IN_SYNC, "c": OUT_OF_SYNC} and not vol.fenced
    assert [f[0] for f in cluster.failures] == [["c"]]


async def test_a_flush_failing_everywhere_does_not_stop_io(cluster):
    vol = cluster.volume(states={"b": IN_SYNC, "c": IN_SYNC})
    await vol.write(0, b"f" * 4096)
    await cluster.nodes["b"].stop()
    await cluster.nodes["c"].stop()
    with pytest.raises(PxfsError):
        await vol.flush()
    assert not vol.fenced


async def test_a_replica_that_restarted_with_unflushed_writes_falls_out(cluster):
    """b took a write, then its process was replaced (its host rebooted:
    the page cache holding the write is gone).  The flush that the new
    process answers must not count: b is marked out of sync."""
    vol = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    await vol.write(0, b"r" * 256 * 1024)             # plain: no durable ack
    await cluster.nodes["b"].stop()
    os.truncate(cluster.nodes["b"].chunk_file(0), HEADER_SIZE)   # lost with the power
    await cluster.nodes["b"].restart(cluster.nursery)
    await vol.flush()
    assert vol.states["b"] == OUT_OF_SYNC
    assert [f[0] for f in cluster.failures] == [["b"]]
    # a restart with nothing unflushed is no reason to fail a replica
    vol2 = cluster.volume(states={"a": IN_SYNC, "c": IN_SYNC})
    await vol2.write(CHUNK_SIZE, b"s" * 256 * 1024)
    await vol2.flush()
    await cluster.nodes["c"].stop()
    await cluster.nodes["c"].restart(cluster.nursery)
    await vol2.write(CHUNK_SIZE, b"t" * 256 * 1024)
    await vol2.flush()
    assert vol2.states["c"] == IN_SYNC


async def test_no_in_sync_replica_took_the_write(cluster):
    vol = cluster.volume(states={"a": RESYNCING, "b": IN_SYNC})
    await cluster.nodes["b"].stop()
    with pytest.raises(PxfsError, match="no in-sync replica took the write"):
        await vol.write(0, b"d" * 4096)          # whole block: straight to the fan-out
    # a, resyncing, took what b (in sync) did not: it falls out of sync
    assert [f[0] for f in cluster.failures] == [["a"]] and vol.states["a"] == OUT_OF_SYNC


async def test_stopped_replica_during_flush(cluster):
    vol = cluster.volume()
    await vol.write(0, b"data")
    await cluster.nodes["b"].stop()
    await vol.flush()
    assert [f[0] for f in cluster.failures] == [["b"]]
    assert vol.states["b"] == OUT_OF_SYNC


# -- durable acknowledgements: a volume flushed after every small write ----------
async def _train(vol, rounds=3):
    """Write-then-flush a few times: the volume learns it is flushed after
    every write, so its next small writes ask for durable acks."""
    for i in range(rounds):
        await vol.write(i * 4096, pattern(4096, i))
        await vol.flush()


def _count_flushes(node):
    calls = []
    real = node.svc.flush

    async def flush(volid, term):
        calls.append(volid)
        await real(volid, term)
    node.svc.flush = flush
    return calls


async def test_flush_after_small_writes_collects_durable_acks(cluster):
    vol = cluster.volume()
    await _train(vol)
    flushes = {n: _count_flushes(cluster.nodes[n]) for n in "bc"}
    acked = {n: cluster.nodes[n].svc.syncer.stats["syncs_acked"] for n in "bc"}
    for i in range(4):
        await vol.write(65536 + i * 4096, pattern(4096, 9 + i))
        await vol.flush()
        for n in "abc":                    # durable everywhere, no flush request sent
            assert cluster.nodes[n].store.clean(VOL), (i, n)
    assert flushes == {"b": [], "c": []}
    assert {n: cluster.nodes[n].svc.syncer.stats["syncs_acked"] - acked[n] for n in "bc"} == \
        {"b": 4, "c": 4}
    assert vol._acks == [] and cluster.failures == []
    for n in "abc":
        assert cluster.nodes[n].store.read(VOL, 0, 65536 + 3 * 4096, 4096) == pattern(4096, 12)


async def test_large_write_among_acked_ones_flushes_the_remotes(cluster):
    vol = cluster.volume()
    await _train(vol)
    flushes = {n: _count_flushes(cluster.nodes[n]) for n in "bc"}
    await vol.write(0, pattern(4096, 5))               # acked
    await vol.write(1 << 20, pattern(256 * 1024, 6))   # too large: plain
    await vol.flush()
    assert flushes == {"b": [VOL], "c": [VOL]}
    assert vol._acks == []                             # collected all the same
    for n in "abc":
        assert cluster.nodes[n].store.clean(VOL)


async def test_writes_without_flush_stop_holding_connections(cluster):
    from pxfs.replication.volume_io import ACK_HELD_MAX
    vol = cluster.volume()
    await _train(vol)
    flushes = {n: _count_flushes(cluster.nodes[n]) for n in "bc"}
    for i in range(10):                                # no flush: answers pile up, to a bound
        await vol.write(i * 4096, pattern(4096, 20 + i))
    assert len(vol._acks) == ACK_HELD_MAX              # 2 remotes: the first 4 writes
    await vol.flush()                                  # the later writes were plain
    assert flushes == {"b": [VOL], "c": [VOL]} and vol._acks == []
    for n in "abc":
        assert cluster.nodes[n].store.clean(VOL)
        assert cluster.nodes[n].store.read(VOL, 0, 9 * 4096, 4096) == pattern(4096, 29)


async def test_failed_durable_ack_fails_its_replica_at_the_flush(cluster):
    vol = cluster.volume()
    await _train(vol)
    b = cluster.nodes["b"]

    def broken_sync(volid):
        raise OSError(5, "Input/output error")
    b.store.sync = broken_sync
    durable = vol.durable
    await vol.write(8192, pattern(4096, 7))            # applied everywhere: acknowledged
    assert cluster.failures == []
    await vol.flush()                                  # b's data is not on disk: b fails
    assert cluster.failures == [(["b"], durable)]
    assert vol.states["b"] == OUT_OF_SYNC and vol.states["c"] == IN_SYNC
    assert cluster.nodes["c"].store.clean(VOL)


async def test_replica_gone_before_its_durable_ack_fails_at_the_flush(cluster):
    vol = cluster.volume()
    await _train(vol)
    c = cluster.nodes["c"]

    async def never(volid):
        await trio.sleep_forever()
    c.svc.syncer.sync_now = never              # applied, then dies before it is on disk
    durable = vol.durable
    await vol.write(8192, pattern(4096, 8))
    assert cluster.failures == []
    await c.stop()
    await vol.flush()
    assert cluster.failures == [(["c"], durable)]
    assert vol.states["c"] == OUT_OF_SYNC and vol.states["b"] == IN_SYNC


async def test_follow_up_reply_on_the_same_connection(cluster):
    peer = cluster.nodes["b"].peer
    await peer.call("write", vol=VOL, idx=0, off=0, data=pattern(4096), term=1, gen=1)
    p = await peer.begin("write", vol=VOL, idx=0, off=4096, data=pattern(4096, 2), term=1,
                         gen=1, durable_ack=True)
    assert (await p.result(keep=True))["ok"]
    assert (await p.follow_up())["durable"] is True
    assert cluster.nodes["b"].store.clean(VOL)
    # the connection went back to the pool in step: the next call uses it
    assert (await peer.call("read", vol=VOL, idx=0, off=4096, size=4096))["data"] == pattern(4096, 2)
    # a refused write has no follow-up, and its connection stays usable
    p = await peer.begin("write", vol=VOL, idx=0, off=0, data=b"x" * 4096, term=0, gen=1,
                         durable_ack=True)
    await cluster.target("b").fence(VOL, 3)
    with pytest.raises(Fenced):
        await (await peer.begin("write", vol=VOL, idx=0, off=0, data=b"x" * 4096, term=1,
                                gen=1, durable_ack=True)).result(keep=True)
    await p.abandon()
    assert (await peer.call("read", vol=VOL, idx=0, off=0, size=4096))["data"] == pattern(4096)


# -- fencing -------------------------------------------------------------------------
async def test_fenced_by_newer_term(cluster):
    await cluster.target("b").fence(VOL, 5)
    assert cluster.nodes["b"].store.get_term(VOL) == 5
    old = cluster.volume(term=4)
    with pytest.raises(Fenced):
        await old.write(0, b"stale")
    assert old.fenced
    assert cluster.nodes["b"].store.list_chunks(VOL) == {}
    assert cluster.nodes["b"].svc.stats["fenced"] == 1
    with pytest.raises(Fenced):
        await old.read(0, 5)
    with pytest.raises(Fenced):
        await old.flush()
    assert cluster.failures == []                 # fencing is not a replica failure
    new = cluster.volume(term=5)
    await new.write(0, b"fresh")
    assert cluster.nodes["b"].store.read(VOL, 0, 0, 5) == b"fresh"


@pytest.mark.parametrize("fenced_on", ["a", "b"])
async def test_a_read_of_an_older_term_is_refused(cluster, fenced_on):
    """Attached elsewhere since (a newer term fenced the replicas): a read
    from the old attachment, local or remote, is refused there and fences
    it here, instead of returning data the new attacher may have changed."""
    old = cluster.volume(term=4, states={"a": IN_SYNC, "b": IN_SYNC})
    await old.write(0, b"old" * 100)
    assert await old.read(0, 300) == b"old" * 100
    # a read carries the term but does not raise the replica's
    assert cluster.nodes["b"].store.get_term(VOL) == 4
    await cluster.target(fenced_on).fence(VOL, 5)
    other = {"a": "b", "b": "a"}[fenced_on]
    if fenced_on == "b":                  # reads go to the local replica first
        old.states = {"b": IN_SYNC}
    with pytest.raises(Fenced, match="older than 5"):
        await old.read(0, 300)
    assert old.fenced
    with pytest.raises(Fenced):
        await old.read(0, 300)            # not from the replica that was not fenced either
    assert cluster.nodes[other].store.get_term(VOL) == 4
    assert cluster.nodes[fenced_on].svc.stats["fenced"] == 1
    new = cluster.volume(term=5, states={"a": IN_SYNC, "b": IN_SYNC})
    assert await new.read(0, 300) == b"old" * 100


async def test_io_holds_while_the_lease_may_have_run_out(cluster, monkeypatch):
    """Past the lease clock (no refresh answered for nearly the TTL) every
    I/O waits for the next refresh; one that never comes fences the volume
    after SUSPEND_MAX."""
    import time
    from pxfs.replication import volume_io

    class Clock:
        def __init__(self):
            self.valid_until = time.monotonic() + 60
            self.renewed = trio.Event()

        def expired(self):
            return time.monotonic() > self.valid_until

        async def wait_renewed(self):
            await self.renewed.wait()

        def renew(self):
            self.valid_until = time.monotonic() + 60
            self.renewed.set()
            self.renewed = trio.Event()

    clock = Clock()
    vol = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    vol._lease = clock
    await vol.write(0, b"l" * 4096)
    clock.valid_until = time.monotonic() - 0.01
    done = []

    async def io(name, fn):
        await fn()
        done.append(name)
    async with trio.open_nursery() as n:
        n.start_soon(io, "read", lambda: vol.read(0, 4096))
        n.start_soon(io, "write", lambda: vol.write(4096, b"m" * 4096))
        n.start_soon(io, "flush", vol.flush)
        await trio.sleep(0.3)
        assert done == []
        clock.renew()
    assert sorted(done) == ["flush", "read", "write"] and not vol.fenced
    assert await vol.read(4096, 4096) == b"m" * 4096
    # fenced while held (a replica refused another request): fails at once
    clock.valid_until = time.monotonic() - 0.01
    with trio.fail_after(1):                # not at the next refresh (never)
        async with trio.open_nursery() as n:
            async def read_fails():
                with pytest.raises(Fenced, match="taken elsewhere"):
                    await vol.read(0, 4096)
            n.start_soon(read_fails)
            await trio.sleep(0.1)
            vol.fence_local("taken elsewhere")
    monkeypatch.setattr(volume_io, "SUSPEND_MAX", 0.2)
    vol2 = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    vol2._lease = clock
    with pytest.raises(Fenced, match="held for .*lease was not refreshed"):
        await vol2.read(0, 4096)
    assert vol2.fenced


async def _fence_during(node, method: str, apply) -> list:
    """Run ``apply()`` with ``node.store.<method>`` stopped at a gate in its
    worker thread, fence term 2 meanwhile, then open the gate: the order in
    which the release, ``apply`` and the fence's answer came."""
    import threading
    gate, entered = threading.Event(), threading.Event()
    orig = getattr(node.store, method)

    def slow(*a, **kw):
        if kw.get("nowait"):
            raise BlockingIOError           # to the worker thread
        entered.set()
        gate.wait(10)
        return orig(*a, **kw)
    setattr(node.store, method, slow)
    order = []

    async def run():
        await apply()
        order.append("applied")

    async def fence():
        await trio.to_thread.run_sync(entered.wait, 10)
        async with trio.open_nursery() as n:
            n.start_soon(node.svc.fence, VOL, 2)
            await trio.sleep(0.2)
            order.append("released")
            gate.set()
        order.append("fence")
    try:
        async with trio.open_nursery() as n:
            n.start_soon(run)
            n.start_soon(fence)
    finally:
        setattr(node.store, method, orig)
    return order


async def test_a_fence_waits_for_the_writes_it_let_through(cluster):
    """A large write that passed its term check is applying in a worker
    thread when the fence comes: the fence answers only after it, and a
    write that was waiting behind a chunk copy is refused after the fence."""
    node = cluster.nodes["b"]
    order = await _fence_during(node, "write", lambda: node.svc.write(
        VOL, 0, 0, b"o" * 256 * 1024, 1, 1 << 32))
    assert order == ["released", "applied", "fence"]
    # a write held behind a chunk copy and fenced meanwhile is refused
    hold = trio.Event()
    node.svc._held[(VOL, 1)] = hold
    async with trio.open_nursery() as n:
        async def late():
            with pytest.raises(Fenced):
                await node.svc.write(VOL, 1, 0, b"l" * 4096, 2, 1 << 32)
        n.start_soon(late)
        await trio.sleep(0.05)
        await node.svc.fence(VOL, 3)
        del node.svc._held[(VOL, 1)]
        hold.set()
    assert node.store.list_chunks(VOL) == {0: 1 << 32}


async def test_a_fence_waits_for_a_chunk_copy_it_let_through(cluster):
    node = cluster.nodes["b"]
    order = await _fence_during(node, "put_chunk", lambda: node.svc.put_chunk(
        VOL, 3, 1 << 32, b"\xff" * 32, b"p" * CHUNK_SIZE, 1))
    assert order == ["released", "applied", "fence"]


@pytest.mark.parametrize("op", ["drop_chunks", "trim"])
async def test_a_fence_waits_for_a_discard_it_let_through(cluster, op):
    """A drop of chunks (or a trim) of the old attachment is running when
    the fence comes: the fence answers only after it, so it cannot delete
    what the new attachment writes next; one that waited behind a chunk
    copy is refused after the fence."""
    node = cluster.nodes["b"]
    node.store.write(VOL, 0, 0, b"d" * 4096, 1)
    if op == "drop_chunks":
        apply = lambda: node.svc.drop_chunks(VOL, 0, 4, 1)      # noqa: E731
    else:
        apply = lambda: node.svc.trim(VOL, 0, 0, 0, 1, 1 << 32)  # noqa: E731
    order = await _fence_during(node, op, apply)
    assert order == ["released", "applied", "fence"]
    node.store.write(VOL, 1, 0, b"n" * 4096, 1)
    hold = trio.Event()
    node.svc._held[(VOL, 1)] = hold
    async with trio.open_nursery() as n:
        async def late():
            with pytest.raises(Fenced):
                await node.svc.drop_chunks(VOL, 0, 4, 2)
        n.start_soon(late)
        await trio.sleep(0.05)
        await node.svc.fence(VOL, 3)
        del node.svc._held[(VOL, 1)]
        hold.set()
    assert node.store.read(VOL, 1, 0, 4096) == b"n" * 4096


async def test_term_survives_restart(cluster):
    await cluster.target("c").fence(VOL, 7)
    await cluster.nodes["c"].stop()
    await cluster.nodes["c"].restart(cluster.nursery)
    with pytest.raises(Fenced):
        await cluster.target("c").write(VOL, 0, 0, b"x", 6, 1)


# -- resync --------------------------------------------------------------------------
async def take_c_out_and_write(cluster):
    """Chunks 0..9 written and flushed, c stops, then chunks 3 and 7 change."""
    vol = cluster.volume()
    for idx in range(10):
        await vol.write(idx * CHUNK_SIZE, pattern(8192, idx))
    await vol.flush()
    await cluster.nodes["c"].stop()
    await vol.write(3 * CHUNK_SIZE + 100, b"three")
    await vol.write(7 * CHUNK_SIZE + 5000, b"seven")
    [(nodes, missed_from)] = cluster.failures
    assert nodes == ["c"]
    await cluster.nodes["c"].restart(cluster.nursery)
    return vol, missed_from


async def test_resync_brings_replica_up_to_date(cluster):
    vol, missed_from = await take_c_out_and_write(cluster)
    c = cluster.nodes["c"]
    assert c.store.read(VOL, 3, 100, 5) != b"three"
    reports = []

    async def report(p):
        reports.append(p.percent)

    await resync_replica(VOL, cluster.target("a"), cluster.target("c"), missed_from=missed_from,
                         term=vol.term, lock_fn=vol.chunk_lock, report=report)
    a = cluster.nodes["a"]
    for idx in range(10):
        assert c.store.get_chunk(VOL, idx) == a.store.get_chunk(VOL, idx), idx
    assert c.store.read(VOL, 7, 5000, 5) == b"seven"
    assert reports[-1] == 100.0


async def test_resync_copies_only_chunks_written_since_failure(cluster):
    vol, missed_from = await take_c_out_and_write(cluster)
    prog = await resync_replica(VOL, cluster.target("a"), cluster.target("c"),
                                missed_from=missed_from, term=vol.term)
    assert prog.chunks == 2, (prog, cluster.nodes["a"].store.list_chunks(VOL), missed_from)
    assert prog.total == prog.done == 2 * CHUNK_SIZE
    assert cluster.nodes["c"].svc.stats["chunks_put"] == 2


async def test_resync_stops_when_its_source_falls_out_of_sync(cluster):
    vol = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    for i in range(4):
        await vol.write(i * CHUNK_SIZE, pattern(4096, i))
    calls = []

    def check():
        calls.append(1)
        return "the source a is out_of_sync now" if len(calls) > 2 else None
    with pytest.raises(PxfsError, match="source a is out_of_sync"):
        await resync_replica(VOL, cluster.target("a"), cluster.target("c"), missed_from=0,
                             term=1, check=check)
    # two chunks copied, then no more: nothing after the source fell out
    assert len(calls) == 3 and sorted(cluster.nodes["c"].store.list_chunks(VOL)) == [0, 1]


async def test_resync_deletes_chunks_gone_from_source(cluster):
    vol = cluster.volume()
    await vol.write(0, b"x")
    await vol.write(CHUNK_SIZE, b"y")
    # chunk 1 vanished on the source (trimmed) after c fell out at stamp 0
    await cluster.target("a").put_chunk(VOL, 1, 0, None, None, vol.term)
    prog = await resync_replica(VOL, cluster.target("a"), cluster.target("c"), missed_from=0,
                                term=vol.term)
    assert prog.chunks == 2
    assert cluster.nodes["c"].store.list_chunks(VOL) == {0: 1 << 32}


async def test_a_full_stale_replica_gets_space_back_before_the_copies(cluster, tmp_path):
    """Replica c filled its pool, fell out of sync, and the data was then
    trimmed away on the others: the resync drops the chunks the source no
    longer has before it copies anything, so the copy of a chunk written
    meanwhile fits in the space they gave back (copied first, it failed
    on the full pool and the resync never got to the drops)."""
    import subprocess
    img, small = tmp_path / "small.img", tmp_path / "small"
    small.mkdir()
    subprocess.run(["truncate", "-s", "320M", str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(small)], check=True)
    try:
        c = cluster.nodes["c"]
        await c.stop()
        c.root = str(small)
        await c.restart(cluster.nursery)
        vol = cluster.volume()
        for i in range(5, 10):
            await vol.write(i * CHUNK_SIZE, os.urandom(CHUNK_SIZE))
        await vol.flush()
        vol.states["c"] = OUT_OF_SYNC
        vol.set_gen(vol.gen + 1)
        missed = vol.stamp()
        await vol.drop(5, 5)                          # trimmed on a and b only
        new = os.urandom(CHUNK_SIZE // 2)
        await vol.write(0, new)                       # chunk 0 sorts before them
        await vol.flush()
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        subprocess.run(["fallocate", "-l", str(free), str(small / "filler")], check=False)
        with contextlib.suppress(OSError), open(small / "filler2", "wb") as fh:
            while True:                               # what fallocate left
                fh.write(bytes(4096))
                fh.flush()
        with pytest.raises(NoSpace):                  # c's pool is full
            c.store.write(VOL, 20, 0, os.urandom(CHUNK_SIZE), vol.stamp())
        prog = await resync_replica(VOL, cluster.target("a"), cluster.target("c"),
                                    missed_from=missed, term=vol.term)
        assert prog.chunks == 6
        assert set(c.store.list_chunks(VOL)) == {0}
        assert c.store.read(VOL, 0, 0, len(new)) == new
        assert c.store.read(VOL, 5, 0, 4096) == bytes(4096)
    finally:
        cluster.nodes["c"].store.close()
        subprocess.run(["umount", "-l", str(small)], check=True)


@pytest.mark.parametrize("source", ["a", "b"])
async def test_resync_deletes_chunks_dropped_while_the_replica_was_out(cluster, source):
    """A shared volume's file shrank (its chunks dropped) while replica c
    was out of sync: the dropped chunks carry no new stamp, yet the
    incremental resync removes them from c too, so that a later extension
    of the file reads zeros there and not the old bytes."""
    vol = cluster.volume()
    for i in range(4):
        await vol.write(i * CHUNK_SIZE, bytes([65 + i]) * 4096)
    await vol.flush()
    vol.states["c"] = OUT_OF_SYNC                 # c falls out here
    vol.set_gen(vol.gen + 1)
    missed = vol.stamp()
    await vol.drop(1, 2)                          # on a and b only
    await vol.write(0, b"w" * 4096)               # and a change c missed
    c = cluster.nodes["c"].store
    assert set(c.list_chunks(VOL)) == {0, 1, 2, 3}
    prog = await resync_replica(VOL, cluster.target(source), cluster.target("c"),
                                missed_from=missed, term=vol.term)
    assert prog.chunks == 3                       # chunk 0, and 1 and 2 deleted
    assert set(c.list_chunks(VOL)) == {0, 3}
    assert c.read(VOL, 1, 0, 4096) == bytes(4096)
    assert c.read(VOL, 0, 0, 4096) == b"w" * 4096


async def test_a_merged_copy_of_a_chunk_gone_from_the_source_keeps_only_new_blocks(cluster):
    """Live resync of a shared volume: the source no longer has a chunk
    (dropped while the target was away), but a write reached the target
    since tracking began.  The target keeps that write's blocks only, not
    the old ones the source dropped."""
    c = cluster.nodes["c"]
    await cluster.target("c").write(VOL, 3, 0, b"o" * 4 * CSUM_BLOCK, 1, 1)     # old, blocks 0-3
    c.svc.track(VOL)
    await cluster.target("c").write(VOL, 3, 5 * CSUM_BLOCK, b"n" * CSUM_BLOCK, 1, 2)   # new, block 5
    await c.svc.put_chunk_merged(VOL, 3, 0, None, None, 1)
    assert c.store.read(VOL, 3, 0, 4 * CSUM_BLOCK) == bytes(4 * CSUM_BLOCK)
    assert c.store.read(VOL, 3, 5 * CSUM_BLOCK, CSUM_BLOCK) == b"n" * CSUM_BLOCK
    c.svc.untrack(VOL)


async def test_chunk_ids_come_in_pages(cluster, monkeypatch):
    from pxfs.replication import replica, targets
    monkeypatch.setattr(replica, "CHUNK_IDS_PAGE", 3)
    monkeypatch.setattr(targets, "CHUNK_IDS_PAGE", 3)
    vol = cluster.volume()
    for i in (0, 2, 5, 6, 9, 40, 41):
        await vol.write(i * CHUNK_SIZE, b"p" * 4096)
    assert await cluster.target("b").chunk_ids(VOL) == {0, 2, 5, 6, 9, 40, 41}
    assert await cluster.target("a").chunk_ids(VOL) == {0, 2, 5, 6, 9, 40, 41}
    assert await cluster.target("b").chunk_ids(VOL + 1) == set()


# -- garbage on the data port ----------------------------------------------------------
def _frame(body):
    return struct.pack(">I", len(body)) + body


GARBAGE = {
    "random": random.Random(7).randbytes(300),
    "huge_length": struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 64,
    "non_map": _frame(codec.pack([1, 2, 3])),
    "undecodable": _frame(b"\xc1\xc1\xc1"),
    "map_without_op": _frame(codec.pack({"hello": "world"})),
    "truncated": encode({"op": "ping", "id": 1})[:-2],
}


async def _send_raw_until_closed(port, payload):
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(payload)
        await stream.send_eof()
        with trio.fail_after(5):
            while True:
                try:
                    if not await stream.receive_some(65536):
                        return                      # the server closed the connection
                except trio.BrokenResourceError:
                    return
    finally:
        await stream.aclose()


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_garbage_frame_closes_only_that_connection(cluster, kind):
    b = cluster.nodes["b"]
    other = Peer("127.0.0.1", b.port)
    await other.call("ping")                        # an established connection
    await _send_raw_until_closed(b.port, GARBAGE[kind])
    assert b.server.frames_rejected == 1
    assert (await other.call("ping"))["ok"]         # the old connection still works
    fresh = Peer("127.0.0.1", b.port)
    assert (await fresh.call("ping"))["ok"]         # and new ones are accepted
    await cluster.target("b").write(VOL, 0, 0, b"ok", 1, 1)
    assert b.store.read(VOL, 0, 0, 2) == b"ok"
    await other.aclose()
    await fresh.aclose()


async def test_a_frame_that_stalls_midway_closes_its_connection(cluster, monkeypatch):
    """A peer that sends part of a frame and then nothing: the connection
    is closed after FRAME_TIMEOUT (it would hold a server task for ever),
    while an idle connection between frames is left alone."""
    from pxfs.rpc import frames
    monkeypatch.setattr(frames, "FRAME_TIMEOUT", 0.5)
    b = cluster.nodes["b"]
    idle = Peer("127.0.0.1", b.port)
    await idle.call("ping")
    stream = await trio.open_tcp_stream("127.0.0.1", b.port)
    try:
        await stream.send_all(struct.pack(">I", 100) + b"\x85" + b"x" * 9)   # 10 of 100 bytes
        t0 = trio.current_time()
        with trio.fail_after(5):
            try:
                assert await stream.receive_some(100) == b""
            except trio.BrokenResourceError:
                pass
        assert trio.current_time() - t0 >= 0.4
    finally:
        await stream.aclose()
    assert b.server.frames_rejected == 1
    await trio.sleep(0.6)                       # idle longer than FRAME_TIMEOUT
    assert (await idle.call("ping"))["ok"]
    await idle.aclose()


async def test_good_requests_before_garbage_are_answered(cluster):
    b = cluster.nodes["b"]
    stream = await trio.open_tcp_stream("127.0.0.1", b.port)
    reader = FrameReader(stream)
    await stream.send_all(encode({"op": "ping", "id": 41}) + _frame(b"\xc1"))
    with trio.fail_after(5):
        assert (await reader.receive()) == {"id": 41, "ok": True}
        assert await reader.receive() is None
    await stream.aclose()
    assert b.server.frames_rejected == 1


@pytest.mark.parametrize("rid", [True, -5, -(1 << 63), 1.0])
async def test_a_request_id_that_is_not_a_u64_closes_the_connection(cluster, rid):
    b = cluster.nodes["b"]
    stream = await trio.open_tcp_stream("127.0.0.1", b.port)
    reader = FrameReader(stream)
    await stream.send_all(encode({"op": "ping", "id": rid}))
    with trio.fail_after(5):
        assert await reader.receive() is None
    await stream.aclose()
    assert b.server.frames_rejected == 1


async def test_bad_field_is_an_error_reply(cluster):
    peer = cluster.nodes["b"].peer
    with pytest.raises(PxfsError, match="'vol'"):
        await peer.call("write", vol=-1, idx=0, off=0, data=b"x", term=1, gen=1)
    with pytest.raises(PxfsError, match="unknown op"):
        await peer.call("format_disk")
    assert (await peer.call("ping"))["ok"]


async def test_out_of_range_chunk_index_does_not_kill_server(cluster):
    # idx must be a u64; the request must fail on its own and the data port
    # must keep serving everyone else.
    b = cluster.nodes["b"]
    with pytest.raises(PxfsError):
        await Peer("127.0.0.1", b.port).call("write", vol=VOL, idx=-1, off=0, data=b"x",
                                             term=1, gen=1)
    assert (await Peer("127.0.0.1", b.port).call("ping"))["ok"]


async def test_peer_survives_server_restart_on_same_port(cluster):
    # A pooled connection the server closed must not fail the next call.
    b = cluster.nodes["b"]
    peer = Peer("127.0.0.1", b.port)
    await peer.call("ping")
    port = b.port
    await b.stop()
    await b.start(cluster.nursery, port=port)
    assert (await peer.call("ping"))["ok"]
    await peer.aclose()


def _first_nowait_misses(store, n=1):
    """Make the store's next ``n`` no-wait reads miss.  A dropped page can
    come back during the no-wait read itself (the read starts read-ahead,
    and a fast disk answers before the call returns), which would turn the
    cold read a test needs into a hit."""
    real, left = store.read, [n]

    def read(volid, idx, off, size, *, nowait=False, inline=False):
        if nowait and left[0] > 0:
            left[0] -= 1
            raise BlockingIOError("not cached (test)")
        return real(volid, idx, off, size, nowait=nowait, inline=inline)
    store.read = read


async def test_small_reads_leave_the_event_loop_only_for_a_slow_device(cluster):
    """A small read that misses the page cache (and whose blocks could not
    be asked for ahead, see the next test) is done on the event loop while
    reads are fast on average, in a worker thread once they are slow,
    without asking ahead; both give the same, verified data."""
    svc = cluster.nodes["a"].svc
    asked = []
    svc.store.prefetch = lambda *args: asked.append(args) or False
    data = pattern(8192, seed=7)
    await svc.write(VOL, 3, 0, data, 1, 1)
    hops = []
    real_run = svc._run

    async def counting_run(fn, *args):
        hops.append(fn)
        return await real_run(fn, *args)
    svc._run = counting_run
    svc.store.sync(VOL)
    drop_cache(cluster.nodes["a"].chunk_file(3))
    _first_nowait_misses(svc.store)
    assert await svc.read(VOL, 3, 0, 8192) == data
    assert hops == [] and svc.read_avg > 0   # waited for the disk, on the event loop
    svc.read_avg = 0.01                      # as after a run of 10 ms reads
    assert await svc.read(VOL, 3, 4096, 4096) == data[4096:]
    assert hops == []                        # in the page cache: no wait, no hop
    svc.store.sync(VOL)                      # then out of it
    drop_cache(cluster.nodes["a"].chunk_file(3))
    _first_nowait_misses(svc.store)
    assert await svc.read(VOL, 3, 4096, 4096) == data[4096:]
    assert hops == [svc._timed_read]         # a miss on a slow device: a thread
    assert asked == [(VOL, 3, 0, 8192)]      # asked ahead on the fast device only
    cluster.nodes["a"].corrupt(3, 10)
    svc.read_avg = 0.0
    with pytest.raises(ChecksumError):
        await svc.read(VOL, 3, 0, 4096)


async def test_cold_small_reads_ask_for_their_blocks_together(cluster):
    """Small reads that miss the page cache each ask for their blocks
    (WILLNEED) before any of them waits, so the disk serves them together;
    every one still returns its own verified data, with no thread hop."""
    node = cluster.nodes["a"]
    svc = node.svc
    blocks = {i: pattern(4096, seed=100 + i) for i in range(16)}
    for i, data in blocks.items():
        await svc.write(VOL, 20 + i, 8192, data, 1, 1)
    svc.store.sync(VOL)
    for i in blocks:
        drop_cache(node.chunk_file(20 + i))
    # every read's first no-wait try misses, as it would on a slower disk
    # (here a page can come back during that try itself)
    _first_nowait_misses(svc.store, len(blocks))
    asked, hops, most = [], [], [0]
    real_prefetch, real_run = svc.store.prefetch, svc._run

    def prefetch(volid, idx, off, size):
        asked.append(idx)
        most[0] = max(most[0], svc._prefetching + 1)
        return real_prefetch(volid, idx, off, size)

    async def counting_run(fn, *args):
        hops.append(fn)
        return await real_run(fn, *args)
    svc.store.prefetch, svc._run = prefetch, counting_run
    got = {}

    async def one(i):
        got[i] = await svc.read(VOL, 20 + i, 8192, 4096)
    async with trio.open_nursery() as nursery:
        for i in blocks:
            nursery.start_soon(one, i)
    assert got == blocks
    # all asked before any of them waited
    assert sorted(asked) == [20 + i for i in blocks] and most[0] == len(asked)
    assert hops == [] and svc._prefetching == 0


async def test_a_cold_read_alone_waits_in_the_kernel_not_on_the_loop(cluster):
    """A lone small read whose blocks are not in after two scheduler rounds
    stops polling and reads them the plain way; a damaged block asked for
    ahead is still refused."""
    node = cluster.nodes["a"]
    svc = node.svc
    data = pattern(4096, seed=9)
    await svc.write(VOL, 40, 0, data, 1, 1)
    svc.store.sync(VOL)
    drop_cache(node.chunk_file(40))
    real_read = svc.store.read
    tries = []

    def never_cached(volid, idx, off, size, *, nowait=False, inline=False):
        if nowait:
            tries.append(idx)
            raise BlockingIOError("not cached")
        return real_read(volid, idx, off, size, nowait=nowait, inline=inline)
    svc.store.read = never_cached
    assert await svc.read(VOL, 40, 0, 4096) == data
    assert tries == [40, 40, 40]             # the first try, then two rounds
    svc.store.read = real_read
    node.corrupt(40, 10)
    drop_cache(node.chunk_file(40))
    _first_nowait_misses(svc.store)
    asked = []
    real_prefetch = svc.store.prefetch
    svc.store.prefetch = lambda *args: asked.append(args) or real_prefetch(*args)
    with pytest.raises(ChecksumError):
        await svc.read(VOL, 40, 0, 4096)
    assert asked == [(VOL, 40, 0, 4096)]



async def test_resync_takes_a_damaged_chunk_from_another_source(cluster):
    vol = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    for i in range(3):
        await vol.write(i * CHUNK_SIZE, pattern(4096, i))
    await vol.flush()
    cluster.nodes["a"].store.close()
    cluster.nodes["a"].corrupt(1, 100)
    cluster.nodes["a"].store = ChunkStore([cluster.nodes["a"].root])
    cluster.nodes["a"].svc.store = cluster.nodes["a"].store
    with pytest.raises(ChecksumError):
        await resync_replica(VOL, cluster.target("a"), cluster.target("c"), missed_from=0, term=1)
    await resync_replica(VOL, cluster.target("a"), cluster.target("c"), missed_from=0, term=1,
                         fallbacks=lambda: [cluster.target("b")])
    for i in range(3):
        assert cluster.nodes["c"].store.read(VOL, i, 0, 4096) == pattern(4096, i)


async def test_held_io_waits_then_goes_on_or_fails(cluster, monkeypatch):
    from pxfs.replication import volume_io
    vol = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    await vol.write(0, b"h" * 4096)
    vol.suspend("lease lost")
    done = []

    async def read():
        done.append(await vol.read(0, 4096))
    async with trio.open_nursery() as n:
        n.start_soon(read)
        await trio.sleep(0.2)
        assert done == []                          # held, reads too
        vol.resume()
    assert done == [b"h" * 4096] and not vol.fenced
    # taken over while held: the held write fails
    vol.suspend("lease lost")
    async with trio.open_nursery() as n:
        async def write():
            with pytest.raises(Fenced):
                await vol.write(0, b"x" * 4096)
        n.start_soon(write)
        await trio.sleep(0.1)
        vol.fence_local("attached elsewhere")
    # held too long: it fails by itself
    monkeypatch.setattr(volume_io, "SUSPEND_MAX", 0.2)
    vol2 = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    vol2.suspend("lease lost")
    with pytest.raises(Fenced, match="held for"):
        await vol2.flush()


async def test_a_restarted_replica_keeps_failing_until_marked(cluster):
    """The only in-sync replica restarted with unflushed writes: no flush
    may succeed over the writes it lost, the second no more than the first."""
    async def cannot_mark(nodes, missed_from):
        raise MetaError("etcd is down")
    vol = cluster.volume(states={"b": IN_SYNC}, on_failure=cannot_mark)
    await vol.write(0, b"r" * 256 * 1024)
    await cluster.nodes["b"].stop()
    await cluster.nodes["b"].restart(cluster.nursery)
    for _ in range(2):
        with pytest.raises(PxfsError):
            await vol.flush()
    assert vol.fenced


@pytest.mark.parametrize("op", ["write", "flush"])
async def test_the_only_in_sync_replica_restarted_stops_io(cluster, op):
    """The only in-sync replica restarted with writes no flush covered: the
    writes it acknowledged may be gone (a power loss), and no replica has
    them.  The attachment stops all I/O (fenced here) rather than let the
    filesystem go on over a device that forgot them; the next attach
    starts from what the replica has."""
    vol = cluster.volume(states={"b": IN_SYNC, "c": RESYNCING})
    await vol.write(0, b"r" * 256 * 1024)
    await cluster.nodes["b"].stop()
    await cluster.nodes["b"].restart(cluster.nursery)
    with pytest.raises(PxfsError, match="restarted"):
        if op == "write":
            await vol.write(CHUNK_SIZE, b"s" * 4096)
        else:
            await vol.flush()
    assert vol.fenced and "may have lost acknowledged writes" in vol.fenced
    with pytest.raises(Fenced):
        await vol.read(0, 4096)
    # b is not marked (no other replica to go on with); c, resyncing, took
    # what b may have lost: it no longer counts as b's copy
    assert [f[0] for f in cluster.failures] == [["c"]] and vol.states["c"] == OUT_OF_SYNC


# -- discards (fstrim, blkdiscard through the loop device) -----------------------
async def test_a_discard_reads_as_zeros_everywhere_and_frees_whole_chunks(cluster):
    """A range from the middle of a block of chunk 1 to the middle of a
    block of chunk 5: its partial blocks are zeroed, the whole blocks of
    chunks 1 and 5 marked never written, chunks 2..4 deleted on every
    replica; every byte outside it is as written."""
    vol = cluster.volume()
    data = bytearray(pattern(7 * CHUNK_SIZE, 3))
    await vol.write(0, bytes(data))
    await vol.flush()
    off, end = CHUNK_SIZE + 3 * CSUM_BLOCK + 100, 5 * CHUNK_SIZE + 7 * CSUM_BLOCK + 10
    await vol.discard(off, end - off)
    data[off:end] = bytes(end - off)
    assert await vol.read(0, len(data)) == bytes(data)
    for name, node in cluster.nodes.items():
        assert sorted(node.store.list_chunks(VOL)) == [0, 1, 5, 6], name
        for idx in range(7):
            got = node.store.read(VOL, idx, 0, CHUNK_SIZE) if idx in (0, 1, 5, 6) else None
            if got is not None:
                assert got == bytes(data[idx * CHUNK_SIZE:(idx + 1) * CHUNK_SIZE]), (name, idx)
        _, bitmap, _ = node.store.get_chunk(VOL, 1)
        # chunk 1: blocks 0..2 kept, 3 zero-written (partial), 4..255 unwritten
        bits = int.from_bytes(bitmap, "little")
        assert bits == 0b1111, (name, bin(bits))
    assert (vol.stats.discards, vol.stats.bytes_discarded) == (1, end - off)
    assert cluster.failures == []


async def test_a_discard_that_empties_a_chunk_deletes_it(cluster):
    vol = cluster.volume()
    await vol.write(2 * CHUNK_SIZE + 8 * CSUM_BLOCK, pattern(2 * CSUM_BLOCK))
    await vol.discard(2 * CHUNK_SIZE, 16 * CSUM_BLOCK)        # a partial chunk, all it held
    for node in cluster.nodes.values():
        assert node.store.list_chunks(VOL) == {}
    assert await vol.read(2 * CHUNK_SIZE, CHUNK_SIZE) == bytes(CHUNK_SIZE)
    await vol.discard(9 * CHUNK_SIZE, 3 * CHUNK_SIZE)         # nothing there: nothing to do
    await vol.discard(SIZE - CSUM_BLOCK, 10 * CHUNK_SIZE)     # past the end: cut at the end
    assert cluster.failures == []


async def test_a_large_discard_visits_only_the_chunks_replicas_hold(cluster):
    """fstrim of a big thin file system: the whole-chunk part of the range
    is dropped only where some replica holds a chunk (one lock-stripe run
    per such window), not 1 MiB at a time over the whole range."""
    vol = cluster.volume()
    vol.size = 1 << 40                                      # 1 TiB: a million chunks
    written = [3, 700, 700 + 1, 900_000]
    for idx in written:
        await vol.write(idx * CHUNK_SIZE + 100, pattern(CSUM_BLOCK, idx))
    await vol.flush()
    runs = []
    real = vol._drop_run

    async def counted(run):
        runs.append((run[0], len(run)))
        await real(run)
    vol._drop_run = counted
    with trio.fail_after(60):
        await vol.discard(CSUM_BLOCK, vol.size - CSUM_BLOCK)
    assert runs == [(1, 256), (513, 256), (899_841, 256)], runs
    for node in cluster.nodes.values():
        assert node.store.list_chunks(VOL) == {}
    for idx in written:
        assert await vol.read(idx * CHUNK_SIZE, CHUNK_SIZE) == bytes(CHUNK_SIZE)
    assert cluster.failures == []


async def test_a_discard_is_durable_at_the_flush_and_survives_a_restart(cluster):
    vol = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    await vol.write(0, pattern(64 * CSUM_BLOCK))
    await vol.flush()
    await vol.discard(8 * CSUM_BLOCK, 8 * CSUM_BLOCK)
    await vol.flush()
    b = cluster.nodes["b"]
    await b.restart(cluster.nursery)            # a new process reads the header from disk
    assert b.store.read(VOL, 0, 8 * CSUM_BLOCK, 8 * CSUM_BLOCK) == bytes(8 * CSUM_BLOCK)
    assert b.store.read(VOL, 0, 0, 8 * CSUM_BLOCK) == pattern(64 * CSUM_BLOCK)[:8 * CSUM_BLOCK]


async def test_a_replica_that_missed_a_discard_gets_it_at_resync(cluster):
    """c is out while a discard drops chunk 2 and trims chunk 4: it is
    marked out of sync, and its resync deletes chunk 2 and takes chunk 4's
    trimmed blocks; read alone afterwards it returns the zeros."""
    vol = cluster.volume()
    for idx in range(6):
        await vol.write(idx * CHUNK_SIZE, pattern(CHUNK_SIZE, idx))
    await vol.flush()
    await cluster.nodes["c"].stop()
    await vol.discard(2 * CHUNK_SIZE, CHUNK_SIZE)
    await vol.discard(4 * CHUNK_SIZE + 16 * CSUM_BLOCK, 32 * CSUM_BLOCK)
    [(nodes, missed_from)] = cluster.failures
    assert nodes == ["c"]
    c = cluster.nodes["c"]
    await c.restart(cluster.nursery)
    assert sorted(c.store.list_chunks(VOL)) == list(range(6))     # stale
    await resync_replica(VOL, cluster.target("a"), cluster.target("c"), missed_from=missed_from,
                         term=vol.term, lock_fn=vol.chunk_lock)
    assert sorted(c.store.list_chunks(VOL)) == [0, 1, 3, 4, 5]
    alone = cluster.volume(states={"c": IN_SYNC, "a": OUT_OF_SYNC, "b": OUT_OF_SYNC}, local="c")
    want = bytearray(pattern(CHUNK_SIZE, 4))
    want[16 * CSUM_BLOCK:48 * CSUM_BLOCK] = bytes(32 * CSUM_BLOCK)
    assert await alone.read(4 * CHUNK_SIZE, CHUNK_SIZE) == bytes(want)
    assert await alone.read(2 * CHUNK_SIZE, CHUNK_SIZE) == bytes(CHUNK_SIZE)


async def test_a_replica_that_restarted_before_the_flush_of_a_trim_falls_out(cluster):
    """A trim lives in the page cache until the flush, like a write: a
    replica answering from a new process before that flush may have lost
    it and must not count as having it."""
    vol = cluster.volume(states={"a": IN_SYNC, "b": IN_SYNC})
    await vol.write(0, pattern(16 * CSUM_BLOCK))
    await vol.flush()
    await vol.discard(0, 4 * CSUM_BLOCK)
    await cluster.nodes["b"].restart(cluster.nursery)
    await vol.flush()
    assert cluster.failures and cluster.failures[0][0] == ["b"]


async def test_a_trim_of_an_older_term_is_refused(cluster):
    vol = cluster.volume(term=1)
    await vol.write(0, pattern(8 * CSUM_BLOCK))
    await cluster.target("b").fence(VOL, 2)
    with pytest.raises(Fenced):
        await vol.discard(0, 4 * CSUM_BLOCK)
    assert cluster.nodes["b"].store.read(VOL, 0, 0, 8 * CSUM_BLOCK) == pattern(8 * CSUM_BLOCK)


async def test_bad_trim_fields_are_an_error_reply(cluster):
    peer = cluster.nodes["b"].peer
    for bad in (dict(first=5, last=4), dict(first=0, last=256), dict(first=-1, last=3),
                dict(first="0", last=3)):
        args = dict(vol=VOL, idx=0, term=1, gen=1, first=0, last=3)
        args.update(bad)
        with pytest.raises(PxfsError):
            await peer.call("trim", **args)
    assert (await peer.call("ping"))["ok"]
