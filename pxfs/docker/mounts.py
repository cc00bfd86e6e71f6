"""Docker's mounts of volumes on this node, counted per mount ID.

Docker sends one Mount per container mount (with an ID it keeps across its
own restarts) and one Unmount when that container stops.  The first Mount
attaches and mounts the volume under ``<osd root>/mounts/<name>``; the last
Unmount unmounts it (and detaches a block volume).  The IDs live in etcd,
not in memory, so that after a node restart the node mounts again what
containers still use, and ``docker volume rm`` on any host sees the volume
in use.  The plugin only counts: attach, mount and their refusals are the
same services the REST API and pxctl call.
"""

from __future__ import annotations

import logging
import os

import trio

from .. import codec
from ..errors import Busy, NotFound, PxfsError
from ..meta import keys
from ..meta.kv import Delete, Put
from ..volume import hostdev

log = logging.getLogger(__name__)


async def record_of(kv, cid: str, node: str, volid: int) -> dict | None:
    """The plugin's record of its mounts of ``volid`` on ``node``:
    {"path", "ids": [Docker mount ids], "mounted", "attached"}, or None."""
    item = await kv.get(keys.docker_mount_key(cid, node, volid))
    return codec.unpack_record(item.value) if item else None


class DockerMounts:
    def __init__(self, node):
        """``node`` offers catalog, attachments, shared_mounts, mount() and
        unmount() (pxfs/node.py)."""
        self.node = node
        self.kv, self.cid, self.me = node.catalog.kv, node.catalog.cid, node.catalog.node
        self._locks: dict[int, trio.Lock] = {}

    def lock(self, volid: int) -> trio.Lock:
        return self._locks.setdefault(volid, trio.Lock())

    def default_path(self, name: str) -> str:
        return os.path.join(self.node.cfg.osd_root, "mounts", name)

    # -- records -----------------------------------------------------------------
    async def record(self, volid: int) -> dict | None:
        return await record_of(self.kv, self.cid, self.me, volid)

    async def _store(self, volid: int, rec: dict | None) -> None:
        """Only this node writes its records, under the volume's lock."""
        key = keys.docker_mount_key(self.cid, self.me, volid)
        await self.kv.txn([], [Delete(key) if rec is None else Put(key, codec.pack_record(rec))])

    async def users(self, volid: int) -> dict[str, list[str]]:
        """Mount IDs holding the volume, by node."""
        out = {}
        for item in await self.kv.range(keys.docker_mount_prefix(self.cid)):
            node, vid = item.key.split("/")[-2:]
            if int(vid) == volid:
                ids = codec.unpack_record(item.value).get("ids", [])
                if ids:
                    out[node] = ids
        return out

    # -- mount / unmount -----------------------------------------------------------
    async def mount(self, rec: dict, mount_id: str) -> str:
        volid = rec["id"]
        async with self.lock(volid):
            cur = await self.record(volid) or {"name": rec["name"], "ids": []}
            if not (cur["ids"] and await self._still_mounted(rec, cur)):
                cur.update(await self._mount(rec))
            path = cur["path"]
            if mount_id not in cur["ids"]:
                cur["ids"].append(mount_id)
            await self._store(volid, cur)
            log.info("docker mount %s of %s at %s (%d in use)", mount_id[:12], rec["name"],
                     path, len(cur["ids"]))
            return path

    async def _still_mounted(self, rec: dict, cur: dict) -> bool:
        if rec.get("shared"):
            # a dead mount process's record outlives it by up to a lease
            if not any(m["path"] == cur.get("path")
                       for m in await self.node.shared_mounts.here(rec["id"])):
                return False
            try:
                return await hostdev.probe_path(cur.get("path", "")) == "mountpoint"
            except PxfsError:       # a mount that does not answer: leave it be
                return True
        loc = self.node.attachments.local.get(rec["id"])
        return loc is not None and not loc.vol.fenced and loc.mount == cur.get("path")

    async def _mount(self, rec: dict) -> dict:
        """Mount the volume here: {"path", "mounted": we made the mount,
        "attached": we made the block attach}."""
        path = self.default_path(rec["name"])
        if rec.get("shared"):
            # the path as mounted (symlinks in the osd root resolved): what
            # _still_mounted and the operator's refusal compare with
            got = await self.node.shared_mounts.mount(rec, path)
            return {"path": got.get("mount") or path, "mounted": True, "attached": False}
        loc = self.node.attachments.local.get(rec["id"])
        if loc is not None and loc.mount and not loc.vol.fenced:
            return {"path": loc.mount, "mounted": False, "attached": False}   # an operator's mount
        attached = loc is None
        got = await self.node.mount(str(rec["id"]), path)
        return {"path": got.get("mount") or path, "mounted": True, "attached": attached}

    async def unmount(self, rec: dict, mount_id: str) -> None:
        volid = rec["id"]
        async with self.lock(volid):
            cur = await self.record(volid)
            if cur is None or mount_id not in cur["ids"]:
                log.info("docker unmount %s of %s: not a mount we counted", mount_id[:12], rec["name"])
                return
            cur["ids"].remove(mount_id)
            if cur["ids"]:
                await self._store(volid, cur)
                return
            await self._release(rec, cur)
            await self._store(volid, None)
            log.info("docker unmount %s: %s no longer used here", mount_id[:12], rec["name"])

    async def _release(self, rec: dict, cur: dict) -> None:
        if not cur.get("mounted"):
            return
        try:
            await self.node.unmount(str(rec["id"]), cur["path"] if rec.get("shared") else None)
        except NotFound:
            pass                                   # already gone (a node restart, an operator)
        if cur.get("attached") and not rec.get("shared"):
            try:
                await self.node.attachments.detach(str(rec["id"]))
            except (NotFound, Busy) as exc:        # detached, or an operator mounted it meanwhile
                log.info("not detaching %s: %s", rec["name"], exc)

    def path_here(self, cur: dict | None) -> str:
        return cur["path"] if cur and cur.get("ids") else ""

    # -- node start ------------------------------------------------------------------
    async def restore(self) -> None:
        """Mount again what Docker's containers held when this node stopped.
        A block volume that another node attached meanwhile (failover) is
        theirs now: its old mounts here are forgotten."""
        for item in await self.kv.range(keys.docker_mount_prefix(self.cid, self.me)):
            volid = int(keys.last_part(item.key))
            cur = codec.unpack_record(item.value)
            async with self.lock(volid):
                try:
                    rec, _ = await self.node.catalog.get(volid)
                except NotFound:
                    await self._store(volid, None)
                    continue
                if not cur.get("ids") or await self._still_mounted(rec, cur):
                    continue
                try:
                    cur.update(await self._mount(rec))
                    await self._store(volid, cur)
                    log.info("docker mounts of %s restored at %s", rec["name"], cur["path"])
                except Busy as exc:
                    log.warning("volume %s is in use elsewhere (%s): forgetting its %d docker "
                                "mount(s) on this node", rec["name"], exc, len(cur["ids"]))
                    await self._store(volid, None)
                except PxfsError as exc:
                    log.warning("cannot restore docker mounts of %s: %s (retried at the next "
                                "Mount)", rec["name"], exc)
