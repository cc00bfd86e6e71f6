"""Advisory locks of shared volumes (pxfs/namespace/locks.py) on MemKV and on
a real etcd: POSIX range rules, conflicts between mounts and within one,
waiting, racing grants, leases that end, bad input."""

import errno

import pytest
import trio

from pxfs import codec
from pxfs.errors import InvalidArgument, LockConflict, LockUnavailable, MetaError
from pxfs.meta import keys
from pxfs.meta.kv import Put
from pxfs.namespace.locks import END, FLOCK, POSIX, RD, UN, WR, NsLocks, apply

VOL = 5151
INO = 77


@pytest.fixture
async def mounts(kv, cid):
    """make(name) -> NsLocks of a mount with its own lease"""
    made = []

    async def make(name: str, ttl: int = 30):
        lease = await kv.lease_grant(ttl)
        box = {"lease": lease}
        m = NsLocks(kv, cid, VOL, name, lambda: box["lease"])
        m.box = box
        made.append(m)
        return m
    yield make
    for m in made:
        if m.box["lease"]:
            await kv.lease_revoke(m.box["lease"])


def ranges(locks, owner=1):
    return [(lk.type, lk.start, lk.end) for lk in locks if lk.owner == owner]


def test_range_rules():
    locks = apply([], 1, POSIX, WR, 0, 99)
    locks = apply(locks, 1, POSIX, UN, 40, 49)               # unlock in the middle: split
    assert ranges(locks) == [(WR, 0, 39), (WR, 50, 99)]
    locks = apply(locks, 1, POSIX, RD, 30, 59)               # downgrade across the hole
    assert ranges(locks) == [(WR, 0, 29), (RD, 30, 59), (WR, 60, 99)]
    locks = apply(locks, 1, POSIX, WR, 30, 59)               # upgrade back: one range again
    assert ranges(locks) == [(WR, 0, 99)]
    locks = apply(locks, 1, POSIX, WR, 100, END)             # touching ranges merge
    assert ranges(locks) == [(WR, 0, END)]
    locks = apply(locks, 2, POSIX, RD, 0, 9)                 # another owner's are kept apart
    locks = apply(locks, 1, FLOCK, WR, 0, END)
    locks = apply(locks, 1, POSIX, UN, 0, END)
    assert ranges(locks) == [(WR, 0, END)]
    assert [lk.kind for lk in locks if lk.owner == 1] == [FLOCK]
    assert ranges(locks, 2) == [(RD, 0, 9)]


async def test_conflicts_between_mounts(mounts):
    a, b = await mounts("a"), await mounts("b")
    await a.lock(INO, POSIX, 1, WR, 0, 99, pid=123)
    with pytest.raises(LockConflict) as ei:
        await b.lock(INO, POSIX, 1, WR, 50, 60)              # the same owner number elsewhere
    assert ei.value.errno == errno.EAGAIN
    with pytest.raises(LockConflict):
        await b.lock(INO, POSIX, 9, RD, 99, 99)
    await b.lock(INO, POSIX, 9, WR, 100, 199)                # beside it: fine
    await b.lock(INO + 1, POSIX, 9, WR, 0, END)              # another file: fine
    await b.lock(INO, FLOCK, 9, WR, 0, END)                  # flock does not see fcntl locks
    holder = await b.test(INO, POSIX, 9, RD, 0, 10)
    assert (holder.type, holder.start, holder.end, holder.pid) == (WR, 0, 99, 0)
    assert await b.test(INO, POSIX, 9, RD, 150, 160) is None     # its own
    assert await a.test(INO, POSIX, 1, RD, 150, 160) is not None
    # shared locks share; an exclusive one waits for both to go
    await a.lock(INO + 2, POSIX, 1, RD, 0, END)
    await b.lock(INO + 2, POSIX, 2, RD, 0, END)
    with pytest.raises(LockConflict):
        await a.lock(INO + 2, POSIX, 1, WR, 0, END)          # an upgrade is refused, the old kept
    assert ranges(a.held(INO + 2)) == [(RD, 0, END)]
    await b.unlock(INO + 2, POSIX, 2)
    await a.lock(INO + 2, POSIX, 1, WR, 0, END)
    # unlocking a part lets the other mount into that part only
    await a.unlock(INO, POSIX, 1, 0, 49)
    await b.lock(INO, POSIX, 9, WR, 0, 49)
    with pytest.raises(LockConflict):
        await b.lock(INO, POSIX, 9, WR, 50, 50)


