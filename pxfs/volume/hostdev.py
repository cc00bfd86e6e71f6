"""Host block-device plumbing: loop devices over the FUSE image files,
mkfs, mount and umount, run as async subprocesses so the FUSE loop keeps
serving the I/O they cause."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import struct
import subprocess
import threading
import time

import trio

from ..chunk import loopdev
from ..errors import Busy, HostError, InvalidArgument

log = logging.getLogger(__name__)
PXD_DIR = "/dev/pxd"


async def _exec(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False)
    except OSError as exc:
        raise HostError(f"{argv[0]}: {exc}") from exc


async def run(*argv: str, check: bool = True) -> str:
    res = await _exec(list(argv))
    if check and res.returncode:
        msg = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
        raise HostError(f"{' '.join(argv[:2])} failed: {msg[-1] if msg else res.returncode}")
    return res.stdout.decode(errors="replace").strip()


async def loop_attach(path: str) -> str:
    dev = await run("losetup", "--find", "--show", "--direct-io=on", path)
    try:
        loopdev.insist_write_back(dev)
    except OSError as exc:
        await loop_detach(dev)
        raise HostError(f"{dev}: cannot enable flushes: {exc}") from exc
    return dev


async def loop_detach(dev: str) -> None:
    await run("losetup", "-d", dev, check=False)


def loops_backed_by(prefix: str) -> list[str]:
    """Loop devices whose backing file lies under ``prefix`` (sync: startup)."""
    out = []
    try:
        text = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True,
                              text=True, check=False).stdout
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(prefix.rstrip("/") + "/"):
            out.append(parts[0])
    return out


_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    """A /proc/self/mounts field as the path it names: the kernel writes
    space, tab, newline and backslash as octal escapes and every other byte
    as it is (UTF-8 names included), so decode the escapes on the bytes and
    the bytes as the file system encoding does (unicode_escape would read
    each byte of a UTF-8 name as a character of its own)."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mounts() -> list[tuple[str, str, str]]:
    """(source, target, fstype) of every mount, octal escapes decoded."""
    out = []
    with open("/proc/self/mounts", "rb") as fh:
        for line in fh:
            f = line.split()
            out.append((_unescape(f[0]), _unescape(f[1]), _unescape(f[2])))
    return out


def is_mountpoint(path: str) -> bool:
    path = os.path.realpath(path)
    return any(t == path for _, t, _ in mounts())


def device_users(dev: str) -> list[str]:
    """"pid (command)" of every other process holding ``dev`` open (a
    database on the raw device, a dd)."""
    return _users(lambda target: target == dev, cwd=False)


PROBE_WAIT = 2.0


def _dead_fuse(target: str) -> bool:
    """Whether the FUSE mount at ``target`` lost its process (ENOTCONN);
    False for one that does not answer within PROBE_WAIT (the probe's
    thread is left to end when it does)."""
    box = {}

    def probe():
        try:
            os.statvfs(target)
        except OSError as exc:
            box["dead"] = exc.errno == errno.ENOTCONN
    t = threading.Thread(target=probe, daemon=True, name="fuse-probe")
    t.start()
    t.join(PROBE_WAIT)
    return bool(box.get("dead"))


def drop_dead_fuse_mounts(under: str, shared_only: bool = False) -> list[str]:
    """Unmount (lazily) the FUSE mounts at or below ``under`` whose process
    is gone (a statfs answers "Transport endpoint is not connected"): a
    shared volume's mount process killed, or dead with its node.  With
    ``shared_only``, shared volumes' mounts only (not a node's view, which
    a paused node would leave hanging).  Each is looked at right before its
    unmount: a new mount may stand there by then.  Call in a worker thread;
    a FUSE mount that is alive but stuck (its process paused) does not
    answer, and is left alone after ``PROBE_WAIT`` seconds."""
    base = os.path.realpath(under).rstrip("/")
    gone = []
    for source, target, fstype in mounts():
        if not fstype.startswith("fuse") or not (target == base or target.startswith(base + "/")):
            continue
        if shared_only and (fstype != "fuse.pxfs" or source == "pxfs"):
            continue
        if not _dead_fuse(target):
            continue
        log.warning("unmounting %s: its FUSE process is gone", target)
        subprocess.run(["umount", "-l", target], capture_output=True)
        gone.append(target)
    return gone


