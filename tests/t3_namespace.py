"""Shared-volume namespace metadata (pxfs/namespace/meta.py) on MemKV and on
a real etcd: POSIX rules, atomicity of racing changes between two nodes,
bad names and attribute limits."""

import errno
import stat

import pytest
import trio

from pxfs.errors import AlreadyExists, NotFound, PxfsError
from pxfs.meta import keys
from pxfs.meta.kv import Put
from pxfs.namespace.meta import RENAME_NOREPLACE, NsMeta, root_ops
from pxfs.namespace.records import ROOT_INO, Inode

VOL = 4242
REG, DIR = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755


@pytest.fixture
async def ns(kv, cid):
    assert await kv.txn([], [Put(k, v) for k, v in root_ops(cid, VOL)])
    return NsMeta(kv, cid, VOL, "n1")


def code(exc_info) -> int:
    return exc_info.value.errno


async def test_root_and_create_lookup(ns):
    root = await ns.getattr(ROOT_INO)
    assert root.is_dir and root.nlink == 2
    f = await ns.mknod(ROOT_INO, b"f", REG, 1000, 100)
    got = await ns.lookup(ROOT_INO, b"f")
    assert (got.ino, got.mode, got.uid, got.gid, got.nlink, got.size) == (f.ino, REG, 1000, 100, 1, 0)
    d = await ns.mknod(ROOT_INO, b"d", DIR, 0, 0)
    assert (await ns.getattr(ROOT_INO)).nlink == 3
    assert (await ns.getattr(d.ino)).parent == ROOT_INO
    assert sorted(await ns.listdir(ROOT_INO)) == [(b"d", d.ino), (b"f", f.ino)]
    with pytest.raises(AlreadyExists):
        await ns.mknod(ROOT_INO, b"f", REG, 0, 0)
    with pytest.raises(NotFound):
        await ns.lookup(ROOT_INO, b"nope")
    with pytest.raises(PxfsError) as e:
        await ns.mknod(f.ino, b"x", REG, 0, 0)         # parent is a file
    assert code(e) == errno.ENOTDIR


@pytest.mark.parametrize("name, err", [(b"a/b", errno.EINVAL), (b"a\0b", errno.EINVAL),
                                       (b"", errno.EINVAL), (b"..", errno.EINVAL),
                                       (b"x" * 256, errno.ENAMETOOLONG)])
async def test_bad_names_change_nothing(ns, name, err):
    before = await ns.kv.range(keys.ns_prefix(ns.cid, VOL))
    with pytest.raises(PxfsError) as e:
        await ns.mknod(ROOT_INO, name, REG, 0, 0)
    assert code(e) == err
    after = await ns.kv.range(keys.ns_prefix(ns.cid, VOL))
    assert [(i.key, i.value) for i in after if "/next" not in i.key] == \
           [(i.key, i.value) for i in before if "/next" not in i.key]


async def test_odd_but_legal_names(ns):
    for name in (b"x" * 255, b"caf\xc3\xa9", b"\xff\xfe", b"100%", b"%41", b" ", b"..."):
        f = await ns.mknod(ROOT_INO, name, REG, 0, 0)
        assert (await ns.lookup(ROOT_INO, name)).ino == f.ino
    names = sorted(n for n, _ in await ns.listdir(ROOT_INO))
    assert b"%41" in names and b"100%" in names and b"\xff\xfe" in names


async def test_hard_links_and_unlink(ns):
    f = await ns.mknod(ROOT_INO, b"f", REG, 0, 0)
    d = await ns.mknod(ROOT_INO, b"d", DIR, 0, 0)
    await ns.link(f.ino, d.ino, b"g")
    assert (await ns.getattr(f.ino)).nlink == 2
    t, free = await ns.unlink(ROOT_INO, b"f")
    assert not free and t.nlink == 1
    t, free = await ns.unlink(d.ino, b"g")
    assert free
    with pytest.raises(NotFound):
        await ns.getattr(f.ino)
    with pytest.raises(PxfsError) as e:
        await ns.link(d.ino, ROOT_INO, b"dl")
    assert code(e) == errno.EPERM
    with pytest.raises(PxfsError) as e:
        await ns.unlink(ROOT_INO, b"d")
    assert code(e) == errno.EISDIR


