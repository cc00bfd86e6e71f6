"""The volume catalog in etcd: create, find, list, inspect, delete, and the
replica-state transitions (out of sync, resyncing, in sync) that decide who
holds good data.  Replica states live only here, never in the replicas.
"""

from __future__ import annotations

import logging
import random
import time

import trio

from .. import codec
from ..errors import (AlreadyExists, Busy, Fenced, InvalidArgument, NoSpace, NotFound, PxfsError,
                      TxnConflict)
from ..meta import keys
from ..meta.kv import KV, Delete
from ..meta.lease import list_nodes
from ..meta.txn import run_txn
from ..replication.volume_io import IN_SYNC, OUT_OF_SYNC, RESYNCING
from ..namespace.meta import root_ops
from .spec import VolumeSpec, cos_name

log = logging.getLogger(__name__)

REPLICA_DELETE_WAIT = 5.0       # s a delete waits for a replica to drop its chunks
PING_WAIT = 2.0                 # s a create waits for a replica's node to answer


def new_volume_id() -> int:
    return random.randint(10 ** 17, 10 ** 18 - 1)


def _attached(rec: dict, att: dict) -> Busy:
    return Busy(f"volume {rec['name']!r} is attached on {att.get('node')}; detach it there "
                f"first (if {att.get('node')} is down, the attachment goes when its lease "
                "ends, within seconds)")


