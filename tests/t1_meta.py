"""KV conformance suite (pxfs/meta): every test runs on MemKV and on a real
etcd through the ``kv`` fixture, so MemKV keeps etcd's semantics.  Also the
optimistic transaction runner (meta/txn.py) and membership (meta/lease.py)."""

import time

import pytest
import trio

from pxfs import codec
from pxfs.errors import Busy, MetaError, TxnConflict
from pxfs.meta import keys
from pxfs.meta.kv import Compare, Delete, Put
from pxfs.meta.lease import Membership, list_nodes
from pxfs.meta.txn import Txn, run_txn

LEASE_TTL = 2


async def put(kv, key, value, lease=0):
    assert await kv.txn([], [Put(key, value, lease)])


async def wait_gone(kv, key, timeout=10.0):
    """Poll until ``key`` is gone (lease expiry is on the store's own clock)."""
    with trio.fail_after(timeout):
        while await kv.get(key) is not None:
            await trio.sleep(0.1)


# -- get / range -------------------------------------------------------------------
async def test_get_absent(kv, cid):
    assert await kv.get(keys.node_key(cid, "nobody")) is None


async def test_put_get(kv, cid):
    key = keys.node_key(cid, "n1")
    await put(kv, key, b"\x00value\xff")
    item = await kv.get(key)
    assert item.key == key and item.value == b"\x00value\xff"
    assert item.mod_rev > 0 and item.create_rev == item.mod_rev and item.lease == 0


async def test_update_keeps_create_rev(kv, cid):
    key = keys.vol_key(cid, 1)
    await put(kv, key, b"1")
    first = await kv.get(key)
    await put(kv, key, b"2")
    second = await kv.get(key)
    assert second.value == b"2"
    assert second.mod_rev > first.mod_rev
    assert second.create_rev == first.create_rev


async def test_range_by_prefix_sorted(kv, cid):
    for n in ("n3", "n1", "n2"):
        await put(kv, keys.node_key(cid, n), n.encode())
    await put(kv, keys.alive_key(cid, "n1"), b"x")
    await put(kv, keys.node_key(cid + "x", "n9"), b"other cluster")
    items = await kv.range(keys.node_prefix(cid))
    assert [i.key for i in items] == [keys.node_key(cid, n) for n in ("n1", "n2", "n3")]
    assert [i.value for i in items] == [b"n1", b"n2", b"n3"]
    assert len(await kv.range(keys.cluster_prefix(cid))) == 4


async def test_range_empty(kv, cid):
    assert await kv.range(keys.vol_prefix(cid)) == []


async def test_range_limit(kv, cid):
    for n in ("n3", "n1", "n2"):
        await put(kv, keys.node_key(cid, n), n.encode())
    items = await kv.range(keys.node_prefix(cid), limit=2)
    assert [i.value for i in items] == [b"n1", b"n2"]


async def test_delete_prefix(kv, cid):
    for n in ("a", "b"):
        await put(kv, keys.node_key(cid, n), b"x")
    await put(kv, keys.vol_key(cid, 1), b"v")
    assert await kv.delete_prefix(keys.node_prefix(cid)) == 2
    assert await kv.range(keys.node_prefix(cid)) == []
    assert (await kv.get(keys.vol_key(cid, 1))).value == b"v"
    assert await kv.delete_prefix(keys.node_prefix(cid)) == 0


async def test_delete_prefix_inside_a_transaction(kv, cid):
    from pxfs.meta.kv import DeletePrefix
    for n in ("a", "b"):
        await put(kv, keys.node_key(cid, n), b"x")
    await put(kv, keys.vol_key(cid, 1), b"v")
    assert await kv.txn([], [DeletePrefix(keys.node_prefix(cid)), Put(keys.vol_key(cid, 2), b"w")])
    assert await kv.range(keys.node_prefix(cid)) == []
    assert {i.value for i in await kv.range(keys.vol_prefix(cid))} == {b"v", b"w"}
    # the compare fails: nothing is deleted
    await put(kv, keys.node_key(cid, "c"), b"y")
    assert not await kv.txn([Compare(keys.vol_key(cid, 1), 1)], [DeletePrefix(keys.node_prefix(cid))])
    assert len(await kv.range(keys.node_prefix(cid))) == 1