async def test_unlink_of_open_file_keeps_an_orphan(ns):
    f = await ns.mknod(ROOT_INO, b"f", REG, 0, 0)
    t, free = await ns.unlink(ROOT_INO, b"f", is_open=lambda ino: ino == f.ino)
    assert not free and t.nlink == 0
    assert (await ns.getattr(f.ino)).nlink == 0
    assert await ns.kv.get(keys.ns_orphan_key(ns.cid, VOL, f.ino))
    gone = await ns.forget_orphan(f.ino)
    assert gone.ino == f.ino
    with pytest.raises(NotFound):
        await ns.getattr(f.ino)
    assert await ns.kv.get(keys.ns_orphan_key(ns.cid, VOL, f.ino)) is None


async def test_rmdir(ns):
    d = await ns.mknod(ROOT_INO, b"d", DIR, 0, 0)
    await ns.mknod(d.ino, b"f", REG, 0, 0)
    with pytest.raises(PxfsError) as e:
        await ns.rmdir(ROOT_INO, b"d")
    assert code(e) == errno.ENOTEMPTY
    await ns.unlink(d.ino, b"f")
    await ns.rmdir(ROOT_INO, b"d")
    assert (await ns.getattr(ROOT_INO)).nlink == 2
    with pytest.raises(NotFound):
        await ns.mknod(d.ino, b"late", REG, 0, 0)       # created in a removed dir


async def test_rename_rules(ns):
    a = await ns.mknod(ROOT_INO, b"a", DIR, 0, 0)
    b = await ns.mknod(a.ino, b"b", DIR, 0, 0)
    f = await ns.mknod(ROOT_INO, b"f", REG, 0, 0)
    g = await ns.mknod(ROOT_INO, b"g", REG, 0, 0)
    with pytest.raises(PxfsError) as e:
        await ns.rename(ROOT_INO, b"a", b.ino, b"x")    # into its own subtree
    assert code(e) == errno.EINVAL
    with pytest.raises(PxfsError) as e:
        await ns.rename(ROOT_INO, b"a", a.ino, b"x")
    assert code(e) == errno.EINVAL
    with pytest.raises(AlreadyExists):
        await ns.rename(ROOT_INO, b"f", ROOT_INO, b"g", RENAME_NOREPLACE)
    with pytest.raises(PxfsError) as e:
        await ns.rename(ROOT_INO, b"f", ROOT_INO, b"a")   # file over dir
    assert code(e) == errno.EISDIR
    with pytest.raises(PxfsError) as e:
        await ns.rename(ROOT_INO, b"a", ROOT_INO, b"f")   # dir over file
    assert code(e) == errno.ENOTDIR
    replaced, free = await ns.rename(ROOT_INO, b"f", ROOT_INO, b"g")
    assert replaced.ino == g.ino and free
    assert (await ns.lookup(ROOT_INO, b"g")).ino == f.ino
    # a directory moves with its parent pointer and the link counts follow
    await ns.rename(a.ino, b"b", ROOT_INO, b"b2")
    assert (await ns.getattr(b.ino)).parent == ROOT_INO
    assert (await ns.getattr(a.ino)).nlink == 2
    assert (await ns.getattr(ROOT_INO)).nlink == 4
    # replacing an empty directory; a non-empty one is refused
    await ns.mknod(b.ino, b"x", REG, 0, 0)
    with pytest.raises(PxfsError) as e:
        await ns.rename(ROOT_INO, b"a", ROOT_INO, b"b2")
    assert code(e) == errno.ENOTEMPTY
    await ns.rename(ROOT_INO, b"b2", ROOT_INO, b"a")
    assert (await ns.lookup(ROOT_INO, b"a")).ino == b.ino
    assert (await ns.getattr(ROOT_INO)).nlink == 3
    with pytest.raises(NotFound):
        await ns.getattr(a.ino)
    # renaming a name onto another name of the same file changes nothing
    await ns.link(f.ino, ROOT_INO, b"h")
    assert await ns.rename(ROOT_INO, b"g", ROOT_INO, b"h") == (None, False)
    assert {n for n, _ in await ns.listdir(ROOT_INO)} == {b"a", b"g", b"h"}


