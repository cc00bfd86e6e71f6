"""The filesystems pxfs formats on a volume (pxfs/volume/hostdev.py) survive a
crash after any fsync: the journal replays and every fsync'd write is there.

The crash is a copy of the device's backing file taken right after an fsync
returned (the loop device uses direct I/O, so the file holds exactly what
the device acknowledged); the copy is then mounted, which replays its journal,
as a node that takes over a volume does.  This found that ext4's fast_commit
breaks recovery on this kernel whenever the fast-commit area is exactly full.
"""

import hashlib
import os
import subprocess

import pytest

from pxfs.volume import hostdev

from conftest import needs_mounts

pytestmark = needs_mounts

SIZE = 512 << 20        # journal of 4096 blocks, a fast-commit area of 64
FSYNCS = 80             # a full fast-commit area at 63 would be among them


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def _features(dev: str) -> set[str]:
    """The ext4 features dumpe2fs lists (not a match anywhere in its output:
    "Last mounted on" holds the test's path, which names fast_commit)."""
    out = _sh("dumpe2fs", "-h", dev).stdout
    line = next(x for x in out.splitlines() if x.startswith("Filesystem features:"))
    return set(line.split(":", 1)[1].split())


def _record(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * 128        # 4 KiB


@pytest.mark.parametrize("fs,zeroed", [("ext4", True), ("ext4", False), ("xfs", True)],
                         ids=["ext4-thin", "ext4-written", "xfs"])
async def test_volume_fs_replays_after_a_crash_at_every_fsync(tmp_path, fs, zeroed):
    img, copy = tmp_path / "vol.img", tmp_path / "crash.img"
    mnt, cmnt = tmp_path / "m", tmp_path / "cm"
    mnt.mkdir(), cmnt.mkdir()
    with open(img, "wb") as fh:
        fh.truncate(SIZE)
    dev = await hostdev.loop_attach(str(img))
    cdev, fd, mounted = None, None, False
    failures = []
    try:
        await hostdev.mkfs(dev, fs, "crashtest", zeroed=zeroed)
        # ext4: no periodic commit in the way, every commit comes from an fsync
        _sh("mount", "-o", "commit=600" if fs == "ext4" else "defaults", dev, str(mnt))
        mounted = True
        fd = os.open(mnt / "log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        os.fsync(fd)
        for i in range(FSYNCS):
            os.write(fd, _record(i))
            os.fsync(fd)
            _sh("cp", "--sparse=always", str(img), str(copy))
            cdev = _sh("losetup", "--find", "--show", str(copy)).stdout.strip()
            # XFS refuses a second mount of the same UUID without nouuid
            res = _sh("mount", *(["-o", "nouuid"] if fs == "xfs" else []), cdev, str(cmnt),
                      check=False)
            if res.returncode:
                failures.append((i + 1, res.stderr.strip()))
            else:
                data = (cmnt / "log").read_bytes()
                _sh("umount", str(cmnt))
                want = b"".join(_record(j) for j in range(i + 1))
                if data != want:
                    failures.append((i + 1, f"{len(data)} bytes of {len(want)} after replay"))
            _sh("losetup", "-d", cdev)
            cdev = None
    finally:
        if fd is not None:
            os.close(fd)
        if cdev:
            _sh("umount", str(cmnt), check=False)
            _sh("losetup", "-d", cdev, check=False)
        if mounted:
            _sh("umount", str(mnt), check=False)
        await hostdev.loop_detach(dev)
    assert not failures, f"crashes (after fsync number, error) that did not replay: {failures[:5]}"


async def test_thin_ext4_gets_its_journal_written_but_not_its_inode_tables(tmp_path):
    """A never-written volume: mkfs skips zeroing, then pxfs writes the
    journal so that jbd2 never fills holes in the replicas' chunk files."""
    img = tmp_path / "vol.img"
    with open(img, "wb") as fh:
        fh.truncate(2 << 30)
    dev = await hostdev.loop_attach(str(img))
    try:
        await hostdev.mkfs(dev, "ext4", "thin", zeroed=True)
        extents, bs = await hostdev.journal_extents(dev)
        features = _features(dev)
    finally:
        await hostdev.loop_detach(dev)
    journal = sum(length for _, _, length in extents)
    assert journal == 64 << 20 and "has_journal" in features
    assert "fast_commit" not in features
    used = os.stat(img).st_blocks * 512
    assert journal <= used < journal + (8 << 20), used      # no inode tables
    fd = os.open(img, os.O_RDONLY)
    try:
        for _, off, length in extents:          # every journal block allocated
            assert os.lseek(fd, off, os.SEEK_HOLE) >= off + length
    finally:
        os.close(fd)
    assert _sh("e2fsck", "-fn", str(img), check=False).returncode == 0


async def test_fast_commit_stays_until_the_journal_is_replayed(tmp_path):
    """A journal that needs replaying is left alone (tune2fs would refuse or
    lose it); once a mount has replayed it, the feature goes."""
    img, mnt = tmp_path / "old.img", tmp_path / "m"
    mnt.mkdir()
    with open(img, "wb") as fh:
        fh.truncate(SIZE)
    _sh("mkfs.ext4", "-q", "-F", "-O", "fast_commit", str(img))
    dev = await hostdev.loop_attach(str(img))
    copy = tmp_path / "crash.img"
    try:
        _sh("mount", dev, str(mnt))
        with open(mnt / "f", "wb", buffering=0) as fh:
            fh.write(_record(0))
            os.fsync(fh.fileno())
        _sh("cp", "--sparse=always", str(img), str(copy))   # a crash: needs recovery
    finally:
        _sh("umount", str(mnt), check=False)
        await hostdev.loop_detach(dev)
    dev = await hostdev.loop_attach(str(copy))
    try:
        assert await hostdev.drop_fast_commit(dev) is False
        assert "fast_commit" in _features(dev)
        _sh("mount", dev, str(mnt))                          # replays the journal
        assert (mnt / "f").read_bytes() == _record(0)
        _sh("umount", str(mnt))
        assert await hostdev.drop_fast_commit(dev) is True
        assert "fast_commit" not in _features(dev)
        assert await hostdev.drop_fast_commit(dev) is False
    finally:
        _sh("umount", str(mnt), check=False)
        await hostdev.loop_detach(dev)
    assert _sh("e2fsck", "-fn", str(copy), check=False).returncode == 0


async def test_a_path_that_does_not_answer_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A mount path on a hung filesystem (or in a FUSE mount the node
    serves itself) is looked at in a worker thread with a time limit: the
    node's event loop goes on meanwhile."""
    import threading

    import trio

    from pxfs.errors import HostError
    release = threading.Event()
    real = os.path.lexists

    def hung(p):
        if p == "/hung":
            release.wait(5)
        return real(p)
    monkeypatch.setattr(os.path, "lexists", hung)
    ticks = 0

    async def loop_goes_on():
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1
    async with trio.open_nursery() as n:
        n.start_soon(loop_goes_on)
        with pytest.raises(HostError, match="did not answer"):
            await hostdev.probe_path("/hung", timeout=0.3)
        n.cancel_scope.cancel()
    release.set()
    assert ticks >= 10
    (tmp_path / "empty").mkdir()
    assert await hostdev.probe_path(str(tmp_path / "empty")) == "dir"
    f = tmp_path / "f"
    f.write_text("x")
    assert await hostdev.probe_path(str(tmp_path)) == "nonempty"
    assert await hostdev.probe_path(str(f)) == "other"
    assert await hostdev.probe_path(str(tmp_path / "nope")) == "absent"
    assert await hostdev.probe_path("/proc") == "mountpoint"


def test_mounts_may_not_lie_in_or_cover_the_nodes_own_dirs():
    from pxfs.errors import InvalidArgument
    own = {"/var/lib/pxfs/fuse": "the FUSE view", "/var/lib/pxfs": "the data directory"}
    for path in ("/var/lib/pxfs/fuse", "/var/lib/pxfs/fuse/v", "/var/lib/pxfs", "/var/lib", "/var"):
        with pytest.raises(InvalidArgument, match="would lie in or cover"):
            hostdev.refuse_own_dirs(path, own)
    for path in ("/var/lib/pxfs-other", "/mnt/db", "/var/lib/osd/mounts/v", "/procs", "/devx"):
        hostdev.refuse_own_dirs(path, own)
    for path in ("/proc/sys", "/proc", "/sys/fs/cgroup", "/dev/shm/x"):
        with pytest.raises(InvalidArgument, match="would lie in the kernel's|host's device"):
            hostdev.refuse_own_dirs(path, own)


async def test_mount_points_made_for_a_failed_mount_are_taken_away(tmp_path):
    (tmp_path / "old").mkdir()
    made = await hostdev.make_mount_point(str(tmp_path / "old" / "a" / "b"))
    assert made == [str(tmp_path / "old" / "a"), str(tmp_path / "old" / "a" / "b")]
    assert os.path.isdir(tmp_path / "old" / "a" / "b")
    hostdev.remove_made(made)
    assert os.listdir(tmp_path / "old") == []           # what was there stays
    assert await hostdev.make_mount_point(str(tmp_path / "old")) == []
    (tmp_path / "f").write_text("x")
    from pxfs.errors import HostError
    with pytest.raises(HostError, match="cannot make the mount point .*Not a directory"):
        await hostdev.make_mount_point(str(tmp_path / "f" / "a"))
    # a failure part-way takes back what it made
    with pytest.raises(HostError, match="File name too long"):
        await hostdev.make_mount_point(str(tmp_path / "old" / "a" / ("n" * 256)))
    assert os.listdir(tmp_path / "old") == []


def test_mount_paths_with_control_characters_or_too_long_are_refused():
    from pxfs.errors import InvalidArgument
    assert hostdev.clean_mount_path("/mnt//db/") == "/mnt/db"
    for bad, said in (("mnt/db", "must be absolute"), ("/mnt/a\x00b", "control character"),
                      ("/mnt/a\nb", "control character"), ("/mnt/" + "d" * 256, "255 bytes"),
                      ("/" + "/".join(["d" * 200] * 21), "at most 4095")):
        with pytest.raises(InvalidArgument, match=said):
            hostdev.clean_mount_path(bad)