def test_name_encoding_is_injective():
    names = [b"a", b"%", b"%25", b"caf\xc3\xa9", b"\xff\xfe", b"a b", b"~x", b"..."]
    enc = [keys.encode_name(n) for n in names]
    assert len(set(enc)) == len(names)
    assert all("/" not in e for e in enc)
    assert [keys.decode_name(e) for e in enc] == names


async def test_get_many_one_revision(kv, cid):
    a, b, c = (keys.node_key(cid, n) for n in ("a", "b", "c"))
    assert await kv.txn([], [Put(a, b"A"), Put(c, b"C")])
    got = await kv.get_many([c, b, a])
    assert [g.value if g else None for g in got] == [b"C", None, b"A"]
    assert got[0].mod_rev == got[2].mod_rev == (await kv.get(a)).mod_rev
    assert await kv.get_many([]) == []


# -- transactions -------------------------------------------------------------------
async def test_create_if_absent_once(kv, cid):
    key = keys.volname_key(cid, "v")
    assert await kv.txn([Compare(key, 0)], [Put(key, b"1")]) is True
    assert await kv.txn([Compare(key, 0)], [Put(key, b"2")]) is False
    assert (await kv.get(key)).value == b"1"


async def test_compare_mod_rev(kv, cid):
    key = keys.vol_key(cid, 2)
    await put(kv, key, b"a")
    item = await kv.get(key)
    assert await kv.txn([Compare(key, item.mod_rev)], [Put(key, b"b")]) is True
    # the revision we read is stale now
    assert await kv.txn([Compare(key, item.mod_rev)], [Put(key, b"c")]) is False
    assert await kv.txn([Compare(key, 0)], [Put(key, b"c")]) is False
    assert (await kv.get(key)).value == b"b"


async def test_failed_compare_applies_nothing(kv, cid):
    a, b = keys.vol_key(cid, 1), keys.vol_key(cid, 2)
    await put(kv, a, b"a")
    ra = (await kv.get(a)).mod_rev
    # a matches, b (absent) is compared against a wrong revision: no op applied
    ok = await kv.txn([Compare(a, ra), Compare(b, 12345)], [Put(a, b"A"), Put(b, b"B")])
    assert ok is False
    assert (await kv.get(a)).value == b"a" and await kv.get(b) is None


async def test_commit_returns_the_revision(kv, cid):
    a = keys.vol_key(cid, 1)
    rev = await kv.commit([Compare(a, 0)], [Put(a, b"x")])
    assert rev > 0 and (await kv.get(a)).mod_rev == rev
    assert await kv.commit([Compare(a, 0)], [Put(a, b"y")]) == 0
    rev2 = await kv.commit([Compare(a, rev)], [Put(a, b"y"), Delete(keys.vol_key(cid, 2))])
    assert rev2 > rev and (await kv.get(a)).value == b"y"


async def test_multi_op_txn_is_atomic_and_one_revision(kv, cid):
    a, b = keys.vol_key(cid, 1), keys.volname_key(cid, "v")
    assert await kv.txn([Compare(a, 0), Compare(b, 0)], [Put(a, b"rec"), Put(b, b"1")])
    ia, ib = await kv.get(a), await kv.get(b)
    assert ia.mod_rev == ib.mod_rev


async def test_delete(kv, cid):
    key = keys.attach_key(cid, 3)
    await put(kv, key, b"x")
    item = await kv.get(key)
    assert await kv.txn([Compare(key, item.mod_rev)], [Delete(key)])
    assert await kv.get(key) is None
    assert await kv.range(keys.attach_prefix(cid)) == []
    # deleting an absent key is not an error; it is absent again for compares
    assert await kv.txn([Compare(key, 0)], [Delete(key)])