async def test_setattr_and_size(ns):
    f = await ns.mknod(ROOT_INO, b"f", REG, 0, 0)
    t, old = await ns.setattr(f.ino, mode=0o600, uid=5, gid=6, size=100)
    assert (t.mode, t.uid, t.gid, t.size, old) == (stat.S_IFREG | 0o600, 5, 6, 100, 0)
    t = await ns.set_size(f.ino, 4096, 123)
    assert t.size == 4096
    d = await ns.mknod(ROOT_INO, b"d", DIR, 0, 0)
    with pytest.raises(PxfsError) as e:
        await ns.setattr(d.ino, size=0)
    assert code(e) == errno.EISDIR


async def test_xattrs(ns):
    f = await ns.mknod(ROOT_INO, b"f", REG, 0, 0)
    await ns.setxattr(f.ino, b"user.a", b"1")
    await ns.setxattr(f.ino, b"user.b", b"\0" * 1000)
    assert await ns.getxattr(f.ino, b"user.a") == b"1"
    assert sorted(await ns.listxattr(f.ino)) == [b"user.a", b"user.b"]
    with pytest.raises(PxfsError) as e:
        await ns.setxattr(f.ino, b"user.big", b"x" * (64 * 1024 + 1))
    assert code(e) == errno.E2BIG
    with pytest.raises(PxfsError) as e:
        await ns.setxattr(f.ino, b"u" * 256, b"x")
    assert code(e) == errno.ERANGE
    await ns.removexattr(f.ino, b"user.a")
    with pytest.raises(PxfsError) as e:
        await ns.getxattr(f.ino, b"user.a")
    assert code(e) == errno.ENODATA
    await ns.unlink(ROOT_INO, b"f")
    assert await ns.kv.range(keys.ns_xattr_prefix(ns.cid, VOL, f.ino)) == []


async def test_racing_creates_one_winner(kv, cid, ns):
    """Two nodes (two NsMeta on one store) create the same names at once:
    exactly one create per name succeeds, the others get EEXIST."""
    other = NsMeta(kv, cid, VOL, "n2")
    wins, losses = [], []

    async def create(meta, name):
        try:
            wins.append((name, (await meta.mknod(ROOT_INO, name, REG, 0, 0)).ino))
        except AlreadyExists:
            losses.append(name)
    async with trio.open_nursery() as n:
        for i in range(10):
            for meta in (ns, other, ns, other):
                n.start_soon(create, meta, b"race%d" % i)
    assert sorted(w for w, _ in wins) == sorted(b"race%d" % i for i in range(10))
    assert len(losses) == 30
    listed = dict(await ns.listdir(ROOT_INO))
    assert all(listed[name] == ino for name, ino in wins)
    for name, ino in wins:                    # no inode left behind by a loser
        assert (await ns.getattr(ino)).nlink == 1


async def test_racing_renames_into_one_name(kv, cid, ns):
    other = NsMeta(kv, cid, VOL, "n2")
    a = await ns.mknod(ROOT_INO, b"a", REG, 0, 0)
    b = await ns.mknod(ROOT_INO, b"b", REG, 0, 0)
    results = []

    async def mv(meta, src):
        try:
            await meta.rename(ROOT_INO, src, ROOT_INO, b"target", RENAME_NOREPLACE)
            results.append(src)
        except AlreadyExists:
            pass
    async with trio.open_nursery() as n:
        n.start_soon(mv, ns, b"a")
        n.start_soon(mv, other, b"b")
    assert len(results) == 1
    names = dict(await ns.listdir(ROOT_INO))
    winner = a if results == [b"a"] else b
    assert names[b"target"] == winner.ino and len(names) == 2


