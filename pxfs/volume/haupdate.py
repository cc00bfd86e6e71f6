"""Changing a volume's replica count (``pxctl volume ha-update``), one
replica at a time, as Portworx does.

One more: the new replica is recorded out of sync with every write missed
(``missed_from`` 0), so the resync service copies every chunk to it from an
in-sync replica, the volume staying in use: the node the volume is attached
on copies it live, or, detached, the new replica's node pulls it.  It is in
sync, and counts, once the copy is done.

One fewer: the replica leaves the record, then its node deletes its chunks.
A volume attached somewhere must stop writing to it first, so the node it
is attached on makes that change itself, under the volume's state lock (no
write can then count on the replica being dropped; the API hands a request
made elsewhere over to that node); a write already on its way is waited for
(under its chunk lock) before the chunks go.  A node that
is offline drops them when it starts (Node.collect_garbage).
"""

from __future__ import annotations

import logging

import trio

from .. import codec
from ..errors import AlreadyExists, Busy, Fenced, InvalidArgument, NoSpace, NotFound, PxfsError
from ..meta import keys
from ..meta.lease import list_nodes
from ..meta.txn import run_txn
from ..replication.volume_io import IN_SYNC, OUT_OF_SYNC, RESYNCING
from .catalog import REPLICA_DELETE_WAIT

log = logging.getLogger(__name__)

MAX_REPL = 3


class AttachedElsewhere(Busy):
    """A removal asked of a node the volume is not attached on: the node it
    is attached on (``node``, its API URL ``api``) must make it."""

    def __init__(self, msg: str, node: str = "", api: str = ""):
        super().__init__(msg)
        self.node, self.api = node, api


def check_repl(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"repl must be a whole number 1..{MAX_REPL}, not {value!r}")
    if not 1 <= value <= MAX_REPL:
        raise InvalidArgument(f"repl must be 1..{MAX_REPL}, not {value}")
    return value