async def test_put_after_delete_new_create_rev(kv, cid):
    key = keys.attach_key(cid, 4)
    await put(kv, key, b"x")
    first = await kv.get(key)
    assert await kv.txn([], [Delete(key)])
    await put(kv, key, b"y")
    assert (await kv.get(key)).create_rev > first.create_rev


# -- leases --------------------------------------------------------------------------
async def test_key_with_lease_expires(kv, cid):
    key = keys.alive_key(cid, "n1")
    lease = await kv.lease_grant(LEASE_TTL)
    await put(kv, key, b"alive", lease)
    item = await kv.get(key)
    assert item is not None and item.lease == lease
    await put(kv, keys.node_key(cid, "n1"), b"no lease")
    with trio.fail_after(LEASE_TTL + 6):
        await wait_gone(kv, key)
    assert (await kv.get(keys.node_key(cid, "n1"))).value == b"no lease"


async def test_lease_refresh_keeps_key(kv, cid):
    key = keys.alive_key(cid, "n1")
    lease = await kv.lease_grant(LEASE_TTL)
    await put(kv, key, b"alive", lease)
    for _ in range(8):              # 4 s, twice the TTL
        await trio.sleep(LEASE_TTL / 4)
        assert await kv.lease_refresh(lease) is True
    assert await kv.get(key) is not None


async def test_lease_refresh_after_expiry_is_false(kv, cid):
    key = keys.alive_key(cid, "n1")
    lease = await kv.lease_grant(LEASE_TTL)
    await put(kv, key, b"alive", lease)
    await wait_gone(kv, key, timeout=LEASE_TTL + 6)
    assert await kv.lease_refresh(lease) is False
    assert await kv.get(key) is None


async def test_lease_revoke_removes_keys(kv, cid):
    lease = await kv.lease_grant(30)
    await put(kv, keys.alive_key(cid, "n1"), b"1", lease)
    await put(kv, keys.attach_key(cid, 1), b"1", lease)
    await kv.lease_revoke(lease)
    assert await kv.get(keys.alive_key(cid, "n1")) is None
    assert await kv.get(keys.attach_key(cid, 1)) is None
    assert await kv.lease_refresh(lease) is False


async def test_lease_revoke_twice_is_harmless(kv, cid):
    # Membership.revoke() at shutdown may meet a lease that already expired
    lease = await kv.lease_grant(30)
    await kv.lease_revoke(lease)
    await kv.lease_revoke(lease)


async def test_put_with_dead_lease_is_meta_error(kv, cid):
    lease = await kv.lease_grant(30)
    await kv.lease_revoke(lease)
    with pytest.raises(MetaError):
        await kv.txn([], [Put(keys.attach_key(cid, 1), b"x", lease)])
    assert await kv.get(keys.attach_key(cid, 1)) is None


# -- run_txn -------------------------------------------------------------------------
async def test_run_txn_returns_body_result(kv, cid):
    key = keys.vol_key(cid, 1)

    async def body(txn: Txn):
        assert await txn.get(key) is None
        txn.put(key, b"made")
        return "result"

    assert await run_txn(kv, body) == "result"
    assert (await kv.get(key)).value == b"made"


async def test_run_txn_concurrent_increments(kv, cid):
    key = keys.vol_key(cid, 99)
    runs = 0

    async def body(txn: Txn):
        nonlocal runs
        runs += 1
        item = await txn.get(key)
        n = codec.unpack(item.value) if item else 0
        await trio.sleep(0)          # let the other task read the same revision
        txn.put(key, codec.pack(n + 1))

    async def worker():
        for _ in range(20):
            await run_txn(kv, body, what="increment")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        nursery.start_soon(worker)
    assert codec.unpack((await kv.get(key)).value) == 40
    assert runs > 40                 # some bodies lost the race and ran again


async def test_run_txn_gives_up_with_txn_conflict(kv, cid):
    key = keys.vol_key(cid, 5)
    runs = 0

    async def body(txn: Txn):
        nonlocal runs
        runs += 1
        await txn.get(key)
        await put(kv, key, str(runs).encode())     # someone else always wins
        txn.put(key, b"never")

    with pytest.raises(TxnConflict, match="lost its race 3 times"):
        await run_txn(kv, body, tries=3, what="doomed")
    assert runs == 3
    assert (await kv.get(key)).value == b"3"


