"""A node's replica incarnation: the number its replica service puts in
every write and flush answer.  A writer whose unflushed writes a node took
treats an answer with another number as "those writes may be gone" (the
node's host may have lost its page cache), fails that replica and, when
every in-sync replica says so, stops its I/O.

A new process takes the old number when nothing can have been lost:

* the previous run stopped cleanly (its pools were unmounted or synced
  before it wrote ``clean``), or
* it died, but the host did not restart (same boot id) and every pool is
  still the same mount (same unique mount id, statx): its writes
  were in that page cache all along, and the new process made them durable
  (ChunkStore.sync_pools) before its data port opens.

A power loss changes the boot id; a pool shut down, unmounted and mounted
again (what the tests do to play a power loss) changes its mount id.  So a
rolling restart of the nodes leaves the writers' unflushed writes standing
instead of failing every replica in turn.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import struct

from .fileio import sync_roots

log = logging.getLogger(__name__)

STATE = "incarnation.json"
_taken: int | None = None       # this process's number, once take() chose it


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


_STATX_MNT_ID_UNIQUE = 0x4000     # Linux 6.8: a mount's id, never reused until reboot
_AT_FDCWD = -100


def _mount_ids(roots: list[str]) -> dict[str, int] | None:
    """root -> the unique id of the mount that holds it, or None where the
    kernel has none (then only a clean stop keeps the number).  Not the id
    /proc/self/mountinfo shows: that one is handed to the next mount."""
    try:
        statx = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    out = {}
    for root in roots:
        buf = ctypes.create_string_buffer(256)
        if statx(_AT_FDCWD, os.fsencode(root), 0, _STATX_MNT_ID_UNIQUE, buf) != 0:
            return None
        mask, = struct.unpack_from("I", buf, 0)
        if not mask & _STATX_MNT_ID_UNIQUE:
            return None
        out[root], = struct.unpack_from("Q", buf, 144)       # stx_mnt_id
    return out


def _write(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_path: str | None = None        # the state file, once begin() found it


def begin(data_dir: str) -> dict:
    """Read the previous run's state and, before anything is synced,
    forfeit it on disk: a sync that fails (a write-back error, which the
    kernel reports once) must leave nothing a later start could reuse,
    even if this process dies right after.  Returns the old state for
    take()."""
    global _path
    _path = os.path.join(data_dir, STATE)
    try:
        with open(_path) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        old = {}
    if old:
        _write(_path, {})
    return old if isinstance(old, dict) else {}


def forfeit() -> None:
    """A sync of this process failed: what it took may never reach the
    disk, and the error is reported only once, so no later process may
    answer under this number (its own syncs would succeed)."""
    global _taken
    _taken = None
    if _path is not None:
        try:
            _write(_path, {})
        except OSError as exc:
            log.error("cannot forfeit the replica incarnation: %s", exc)


def take(data_dir: str, roots: list[str], old: dict) -> int:
    """This process's incarnation: the previous one's when nothing it took
    can have been lost (module doc), else a new one.  Call with begin()'s
    state, after the pools were synced, before the data port opens."""
    global _taken
    path = os.path.join(data_dir, STATE)
    now = {"boot_id": _boot_id(), "mounts": _mount_ids(roots)}
    inc = old.get("inc")
    same_cache = bool(now["boot_id"]) and now["mounts"] is not None \
        and old.get("boot_id") == now["boot_id"] and old.get("mounts") == now["mounts"]
    if not (isinstance(inc, int) and not isinstance(inc, bool) and inc > 0
            and (old.get("clean") is True or same_cache)):
        inc = secrets.randbits(62) + 1
    _write(path, {"inc": inc, "clean": False, **now})
    _taken = inc
    return inc


def mark_clean(data_dir: str, roots: list[str]) -> None:
    """At a clean stop, before the pools are unmounted: everything this
    process took is made durable, then recorded, so the next process may
    answer under the same number wherever it starts.  Not if a pool cannot
    be synced (its filesystem shut down after an I/O error)."""
    if _taken is None or not roots:
        return
    try:
        sync_roots(roots)
    except OSError as exc:
        log.error("pools not synced at stop (%s): the next start takes a new incarnation", exc)
        forfeit()
        return
    _write(os.path.join(data_dir, STATE), {"inc": _taken, "clean": True})
