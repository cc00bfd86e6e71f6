"""Shared volumes mounted on this node for ``pxctl host mount`` (and later
the Docker plugin): each mount is a ``pxfs`` mount process (pxfs/mount.py)
that this node starts with itself as the node to use.  Which mounts exist is
read back from their records in etcd, so a node restart loses nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import trio

from ..errors import HostError, NotFound
from . import hostdev

log = logging.getLogger(__name__)


class SharedMounts:
    def __init__(self, catalog, api_url: str, osd_root: str, own_dirs=dict, log_dir: str = ""):
        self.catalog, self.api_url, self.osd_root = catalog, api_url, osd_root
        self._own_dirs = own_dirs             # () -> {dir: what}: none mounted in or over
        self.log_dir = log_dir                # the mount processes' logs, one per volume

    def log_path(self, name: str) -> str:
        """Where this node's mount processes of volume ``name`` log (why a
        mount stopped, what it could not do); "" for none."""
        if not self.log_dir or "," in self.log_dir:      # -o splits on commas
            return ""
        return os.path.join(self.log_dir, f"{name}.log")

    def default_path(self, name: str) -> str:
        """Where Portworx users look for a shared volume on a node."""
        return os.path.join(self.osd_root, "pxns", name)

    async def here(self, volid: int) -> list[dict]:
        """This node's mounts of the volume on this host, but not those of
        a mount process that is gone (its record stays until its lease
        runs out)."""
        host = socket.gethostname()
        return [m for m in await self.catalog.ns_mounts(volid)
                if m["node"] == self.catalog.node and m.get("host") == host
                and _running(m.get("pid"))]

    async def gone(self, m: dict) -> bool:
        """Whether a mount record is left by a process that ran where this
        node runs (same boot, pid and mount namespaces) and is gone: its
        pid runs no more and nothing live is mounted at its path."""
        place = hostdev.process_place()
        if not place or m.get("where") != place or _running(m.get("pid")):
            return False
        with trio.move_on_after(5):
            return not await trio.to_thread.run_sync(hostdev.live_fuse_mount, m.get("path", ""),
                                                     abandon_on_cancel=True)
        return False            # a mount that does not answer: not known to be gone

    async def clear_if_gone(self, m: dict) -> bool:
        """Whether the mount of record ``m`` is gone (see gone); its dead
        FUSE mount, if one is left at the path, is unmounted."""
        if not await self.gone(m):
            return False
        with trio.move_on_after(10):
            await trio.to_thread.run_sync(hostdev.drop_dead_fuse_mounts, m["path"], True,
                                          abandon_on_cancel=True)
        return True

    async def mount(self, rec: dict, path: str | None) -> dict:
        path, own = await hostdev.resolve_mount_path(
            hostdev.clean_mount_path(path or self.default_path(rec["name"])), self._own_dirs())
        hostdev.refuse_own_dirs(path, own)
        # a mount whose process was killed stays until unmounted, and its
        # record until its lease runs out: neither is a mount to answer with
        with trio.move_on_after(10):
            await trio.to_thread.run_sync(hostdev.drop_dead_fuse_mounts, path,
                                          abandon_on_cancel=True)
        with hostdev.claim_mount_path(path):
            return await self._mount_at(rec, path)

    async def _mount_at(self, rec: dict, path: str) -> dict:
        kind = await hostdev.probe_path(path)
        mine = [m for m in await self.here(rec["id"]) if m["path"] == path]
        if kind == "mountpoint" and mine:
            if not any(m.get("stale") for m in mine):
                return await self.describe(rec)
            # cut off from etcd for too long, it serves ESTALE for good:
            # mounting again is what the user asks for
            log.warning("shared volume %s: the mount at %s is stale; mounting it again",
                        rec["name"], path)
            await hostdev.umount(path)
            for m in mine:
                await self._wait_gone(rec["id"], m)
            kind = await hostdev.probe_path(path)
        hostdev.refuse_mount_kind(path, kind)
        made = await hostdev.make_mount_point(path)
        opts = f"node={self.api_url},allow_other,default_permissions,x-pxfs-host-mount"
        if self.log_path(rec["name"]):
            await trio.to_thread.run_sync(lambda: os.makedirs(self.log_dir, exist_ok=True))
            opts += f",log={self.log_path(rec['name'])}"
        argv = [sys.executable, "-m", "pxfs.mount", str(rec["id"]), path, "-o", opts]
        with trio.fail_after(60):
            res = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        if res.returncode:
            await trio.to_thread.run_sync(hostdev.remove_made, made)
            raise HostError(f"mounting {rec['name']} at {path} failed: "
                            + res.stderr.decode(errors="replace").strip())
        log.info("shared volume %s mounted at %s", rec["name"], path)
        return await self.describe(rec, path)

    async def unmount(self, rec: dict, path: str | None = None) -> dict:
        """Undo this node's `host mount`s of the volume (or the mount at
        ``path``); mounts a user made with `mount -t fuse.pxfs` through this
        node are left alone unless named by path."""
        mounts = await self.here(rec["id"])
        if path is not None:
            names = await hostdev.names_of(path)
            elsewhere = sorted(m["path"] for m in mounts if m["path"] not in names)
            mounts = [m for m in mounts if m["path"] in names]
            if not mounts and elsewhere:
                raise NotFound(f"volume {rec['name']!r} is mounted on this node at "
                               f"{', '.join(elsewhere)}, not at {path}")
        else:
            mounts = [m for m in mounts if m.get("host_mount")]
        if not mounts:
            raise NotFound(f"volume {rec['name']!r} is not mounted on this node")
        for m in mounts:
            await hostdev.umount(m["path"])
            await self._wait_gone(rec["id"], m)
            if m["path"] == self.default_path(rec["name"]):
                hostdev.remove_made([m["path"]])       # pxfs's own directory, as for block
        return await self.describe(rec)

    async def _wait_gone(self, volid: int, m: dict) -> None:
        """The mount process removes its record as it exits."""
        with trio.move_on_after(15):
            while any(x.get("pid") == m.get("pid") for x in await self.here(volid)):
                await trio.sleep(0.1)

    async def describe(self, rec: dict, path: str = "") -> dict:
        mounts = await self.here(rec["id"])
        return {"id": str(rec["id"]), "name": rec["name"], "shared": True,
                "mount": path or (mounts[0]["path"] if mounts else ""),
                "mounts": [m["path"] for m in mounts]}


def _running(pid) -> bool:
    """Whether process ``pid`` of this host runs (a zombie no longer serves
    its mount)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True             # a record without a pid: cannot tell, keep it
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