async def test_txn_expect_and_delete(kv, cid):
    key = keys.vol_key(cid, 6)
    await put(kv, key, b"x")
    rev = (await kv.get(key)).mod_rev
    txn = Txn(kv)
    txn.expect(key, rev)
    txn.delete(key)
    assert await txn.commit()
    txn = Txn(kv)
    txn.expect(key, rev)             # stale now
    txn.put(key, b"y")
    assert not await txn.commit()
    assert await kv.get(key) is None


# -- membership ----------------------------------------------------------------------
def info():
    return {"api": "http://127.0.0.1:9001", "data": "127.0.0.1:9002", "pool_used": 1,
            "pool_total": 2}


async def start_membership(nursery, kv, cid, node):
    m = Membership(kv, cid, node, LEASE_TTL, info)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await m.run(task_status=task_status)

    await nursery.start(run)
    return m, scope


async def test_list_nodes_empty(kv, cid):
    assert await list_nodes(kv, cid) == []


async def test_registered_node_online_then_offline_after_revoke(kv, cid):
    async with trio.open_nursery() as nursery:
        m1, s1 = await start_membership(nursery, kv, cid, "n1")
        m2, s2 = await start_membership(nursery, kv, cid, "n2")
        nodes = {n["id"]: n for n in await list_nodes(kv, cid)}
        assert set(nodes) == {"n1", "n2"}
        assert nodes["n1"]["online"] and nodes["n2"]["online"]
        assert nodes["n1"]["data"] == "127.0.0.1:9002" and "started" in nodes["n1"]
        assert (await kv.get(keys.alive_key(cid, "n1"))).lease == m1.lease
        s1.cancel()                  # n1 stops its keepalive, then its lease goes
        await kv.lease_revoke(m1.lease)
        nodes = {n["id"]: n for n in await list_nodes(kv, cid)}
        assert set(nodes) == {"n1", "n2"}          # still known, now offline
        assert not nodes["n1"]["online"] and nodes["n2"]["online"]
        nursery.cancel_scope.cancel()


async def test_membership_revoke(kv, cid):
    async with trio.open_nursery() as nursery:
        m, scope = await start_membership(nursery, kv, cid, "n1")
        scope.cancel()
        await m.revoke()
        assert m.lease == 0
        [n] = await list_nodes(kv, cid)
        assert n["id"] == "n1" and not n["online"]


async def test_keepalive_holds_the_lease(kv, cid):
    async with trio.open_nursery() as nursery:
        m, _ = await start_membership(nursery, kv, cid, "n1")
        lease = m.lease
        await trio.sleep(LEASE_TTL * 2)
        [n] = await list_nodes(kv, cid)
        assert n["online"] and m.lease == lease
        nursery.cancel_scope.cancel()


async def test_lost_lease_calls_listeners_and_rejoins(kv, cid):
    lost = []
    got = trio.Event()

    async def listener(old):
        lost.append(old)
        got.set()

    async with trio.open_nursery() as nursery:
        m = Membership(kv, cid, "n1", LEASE_TTL, info)
        m.on_lease_lost(listener)
        await nursery.start(m.run)
        old = m.lease
        await kv.lease_revoke(old)           # the lease vanishes behind the node's back
        with trio.fail_after(LEASE_TTL * 3):
            await got.wait()
        assert lost == [old]
        with trio.fail_after(LEASE_TTL * 3):
            while not (await list_nodes(kv, cid))[0]["online"]:
                await trio.sleep(0.05)
        assert m.lease not in (0, old)
        nursery.cancel_scope.cancel()