async def test_owners_within_one_mount(mounts):
    a = await mounts("a")
    await a.lock(INO, FLOCK, 1, WR, 0, END)
    await a.lock(INO, FLOCK, 1, RD, 0, END)                  # its own lock converts
    await a.lock(INO, FLOCK, 2, RD, 0, END)
    with pytest.raises(LockConflict):
        await a.lock(INO, FLOCK, 3, WR, 0, END)
    holder = await a.test(INO, FLOCK, 3, WR, 0, END)
    assert holder.owner in (1, 2)
    await a.drop_owner(INO, FLOCK, 1)
    await a.drop_owner(INO, FLOCK, 2)
    await a.lock(INO, FLOCK, 3, WR, 0, END)
    assert [lk.owner for lk in a.held(INO)] == [3]


async def test_waiters_are_woken(mounts, monkeypatch):
    import pxfs.namespace.locks as locks_mod
    a, b = await mounts("a"), await mounts("b")
    monkeypatch.setattr(locks_mod, "POLL_MIN", 5.0)          # a local release must not need a poll
    monkeypatch.setattr(locks_mod, "POLL_MAX", 5.0)
    await a.lock(INO, POSIX, 1, WR, 0, END)
    got = []

    async def wait_local(owner):
        await a.lock(INO, POSIX, owner, WR, 0, END, wait=True)
        got.append(("a", owner, trio.current_time()))

    async def wait_remote():
        await b.lock(INO, POSIX, 5, WR, 0, END, wait=True)
        got.append(("b", 5, trio.current_time()))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(wait_local, 2)
            await trio.sleep(0.3)
            assert got == []
            t0 = trio.current_time()
            await a.unlock(INO, POSIX, 1)
            await trio.sleep(1.0)
            assert [g[:2] for g in got] == [("a", 2)]        # a release here wakes at once
            assert got[0][2] - t0 < 1.0                      # (the poll would take 5 s)
            n.start_soon(wait_remote)
            await trio.sleep(0.6)
            assert len(got) == 1                             # still held by owner 2
            t0 = trio.current_time()
            await a.unlock(INO, POSIX, 2)
    assert [g[:2] for g in got] == [("a", 2), ("b", 5)]
    assert got[1][2] - t0 < 1.0                              # another mount's: the etcd watch


async def test_waiters_poll_without_a_watch(kv, cid):
    """If etcd gives no watch, a waiter still gets the lock by looking again."""
    from pxfs.errors import MetaError as ME

    class NoWatch(Yielding):
        def watch(self, prefix):
            raise ME("no watch today")
    leases = [await kv.lease_grant(30) for _ in range(2)]
    a = NsLocks(kv, cid, VOL, "a", lambda: leases[0])
    b = NsLocks(NoWatch(kv), cid, VOL, "b", lambda: leases[1])
    await a.lock(INO, POSIX, 1, WR, 0, END)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(lambda: b.lock(INO, POSIX, 2, WR, 0, END, wait=True))
            await trio.sleep(0.5)
            t0 = trio.current_time()
            await a.unlock(INO, POSIX, 1)
    assert trio.current_time() - t0 < 1.0
    assert ranges(b.held(INO), 2) == [(WR, 0, END)]
    for lease in leases:
        await kv.lease_revoke(lease)


async def _cutting_proxy(upstream, task_status=trio.TASK_STATUS_IGNORED):
    """A TCP proxy to ``upstream``; started, it gives (port, cut): ``cut()``
    closes every connection through it, as a network fault or an etcd
    restart ends a client's streams (new connections are still taken)."""
    live = set()

    async def pipe(src, dst):
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for s in (src, dst):
                await trio.aclose_forcefully(s)

    async def handle(client):
        server = await trio.open_tcp_stream(*upstream)
        live.update((client, server))
        async with trio.open_nursery() as n:
            n.start_soon(pipe, client, server)
            n.start_soon(pipe, server, client)
        live.difference_update((client, server))

    async def cut():
        for s in list(live):
            await trio.aclose_forcefully(s)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as n:
        task_status.started((listeners[0].socket.getsockname()[1], cut))
        await trio.serve_listeners(handle, listeners, handler_nursery=n)