def process_place() -> str:
    """Where this process runs, finer than its host name: the boot and
    the pid and mount namespaces.  Two processes with the same place see
    each other's pids and mounts (cloned machines share host names)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        ns = [os.stat(f"/proc/self/ns/{n}").st_ino for n in ("pid", "mnt")]
    except OSError:
        return ""
    return f"{boot}/{ns[0]}/{ns[1]}"


def live_fuse_mount(path: str) -> bool:
    """Whether a FUSE mount stands at ``path`` whose process has not gone
    (one that does not answer counts as live)."""
    return (bool(path) and any(t == path and f.startswith("fuse") for _, t, f in mounts())
            and not _dead_fuse(path))


def device_mount_points(dev: str) -> list[str]:
    """Where ``dev`` is mounted in this mount namespace, bind mounts of it
    included (matched by device number: a mount made through
    /dev/pxd/pxd<ID> shows that name, not the loop device's)."""
    try:
        rdev = os.stat(dev).st_rdev
    except OSError:
        return []
    want = f"{os.major(rdev)}:{os.minor(rdev)}".encode()
    with open("/proc/self/mountinfo", "rb") as fh:
        return [_unescape(f[4]) for f in map(bytes.split, fh) if len(f) > 4 and f[2] == want]


def device_holders(dev: str) -> list[str]:
    """What holds ``dev`` without a file descriptor that device_users could
    see: a mount of it made by hand (``mount /dev/pxd/pxd<ID> /mnt``), or,
    found by an exclusive open failing, a mount in another mount namespace,
    a device-mapper or RAID device over it.  Detaching under any of them
    would throw away what they have not yet written back."""
    out = [f"mounted at {p}" for p in device_mount_points(dev)]
    if out:
        return out
    try:
        os.close(os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return ["held by the kernel (a mount in another mount namespace, "
                    "or a device-mapper or RAID device on it)"]
    return []


def path_users(path: str) -> list[str]:
    """"pid (command)" of every other process with a file open, its working
    directory or its root under ``path`` (what keeps a mount busy)."""
    path = os.path.realpath(path)
    return _users(lambda target: target == path or target.startswith(path + "/"), cwd=True)


def _users(match, cwd: bool) -> list[str]:
    """Only the /proc/PID links are read, never stat'ed: a link to a file on
    a hung mount would hang."""
    out = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            links = [f"fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:             # gone, or not ours to look at
            continue
        if cwd:
            links += ["cwd", "root"]
        for link in links:
            try:
                if not match(os.readlink(f"/proc/{pid}/{link}")):
                    continue
            except OSError:
                continue
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    comm = fh.read().strip()
            except OSError:
                comm = "?"
            out.append(f"{pid} ({comm})")
            break
    return out


def is_mounted(dev: str, path: str) -> bool:
    """Whether ``dev`` is mounted at ``path`` (not merely something)."""
    path = os.path.realpath(path)
    return any(s == dev and t == path for s, t, _ in mounts())


#: the kernel's own trees: a volume mounted in one hides what the host
#: and its processes read there (a mount at /proc/sys hid every sysctl)
SYSTEM_DIRS = {"/proc": "the kernel's process tree", "/sys": "the kernel's sysfs",
               "/dev": "the host's device tree"}


def clean_mount_path(path: str) -> str:
    """``path`` normalized, or InvalidArgument before anything is attached,
    formatted or made: it must be absolute, free of control characters
    (a NUL cannot reach the kernel; a newline garbles every listing of
    mounts) and within the kernel's limits (a path it refuses would fail
    half-way through making its directories)."""
    if not os.path.isabs(path):
        raise InvalidArgument(f"mount path {path!r} must be absolute")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise InvalidArgument(f"mount path {path!r} holds a control character")
    path = os.path.normpath(path)
    if len(os.fsencode(path)) >= 4096:
        raise InvalidArgument(f"mount path is {len(os.fsencode(path))} bytes long; "
                              "at most 4095 are allowed")
    for part in path.split("/"):
        if len(os.fsencode(part)) > 255:
            raise InvalidArgument(f"mount path component {part[:40]!r}... is longer "
                                  "than 255 bytes")
    return path


async def resolve_mount_path(path: str, dirs: dict[str, str] | None = None,
                             timeout: float = 10.0) -> tuple[str, dict[str, str]]:
    """``path`` with its symlinks resolved, and ``dirs`` (path -> what it
    is) likewise, so that refuse_own_dirs and the mount see where a mount
    really lands: a symlink must not carry a volume into the node's data
    directory, and the path recorded must be the one mountinfo shows.  In a
    worker thread, as probe_path."""
    def look():
        # each dir under its written name and its resolved one (a node's
        # own FUSE view answers this thread from the node's event loop)
        own = {}
        for d, what in (dirs or {}).items():
            own[os.path.normpath(d)] = what
            own[os.path.realpath(d)] = what
        return os.path.realpath(path), own
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(look, abandon_on_cancel=True)
    raise HostError(f"{path} did not answer within {timeout:.0f} s (a hung filesystem?)",
                    errno=errno.EIO)


async def names_of(path: str, timeout: float = 5.0) -> set[str]:
    """The paths a user's ``path`` may name a mount by: as given
    (normalized) and with its symlinks resolved, as mount recorded it.  A
    path that does not answer (a dead mount behind it) is matched as given."""
    names = {os.path.normpath(path)}
    with trio.move_on_after(timeout):
        names.add(await trio.to_thread.run_sync(os.path.realpath, path, abandon_on_cancel=True))
    return names


def refuse_own_dirs(path: str, dirs: dict[str, str]) -> None:
    """InvalidArgument if a mount at ``path`` would lie in or cover one of
    ``dirs`` (path -> what it is): a node's FUSE view, its data directory,
    or lie in one of the kernel's trees (SYSTEM_DIRS)."""
    for root, what in SYSTEM_DIRS.items():
        if path == root or path.startswith(root + "/"):
            raise InvalidArgument(f"mount path {path!r} would lie in {what} ({root})")
    for root, what in dirs.items():
        root = os.path.normpath(root)
        if path == root or path.startswith(root + "/") or root.startswith(path.rstrip("/") + "/"):
            raise InvalidArgument(f"mount path {path!r} would lie in or cover {what} ({root})")


async def check_mount_path(path: str) -> None:
    refuse_mount_kind(path, await probe_path(path))


def refuse_mount_kind(path: str, kind: str) -> None:
    """Refuse a path a volume cannot be mounted on, given what probe_path
    found: not a directory, already a mount point, or a directory with
    files in it (the mount would hide them, and a user who then deletes the
    mount's contents believing them to be the old files loses data)."""
    if kind == "mountpoint":
        raise Busy(f"{path} is already a mount point")
    if kind == "other":
        raise InvalidArgument(f"mount path {path!r} exists and is not a directory")
    if kind == "nonempty":
        raise InvalidArgument(f"mount path {path!r} is not empty: the mount would hide "
                              "what is in it; use an empty or new directory")


async def probe_path(path: str, timeout: float = 10.0) -> str:
    """What ``path`` is: "absent", "mountpoint", "dir" (empty), "nonempty"
    (a directory with entries) or "other".  Looked
    at in a worker thread: a path on a hung network filesystem, or one that
    goes through a FUSE mount this very process serves, would otherwise
    stall the node's event loop (and with it its lease).  HostError (EIO)
    if it does not answer within ``timeout``."""
    def look() -> str:
        if not os.path.lexists(path):
            return "absent"
        if not os.path.isdir(path):
            return "other"
        if is_mountpoint(path):
            return "mountpoint"
        with os.scandir(path) as it:
            return "nonempty" if next(it, None) is not None else "dir"
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(look, abandon_on_cancel=True)
    raise HostError(f"{path} did not answer within {timeout:.0f} s (a hung filesystem?)",
                    errno=errno.EIO)


async def fs_type(dev: str) -> str:
    """The filesystem type on ``dev`` ('' when none)."""
    return await run("blkid", "-p", "-o", "value", "-s", "TYPE", dev, check=False)


async def mkfs(dev: str, fs: str, label: str, zeroed: bool = False) -> None:
    """``zeroed``: the device is known to read as zeros (a thin volume never
    written), so ext4 need not zero its inode tables: ~32 MiB fewer writes
    (and chunks) per replica for a 2 GiB volume, and no background zeroing
    after the mount.  Its journal is written all the same (write_journal)."""
    if fs == "ext4":
        # No fast_commit, although it would save journal writes and flushes
        # behind each fsync: with it, a crash taken when the fast-commit area
        # is exactly full leaves a journal that neither the kernel (6.18) nor
        # e2fsck (1.47.0) can replay ("JBD2: corrupted journal superblock"):
        # the mount fails, and e2fsck throws away every fsync since the last
        # full commit.  tests/t4_hostdev.py crashes after every fsync.
        ext = "nodiscard,lazy_itable_init=1" + (",assume_storage_prezeroed=1" if zeroed else "")
        await run("mkfs.ext4", "-q", "-F", "-L", label[:16], "-E", ext, dev)
        if zeroed:
            await write_journal(dev)
    elif fs == "xfs":
        await run("mkfs.xfs", "-q", "-f", "-K", "-L", label[:12], dev)
    else:
        raise HostError(f"cannot format {fs}")


_EXTENT = re.compile(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?")


async def _superblock_field(dev: str, name: str) -> str | None:
    """One field of the ext4 superblock on ``dev`` (``dumpe2fs -h``)."""
    m = re.search(rf"^{re.escape(name)}:\s+(.*)$", await run("dumpe2fs", "-h", dev), re.M)
    return m.group(1).strip() if m else None


async def journal_extents(dev: str) -> tuple[list[tuple[int, int, int]], int]:
    """(logical block, byte offset, byte length) of each extent of the ext4
    journal on ``dev``, and the block size."""
    bs = await _superblock_field(dev, "Block size")
    text = await run("debugfs", "-R", "stat <8>", dev)
    if not (bs or "").isdigit() or "EXTENTS:" not in text:
        raise HostError(f"{dev}: cannot locate the ext4 journal")
    bs = int(bs)
    out = []
    for first, last, pfirst, _ in _EXTENT.findall(text.split("EXTENTS:", 1)[1]):
        n = int(last or first) - int(first) + 1
        out.append((int(first), int(pfirst) * bs, n * bs))
    return out, bs


async def write_journal(dev: str) -> None:
    """Write the ext4 journal (all but its own superblock) once, with zeros,
    after a mkfs that skipped it: ``assume_storage_prezeroed`` leaves the
    journal unwritten along with the inode tables.  Left unwritten, each
    journal block jbd2 reaches for the first time is a hole in a chunk file
    of every replica, filled by an allocation that the pool must commit
    behind the application's fsync: ~610 instead of ~780 fsync'd 4 KiB
    writes/s (repl 2) until the journal has wrapped once."""
    extents, bs = await journal_extents(dev)
    for logical, off, length in extents:
        if logical == 0:            # the journal's superblock: keep it
            off, length = off + bs, length - bs
        if length <= 0:
            continue
        await run("dd", "if=/dev/zero", f"of={dev}", "bs=1M", "oflag=direct,seek_bytes",
                  "iflag=count_bytes", f"seek={off}", f"count={length}", "conv=notrunc",
                  "status=none")


async def recorded_errors(dev: str) -> str:
    """What an ext4 superblock on ``dev`` says of errors the kernel met on it
    before (it goes read-only on an I/O error and records it), as a warning
    for the user who mounts it again: '' when it is clean.  The mount
    itself succeeds, and the kernel only says so in its log."""
    state = await _superblock_field(dev, "Filesystem state") or ""
    if "error" not in state:
        return ""
    count = await _superblock_field(dev, "FS Error count")
    return (f"the file system on {dev} has recorded errors (state: {state}"
            + (f", {count} error(s)" if count else "") + "); unmount it and run "
            f"e2fsck -f {dev} before trusting its contents")


async def drop_fast_commit(dev: str) -> bool:
    """Clear ext4's fast_commit on a volume an older pxfs formatted with it
    (see mkfs for why), if its journal is clean; True if it did.  A journal
    that still needs replaying keeps it until a later mount finds it clean."""
    features = (await _superblock_field(dev, "Filesystem features") or "").split()
    if "fast_commit" not in features:
        return False
    if "needs_recovery" in features:
        log.warning("%s: ext4 fast_commit left on: its journal needs replaying first", dev)
        return False
    await run("tune2fs", "-O", "^fast_commit", dev)
    log.warning("%s: cleared ext4 fast_commit (a crash with its area full cannot be replayed)",
                dev)
    return True


_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]\s*")


async def _kernel_log(after: float) -> list[str]:
    """The kernel's messages logged after ``after`` (CLOCK_MONOTONIC seconds,
    the clock dmesg's timestamps follow)."""
    out = []
    for line in (await run("dmesg", check=False)).splitlines():
        m = _STAMP.match(line)
        if m and float(m.group(1)) >= after:
            out.append(line[m.end():])
    return out


async def make_mount_point(path: str) -> list[str]:
    """Make ``path`` and its missing parents, before anything is formatted
    or mounted; returns the directories made, for remove_made to take away
    again if the mount fails."""
    def make() -> list[str]:
        missing, p = [], path
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        made = []
        try:
            for d in reversed(missing):
                os.mkdir(d)
                made.append(d)
        except OSError as exc:
            remove_made(made)
            raise HostError(f"cannot make the mount point {path}: {exc.strerror}",
                            errno=errno.EINVAL) from None
        return made
    return await trio.to_thread.run_sync(make)


def remove_made(made: list[str]) -> None:
    """Take away directories make_mount_point made (innermost first) that
    are still empty."""
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            return


#: paths a mount is being made at by this process, from its checks to the
#: mount itself: two volumes mounted at one path at once would both find
#: it free and end up stacked, the second hiding the first
_CLAIMED: set[str] = set()
#: the same between processes (several nodes on one host): one lock file
#: per path, flock'ed while the mount is made; left in place (tiny, on tmpfs)
CLAIM_DIR = "/run/pxfs/mount-paths"


@contextlib.contextmanager
def claim_mount_path(path: str):
    """Hold ``path`` for one mount; a second one at the same time (in this
    process or another node's on the host) is Busy."""
    if path in _CLAIMED:
        raise Busy(f"another volume is being mounted at {path}")
    os.makedirs(CLAIM_DIR, exist_ok=True)
    name = hashlib.sha256(os.fsencode(path)).hexdigest()[:32]
    fd = os.open(os.path.join(CLAIM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another volume is being mounted at {path}") from None
        _CLAIMED.add(path)
        try:
            yield
        finally:
            _CLAIMED.discard(path)
    finally:
        os.close(fd)


def top_mount(path: str) -> str | None:
    """The source of the mount at ``path`` that an unmount of it would take
    away (the last one made there), or None."""
    path = os.path.realpath(path)
    found = [s for s, t, _ in mounts() if t == path]
    return found[-1] if found else None


async def mount(dev: str, path: str, fs: str) -> None:
    """Mount at ``path`` (made by make_mount_point); on failure the error
    says what the kernel logged about it (mount(8) itself only says to look
    in dmesg)."""
    # a little before now: dmesg's clock and CLOCK_MONOTONIC differ by a few ms
    since = time.clock_gettime(time.CLOCK_MONOTONIC) - 0.5
    res = await _exec(["mount", "-t", fs, dev, path])
    if res.returncode == 0:
        return
    name = os.path.basename(dev)
    said = [line for line in await _kernel_log(since)
            if name in line or line.startswith("JBD2")][-3:]
    if said:
        why = "kernel: " + " / ".join(said)
    else:
        lines = res.stderr.decode(errors="replace").strip().splitlines()
        why = lines[0].strip() if lines else f"exit status {res.returncode}"
    raise HostError(f"cannot mount {dev} ({fs}) at {path}: {why}")


async def umount(path: str, lazy: bool = False) -> None:
    try:
        await run("umount", *(["-l"] if lazy else []), path)
    except HostError as exc:
        if "busy" not in str(exc):
            raise
        def holders() -> list[str]:
            real = os.path.realpath(path)
            under = [f"a mount at {t}" for _, t, _ in mounts() if t.startswith(real + "/")]
            return under + path_users(path)
        users = await trio.to_thread.run_sync(holders)
        if not users:
            raise
        raise HostError(f"{str(exc).rstrip('.')}; in use by {', '.join(users[:5])}"
                        + (f" and {len(users) - 5} more" if len(users) > 5 else "")) from None


#: ``_IOR('X', 125, __u32)``: ext4's EXT4_IOC_SHUTDOWN and XFS's
#: XFS_IOC_GOINGDOWN; flags 0 ("default") freeze the filesystem first, which
#: writes back every dirty page and commits the journal
FS_IOC_SHUTDOWN = 0x8004587D


def _shutdown(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", 0))
    finally:
        os.close(fd)


async def sync_and_shut(path: str, timeout: float = 20.0) -> bool:
    """Make everything written so far to the filesystem mounted at ``path``
    durable, and every later read or write fail (EIO): for a mount that is
    still in use when its volume must go (a node's clean stop).  Without it
    the writes in the page cache are lost once the device is gone, while
    the application was told they succeeded.  In a worker thread: the
    sync's I/O comes back to this node's FUSE loop.  False if it could not
    be done (then at least ``syncfs``)."""
    with trio.move_on_after(timeout):
        try:
            await trio.to_thread.run_sync(_shutdown, path, abandon_on_cancel=True)
            return True
        except OSError as exc:
            log.warning("cannot shut down the filesystem at %s (%s); syncing it", path, exc)
        try:
            await trio.to_thread.run_sync(_syncfs, path, abandon_on_cancel=True)
        except OSError as exc:
            log.error("cannot sync the filesystem at %s: %s", path, exc)
        return False
    log.error("syncing the filesystem at %s took longer than %.0f s", path, timeout)
    return False


def _syncfs(path: str) -> None:
    res = subprocess.run(["sync", "-f", path], capture_output=True, text=True)   # syncfs(2)
    if res.returncode:
        raise OSError(res.stderr.strip() or f"sync -f: exit status {res.returncode}")


def link_pxd(volid: int, dev: str) -> str:
    os.makedirs(PXD_DIR, exist_ok=True)
    link = os.path.join(PXD_DIR, f"pxd{volid}")
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass
    os.symlink(dev, link)
    return link


def unlink_pxd(volid: int, dev: str) -> None:
    """Remove ``/dev/pxd/pxd<volid>`` if it still names ``dev``: after a
    failover on the same host it names another node's device."""
    link = os.path.join(PXD_DIR, f"pxd{volid}")
    try:
        if os.readlink(link) == dev:
            os.unlink(link)
    except OSError:
        pass


def share_mounts_under(path: str) -> None:
    """Make ``path`` a shared mount (a bind of itself if need be), so that
    what is mounted under it later also appears in mount namespaces copied
    from this one before, such as a dockerd run with MountFlags=slave.
    Portworx asks the same of /var/lib/osd ("-v /var/lib/osd:/var/lib/osd:shared")."""
    if not is_mountpoint(path):
        subprocess.run(["mount", "--bind", path, path], check=True, capture_output=True)
    subprocess.run(["mount", "--make-shared", path], check=True, capture_output=True)