async def test_a_lost_lease_that_answers_again_still_ends_in_a_rejoin(kv, cid):
    """etcd restarts: refreshes fail for the TTL (the lease counts as lost
    and the listeners hold I/O), re-registering fails while it is down,
    then etcd is back with the old lease restored, so refreshes of it
    succeed.  The node must still register a new lease and tell its rejoin
    listeners, which are what give the held I/O back."""
    from pxfs.errors import MetaError
    lost, rejoined, failed_grants = [], [], []
    real_refresh, real_grant = kv.lease_refresh, kv.lease_grant
    etcd = {"down": False}
    old = None

    async def refresh(lease):
        if etcd["down"]:
            raise MetaError("etcd is down")
        if lease == old:
            return True                     # restored by the restarted etcd
        return await real_refresh(lease)

    async def grant(ttl):
        if etcd["down"]:
            failed_grants.append(1)
            raise MetaError("etcd is down")
        return await real_grant(ttl)

    async def on_lost(lease):
        lost.append(lease)

    async def on_rejoined(lease):
        rejoined.append(lease)

    async with trio.open_nursery() as nursery:
        m = Membership(kv, cid, "n1", LEASE_TTL, info)
        m.on_lease_lost(on_lost)
        m.on_rejoined(on_rejoined)
        await nursery.start(m.run)
        old = m.lease
        kv.lease_refresh, kv.lease_grant = refresh, grant
        etcd["down"] = True
        with trio.fail_after(LEASE_TTL * 4):
            while not failed_grants:
                await trio.sleep(0.05)
        etcd["down"] = False
        with trio.fail_after(LEASE_TTL * 4):
            while not rejoined:
                await trio.sleep(0.05)
        assert lost == [old] and rejoined == [m.lease] and m.lease != old
        nursery.cancel_scope.cancel()


async def test_a_lost_lease_is_not_handed_out_and_is_revoked_after_the_rejoin(kv, cid):
    """etcd restarted and restored the old lease, which a stray refresh
    (here: the test) keeps alive.  While the node counts it as lost it hands
    out no lease for new keys; once it has a new one it revokes the old, so
    the keys still bound to it go as the lost listeners were told."""
    from pxfs.errors import MetaError
    real_refresh, real_grant = kv.lease_refresh, kv.lease_grant
    etcd = {"down": False}
    rejoined, seen_while_lost = [], []

    async def refresh(lease):
        if etcd["down"]:
            raise MetaError("etcd is down")
        return await real_refresh(lease)

    async def grant(ttl):
        if etcd["down"]:
            raise MetaError("etcd is down")
        return await real_grant(ttl)

    async def on_lost(lease):
        seen_while_lost.append(m.lease)
        with pytest.raises(MetaError, match="rejoining"):
            m.held()

    async def on_rejoined(lease):
        rejoined.append(lease)

    async with trio.open_nursery() as nursery:
        m = Membership(kv, cid, "n1", LEASE_TTL, info)
        m.on_lease_lost(on_lost)
        m.on_rejoined(on_rejoined)
        await nursery.start(m.run)
        old = m.held()
        await put(kv, keys.node_key(cid, "bound"), b"x", old)
        keeper = trio.CancelScope()

        async def keep_old_alive():
            with keeper:
                while True:
                    await real_refresh(old)
                    await trio.sleep(LEASE_TTL / 4)
        nursery.start_soon(keep_old_alive)
        kv.lease_refresh, kv.lease_grant = refresh, grant
        etcd["down"] = True
        with trio.fail_after(LEASE_TTL * 4):
            while not seen_while_lost:
                await trio.sleep(0.05)
        etcd["down"] = False
        with trio.fail_after(LEASE_TTL * 4):
            while not rejoined:
                await trio.sleep(0.05)
        keeper.cancel()
        assert seen_while_lost == [0] and m.held() == rejoined[0] != old
        with trio.fail_after(LEASE_TTL / 2):     # well before it could expire
            while await real_refresh(old):
                await trio.sleep(0.05)
        assert await kv.get(keys.node_key(cid, "bound")) is None
        nursery.cancel_scope.cancel()


