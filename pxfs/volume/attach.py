"""Attaching volumes to this node: the attach lease and fencing term in etcd,
the image file in the node's FUSE view, the loop device, mkfs and mount.

At most one node holds ``attach/<volid>``; it is bound to the node's etcd
lease, so it vanishes when the node dies and another node may attach.
Every attach bumps the volume's term and sends it to the replicas, which
then refuse writes from any older term (a paused node waking up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess

import trio

from .. import codec
from ..chunk import loopdev
from ..errors import Busy, ChecksumError, Fenced, HostError, InvalidArgument, NotFound, PxfsError
from ..meta import keys
from ..meta.kv import Compare, Delete
from ..meta.txn import run_txn
from ..replication.volume_io import OUT_OF_SYNC, RESYNCING, ReplicatedVolume
from . import hostdev

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Local:
    volid: int
    name: str
    fs: str
    vol: ReplicatedVolume
    device: str = ""
    mount: str = ""
    ready: bool = True


class Attachments:
    def __init__(self, catalog, membership, view, *, osd_root: str, fuse_mountpoint: str,
                 state_path: str, io_timeout: float = 5.0):
        self.catalog = catalog
        self.kv, self.cid, self.node = catalog.kv, catalog.cid, catalog.node
        self.membership = membership
        self.view = view                  # FUSE view: add(name, vol) / remove(name)
        self.osd_root = osd_root
        self.fuse_mountpoint = fuse_mountpoint
        self.state_path = state_path
        self.io_timeout = io_timeout
        self.local: dict[int, Local] = {}
        self._locks: dict[int, trio.Lock] = {}

    def lock(self, volid: int) -> trio.Lock:
        return self._locks.setdefault(volid, trio.Lock())

    # -- local state file (what to clean after a crash) ---------------------
    def _save(self) -> None:
        state = {str(v.volid): {"name": v.name, "device": v.device, "mount": v.mount}
                 for v in self.local.values()}
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, self.state_path)

    def recover_stale(self) -> None:
        """Undo mounts and loop devices left by an earlier run that died (sync,
        at start).  Only what is still this node's: on a host that runs
        several nodes, the path or the device an earlier run used may now
        belong to another node that took the volume over."""
        try:
            with open(self.state_path) as fh:
                state = json.load(fh)
        except (FileNotFoundError, ValueError):
            state = {}
        mine = self.fuse_mountpoint.rstrip("/") + "/"
        stale = set(hostdev.loops_backed_by(self.fuse_mountpoint))
        for volid, ent in state.items():
            dev = ent.get("device") or ""
            if not dev:
                continue
            backing = loopdev.backing_file(dev)
            # once this node's FUSE mount is gone, its loop devices show
            # their file as "/<volume name>"
            if backing is None or backing.startswith(mine) or backing == "/" + ent.get("name", ""):
                stale.add(dev)
                hostdev.unlink_pxd(int(volid), dev)
        for dev in sorted(stale):
            for src, tgt, _ in hostdev.mounts():
                if src == dev:
                    log.warning("unmounting %s (on %s, left by a previous run)", tgt, dev)
                    subprocess.run(["umount", "-l", tgt], check=False)
            if loopdev.backing_file(dev):
                log.warning("detaching stale loop device %s", dev)
                subprocess.run(["losetup", "-d", dev], check=False)
        self.local.clear()
        self._save()

    # -- the failure callback used by the data path -------------------------
    def _failure_handler(self, volid: int):
        async def on_failure(nodes, missed_from):
            loc = self.local.get(volid)
            term = loc.vol.term if loc else -1
            try:
                rec = await self.catalog.mark_out_of_sync(volid, nodes, term, missed_from)
            except Fenced as exc:
                if loc:
                    loc.vol.fence_local(str(exc))
                raise
            if loc:
                loc.vol.states = {r["node"]: r["state"] for r in rec["replicas"]}
            return rec["gen"]
        return on_failure

    # -- attach ----------------------------------------------------------------
    def _busy_elsewhere(self, name: str, node: str) -> Busy:
        """The attach refusal, with what a user who knows that node died
        wants to know: the volume frees itself when that node's lease ends."""
        return Busy(f"volume {name!r} is attached on node {node} (detach it there; if {node} "
                    f"is down, its lease ends within {self.membership.ttl} s and the volume can "
                    "be attached here then)")

    async def attach(self, ref: str) -> dict:
        volid = await self.catalog.resolve(ref)
        async with self.lock(volid):
            return await self._attach(volid)

    async def _attach(self, volid: int) -> dict:
        rec, _ = await self.catalog.get(volid)
        loc = self.local.get(volid)
        if loc is not None and not loc.vol.fenced:
            return self._describe(loc)
        if loc is not None:
            if loc.mount and self._still_mounted(loc):
                raise Busy(f"volume {rec['name']!r} lost its attachment here and is still mounted "
                           f"at {loc.mount}; unmount it first (pxctl host unmount)")
            await self._teardown(loc, release=False)
        att = await self.catalog.attachment(volid)
        if att is not None and not (att["node"] == self.node and att["lease"] != self.membership.lease):
            raise self._busy_elsewhere(rec["name"], att["node"])
        lease = self.membership.held()

        async def body(txn):
            item = await txn.get(keys.vol_key(self.cid, volid))
            if item is None:
                raise NotFound(f"volume {volid} not found")
            cur = await txn.get(keys.attach_key(self.cid, volid))
            if cur is not None:
                other = codec.unpack_record(cur.value)
                if other["node"] != self.node:
                    raise self._busy_elsewhere(rec["name"], other["node"])
            r = codec.unpack_record(item.value)
            r["prev_durable"] = r.get("durable", 0)   # the dying attachment's last checkpoint
            r["prev_clean"] = r.get("clean", True)    # did it end with a flushed detach?
            r["clean"] = False
            r["term"] += 1
            r["gen"] += 1          # a new stamp space for this attachment
            for rep in r["replicas"]:
                if rep["state"] == RESYNCING:   # the old attacher's resync stops here
                    rep["state"] = OUT_OF_SYNC
            txn.put(keys.vol_key(self.cid, volid), codec.pack_record(r))
            txn.put(keys.attach_key(self.cid, volid),
                    codec.pack_record({"node": self.node, "term": r["term"]}), lease)
            return r
        rec = await run_txn(self.kv, body, what="attach")
        prev_durable = rec.pop("prev_durable", 0)
        prev_clean = rec.pop("prev_clean", True)
        term = rec["term"]
        states = {r["node"]: r["state"] for r in rec["replicas"]}
        vol = ReplicatedVolume(volid, rec["size"], term, rec["gen"], states, self.catalog.targets,
                               self._failure_handler(volid), local_node=self.node,
                               timeout=self.io_timeout, lease=self.membership)
        loc = Local(volid, rec["name"], rec["fs"], vol)
        loc.ready = False               # no checkpoints before fencing is done
        self.local[volid] = loc
        try:
            await self._fence_replicas(loc, prev_durable)
            if not prev_clean:
                await self._reconcile(loc, prev_durable)
            loc.ready = True
            self.view.add(rec["name"], vol)
            loc.device = await hostdev.loop_attach(os.path.join(self.fuse_mountpoint, rec["name"]))
            hostdev.link_pxd(volid, loc.device)
            self._save()
            await self._publish(loc)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(loc, release=True)
            raise
        log.info("attached volume %s (%d) as %s, term %d", loc.name, volid, loc.device, term)
        return self._describe(loc)

    async def _fence_replicas(self, loc: Local, prev_durable: int) -> None:
        """Tell every replica the new term; unreachable ones fall out of sync."""
        vol = loc.vol
        failed = []
        why: dict[str, PxfsError] = {}

        async def one(node):
            try:
                await self.catalog.targets(node).fence(vol.volid, vol.term, timeout=min(3, self.io_timeout))
            except PxfsError as exc:
                log.warning("volume %s: cannot fence replica on %s: %s", loc.name, node, exc)
                failed.append(node)
                why[node] = exc

        async def stale(node):
            # an out-of-sync replica gets the term too (best effort): a paused
            # old attacher's resync must not go on copying into it
            with contextlib.suppress(PxfsError):
                await self.catalog.targets(node).fence(vol.volid, vol.term, timeout=1)

        async with trio.open_nursery() as n:
            for node in vol.writers():
                n.start_soon(one, node)
            for node in vol.states:
                if node not in vol.writers():
                    n.start_soon(stale, node)
        if failed:
            if not [x for x in vol.readers() if x not in failed]:
                raise PxfsError(f"volume {loc.name!r}: no in-sync replica is reachable ("
                                + ("; ".join(f"{n}: {why[n]}" for n in vol.readers())
                                   or "none") + ")")
            # they may lack what the previous attachment wrote after its last checkpoint
            vol.set_gen(await self._failure_handler(vol.volid)(failed, prev_durable))

    async def checkpoint_service(self, *, interval: float = 2.0,
                                 task_status=trio.TASK_STATUS_IGNORED):
        """Record each attachment's durable stamp in etcd now and then, so that
        after this node dies resync copies only what it wrote since."""
        task_status.started()
        recorded: dict[int, int] = {}
        while True:
            await trio.sleep(interval)
            for loc in list(self.local.values()):
                vol = loc.vol
                if loc.mount and loc.ready and not (vol.fenced or vol.suspended):
                    await self._forget_hand_unmount(loc)
                if vol.fenced or vol.suspended or not loc.ready \
                        or recorded.get(loc.volid) == vol.durable:
                    continue
                try:
                    await self.catalog.checkpoint(loc.volid, vol.term, vol.durable)
                    recorded[loc.volid] = vol.durable
                except PxfsError as exc:
                    log.info("checkpoint of %s failed: %s", loc.name, exc)

    async def _forget_hand_unmount(self, loc: Local) -> None:
        """A mount taken away by hand (``umount /mnt/db``) stops showing in
        inspect and list within a checkpoint interval, on every node."""
        if await trio.to_thread.run_sync(hostdev.is_mounted, loc.device, loc.mount):
            return
        async with self.lock(loc.volid):
            if self.local.get(loc.volid) is not loc or not loc.mount \
                    or await trio.to_thread.run_sync(hostdev.is_mounted, loc.device, loc.mount):
                return
            log.info("%s is no longer mounted at %s (unmounted by hand)", loc.name, loc.mount)
            loc.mount = ""
            self._save()
            try:
                await self._publish(loc)
            except PxfsError as exc:
                log.info("cannot record that %s was unmounted: %s", loc.name, exc)

    async def _reconcile(self, loc: Local, prev_durable: int) -> None:
        """The previous attachment died: a write (or discard) it never
        acknowledged may have reached only some in-sync replicas.  Make them
        agree by copying every chunk stamped since its last checkpoint, and
        every chunk some of them lack, from the first of them
        that holds a whole, checked copy (a chunk torn by a power loss fails
        its checksums: it is the one replaced, not the replicas that are
        fine).  A replica that cannot take part falls out of sync."""
        vol = loc.vol
        readers = vol.readers()
        if len(readers) < 2:
            return
        t = {n: self.catalog.targets(n) for n in readers}
        failed: dict[str, PxfsError] = {}
        todo: set[int] = set()
        held: list[set[int]] = []
        for n in readers:
            try:
                todo |= set(await t[n].list_chunks(vol.volid, prev_durable))
                # and chunks some hold and others do not: a discard deletes
                # whole chunks without a stamp, and may have reached only some
                held.append(await t[n].chunk_ids(vol.volid))
            except PxfsError as exc:
                failed[n] = exc
        if held:
            todo |= set.union(*held) - set.intersection(*held)
        copied = 0
        for idx in sorted(todo):
            live = [n for n in readers if n not in failed]
            src = got = None
            for n in live:
                try:
                    got = await t[n].get_chunk(vol.volid, idx)
                    src = n
                    break
                except ChecksumError as exc:
                    log.warning("volume %s: chunk %d on %s: %s; taking another copy",
                                loc.name, idx, n, exc)
                except PxfsError as exc:
                    failed[n] = exc
            if src is None:
                log.error("volume %s: no in-sync replica holds a whole copy of chunk %d; "
                          "left as it is (its damaged blocks fail to read)", loc.name, idx)
                continue
            gen, bitmap, data = got if got is not None else (0, None, None)
            for n in live:
                if n == src or n in failed:
                    continue
                try:
                    await t[n].put_chunk(vol.volid, idx, gen, bitmap, data, vol.term)
                except PxfsError as exc:
                    failed[n] = exc
            copied += 1
        if failed:
            for n, exc in failed.items():
                log.warning("volume %s: cannot reconcile replica on %s: %s", loc.name, n, exc)
            if not [n for n in readers if n not in failed]:
                raise PxfsError(f"volume {loc.name!r}: no in-sync replica could be reconciled: "
                                + "; ".join(f"{n}: {e}" for n, e in failed.items()))
            vol.set_gen(await self._failure_handler(vol.volid)(list(failed), prev_durable))
        log.info("volume %s: previous attachment ended uncleanly; %d chunk(s) written since its "
                 "last checkpoint made the same on the in-sync replicas", loc.name, copied)

    async def _publish(self, loc: Local) -> None:
        """Write device and mount path into the attach record."""
        lease = self.membership.held()

        async def body(txn):
            item = await txn.get(keys.attach_key(self.cid, loc.volid))
            if item is None or item.lease != lease:
                raise Fenced(f"volume {loc.name!r} lost its attachment")
            txn.put(keys.attach_key(self.cid, loc.volid), codec.pack_record(
                {"node": self.node, "term": loc.vol.term, "device": loc.device, "mount": loc.mount}),
                lease)
        await run_txn(self.kv, body, what="publish attach")

    def _describe(self, loc: Local) -> dict:
        return {"id": str(loc.volid), "name": loc.name, "device": loc.device,
                "pxd": os.path.join(hostdev.PXD_DIR, f"pxd{loc.volid}"), "mount": loc.mount,
                "node": self.node, "term": loc.vol.term}

    # -- mount / unmount -------------------------------------------------------
    async def mount(self, ref: str, path: str | None) -> dict:
        volid = await self.catalog.resolve(ref)
        rec, _ = await self.catalog.get(volid)
        if path is None:
            path = os.path.join(self.osd_root, "mounts", rec["name"])
        asked = hostdev.clean_mount_path(path)
        path, own = await hostdev.resolve_mount_path(asked, self.own_dirs())
        hostdev.refuse_own_dirs(path, own)
        loc = self.local.get(volid)
        if loc and loc.mount == asked:          # recorded before paths were resolved
            path = asked
        if not (loc and loc.mount == path):     # else _mount answers (idempotent)
            await hostdev.check_mount_path(path)
        if rec["fs"] == "none":
            raise InvalidArgument(f"volume {rec['name']!r} has --fs none: use its block device")
        attached_here = volid in self.local
        if not attached_here:
            await self.attach(str(volid))
        try:
            return await self._mount(volid, rec, path)
        except BaseException:
            if not attached_here and volid in self.local:   # undo our own attach
                with trio.CancelScope(shield=True):
                    await self.detach(str(volid))
            raise

    def own_dirs(self) -> dict[str, str]:
        """Directories no volume may be mounted on, in or over."""
        return {self.fuse_mountpoint: "this node's FUSE view",
                os.path.dirname(self.state_path): "this node's data directory"}

    async def _mount(self, volid: int, rec: dict, path: str) -> dict:
        async with self.lock(volid):
            loc = self.local.get(volid)
            if loc is None:
                raise NotFound(f"volume {rec['name']!r} is not attached here")
            if loc.vol.fenced:          # a mount would answer every write with EIO
                raise Fenced(f"volume {loc.name!r}: I/O stopped on this node ({loc.vol.fenced}); "
                             "detach it here and attach it again")
            if loc.mount and self._still_mounted(loc):
                if loc.mount == path:
                    return self._describe(loc)
                raise Busy(f"volume {loc.name!r} is already mounted at {loc.mount}")
            with hostdev.claim_mount_path(path):
                await hostdev.check_mount_path(path)
                made = await hostdev.make_mount_point(path)
                try:
                    warning = await self._format_and_mount(loc, path)
                except BaseException:
                    await trio.to_thread.run_sync(hostdev.remove_made, made)
                    raise
            loc.mount = path
            self._save()
            await self._publish(loc)
            out = self._describe(loc)
            if warning:
                log.warning("volume %s: %s", loc.name, warning)
                out["warning"] = warning
            return out

    async def _format_and_mount(self, loc: Local, path: str) -> str:
        """Format on first use and mount; a warning for the user, or ''."""
        warning = ""
        found = await hostdev.fs_type(loc.device)
        if not found:
            zeroed = await loc.vol.never_written()
            log.info("formatting %s (%s) with %s%s", loc.name, loc.device, loc.fs,
                     " (never written: nothing to zero)" if zeroed else "")
            await hostdev.mkfs(loc.device, loc.fs, loc.name, zeroed=zeroed)
        elif found != loc.fs:
            raise HostError(f"volume {loc.name!r} holds {found}, not {loc.fs}")
        elif found == "ext4":
            await hostdev.drop_fast_commit(loc.device)
            warning = await hostdev.recorded_errors(loc.device)
        await hostdev.mount(loc.device, path, loc.fs)
        return warning

    def local_by_ref(self, ref: str):
        """The attachment here named ``ref`` (name or id), or None."""
        return next((loc for loc in self.local.values() if ref in (loc.name, str(loc.volid))),
                    None)

    async def _resolve_here(self, ref: str) -> int:
        """The volume's id; for one deleted while this node was cut off (its
        lease gone, its attachment with it), the attachment left here, so
        that it can still be unmounted and detached."""
        try:
            return await self.catalog.resolve(ref)
        except NotFound:
            loc = self.local_by_ref(ref)
            if loc is None:
                raise
            return loc.volid

    async def unmount(self, ref: str, path: str | None = None) -> dict:
        volid = await self._resolve_here(ref)
        async with self.lock(volid):
            loc = self.local.get(volid)
            if loc is None or not loc.mount:
                raise NotFound(f"volume {ref!r} is not mounted on this node")
            if path is not None and loc.mount not in await hostdev.names_of(path):
                raise NotFound(f"volume {ref!r} is mounted at {loc.mount}, not at {path}")
            await self._umount(loc)
            self._save()
            if not loc.vol.fenced and not loc.vol.suspended:
                await self._publish(loc)
            return self._describe(loc)

    # -- detach ----------------------------------------------------------------
    async def detach(self, ref: str) -> dict:
        volid = await self._resolve_here(ref)
        async with self.lock(volid):
            loc = self.local.get(volid)
            if loc is None:
                att = await self.catalog.attachment(volid)
                if att:
                    raise NotFound(f"volume {ref!r} is attached on node {att['node']}, "
                                   "not on this node")
                raise NotFound(f"volume {ref!r} is not attached")
            if loc.mount and self._still_mounted(loc):
                raise Busy(f"volume {loc.name!r} is mounted at {loc.mount}; unmount it first")
            if loc.device:
                users = await trio.to_thread.run_sync(hostdev.device_users, loc.device)
                if users:       # their next read or write would fail with EIO
                    raise Busy(f"volume {loc.name!r}: {loc.device} is open by "
                               f"{', '.join(users[:5])}; close it first")
                holders = await trio.to_thread.run_sync(hostdev.device_holders, loc.device)
                if holders:
                    raise Busy(f"volume {loc.name!r}: {loc.device} is {', '.join(holders[:5])}; "
                               "unmount it first")
            out = self._describe(loc)
            await self._teardown(loc, release=True)
            return out

    def _still_mounted(self, loc: Local) -> bool:
        """Whether the volume's mount is still there; one the user took away
        by hand (``umount /mnt/db``) is forgotten."""
        if hostdev.is_mounted(loc.device, loc.mount):
            return True
        log.info("%s is no longer mounted at %s (unmounted by hand)", loc.name, loc.mount)
        loc.mount = ""
        self._save()
        return False

    async def _umount(self, loc: Local, *, lazy_fallback: bool = False) -> None:
        if not self._still_mounted(loc):
            return
        top = hostdev.top_mount(loc.mount)
        if top != loc.device:       # umount would take that one away, not ours
            raise Busy(f"{top} is mounted over volume {loc.name!r} at {loc.mount}; "
                       "unmount it first")
        try:
            await hostdev.umount(loc.mount)
        except HostError as exc:
            if not lazy_fallback:
                raise
            # still in use: what the application wrote must not die with the
            # device, and what it writes next must fail rather than vanish
            log.warning("cannot unmount %s: %s; syncing it, failing its further I/O and "
                        "unmounting it lazily", loc.mount, exc)
            await hostdev.sync_and_shut(loc.mount)
            await hostdev.umount(loc.mount, lazy=True)
        else:
            # the default mount point is pxfs's: it goes with the mount (an
            # empty directory per volume ever mounted piled up in the osd root)
            if loc.mount == os.path.join(self.osd_root, "mounts", loc.name):
                hostdev.remove_made([loc.mount])
        loc.mount = ""
        self._save()

    async def _teardown(self, loc: Local, release: bool) -> None:
        held = loc.vol.must_hold()
        if held:                    # its held requests fail now, not after SUSPEND_MAX
            loc.vol.fence_local("detached while its I/O was held")
        if loc.device:
            await hostdev.loop_detach(loc.device)
        hostdev.unlink_pxd(loc.volid, loc.device)
        clean = False
        if not loc.vol.fenced and not held:     # held I/O: no flush to wait for
            try:
                await loc.vol.flush()
                # not for an attach that failed before its replicas were
                # fenced and reconciled: the unclean end it found still is
                clean = release and loc.ready
            except PxfsError as exc:
                log.warning("flush at detach of %s failed: %s", loc.name, exc)
        if clean:
            try:    # the next attach need not reconcile the replicas
                await self.catalog.checkpoint(loc.volid, loc.vol.term, loc.vol.durable, clean=True)
            except PxfsError as exc:
                log.info("clean-detach checkpoint of %s failed: %s", loc.name, exc)
        self.view.remove(loc.name)
        self.local.pop(loc.volid, None)
        self._save()
        if release and self.membership.lease:   # (none: the key went with the lost one)
            item = await self.kv.get(keys.attach_key(self.cid, loc.volid))
            if item is not None and item.lease == self.membership.lease:
                await self.kv.txn([Compare(item.key, item.mod_rev)], [Delete(item.key)])
        log.info("detached volume %s", loc.name)

    # -- node events ------------------------------------------------------------
    async def on_lease_lost(self, old_lease: int) -> None:
        """Its attach keys went with the lease: another node may take these
        volumes over.  Hold their I/O (no stale reads either) until the node
        is back in etcd and knows."""
        for loc in self.local.values():
            loc.vol.suspend("this node lost its etcd lease; the volume may be attached elsewhere")

    async def on_rejoined(self, lease: int) -> None:
        """Back in etcd: an attachment whose term nobody bumped meanwhile is
        still ours (any other attach bumps it); take its key again under
        the new lease and let its I/O go on.  Otherwise it was taken over:
        its I/O fails from now on."""
        for loc in list(self.local.values()):
            # not under the volume's lock: a mount or unmount holding it may
            # be waiting for this very volume's held I/O
            if loc.vol.fenced or not loc.vol.suspended:
                continue
            try:
                async with loc.vol._state_lock:    # states as the data path last set them
                    await self._retake(loc, lease)
            except PxfsError as exc:
                loc.vol.fence_local(f"not attached here any more: {exc}")
                continue
            if self.membership.lease != lease:
                continue            # lost again meanwhile: the next rejoin decides
            if self.local.get(loc.volid) is not loc:
                # detached meanwhile: the key just put back is not ours to keep
                with contextlib.suppress(PxfsError):
                    item = await self.kv.get(keys.attach_key(self.cid, loc.volid))
                    if item is not None and item.lease == lease:
                        await self.kv.txn([Compare(item.key, item.mod_rev)], [Delete(item.key)])
                continue
            loc.vol.resume()

    async def _retake(self, loc: Local, lease: int) -> None:
        """Put the attach key back under ``lease`` if nothing about the
        volume changed while the node was away: same term (nobody attached)
        and the same replica states (nobody resynced a replica the detached
        way, which the data path would then not write to).  A resync this
        node was running is stopped: those replicas go back to out of sync
        and are resynced again."""
        vol, term = loc.vol, loc.vol.term

        def settled(states):
            return {n: OUT_OF_SYNC if st == RESYNCING else st for n, st in states.items()}

        async def body(txn):
            item = await txn.get(keys.vol_key(self.cid, loc.volid))
            if item is None:
                raise NotFound(f"volume {loc.name!r} vanished")
            rec = codec.unpack_record(item.value)
            if rec["term"] != term:
                raise Fenced(f"volume {loc.name!r} was attached elsewhere, or a resync this "
                             "node ran was started over by its replica's node, while this node "
                             f"was away (term {rec['term']} > {term})")
            theirs = {r["node"]: r["state"] for r in rec["replicas"]}
            if settled(theirs) != settled(vol.states) or any(
                    st == RESYNCING and vol.states.get(n) != RESYNCING for n, st in theirs.items()):
                # (a replica resyncing in etcd but not here: its own node is
                # resyncing it the detached way)
                raise Fenced(f"the replicas of volume {loc.name!r} changed while this node was "
                             "away")
            cur = await txn.get(keys.attach_key(self.cid, loc.volid))
            if cur is not None:
                other = codec.unpack_record(cur.value)
                if other.get("node") != self.node or other.get("term") != term:
                    raise Fenced(f"volume {loc.name!r} is attached on node {other.get('node')}")
            if any(r["state"] == RESYNCING for r in rec["replicas"]):
                for r in rec["replicas"]:
                    if r["state"] == RESYNCING:
                        r["state"] = OUT_OF_SYNC
                rec["gen"] += 1
                txn.put(keys.vol_key(self.cid, loc.volid), codec.pack_record(rec))
            txn.put(keys.attach_key(self.cid, loc.volid), codec.pack_record(
                {"node": self.node, "term": term, "device": loc.device, "mount": loc.mount}), lease)
            return rec
        rec = await run_txn(self.kv, body, what="take an attachment back")
        vol.states = {r["node"]: r["state"] for r in rec["replicas"]}
        vol.set_gen(rec["gen"])
        log.warning("volume %s: still attached here after the lease loss (term %d); I/O goes on",
                    loc.name, term)

    async def shutdown(self, grace: float = 15.0) -> None:
        """Unmount and detach everything (clean node stop).  A volume whose
        I/O is still held after ``grace`` seconds (the node is cut off from
        etcd) has that I/O failed: the unmount waits for it in the kernel,
        where no cancellation reaches, and the node must stop."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fail_held_io_after, grace)
            for loc in list(self.local.values()):
                try:            # one volume's trouble must not leave the others attached
                    if loc.mount:
                        await self._umount(loc, lazy_fallback=True)
                    if loc.device:
                        await self._shut_hand_mounts(loc)
                    await self._teardown(loc, release=True)
                except PxfsError as exc:
                    log.error("could not detach %s at stop: %s", loc.name, exc)
            nursery.cancel_scope.cancel()

    async def _shut_hand_mounts(self, loc: Local) -> None:
        """Mounts of the device made by hand (or bind mounts left of ours):
        the device goes with this node, so what they hold in the page cache
        is written now and their later I/O fails, rather than their writes
        being lost without a word."""
        for path in await trio.to_thread.run_sync(hostdev.device_mount_points, loc.device):
            log.warning("%s (%s) is still mounted at %s: syncing it, failing its further I/O "
                        "and unmounting it lazily", loc.name, loc.device, path)
            await hostdev.sync_and_shut(path)
            try:
                await hostdev.umount(path, lazy=True)
            except HostError as exc:
                log.error("cannot unmount %s: %s", path, exc)

    async def _fail_held_io_after(self, grace: float) -> None:
        await trio.sleep(grace)
        for loc in list(self.local.values()):
            if loc.vol.must_hold():
                # what an fsync returned is on the replicas; the rest is
                # lost as in a crash, and the next attach reconciles
                loc.vol.fence_local(f"the node is stopping and the volume's I/O was held for "
                                    f"{grace:.0f} s (no etcd lease); failing it")
