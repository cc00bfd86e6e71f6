"""Turning the configured storage devices into pool roots.

A directory is used as it is (development).  A block device or an image
file is formatted XFS with the label ``pxfs-pool`` on first use (after a
loud warning; XFS because it takes buffered writes with RWF_NOWAIT, so a
replica applies a write on the event loop when the page cache can take it) and mounted under ``<data_dir>/pools/<n>``; a device that holds
any other filesystem is refused.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess

from ..errors import ConfigError
from . import loopdev

log = logging.getLogger(__name__)
LABEL = "pxfs-pool"


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
    loops = {}
    if os.path.isfile(real):
        lo = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", real], capture_output=True,
                            text=True).stdout.split()
        loops = set(lo)
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and (parts[0] == real or parts[0] in loops):
            return parts[1]
    return None


def prepare(devices, data_dir: str) -> list[str]:
    """Pool roots for the devices; raises ConfigError for unusable devices."""
    roots = []
    for n, dev in enumerate(devices):
        st = os.stat(dev)
        if stat.S_ISDIR(st.st_mode):
            roots.append(dev)
            continue
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise ConfigError("storage.devices", f"{dev} is neither a block device, a file nor a directory")
        info = _blkid(dev)
        if info.get("TYPE") and info.get("LABEL") != LABEL:
            raise ConfigError("storage.devices", f"{dev} holds a {info['TYPE']} filesystem that pxfs "
                              "did not make; wipe it (wipefs -a) to let pxfs use it")
        target = os.path.join(data_dir, "pools", str(n))
        os.makedirs(target, exist_ok=True)
        where = _mounted_at(dev)
        if where:
            roots.append(where)
            continue
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
        roots.append(target)
    return roots


def release(roots: list[str], data_dir: str) -> None:
    """Unmount the pool mounts pxfs made (clean stop)."""
    base = os.path.join(data_dir, "pools") + "/"
    for root in roots:
        if root.startswith(base):
            subprocess.run(["umount", root], capture_output=True)