async def test_a_waiter_whose_watch_dies_still_gets_the_lock(etcd_server, cid, monkeypatch):
    """etcd's watch stream ends under a waiter (its connection cut): the
    waiter is woken, looks again, and goes on at the short poll of a mount
    without a watch, so another mount's release reaches it in well under a
    second, not at the watched safety-net poll (5 s here)."""
    import pxfs.namespace.locks as locks_mod
    from pxfs.meta.etcd import EtcdKV
    monkeypatch.setattr(locks_mod, "WATCHED_POLL_MAX", 5.0)
    direct = EtcdKV([etcd_server])
    async with trio.open_nursery() as n:
        port, cut = await n.start(_cutting_proxy, etcd_server)
        proxied = EtcdKV([("127.0.0.1", port)])
        leases = [await direct.lease_grant(30), await proxied.lease_grant(30)]
        a = NsLocks(direct, cid, VOL, "a", lambda: leases[0])
        b = NsLocks(proxied, cid, VOL, "b", lambda: leases[1])
        await a.lock(INO, POSIX, 1, WR, 0, END)
        got = trio.Event()

        async def wait():
            await b.lock(INO, POSIX, 2, WR, 0, END, wait=True)
            got.set()
        with trio.fail_after(20):
            n.start_soon(wait)
            await trio.sleep(1.0)                    # waiting, with a watch
            await cut()
            await trio.sleep(2.5)
            assert not got.is_set()
            t0 = trio.current_time()
            await a.unlock(INO, POSIX, 1)
            await got.wait()
        assert trio.current_time() - t0 < 1.0
        assert ranges(b.held(INO), 2) == [(WR, 0, END)]
        await b.unlock(INO, POSIX, 2)
        await proxied.lease_revoke(leases[1])
        await proxied.close()
        n.cancel_scope.cancel()
    await direct.lease_revoke(leases[0])
    await direct.close()


class Yielding:
    """The KV with a trip through the scheduler before and after every call,
    so that MemKV interleaves mounts as a real etcd does."""

    def __init__(self, kv):
        self.kv = kv

    def watch(self, prefix):
        return self.kv.watch(prefix)

    def __getattr__(self, name):
        fn = getattr(self.kv, name)

        async def call(*args, **kw):
            await trio.sleep(0)
            try:
                return await fn(*args, **kw)
            finally:
                await trio.sleep(0)
        return call


async def test_racing_grants_never_overlap(kv, cid):
    ms = []
    for i in range(4):
        lease = await kv.lease_grant(30)
        ms.append(NsLocks(Yielding(kv), cid, VOL, f"m{i}", lambda lease=lease: lease))
    inside = []
    worst = [0]

    async def worker(m, i):
        for _ in range(6):
            await m.lock(INO, POSIX, 100 + i, WR, 0, END, wait=True)
            inside.append(i)
            worst[0] = max(worst[0], len(inside))
            await trio.sleep(0.005)
            inside.remove(i)
            await m.unlock(INO, POSIX, 100 + i)

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i, m in enumerate(ms):
                n.start_soon(worker, m, i)
    assert worst[0] == 1
    assert all(not m.held(INO) for m in ms)


async def test_a_mount_whose_lease_ends_loses_its_locks(kv, cid, mounts):
    a, b = await mounts("a"), await mounts("b")
    await a.lock(INO, FLOCK, 1, WR, 0, END)
    with pytest.raises(LockConflict):
        await b.lock(INO, FLOCK, 2, WR, 0, END)
    await kv.lease_revoke(a.box["lease"])                    # a's mount died
    a.box["lease"] = 0
    await b.lock(INO, FLOCK, 2, WR, 0, END)
    with pytest.raises(LockUnavailable) as ei:               # no lease: no new locks
        await a.lock(INO + 1, FLOCK, 1, WR, 0, END)
    assert ei.value.errno == errno.ENOLCK
    await a.unlock(INO, FLOCK, 1)                            # a release is taken here
    assert a.held(INO) == []