async def test_rmdir_racing_create(kv, cid, ns):
    """rmdir's emptiness check and a create in that directory never both win."""
    other = NsMeta(kv, cid, VOL, "n2")
    for i in range(5):
        d = await ns.mknod(ROOT_INO, b"d%d" % i, DIR, 0, 0)
        outcome = {}

        async def rm():
            try:
                await ns.rmdir(ROOT_INO, b"d%d" % i)
                outcome["rm"] = True
            except PxfsError:
                outcome["rm"] = False

        async def mk():
            try:
                await other.mknod(d.ino, b"f", REG, 0, 0)
                outcome["mk"] = True
            except PxfsError:
                outcome["mk"] = False
        async with trio.open_nursery() as n:
            n.start_soon(rm)
            n.start_soon(mk)
        assert outcome["rm"] != outcome["mk"], outcome
        if outcome["mk"]:
            assert [n for n, _ in await ns.listdir(d.ino)] == [b"f"]


async def test_inode_numbers_are_batched_per_node(kv, cid, ns):
    other = NsMeta(kv, cid, VOL, "n2")
    a = await ns.mknod(ROOT_INO, b"a", REG, 0, 0)
    b = await other.mknod(ROOT_INO, b"b", REG, 0, 0)
    c = await ns.mknod(ROOT_INO, b"c", REG, 0, 0)
    assert len({a.ino, b.ino, c.ino}) == 3 and c.ino == a.ino + 1


def test_inode_record_is_compact():
    node = Inode(123456, REG, 1000, 1000, 1, 4096, 1_700_000_000_000_000_000,
                 1_700_000_000_000_000_000, 1_700_000_000_000_000_000)
    raw = node.pack()
    assert len(raw) < 48
    back = Inode.unpack(123456, raw)
    assert (back.mode, back.size, back.mtime, back.target) == (REG, 4096, node.mtime, None)


async def test_remembered_inodes_never_overwrite_other_nodes_changes(kv, cid, ns):
    """Node 1's first attempts compare against the revisions it remembers;
    a change node 2 made meanwhile fails that compare and node 1 re-reads,
    so nothing node 2 wrote is lost, and the common case is one round trip."""
    other = NsMeta(kv, cid, VOL, "n2")
    f = await ns.mknod(ROOT_INO, b"f", REG, 0, 0)
    fast = ns.stats["fast"]
    await ns.set_size(f.ino, 100, 1)
    assert ns.stats["fast"] == fast + 1 and ns.stats["retried"] == 0
    await other.setattr(f.ino, mode=0o600, uid=7)            # behind node 1's back
    await ns.set_size(f.ino, 200, 2)
    assert ns.stats["retried"] == 1
    t = await other.getattr(f.ino)
    assert (t.size, t.mode & 0o777, t.uid) == (200, 0o600, 7)
    # a name node 2 created is not overwritten by node 1's assumed-absent create
    await other.mknod(ROOT_INO, b"g", REG, 0, 0)
    with pytest.raises(AlreadyExists):
        await ns.mknod(ROOT_INO, b"g", REG, 0, 0)
    # and a rename onto an existing name still replaces it
    await ns.rename(ROOT_INO, b"f", ROOT_INO, b"g")
    assert (await other.lookup(ROOT_INO, b"g")).ino == f.ino


async def test_listing_of_own_directory_answers_negative_lookups(kv, cid, ns):
    """A directory this node made and changed alone is known whole: a lookup
    of a missing name costs no round trip.  Another node's entry shows
    within a second, and a create of that name still meets it."""
    from pxfs.namespace import remembered
    other = NsMeta(kv, cid, VOL, "n2")
    d = await ns.mknod(ROOT_INO, b"d", DIR, 0, 0)
    await ns.mknod(d.ino, b"mine", REG, 0, 0)
    saved = ns.stats["negative lookups saved"]
    with pytest.raises(NotFound):
        await ns.lookup(d.ino, b"missing")
    assert ns.stats["negative lookups saved"] == saved + 1
    assert (await ns.lookup(d.ino, b"mine")).is_reg
    theirs = await other.mknod(d.ino, b"theirs", REG, 0, 0)
    with pytest.raises(AlreadyExists):
        await ns.mknod(d.ino, b"theirs", REG, 0, 0)
    assert (await ns.lookup(d.ino, b"theirs")).ino == theirs.ino   # listing dropped
    await other.mknod(d.ino, b"later", REG, 0, 0)
    await trio.sleep(remembered.FRESH)
    assert (await ns.lookup(d.ino, b"later")).is_reg