async def test_a_slow_rejoin_listener_does_not_stall_the_keepalive(kv, cid):
    """What waits on a rejoin (taking attachments back) must not keep the
    node from refreshing its new lease."""
    rejoined = []

    async def slow(lease):
        rejoined.append(lease)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        m = Membership(kv, cid, "n1", LEASE_TTL, info)
        m.on_rejoined(slow)
        await nursery.start(m.run)
        old = m.lease
        await kv.lease_revoke(old)
        with trio.fail_after(LEASE_TTL * 3):
            while not rejoined:
                await trio.sleep(0.05)
        new = m.lease
        await trio.sleep(LEASE_TTL * 2)           # two TTLs with the listener still waiting
        assert m.lease == new and (await list_nodes(kv, cid))[0]["online"]
        nursery.cancel_scope.cancel()


async def test_the_lease_clock_moves_only_with_answered_refreshes(kv, cid):
    """``expired()`` (what attached volumes hold their I/O by) turns true
    once no refresh was answered for the TTL less the margin, counted from
    the send time of the last answered one; waiters wake at the next answer."""
    from pxfs.meta.lease import HOLD_MARGIN

    def clock():
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    gate = trio.Event()
    gate.set()
    real = kv.lease_refresh

    async def refresh(lease):
        await gate.wait()
        return await real(lease)

    kv.lease_refresh = refresh
    margin = min(HOLD_MARGIN, LEASE_TTL / 4)
    async with trio.open_nursery() as nursery:
        t0 = clock()
        m = Membership(kv, cid, "n1", LEASE_TTL, info)
        await nursery.start(m.run)
        assert t0 + LEASE_TTL - margin <= m.valid_until <= clock() + LEASE_TTL - margin
        with trio.fail_after(LEASE_TTL):
            await m.wait_renewed()               # the keepalive refreshes it
        assert not m.expired()
        gate = trio.Event()                      # etcd stops answering
        await trio.sleep(LEASE_TTL / 2)
        stuck = m.valid_until
        await trio.sleep(LEASE_TTL / 2)
        assert m.valid_until == stuck and clock() > stuck and m.expired()
        t1 = clock()
        with trio.move_on_after(0.2):
            await m.wait_renewed()
            pytest.fail("woke without a refresh")
        async with trio.open_nursery() as n2:
            n2.start_soon(m.wait_renewed)
            gate.set()
        assert m.valid_until >= t1 + LEASE_TTL - margin and not m.expired()
        nursery.cancel_scope.cancel()


async def test_a_slow_node_record_does_not_delay_the_refreshes(kv, cid):
    """Publishing the node record (capacity) hangs: the lease is refreshed
    all the same, so attached volumes never hold their I/O for it."""
    real = kv.txn
    hang = trio.Event()

    async def txn(compares, ops):
        if hang.is_set() and any("/node/" in getattr(o, "key", "") for o in ops):
            await trio.sleep_forever()
        return await real(compares, ops)
    kv.txn = txn
    async with trio.open_nursery() as nursery:
        m = Membership(kv, cid, "n1", LEASE_TTL, info)
        await nursery.start(m.run)
        lease = m.lease
        hang.set()
        for _ in range(int(LEASE_TTL * 3 / 0.1)):
            assert not m.expired()
            await trio.sleep(0.1)
        assert m.lease == lease and (await list_nodes(kv, cid))[0]["online"]
        nursery.cancel_scope.cancel()


async def test_a_resync_ends_in_sync_only_while_its_source_is(kv, cid):
    """The replica state etcd keeps is the truth: a resync whose source fell
    out of sync meanwhile may have copied stale chunks, so its end is refused."""
    from pxfs.volume.catalog import Catalog
    cat = Catalog(kv, cid, "n1", targets=None)
    rec = {"id": 7, "name": "v", "term": 1, "gen": 3, "replicas": [
        {"node": "n1", "state": "out_of_sync", "missed_from": 2 << 32},
        {"node": "n2", "state": "resyncing", "missed_from": 1 << 32}]}
    await kv.txn([], [Put(keys.vol_key(cid, 7), codec.pack_record(rec))])
    with pytest.raises(Busy, match="source n1 is out_of_sync"):
        await cat.set_replica_state(7, "n2", "in_sync", expect_state="resyncing", source="n1")
    got = codec.unpack_record((await kv.get(keys.vol_key(cid, 7))).value)
    assert got == rec
    rec["replicas"][0]["state"] = "in_sync"
    await kv.txn([], [Put(keys.vol_key(cid, 7), codec.pack_record(rec))])
    out = await cat.set_replica_state(7, "n2", "in_sync", expect_state="resyncing", source="n1")
    assert [r["state"] for r in out["replicas"]] == ["in_sync", "in_sync"]