async def test_version_key_cannot_come_back(kv, cid, mounts):
    """A grant that read the version, then another mount's conflicting grant
    and a third mount's grant and unmount: the first must not succeed (the
    version key outlives the leases of those who wrote it)."""
    a, b, c = await mounts("a"), await mounts("b"), await mounts("c")
    gate, go = trio.Event(), trio.Event()
    read = a._read

    async def slow_read(ino):
        got = await read(ino)
        gate.set()
        await go.wait()
        return got
    a._read = slow_read
    outcome = []

    async def a_locks():
        try:
            await a.lock(INO, POSIX, 1, WR, 0, END)
            outcome.append("granted")
        except LockConflict:
            outcome.append("refused")
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(a_locks)
            await gate.wait()
            await b.lock(INO, POSIX, 2, WR, 0, END)
            await c.lock(INO, FLOCK, 3, WR, 0, END)
            await kv.lease_revoke(c.box["lease"])
            c.box["lease"] = 0
            a._read = read
            go.set()
    assert outcome == ["refused"] and a.held(INO) == []
    assert ranges(b.held(INO), 2) == [(WR, 0, END)]


async def test_a_release_that_failed_is_written_later(kv, cid, mounts):
    a, b = await mounts("a"), await mounts("b")
    await a.lock(INO, FLOCK, 1, WR, 0, END)
    real = a.kv

    class Down:
        async def commit(self, *args):
            raise MetaError("etcd unavailable")
    a.kv = Down()
    with pytest.raises(MetaError):
        await a.unlock(INO, FLOCK, 1)
    a.kv = real
    assert a.held(INO) == []
    with pytest.raises(LockConflict):                        # etcd still shows it
        await b.lock(INO, FLOCK, 2, WR, 0, END)
    await a.unlock(INO, FLOCK, 1)                            # nothing changes here...
    with pytest.raises(LockConflict):
        await b.lock(INO, FLOCK, 2, WR, 0, END)
    await a.repair()                                         # ...the repair writes it
    await b.lock(INO, FLOCK, 2, WR, 0, END)


async def test_records_follow_a_new_lease(kv, cid, mounts):
    """The mount's lease was replaced while it is alive (a refresh failed):
    its records move to the new lease before the old one expires."""
    a, b = await mounts("a"), await mounts("b")
    await a.lock(INO, POSIX, 1, WR, 0, 9)
    await a.lock(INO + 1, FLOCK, 1, RD, 0, END)
    old = a.box["lease"]
    a.box["lease"] = await kv.lease_grant(30)
    await a.repair()
    await kv.lease_revoke(old)
    for ino in (INO, INO + 1):
        assert (await kv.get(keys.ns_lock_key(cid, VOL, ino, "a"))).lease == a.box["lease"]
    with pytest.raises(LockConflict):
        await b.lock(INO, POSIX, 2, RD, 5, 5)
    with pytest.raises(LockConflict):
        await b.lock(INO + 1, FLOCK, 2, WR, 0, END)


async def test_a_mount_that_is_not_alive_grants_nothing(kv, cid, mounts):
    """Cut off longer than it may trust its lease (or fenced): no new locks;
    what it holds stays held while its record stands."""
    a, b = await mounts("a"), await mounts("b")
    alive = [True]
    a._alive = lambda: alive[0]
    await a.lock(INO, POSIX, 1, WR, 0, END)
    alive[0] = False
    with pytest.raises(LockUnavailable):
        await a.lock(INO + 1, POSIX, 1, WR, 0, END)
    await a.repair()
    assert ranges(a.held(INO)) == [(WR, 0, END)]
    with pytest.raises(LockConflict):
        await b.lock(INO, POSIX, 2, RD, 0, 0)
    alive[0] = True
    await a.lock(INO + 1, POSIX, 1, WR, 0, END)


async def test_locks_that_expired_never_come_back(kv, cid, mounts):
    """The mount's lease expired (its record went) and another mount took the
    lock; then the first mount gets a new lease: neither moving its records
    to it, nor a release, nor a grant on the file writes the lost lock back."""
    a, b = await mounts("a"), await mounts("b")
    await a.lock(INO, POSIX, 1, WR, 0, 99)
    await a.lock(INO, POSIX, 2, WR, 200, 299)
    await a.lock(INO + 1, FLOCK, 1, WR, 0, END)
    await a.lock(INO + 2, FLOCK, 1, WR, 0, END)
    old = a.box["lease"]
    a.box["lease"] = 0                      # a refresh failed...
    await kv.lease_revoke(old)              # ...and the lease ran out
    await b.lock(INO, POSIX, 7, WR, 0, 99)
    await b.lock(INO + 1, FLOCK, 7, WR, 0, END)
    await b.lock(INO + 2, FLOCK, 7, WR, 0, END)
    a.box["lease"] = await kv.lease_grant(30)
    await a.unlock(INO, POSIX, 2)           # a release: finds its record gone
    assert a.held(INO) == []
    await a.repair()                        # the move to the new lease: the same
    assert a.held(INO + 1) == []
    with pytest.raises(LockConflict):       # a grant on the file: reads it gone first
        await a.lock(INO + 2, FLOCK, 3, RD, 0, END)
    assert a.held(INO + 2) == []
    for ino in (INO, INO + 1, INO + 2):
        assert await kv.get(keys.ns_lock_key(cid, VOL, ino, "a")) is None
    assert await a.test(INO, POSIX, 9, RD, 0, 99) is not None       # b's
    await a.lock(INO, POSIX, 1, WR, 100, 199)   # beside b's: a fresh grant works