# -- directories held by the mount that made them (delegation.py) --------------------
async def _holder(kv, cid, ns):
    """ns holds a new directory d (made with its writer mark) and makes files
    in it in memory; returns d."""
    d = await ns.mknod(ROOT_INO, b"d", DIR, 0, 0, writer=ns.node)
    assert d.ino in ns.marked and d.writer == ns.node
    return d


async def test_files_in_a_held_directory_cost_no_round_trip(kv, cid, ns):
    d = await _holder(kv, cid, ns)
    made = [await ns.mknod(d.ino, f"f{i}".encode(), REG, 0, 0, writer=ns.node) for i in range(50)]
    assert ns.stats["local creates"] == 50
    # not in etcd yet, but this mount sees them
    assert await kv.get(keys.ns_dentry_key(cid, VOL, d.ino, b"f0")) is None
    assert (await ns.lookup(d.ino, b"f7")).ino == made[7].ino
    with pytest.raises(AlreadyExists):
        await ns.mknod(d.ino, b"f3", REG, 0, 0, writer=ns.node)
    await ns.set_sizes([(made[1].ino, 123, 1, {}, True)])
    await ns.flush_local()
    assert ns.stats["local batches"] == 2                  # 40 + 10
    other = NsMeta(kv, cid, VOL, "n2")
    assert sorted(n for n, _ in await _listdir_via(other, ns, d.ino)) == sorted(
        f"f{i}".encode() for i in range(50))
    got = await other.getattr(made[1].ino)
    assert got.size == 123 and got.writer == ""


async def _listdir_via(other, holder, ino):
    """other lists ino while holder answers recalls."""
    async with trio.open_nursery() as n:
        await n.start(holder.serve_recalls)
        out = await other.listdir(ino)
        n.cancel_scope.cancel()
    return out


async def test_another_mount_recalls_a_held_directory(kv, cid, ns):
    d = await _holder(kv, cid, ns)
    await ns.mknod(d.ino, b"x", REG, 0, 0, writer=ns.node)
    other = NsMeta(kv, cid, VOL, "n2")
    async with trio.open_nursery() as n:
        await n.start(ns.serve_recalls)
        with pytest.raises(AlreadyExists):                 # the name made in memory wins
            await other.mknod(d.ino, b"x", REG, 0, 0)
        assert d.ino not in ns.marked                       # given up
        y = await other.mknod(d.ino, b"y", REG, 0, 0)
        # the holder now goes to etcd for this directory, and sees y
        with pytest.raises(AlreadyExists):
            await ns.mknod(d.ino, b"y", REG, 0, 0, writer=ns.node)
        assert (await ns.lookup(d.ino, b"y")).ino == y.ino
        n.cancel_scope.cancel()
    assert (await kv.get(keys.ns_prefix(cid, VOL) + f"recall/{d.ino:x}")) is None


async def test_a_dead_holders_directory_is_cleared_and_its_memory_lost(kv, cid, ns):
    d = await _holder(kv, cid, ns)
    await ns.mknod(d.ino, b"lost", REG, 0, 0, writer=ns.node)
    other = NsMeta(kv, cid, VOL, "n2")                    # n1 has no mount record: it is gone
    with pytest.raises(NotFound):
        await other.lookup(d.ino, b"lost")
    assert (await other.getattr(d.ino)).writer == ""
    made = await other.mknod(d.ino, b"lost", REG, 0, 0)
    with pytest.raises(PxfsError) as e:                    # the old holder cannot land it now
        await ns.flush_local()
    assert e.value.errno == errno.ESTALE
    assert (await other.lookup(d.ino, b"lost")).ino == made.ino