class Catalog:
    def __init__(self, kv: KV, cid: str, node: str, targets):
        self.kv, self.cid, self.node = kv, cid, node
        self.targets = targets            # node id -> replica target

    # -- lookups -------------------------------------------------------------
    async def resolve(self, ref: str | int) -> int:
        ref = str(ref)
        if ref.isascii() and ref.isdigit():
            return int(ref)
        item = await self.kv.get(keys.volname_key(self.cid, ref))
        if item is None:
            raise NotFound(f"volume {ref!r} not found")
        return int(codec.unpack(item.value))

    async def get(self, ref: str | int) -> tuple[dict, int]:
        volid = await self.resolve(ref)
        item = await self.kv.get(keys.vol_key(self.cid, volid))
        if item is None:
            raise NotFound(f"volume {ref!r} not found")
        return codec.unpack_record(item.value), item.mod_rev

    async def attachment(self, volid: int) -> dict | None:
        item = await self.kv.get(keys.attach_key(self.cid, volid))
        if item is None:
            return None
        rec = codec.unpack_record(item.value)
        rec["lease"] = item.lease
        rec["mod_rev"] = item.mod_rev
        return rec

    # -- create / delete -----------------------------------------------------
    async def answering(self, nodes: list[str]) -> set[str]:
        """Which of ``nodes`` answer a ping on their data port now.  A node
        killed a moment ago stays Online in etcd until its lease runs out;
        a volume placed on it would start degraded (or down)."""
        ok: set[str] = set()

        async def ping(node: str) -> None:
            with trio.move_on_after(PING_WAIT):
                try:
                    await self.targets(node).ping(timeout=PING_WAIT)
                except PxfsError:
                    return
                ok.add(node)
        async with trio.open_nursery() as nursery:
            for n in nodes:
                nursery.start_soon(ping, n)
        return ok

    async def _replica_counts(self) -> dict[str, int]:
        """node id -> how many volumes have a replica there."""
        counts: dict[str, int] = {}
        for item in await self.kv.range(keys.vol_prefix(self.cid)):
            for r in codec.unpack_record(item.value)["replicas"]:
                counts[r["node"]] = counts.get(r["node"], 0) + 1
        return counts

    async def placement_order(self, nodes: list[dict]) -> list[dict]:
        """``nodes`` (records of nodes that answer) in the order new
        replicas go to them: emptiest pools first (by whole GiB free), then
        the nodes that hold the fewest replicas (a new thin volume uses no
        space, so free space alone would put a row of creates on one
        node), then at random."""
        held = await self._replica_counts()
        return sorted(nodes, key=lambda n: (-((n.get("pool_total", 0) - n.get("pool_used", 0)) >> 30),
                                            held.get(n["id"], 0), random.random()))

    async def create(self, spec: VolumeSpec) -> dict:
        nodes = await list_nodes(self.kv, self.cid)
        online = [n for n in nodes if n["online"]]
        if spec.nodes:
            known = {n["id"]: n for n in nodes}
            for n in spec.nodes:
                if n not in known:
                    raise InvalidArgument(f"nodes: no node {n!r} in this cluster")
                if not known[n]["online"]:
                    raise NoSpace(f"nodes: node {n!r} is offline")
            answering = await self.answering(list(spec.nodes))
            for n in spec.nodes:
                if n not in answering:
                    raise NoSpace(f"nodes: node {n!r} does not answer on its data port "
                                  "(down, or stopping)")
            chosen = list(spec.nodes)
        else:
            answering = await self.answering([n["id"] for n in online])
            online = [n for n in online if n["id"] in answering]
            if spec.repl > len(online):
                raise NoSpace(f"cannot create a volume with repl {spec.repl}: only "
                              f"{len(online)} node(s) online")
            chosen = [n["id"] for n in await self.placement_order(online)][:spec.repl]
        rec = spec.to_record()
        if spec.shared:
            rec["fs"] = "pxfs"          # a POSIX namespace, not a block image
        rec.update(id=new_volume_id(), ctime=time.time(), shared=spec.shared, encrypted=False, scale=1,
                   gen=1, term=0, replicas=[{"node": n, "state": IN_SYNC, "missed_from": 0}
                                            for n in chosen])

        async def body(txn):
            taken = await txn.get(keys.volname_key(self.cid, spec.name))
            if taken and codec.unpack(taken.value) == rec["id"]:
                return          # our own attempt, committed although its answer timed out
            if taken:
                raise AlreadyExists(f"volume {spec.name!r} already exists")
            await txn.get(keys.vol_key(self.cid, rec["id"]))
            txn.put(keys.volname_key(self.cid, spec.name), codec.pack(rec["id"]))
            txn.put(keys.vol_key(self.cid, rec["id"]), codec.pack_record(rec))
            if spec.shared:
                await txn.get(keys.ns_inode_key(self.cid, rec["id"], 1))
                for k, v in root_ops(self.cid, rec["id"]):
                    txn.put(k, v)
        await run_txn(self.kv, body, what=f"create volume {spec.name}")
        log.info("created volume %s (%d) on %s", spec.name, rec["id"], ",".join(chosen))
        return rec

    async def delete(self, ref: str, mount_gone=None) -> dict:
        """``mount_gone(record)``: whether a shared mount's record is left
        by a process that is gone; such records are dropped (with their
        lease) instead of refusing the delete until the lease runs out."""
        for attempt in range(1, 21):
            rec, rev = await self.get(ref)
            att = await self.attachment(rec["id"])
            if att is not None:
                raise _attached(rec, att)
            mounts = await self._live_mounts(rec["id"], mount_gone)
            if mounts:
                where = ", ".join(sorted({f"{m['node']}:{m['path']}" for m in mounts}))
                raise Busy(f"volume {rec['name']!r} is mounted ({where}); unmount it first")

            async def body(txn):
                txn.expect(keys.vol_key(self.cid, rec["id"]), rev)
                got = await txn.get(keys.attach_key(self.cid, rec["id"]))
                if got:
                    raise _attached(rec, codec.unpack_record(got.value))
                txn.delete(keys.vol_key(self.cid, rec["id"]))
                txn.delete(keys.volname_key(self.cid, rec["name"]))
            try:
                await run_txn(self.kv, body, tries=1, what="delete volume")
                break
            except TxnConflict:
                # the record changed since it was read (an attach, a replica
                # state, a checkpoint: look again) -- or this very delete
                # committed and its answer was lost, and the client's resend
                # found the record gone: then the delete is done
                if await self.kv.get(keys.vol_key(self.cid, rec["id"])) is None:
                    break
                await trio.sleep(random.uniform(0.005, 0.02 * attempt))
        else:
            raise TxnConflict(f"volume {rec['name']!r} kept changing while it was being "
                              "deleted; try again")
        if rec.get("shared"):
            await self.kv.delete_prefix(keys.ns_prefix(self.cid, rec["id"]))
        # in parallel and briefly: a node that does not answer (offline, or
        # paused and not yet seen as offline) drops the chunks of volumes
        # etcd no longer knows when it starts or gets its lease back
        online = {n["id"] for n in await list_nodes(self.kv, self.cid) if n["online"]}

        async def drop(node: str) -> None:
            try:
                with trio.move_on_after(REPLICA_DELETE_WAIT):
                    await self.targets(node).delete_volume(rec["id"])
                    return
                log.info("replica data of %s on %s left for its node to remove: no answer "
                         "within %s s", rec["id"], node, REPLICA_DELETE_WAIT)
            except PxfsError as exc:
                log.info("replica data of %s on %s left for its node to remove: %s",
                         rec["id"], node, exc)
        async with trio.open_nursery() as nursery:
            for r in rec["replicas"]:
                if r["node"] in online:
                    nursery.start_soon(drop, r["node"])
        for item in await self.kv.range(keys.resync_prefix(self.cid) + f"{rec['id']}/"):
            await self.kv.txn([], [Delete(item.key)])
        # Docker's records of the volume: mounts counted on each node, other names
        for item in await self.kv.range(keys.docker_mount_prefix(self.cid)):
            if keys.last_part(item.key) == str(rec["id"]):
                await self.kv.txn([], [Delete(item.key)])
        for item in await self.kv.range(keys.docker_alias_prefix(self.cid)):
            if codec.unpack(item.value) == rec["id"]:
                await self.kv.txn([], [Delete(item.key)])
        return rec

    async def remove_node(self, node: str) -> None:
        """Forget an Offline node for good (``pxctl cluster delete``).
        Refused while it is Online, and while it holds a replica of any
        volume: its data would be missed without a word (delete or move
        those volumes first).  A node removed and started again registers
        again."""
        if node == self.node:
            raise Busy(f"node {node} is this node; ask another node to remove it once it is "
                       "stopped")
        if await self.kv.get(keys.alive_key(self.cid, node)) is not None:
            raise Busy(f"node {node} is Online; stop it before removing it from the cluster")
        recs = [codec.unpack_record(i.value) for i in await self.kv.range(keys.vol_prefix(self.cid))]
        held = sorted(v["name"] for v in recs if any(r["node"] == node for r in v["replicas"]))
        if held:
            raise Busy(f"node {node} holds replicas of {', '.join(held[:10])}"
                       + (f" and {len(held) - 10} more" if len(held) > 10 else "")
                       + "; move them off it first (pxctl volume ha-update VOL --repl N "
                       f"--node {node}, with N one less than now, and back up with another node"
                       ") or delete those volumes")

        async def body(txn):
            if await txn.get(keys.node_key(self.cid, node)) is None:
                raise NotFound(f"node {node!r} is not in the cluster")
            if await txn.get(keys.alive_key(self.cid, node)) is not None:
                raise Busy(f"node {node} is Online; stop it before removing it from the cluster")
            txn.delete(keys.node_key(self.cid, node))
        await run_txn(self.kv, body, what=f"remove node {node}")
        log.info("removed node %s from the cluster", node)

    async def ns_mounts(self, volid: int | None = None) -> list[dict]:
        """The live mounts of shared volumes (each mount process keeps its
        record alive with its own lease)."""
        return await self._live_mounts(volid)

    async def _live_mounts(self, volid: int | None, gone=None) -> list[dict]:
        """ns_mounts; with ``gone``, the records it finds left by a process
        that is gone are dropped (with their lease) and not returned."""
        out = []
        for item in await self.kv.range(keys.nsmount_prefix(self.cid, volid)):
            m = codec.unpack_record(item.value)
            m["volid"] = int(item.key.split("/")[-2])
            if gone is not None and await gone(m):
                log.info("volume %s: dropping the record of the mount at %s:%s, whose "
                         "process is gone", m["volid"], m.get("node"), m.get("path"))
                if item.lease:
                    await self.kv.lease_revoke(item.lease)
                else:
                    await self.kv.txn([], [Delete(item.key)])
                continue
            out.append(m)
        return out

    # -- replica states ------------------------------------------------------
    async def mark_out_of_sync(self, volid: int, nodes: list[str], term: int,
                               missed_from: int) -> dict:
        """Record that ``nodes`` may have missed the writes stamped
        ``missed_from`` or later; returns the new record.  Fails (Fenced) if
        this node no longer holds the attach term."""
        async def body(txn):
            item = await txn.get(keys.vol_key(self.cid, volid))
            if item is None:
                raise NotFound(f"volume {volid} vanished")
            rec = codec.unpack_record(item.value)
            if rec["term"] != term:
                raise Fenced(f"volume {volid} was attached elsewhere (term {rec['term']} > {term})")
            for r in rec["replicas"]:
                if r["node"] in nodes:
                    # already behind: only ever lower what it missed (another
                    # writer of a shared volume may stamp with an older gen)
                    mf = missed_from if r["state"] == IN_SYNC else min(r["missed_from"], missed_from)
                    r.update(state=OUT_OF_SYNC, missed_from=mf)
            rec["gen"] += 1
            txn.put(keys.vol_key(self.cid, volid), codec.pack_record(rec))
            return rec
        return await run_txn(self.kv, body, what="mark replica out of sync")

    async def checkpoint(self, volid: int, term: int, durable: int, *, clean: bool = False) -> None:
        """Record the attachment's durable stamp (used when it dies); ``clean``
        at a detach after a successful final flush."""
        async def body(txn):
            item = await txn.get(keys.vol_key(self.cid, volid))
            if item is None:
                return
            rec = codec.unpack_record(item.value)
            if rec["term"] != term or (rec.get("durable", 0) >= durable and not clean):
                return
            rec["durable"] = max(durable, rec.get("durable", 0))
            if clean:
                rec["clean"] = True
            txn.put(keys.vol_key(self.cid, volid), codec.pack_record(rec))
        await run_txn(self.kv, body, what="checkpoint")

    async def set_replica_state(self, volid: int, node: str, state: str, *, term: int | None = None,
                                expect_rev: int | None = None, require_detached=False,
                                expect_state: str | None = None, source: str | None = None,
                                bump_term: bool = False) -> dict:
        """Set one replica's state; returns the new record with its
        ``mod_rev``.  Refuses (Busy) if the replica is not in ``expect_state``,
        or if ``source`` (the replica a resync copied from) is no longer in
        sync: what it gave may be stale.  ``bump_term``: also raise the
        attach term, so that an attachment of the old term cannot take the
        volume back (Attachments._retake) nor finish what it was doing."""
        async def body(txn):
            item = await txn.get(keys.vol_key(self.cid, volid))
            if item is None:
                raise NotFound(f"volume {volid} vanished")
            if expect_rev is not None and item.mod_rev != expect_rev:
                raise Busy(f"volume {volid} changed meanwhile")
            if require_detached and await txn.get(keys.attach_key(self.cid, volid)):
                raise Busy(f"volume {volid} was attached meanwhile")
            rec = codec.unpack_record(item.value)
            if term is not None and rec["term"] != term:
                raise Fenced(f"volume {volid} was attached elsewhere")
            for r in rec["replicas"]:
                if r["node"] == source and r["state"] != IN_SYNC:
                    raise Busy(f"the resync source {source} is {r['state']} now")
            if not any(r["node"] == node for r in rec["replicas"]):
                # taken off the volume meanwhile (pxctl volume ha-update)
                raise NotFound(f"volume {volid} has no replica on {node} any more")
            for r in rec["replicas"]:
                if r["node"] == node:
                    if expect_state is not None and r["state"] != expect_state:
                        raise Busy(f"replica on {node} is {r['state']}, not {expect_state}")
                    r["state"] = state
                    if state == IN_SYNC:
                        r["missed_from"] = 0
            if state == IN_SYNC:
                rec["gen"] += 1
            if bump_term:
                rec["term"] += 1
            txn.put(keys.vol_key(self.cid, volid), codec.pack_record(rec))
            return rec
        rec = await run_txn(self.kv, body, what=f"set replica state {state}")
        item = await self.kv.get(keys.vol_key(self.cid, volid))
        if item is None or codec.unpack_record(item.value) != rec:
            raise Busy(f"volume {volid} changed right after the replica state did")
        return dict(rec, mod_rev=item.mod_rev)

    # -- listing ---------------------------------------------------------------
    async def snapshot(self) -> tuple[list[dict], dict, dict, dict]:
        """(volumes, attachments by volid, nodes by id, resync progress)."""
        vols = [codec.unpack_record(i.value) for i in await self.kv.range(keys.vol_prefix(self.cid))]
        atts = {}
        for i in await self.kv.range(keys.attach_prefix(self.cid)):
            atts[int(keys.last_part(i.key))] = codec.unpack_record(i.value)
        nodes = {n["id"]: n for n in await list_nodes(self.kv, self.cid)}
        progress = {}
        for i in await self.kv.range(keys.resync_prefix(self.cid)):
            volid, node = i.key.split("/")[-2:]
            progress[(int(volid), node)] = codec.unpack_record(i.value)
        for m in await self.ns_mounts():
            progress.setdefault(("mounts", m["volid"]), []).append(m)
        return vols, atts, nodes, progress

    @staticmethod
    def describe(rec: dict, att: dict | None, nodes: dict, progress: dict) -> dict:
        """The public view of a volume (REST/pxctl)."""
        replicas = []
        degraded = False
        healthy = 0
        for r in rec["replicas"]:
            node = nodes.get(r["node"], {})
            online = bool(node.get("online"))
            state = r["state"]
            view = {"node": r["node"], "address": node.get("data", ""), "state": state}
            if state == RESYNCING:
                p = progress.get((rec["id"], r["node"]), {})
                view.update(done_bytes=p.get("done", 0), total_bytes=p.get("total", 0),
                            percent=p.get("percent", 0.0))
            if not online:
                view["state"] = "offline" if state == IN_SYNC else state
                view["online"] = False
            else:
                view["online"] = True
            if state == IN_SYNC and online:
                healthy += 1
            else:
                degraded = True
            replicas.append(view)
        status = "down" if healthy == 0 else "degraded" if degraded else "up"
        where = f"attached on {att['node']}" if att else "detached"
        mounts = progress.get(("mounts", rec["id"]), [])
        if rec["shared"]:
            on = sorted({m["node"] for m in mounts})
            where = f"mounted on {', '.join(on)}" if on else "not mounted"
            stale = sorted({f"{m['node']}:{m['path']}" for m in mounts if m.get("stale")})
            if stale:
                where += f" (stale, mount again: {', '.join(stale)})"
        local = att is not None and att["node"] in [r["node"] for r in rec["replicas"]]
        return {
            "id": str(rec["id"]), "name": rec["name"], "size": rec["size"], "fs": rec["fs"],
            "block_size": rec["block_size"], "ha": rec["repl"], "cos": rec["cos"],
            "io_priority": cos_name(rec["cos"]), "labels": rec["labels"], "shared": rec["shared"],
            "encrypted": rec["encrypted"], "scale": rec["scale"], "ctime": rec["ctime"],
            "status": status, "state": where, "status_text": f"{status} - {where}",
            "attached_on": att["node"] if att else None,
            "device_path": att.get("device", "") if att else "",
            "mount_path": att.get("mount", "") if att else "",
            "data_local": local if att else None,
            "term": rec["term"], "gen": rec["gen"], "replicas": replicas,
            "mounts": [{"node": m["node"], "path": m["path"], "host": m.get("host", ""),
                        "stale": bool(m.get("stale"))} for m in mounts],
        }