async def test_flock_upgrades_do_not_deadlock(mounts):
    """Two holders of a shared flock both ask for an exclusive one: as on
    Linux, each drops its shared lock first, so one of them gets it."""
    a, b = await mounts("a"), await mounts("b")
    await a.lock(INO, FLOCK, 1, RD, 0, END)
    await b.lock(INO, FLOCK, 2, RD, 0, END)
    order = []

    async def upgrade(m, owner):
        await m.lock(INO, FLOCK, owner, WR, 0, END, wait=True)
        order.append(owner)
        await trio.sleep(0.1)
        await m.unlock(INO, FLOCK, owner)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(upgrade, a, 1)
            n.start_soon(upgrade, b, 2)
    assert sorted(order) == [1, 2]


async def test_inode_deletion_takes_its_lock_records(kv, cid, mounts):
    from pxfs.meta.kv import Put as P
    from pxfs.namespace.meta import NsMeta, root_ops
    from pxfs.namespace.records import ROOT_INO
    import stat
    assert await kv.txn([], [P(k, v) for k, v in root_ops(cid, VOL)])
    ns = NsMeta(kv, cid, VOL, "n1")
    f = await ns.mknod(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0)
    a = await mounts("a")
    await a.lock(f.ino, POSIX, 1, WR, 0, END)
    await a.unlock(f.ino, POSIX, 1)
    assert await kv.range(keys.ns_lock_prefix(cid, VOL, f.ino))      # the version key stays
    await ns.unlink(ROOT_INO, b"f")
    assert await kv.range(keys.ns_lock_prefix(cid, VOL, f.ino)) == []


async def test_records_in_etcd(kv, cid, mounts):
    a = await mounts("a")
    await a.lock(INO, POSIX, 1, WR, 10, 19, pid=42)
    await a.lock(INO, POSIX, 2, RD, 30, 39, pid=43)
    item = await kv.get(keys.ns_lock_key(cid, VOL, INO, "a"))
    assert item.lease == a.box["lease"]
    assert sorted(map(tuple, codec.unpack(item.value))) == sorted([(POSIX, WR, 10, 19, 42),
                                                                   (POSIX, RD, 30, 39, 43)])
    await a.drop_owner(INO, POSIX, 1)
    await a.drop_owner(INO, POSIX, 2)
    assert await kv.get(keys.ns_lock_key(cid, VOL, INO, "a")) is None


async def test_unreadable_record_blocks_the_file(kv, cid, mounts):
    b = await mounts("b")
    await kv.txn([], [Put(keys.ns_lock_key(cid, VOL, INO, "junk"), b"\xc1not msgpack")])
    with pytest.raises(LockConflict):
        await b.lock(INO, POSIX, 1, RD, 0, 0)
    with pytest.raises(LockConflict):
        await b.lock(INO, FLOCK, 1, RD, 0, END)
    await b.lock(INO + 1, POSIX, 1, RD, 0, 0)


@pytest.mark.parametrize("kind,type_,start,end", [
    ("x", WR, 0, 1), (POSIX, 7, 0, 1), (POSIX, WR, -1, 5), (POSIX, WR, 9, 3),
    (POSIX, WR, 0, END + 1)])
async def test_bad_requests(mounts, kind, type_, start, end):
    a = await mounts("a")
    with pytest.raises(InvalidArgument):
        await a.lock(INO, kind, 1, type_, start, end)
    with pytest.raises(InvalidArgument):
        await a.test(INO, kind, 1, type_, start, end)
    assert a.held(INO) == []

