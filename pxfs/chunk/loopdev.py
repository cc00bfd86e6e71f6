"""Loop devices pxfs attaches (pool images, volume images): their cache mode,
and their backing files as sysfs gives them.

A loop device keeps its queue's ``write_cache`` setting across detach and
attach.  Left in "write through" by anyone (a tuning script, an earlier
experiment), the block layer drops every flush and FUA sent to it: an fsync
inside the filesystem on top returns without the data reaching pxfs's flush,
so nothing it acknowledged would be durable.  Every loop device pxfs attaches
is therefore set back to "write back" before it is used.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

WRITE_BACK = "write back"


def _knob(dev: str) -> str:
    return f"/sys/block/{os.path.basename(dev)}/queue/write_cache"


def insist_write_back(dev: str) -> None:
    """Make flushes on ``dev`` reach the file under it (OSError if the
    kernel refuses)."""
    path = _knob(dev)
    if not os.path.exists(path):
        return                  # not a block device with a queue (nothing to do)
    with open(path) as fh:
        mode = fh.read().strip()
    if mode == WRITE_BACK:
        return
    log.warning("%s was in %r cache mode, which drops flushes: setting %r", dev, mode,
                WRITE_BACK)
    with open(path, "w") as fh:
        fh.write(WRITE_BACK)
    with open(path) as fh:
        mode = fh.read().strip()
    if mode != WRITE_BACK:
        raise OSError(f"{dev}: write_cache stays {mode!r}")


def backing_file(dev: str) -> str | None:
    """The file behind loop device ``dev``, None when it has none (or no
    such device).  From sysfs: asking the device itself (LOOP_GET_STATUS,
    as ``losetup -j`` does for every loop device) looks its backing file
    up, and one on a FUSE mount whose process is stopped (a paused node's
    attached volume) hangs the caller."""
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as fh:
            return fh.read().rstrip("\n")
    except OSError:
        return None


def loops_backed_by(path: str) -> set[str]:
    """The loop devices whose backing file is ``path``."""
    try:
        names = [n for n in os.listdir("/sys/block") if n.startswith("loop")]
    except OSError:
        return set()
    return {f"/dev/{n}" for n in names if backing_file(n) == path}