class IdleReplica:
    """A replica target that answers and holds nothing (the catalog pings
    the nodes it places a volume on and asks them to drop a deleted one)."""
    async def ping(self, timeout=None):
        pass

    async def delete_volume(self, volid):
        pass


async def test_a_create_whose_commit_went_unanswered_is_not_reported_taken(kv, cid, monkeypatch):
    """etcd committed a create but its answer was lost; the KV client sends
    it again (as EtcdKV does after a connection error), and that copy's
    compares fail.  The retry then finds the name taken -- by this very
    volume: a success, not 'already exists' (the user would be told a
    volume they just made is someone else's), and one volume exists."""
    from pxfs.errors import AlreadyExists
    from pxfs.volume import catalog as catalog_mod
    from pxfs.volume.spec import VolumeSpec
    real = kv.commit
    lost = []

    async def commit(compares, ops):
        rev = await real(compares, ops)
        if rev and not lost and any(isinstance(o, Put) and "/volname/" in o.key for o in ops):
            lost.append(rev)                        # applied; its answer never came back
            return await real(compares, ops)        # the resend: compares fail now
        return rev
    monkeypatch.setattr(kv, "commit", commit)
    async with trio.open_nursery() as nursery:
        await start_membership(nursery, kv, cid, "n1")
        cat = catalog_mod.Catalog(kv, cid, "n1", targets=lambda node: IdleReplica())
        rec = await cat.create(VolumeSpec(name="v"))
        assert lost, "the create never went through the lost answer"
        name = await kv.get(keys.volname_key(cid, "v"))
        assert codec.unpack(name.value) == rec["id"]
        vols = await kv.range(keys.vol_prefix(cid))
        assert [codec.unpack_record(i.value)["id"] for i in vols] == [rec["id"]]
        with pytest.raises(AlreadyExists):          # another create of the name still fails
            await cat.create(VolumeSpec(name="v"))
        nursery.cancel_scope.cancel()


async def test_creates_spread_over_nodes_with_the_same_free_space(kv, cid):
    """A new thin volume uses no space: a row of creates must not all land on
    the node whose pool happens to have a few bytes more free."""
    from pxfs.volume import catalog as catalog_mod
    from pxfs.volume.spec import VolumeSpec
    async with trio.open_nursery() as nursery:
        for n in ("n1", "n2", "n3"):
            await start_membership(nursery, kv, cid, n)
        cat = catalog_mod.Catalog(kv, cid, "n1", targets=lambda node: IdleReplica())
        placed = {}
        for i in range(6):
            rec = await cat.create(VolumeSpec(name=f"v{i}"))
            for r in rec["replicas"]:
                placed[r["node"]] = placed.get(r["node"], 0) + 1
        assert placed == {"n1": 2, "n2": 2, "n3": 2}, placed
        rec = await cat.create(VolumeSpec(name="w", repl=2))
        assert len({r["node"] for r in rec["replicas"]}) == 2
        nursery.cancel_scope.cancel()


