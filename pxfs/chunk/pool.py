"""Turning the configured storage devices into pool roots.

A directory is used as it is (development).  A block device or an image
file is formatted XFS with the label ``pxfs-pool`` on first use (after a
loud warning; XFS because it takes buffered writes with RWF_NOWAIT, so a
replica applies a write on the event loop when the page cache can take it) and mounted under ``<data_dir>/pools/<n>``; a device that holds
any other filesystem is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import subprocess

from ..errors import ConfigError
from . import loopdev

log = logging.getLogger(__name__)
LABEL = "pxfs-pool"
#: the smallest device mkfs.xfs formats
MIN_DEVICE = 300 << 20


def _blkid(dev: str) -> dict:
    res = subprocess.run(["blkid", "-p", "-o", "export", dev], capture_output=True, text=True)
    out = {}
    for line in res.stdout.splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


def _mounted_at(dev: str) -> str | None:
    real = os.path.realpath(dev)
    text = subprocess.run(["findmnt", "-n", "-o", "SOURCE,TARGET", "-l"], capture_output=True,
                          text=True).stdout
    loops = loopdev.loops_backed_by(real) if os.path.isfile(real) else set()
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and (parts[0] == real or parts[0] in loops):
            return parts[1]
    return None


#: name of the file in each pool root that says whose pool it is, and that
#: the node holding the pool keeps locked (flock) while it runs
OWNER_FILE = "pxfs-pool.json"
#: the open, locked owner files: a lock lasts as long as its descriptor
_claims: dict[str, int] = {}


def claim(root: str, dev: str, clusterid: str, node_id: str) -> None:
    """Take the pool at ``root`` for this node, or raise ConfigError: a pool
    that another running pxfsd holds, or one that belongs to another node,
    would have two nodes serve (and overwrite) one set of chunk files."""
    path = os.path.join(root, OWNER_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("storage.devices", f"{dev} is in use by another running pxfsd "
                              f"({_describe(fd)}); give each node devices of its own") from None
        raw = os.pread(fd, 4096, 0)
        try:
            owner = json.loads(raw) if raw else {}
        except ValueError:
            owner = {}
        if owner and (owner.get("clusterid"), owner.get("node_id")) != (clusterid, node_id):
            raise ConfigError("storage.devices", f"{dev} is the pool of node "
                              f"{owner.get('node_id')!r} in cluster {owner.get('clusterid')!r}, "
                              f"not of {node_id!r} in {clusterid!r}; give each node devices of its "
                              "own (or wipe this one to reuse it)")
        rec = json.dumps({"clusterid": clusterid, "node_id": node_id, "pid": os.getpid()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, rec, 0)
    except BaseException:
        os.close(fd)
        raise
    _claims[root] = fd


def _describe(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        return f"node {owner['node_id']!r}, pid {owner['pid']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "its owner file is unreadable"


def check(devices) -> None:
    """ConfigError for a device pxfs cannot use, with no side effect: run
    before anything is started (the devices are formatted and mounted only
    once the node knows it may start)."""
    for dev in devices:
        _usable(dev)


def _usable(dev: str) -> tuple[os.stat_result, dict | None]:
    """The device's stat and blkid facts (None for a directory), or
    ConfigError if pxfs may not use it."""
    st = os.stat(dev)
    if stat.S_ISDIR(st.st_mode):
        return st, None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise ConfigError("storage.devices", f"{dev} is neither a block device, a file nor a directory")
    info = _blkid(dev)
    if info.get("TYPE") and info.get("LABEL") != LABEL:
        raise ConfigError("storage.devices", f"{dev} holds a {info['TYPE']} filesystem that pxfs "
                          "did not make; wipe it (wipefs -a) to let pxfs use it")
    if not info.get("TYPE"):                # to be formatted: mkfs.xfs's own minimum
        fd = os.open(dev, os.O_RDONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if size < MIN_DEVICE:
            raise ConfigError("storage.devices", f"{dev} holds {size >> 20} MiB; a pool device "
                              f"needs at least {MIN_DEVICE >> 20} MiB (or use a directory)")
    return st, info


def prepare(devices, data_dir: str, clusterid: str | None = None,
            node_id: str | None = None) -> list[str]:
    """Pool roots for the devices; raises ConfigError for unusable devices
    (and then unmounts the pools it mounted for the others).  With a node
    id, each pool is claimed for that node (see ``claim``)."""
    roots: list[str] = []
    mounted: list[str] = []
    try:
        for n, dev in enumerate(devices):
            root = _prepare_one(n, dev, data_dir, mounted)
            roots.append(root)
            if node_id is not None:
                claim(root, dev, clusterid, node_id)
    except BaseException:
        release(roots, data_dir, only=mounted)
        raise
    return roots


def _prepare_one(n: int, dev: str, data_dir: str, mounted: list[str]) -> str:
    """Mount (or find) the pool of one device and return its root; a pool
    mounted here is appended to ``mounted`` at once (unmounted again if a
    later device fails)."""
    st, info = _usable(dev)
    if info is None:
        return dev                      # a directory, used as it is
    target = os.path.join(data_dir, "pools", str(n))
    os.makedirs(target, exist_ok=True)
    where = _mounted_at(dev)
    if where:
        # left mounted by a run that died (or held by another running
        # node: ``claim`` refuses that); not ours to unmount on a failure
        return where
    if not info.get("TYPE"):
        log.warning("*** %s holds no filesystem: FORMATTING IT for the pxfs pool; "
                    "everything on it is lost ***", dev)
        res = subprocess.run(["mkfs.xfs", "-q", "-L", LABEL, dev], capture_output=True, text=True)
        if res.returncode:
            raise ConfigError("storage.devices", f"cannot format {dev}: {res.stderr.strip()}")
    source = dev
    if stat.S_ISREG(st.st_mode):
        # direct I/O on the loop device avoids caching every page twice
        # (once for the pool filesystem, once for the image file)
        res = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", dev],
                             capture_output=True, text=True)
        if res.returncode:
            raise ConfigError("storage.devices", f"cannot loop-attach {dev}: {res.stderr.strip()}")
        source = res.stdout.strip()
        try:
            loopdev.insist_write_back(source)
        except OSError as exc:
            subprocess.run(["losetup", "-d", source], capture_output=True)
            raise ConfigError("storage.devices", f"cannot use {source} for {dev}: {exc}") from exc
    # allocsize: a fixed, minimal preallocation past the end of a file.
    # XFS's default grows with the file, so a chunk file filled in order
    # held up to twice its data while it stayed open (thin volumes that
    # used twice what was written, as pool usage and in volume inspect)
    opts = ["-o", "allocsize=4k"] if info.get("TYPE", "xfs") == "xfs" else []
    res = subprocess.run(["mount", *opts, source, target], capture_output=True, text=True)
    if source != dev:
        # autoclear: the loop device goes away when the pool is unmounted
        subprocess.run(["losetup", "-d", source], capture_output=True)
    if res.returncode:
        raise ConfigError("storage.devices", f"cannot mount {dev}: {res.stderr.strip()}")
    mounted.append(target)
    return target


def release(roots: list[str], data_dir: str, only: list[str] | None = None) -> None:
    """Give up the claims on the pools and unmount those pxfs mounted
    (clean stop; ``only`` these after a failed start)."""
    base = os.path.join(data_dir, "pools") + "/"
    for root in roots:
        fd = _claims.pop(root, None)
        if fd is not None:
            os.close(fd)
        if only is not None and root not in only:
            continue
        if root.startswith(base):
            subprocess.run(["umount", root], capture_output=True)