async def test_directories_made_in_a_held_directory_are_held_too(kv, cid, ns):
    d = await _holder(kv, cid, ns)
    e = await ns.mknod(d.ino, b"e", DIR, 0, 0, writer=ns.node)
    f = await ns.mknod(e.ino, b"f", REG, 0, 0, writer=ns.node)
    g = await ns.mknod(e.ino, b"g", DIR, 0, 0, writer=ns.node)
    assert ns.stats["local creates"] == 3 and {e.ino, g.ino} <= ns.marked
    assert (await ns.getattr(e.ino)).nlink == 3
    assert (await ns.lookup(e.ino, b"f")).ino == f.ino
    await ns.flush_local()
    other = NsMeta(kv, cid, VOL, "n2")
    async with trio.open_nursery() as n:
        await n.start(ns.serve_recalls)
        assert (await other.lookup(d.ino, b"e")).nlink == 3
        assert (await other.getattr(d.ino)).nlink == 3
        assert sorted(await other.listdir(e.ino)) == [(b"f", f.ino), (b"g", g.ino)]
        with pytest.raises(PxfsError) as exc:                  # not empty
            await other.rmdir(d.ino, b"e")
        assert code(exc) == errno.ENOTEMPTY
        n.cancel_scope.cancel()
    # the holder removes what it made: everything goes through etcd now
    await ns.unlink(e.ino, b"f")
    await ns.rmdir(e.ino, b"g")
    await ns.rmdir(d.ino, b"e")
    assert await ns.listdir(d.ino) == []


async def test_a_held_directory_changed_by_this_mount_meanwhile_loses_nothing(kv, cid, ns):
    """A change of this mount to a held directory (rename, unlink in it)
    may land while files made in memory are on their way to etcd: the flush
    reads the directory again and tries again instead of giving up."""
    d = await _holder(kv, cid, ns)
    made = [await ns.mknod(d.ino, f"f{i}".encode(), REG, 0, 0, writer=ns.node) for i in range(5)]
    item = await kv.get(keys.ns_inode_key(cid, VOL, d.ino))
    assert await kv.txn([], [Put(item.key, item.value)])      # same record, newer revision
    await ns.flush_local()
    for m in made:
        assert (await kv.get(keys.ns_dentry_key(cid, VOL, d.ino, f"f{made.index(m)}".encode()))) is not None
    assert d.ino in ns.marked
    # and giving the directory up copes with the same
    item = await kv.get(keys.ns_inode_key(cid, VOL, d.ino))
    assert await kv.txn([], [Put(item.key, item.value)])
    await ns.release([d.ino])
    assert (await NsMeta(kv, cid, VOL, "n2").getattr(d.ino)).writer == ""


async def test_held_directories_are_given_up_when_idle(kv, cid, ns, monkeypatch):
    from pxfs.namespace import delegation
    monkeypatch.setattr(delegation, "IDLE_RELEASE", 1.0)
    d = await _holder(kv, cid, ns)
    await ns.mknod(d.ino, b"f", REG, 0, 0, writer=ns.node)
    async with trio.open_nursery() as n:
        await n.start(ns.serve_recalls)
        await trio.sleep(0.2)
        assert d.ino in ns.marked                  # still busy
        # the mark goes from memory first, then from etcd: wait for both
        # before the release is cancelled with the nursery
        with trio.fail_after(10):
            while ns.marked or (await NsMeta(kv, cid, VOL, "n3").getattr(d.ino)).writer:
                await trio.sleep(0.1)
        n.cancel_scope.cancel()
    assert not ns.marked
    other = NsMeta(kv, cid, VOL, "n2")
    assert (await other.getattr(d.ino)).writer == ""
    assert (await other.lookup(d.ino, b"f")).ino                # committed on the way out