async def test_a_delete_whose_commit_went_unanswered_is_done(kv, cid, monkeypatch):
    """The same for a delete: the resend finds the record gone, which is
    this delete's own doing, so it succeeds (and cleans up) instead of
    reporting a lost race; a delete racing a real change still fails."""
    from pxfs.volume import catalog as catalog_mod
    from pxfs.volume.spec import VolumeSpec
    async with trio.open_nursery() as nursery:
        await start_membership(nursery, kv, cid, "n1")
        cat = catalog_mod.Catalog(kv, cid, "n1", targets=lambda node: IdleReplica())
        rec = await cat.create(VolumeSpec(name="v"))
        real = kv.commit
        lost = []

        async def commit(compares, ops):
            rev = await real(compares, ops)
            if rev and not lost and any(isinstance(o, Delete) for o in ops):
                lost.append(rev)
                return await real(compares, ops)
            return rev
        monkeypatch.setattr(kv, "commit", commit)
        assert (await cat.delete("v"))["id"] == rec["id"]
        assert lost
        assert await kv.get(keys.vol_key(cid, rec["id"])) is None
        assert await kv.get(keys.volname_key(cid, "v")) is None
        # a change between the read and the delete is still a lost race
        monkeypatch.setattr(kv, "commit", real)
        rec = await cat.create(VolumeSpec(name="w"))
        real_get = cat.get

        async def get_then_change(ref):
            got = await real_get(ref)
            item = await kv.get(keys.vol_key(cid, rec["id"]))
            await kv.txn([], [Put(item.key, item.value)])     # a new revision
            return got
        monkeypatch.setattr(cat, "get", get_then_change)
        with pytest.raises(TxnConflict, match="kept changing"):
            await cat.delete("w")
        assert await kv.get(keys.vol_key(cid, rec["id"])) is not None
        # an attach between the read and the delete: refused as an attached
        # volume is, naming the node (not "lost its race")
        def get_then_once(*puts):
            done = []

            async def get(ref):
                got = await real_get(ref)
                if not done:
                    done.append(ref)
                    item = await kv.get(keys.vol_key(cid, rec["id"]))
                    await kv.txn([], [Put(item.key, item.value), *puts])
                return got
            return get, done
        monkeypatch.setattr(cat, "get", get_then_once(
            Put(keys.attach_key(cid, rec["id"]), codec.pack_record({"node": "n2", "term": 1})))[0])
        with pytest.raises(Busy, match="attached on n2; detach it there"):
            await cat.delete("w")
        # a change that is not an attach (a checkpoint): the delete looks again and goes on
        await kv.txn([], [Delete(keys.attach_key(cid, rec["id"]))])
        get, changed = get_then_once()
        monkeypatch.setattr(cat, "get", get)
        assert (await cat.delete("w"))["id"] == rec["id"]
        assert changed and await kv.get(keys.vol_key(cid, rec["id"])) is None
        nursery.cancel_scope.cancel()


async def test_a_replica_reported_again_keeps_the_earliest_miss(kv, cid):
    from pxfs.volume.catalog import Catalog
    cat = Catalog(kv, cid, "n1", targets=None)
    rec = {"id": 8, "name": "w", "term": 1, "gen": 5, "replicas": [
        {"node": "n1", "state": "in_sync", "missed_from": 0},
        {"node": "n2", "state": "in_sync", "missed_from": 0}]}
    await kv.txn([], [Put(keys.vol_key(cid, 8), codec.pack_record(rec))])
    await cat.mark_out_of_sync(8, ["n2"], 1, 5 << 32)
    await cat.mark_out_of_sync(8, ["n2"], 1, 4 << 32)     # a writer whose gen lags
    await cat.mark_out_of_sync(8, ["n2"], 1, 6 << 32)
    got = codec.unpack_record((await kv.get(keys.vol_key(cid, 8))).value)
    assert got["replicas"][1] == {"node": "n2", "state": "out_of_sync", "missed_from": 4 << 32}


async def test_a_failing_resync_backs_off(kv, cid):
    """A resync that keeps failing (its source down, the target's pool
    full) is tried again after 1, 2, 4 ... 30 s, not at every scan; one
    that succeeds clears its wait."""
    import types

    from pxfs.errors import PxfsError
    from pxfs.volume.resyncer import Resyncer
    catalog = types.SimpleNamespace(kv=kv, cid=cid, node="n1")
    r = Resyncer(catalog, attachments=None, membership=None)
    key = (7, "n2")

    async def fails():
        raise PxfsError("the source is down")

    async def works():
        pass
    waits = []
    for _ in range(7):
        r.running.add(key)
        t0 = trio.current_time()
        await r._guard(key, fails)
        waits.append(round(r._backoff[key][0] - t0))
        assert key not in r.running
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    await r._guard(key, works)
    assert key not in r._backoff