class HaUpdate:
    def __init__(self, catalog, attachments):
        self.catalog, self.attachments = catalog, attachments
        self.kv, self.cid = catalog.kv, catalog.cid

    async def update(self, ref: str, repl, node: str | None = None) -> dict:
        """Add or remove one replica; returns {"action": "add"|"remove", "node"}."""
        repl = check_repl(repl)
        if node is not None and (not isinstance(node, str) or not node):
            raise InvalidArgument("node must be a node id")
        rec, _ = await self.catalog.get(ref)
        have = len(rec["replicas"])
        if repl == have:
            raise InvalidArgument(f"volume {rec['name']!r} already has {have} replica"
                                  f"{'s' if have > 1 else ''}")
        if abs(repl - have) != 1:
            raise InvalidArgument(f"volume {rec['name']!r} has {have} replica"
                                  f"{'s' if have > 1 else ''}: ha-update adds or removes one "
                                  f"at a time (--repl {have + 1 if repl > have else have - 1})")
        if rec.get("shared") and await self.catalog.ns_mounts(rec["id"]):
            raise Busy(f"volume {rec['name']!r} is a shared volume mounted now; unmount it "
                       "everywhere before changing its replicas")
        if repl > have:
            return await self._add(rec, node)
        return await self._remove(rec, node)

    # -- one more ------------------------------------------------------------
    async def _add(self, rec: dict, node: str | None) -> dict:
        name, have = rec["name"], len(rec["replicas"])
        holders = {r["node"] for r in rec["replicas"]}
        if not any(r["state"] == IN_SYNC for r in rec["replicas"]):
            raise Busy(f"volume {name!r} has no in-sync replica to copy a new one from")
        nodes = await list_nodes(self.kv, self.cid)
        known = {n["id"]: n for n in nodes}
        if node is not None:
            if node not in known:
                raise InvalidArgument(f"no node {node!r} in this cluster")
            if node in holders:
                raise AlreadyExists(f"node {node} already holds a replica of {name!r}")
            if not known[node]["online"]:
                raise NoSpace(f"node {node} is offline")
            candidates = [known[node]]
        else:
            candidates = [n for n in nodes if n["online"] and n["id"] not in holders]
            if not candidates:
                raise NoSpace(f"no online node without a replica of {name!r} to add one on")
        answering = await self.catalog.answering([n["id"] for n in candidates])
        candidates = [n for n in candidates if n["id"] in answering]
        if not candidates:
            raise NoSpace(f"node {node} does not answer on its data port (down, or stopping)"
                          if node else f"no node without a replica of {name!r} answers on "
                          "its data port")
        need = await self._used(rec)
        roomy = [n for n in candidates
                 if need is None or n.get("pool_total", 0) - n.get("pool_used", 0) >= need]
        if not roomy:
            raise NoSpace(f"{'node ' + node if node else 'no node'} has room for the "
                          f"{need} bytes the replicas of {name!r} hold")
        chosen = (await self.catalog.placement_order(roomy))[0]["id"]
        # what may be left there of an earlier replica (removed while it was
        # unreachable): the copy must start from nothing, and no late
        # delete of that may land in the middle of it
        try:
            with trio.fail_after(REPLICA_DELETE_WAIT):
                await self.catalog.targets(chosen).delete_volume(rec["id"])
        except (PxfsError, trio.TooSlowError) as exc:
            raise NoSpace(f"node {chosen} cannot clear an old copy of {name!r}: {exc}") from None

        async def body(txn):
            item = await txn.get(keys.vol_key(self.cid, rec["id"]))
            if item is None:
                raise NotFound(f"volume {name!r} not found")
            now = codec.unpack_record(item.value)
            if len(now["replicas"]) != have or any(r["node"] == chosen for r in now["replicas"]):
                raise Busy(f"the replicas of {name!r} changed meanwhile; look again")
            now["replicas"].append({"node": chosen, "state": OUT_OF_SYNC, "missed_from": 0})
            now["repl"] = have + 1
            txn.put(keys.vol_key(self.cid, rec["id"]), codec.pack_record(now))
        await run_txn(self.kv, body, what=f"add a replica of {name}")
        log.info("volume %s: replica added on %s (%d -> %d); it is copied from an in-sync one",
                 name, chosen, have, have + 1)
        return {"action": "add", "node": chosen}

    async def _used(self, rec: dict) -> int | None:
        """Bytes an in-sync replica of the volume holds (what a new one will
        take), or None if none answers."""
        for r in rec["replicas"]:
            if r["state"] == IN_SYNC:
                try:
                    with trio.move_on_after(5):
                        return await self.catalog.targets(r["node"]).usage(rec["id"])
                except PxfsError:
                    continue
        return None

    # -- one fewer -----------------------------------------------------------
    async def _remove(self, rec: dict, node: str | None) -> dict:
        name = rec["name"]
        online = {n["id"]: n for n in await list_nodes(self.kv, self.cid) if n["online"]}
        att = await self.catalog.attachment(rec["id"])
        if node is not None:
            if not any(r["node"] == node for r in rec["replicas"]):
                raise InvalidArgument(f"node {node!r} holds no replica of {name!r}")
            gone = node
        else:
            # the replicas that help least first: out of sync or offline,
            # then any but the one on the node the volume is attached on
            def rank(r):
                return (r["state"] == IN_SYNC and r["node"] in online,
                        att is not None and r["node"] == att["node"])
            gone = min(rec["replicas"], key=rank)["node"]
        self._check_removable(rec, gone, online)
        if att is not None:
            loc = self.attachments.local.get(rec["id"])
            if att["node"] != self.catalog.node or loc is None:
                api = (online.get(att["node"]) or {}).get("api", "")
                raise AttachedElsewhere(
                    f"volume {name!r} is attached on {att['node']}: a replica can only be "
                    f"removed there (pxctl --host {api or '<its API URL>'} volume ha-update "
                    f"{name} --repl {len(rec['replicas']) - 1} --node {gone})", att["node"], api)
            await self._remove_attached_here(rec, gone, loc, online)
        else:
            await self._remove_detached(rec, gone, online)
        log.info("volume %s: replica on %s removed (%d -> %d)", name, gone,
                 len(rec["replicas"]), len(rec["replicas"]) - 1)
        await self._drop_data(rec["id"], gone, online)
        return {"action": "remove", "node": gone}

    @staticmethod
    def _check_removable(rec: dict, gone: str, online: dict, states: dict | None = None) -> None:
        states = states or {r["node"]: r["state"] for r in rec["replicas"]}
        if states.get(gone) == RESYNCING:
            raise Busy(f"the replica of {rec['name']!r} on {gone} is being resynced; remove it "
                       "once that is done (or it failed)")
        left = [n for n, s in states.items() if n != gone and s == IN_SYNC and n in online]
        if not left:
            raise Busy(f"removing the replica on {gone} would leave {rec['name']!r} without "
                       "an in-sync replica on an online node")

    def _new_record(self, now: dict, gone: str) -> dict:
        now["replicas"] = [r for r in now["replicas"] if r["node"] != gone]
        now["repl"] = len(now["replicas"])
        now["gen"] += 1
        return now

    async def _remove_detached(self, rec: dict, gone: str, online: dict) -> None:
        async def body(txn):
            item = await txn.get(keys.vol_key(self.cid, rec["id"]))
            if item is None:
                raise NotFound(f"volume {rec['name']!r} not found")
            if await txn.get(keys.attach_key(self.cid, rec["id"])):
                raise Busy(f"volume {rec['name']!r} was attached meanwhile; run ha-update again")
            now = codec.unpack_record(item.value)
            if not any(r["node"] == gone for r in now["replicas"]):
                raise Busy(f"the replicas of {rec['name']!r} changed meanwhile; look again")
            self._check_removable(now, gone, online)
            txn.put(keys.vol_key(self.cid, rec["id"]), codec.pack_record(self._new_record(now, gone)))
        await run_txn(self.kv, body, what=f"remove the replica of {rec['name']} on {gone}")

    async def _remove_attached_here(self, rec: dict, gone: str, loc, online: dict) -> None:
        vol = loc.vol
        if vol.fenced:
            raise Fenced(f"volume {rec['name']!r}: its attachment here stopped all I/O "
                         f"({vol.fenced})")
        async with vol._state_lock:
            # the states as the writes see them: a write that failed on a
            # replica has marked it out of sync here (and in etcd) already
            self._check_removable(rec, gone, online, dict(vol.states))

            async def body(txn):
                item = await txn.get(keys.vol_key(self.cid, rec["id"]))
                if item is None:
                    raise NotFound(f"volume {rec['name']!r} not found")
                now = codec.unpack_record(item.value)
                if now["term"] != vol.term:
                    raise Fenced(f"volume {rec['name']!r} was attached elsewhere meanwhile")
                if not any(r["node"] == gone for r in now["replicas"]):
                    raise Busy(f"the replicas of {rec['name']!r} changed meanwhile; look again")
                new = self._new_record(now, gone)
                txn.put(keys.vol_key(self.cid, rec["id"]), codec.pack_record(new))
                return new
            new = await run_txn(self.kv, body, what=f"remove the replica of {rec['name']} on {gone}")
            vol.forget_replica(gone)
            vol.set_gen(new["gen"])
        # a write that chose its replicas before may still be sending to it:
        # each holds its chunk's lock until all its replicas answered
        for lock in vol.locks:
            async with lock:
                pass

    async def _drop_data(self, volid: int, gone: str, online: dict) -> None:
        if gone not in online:
            log.info("replica data of %s on %s left for its node to remove when it starts",
                     volid, gone)
            return
        try:
            with trio.move_on_after(REPLICA_DELETE_WAIT):
                await self.catalog.targets(gone).delete_volume(volid)
                return
            log.info("replica data of %s on %s left for its node to remove: no answer within "
                     "%s s", volid, gone, REPLICA_DELETE_WAIT)
        except PxfsError as exc:
            log.info("replica data of %s on %s left for its node to remove: %s", volid, gone, exc)
