"""The resync service: finds replicas marked out of sync whose node is back
online and brings them up to date.  The node a volume is attached on runs the
resync live (writes keep flowing, chunk by chunk under the chunk locks); a
detached volume is pulled by the stale replica's own node.
"""

from __future__ import annotations

import logging

import trio

from .. import codec
from ..errors import PxfsError
from ..meta import keys
from ..meta.kv import Delete, Put
from ..meta.lease import list_nodes
from ..replication.resync import resync_replica
from ..replication.volume_io import IN_SYNC, OUT_OF_SYNC, RESYNCING

log = logging.getLogger(__name__)


class Resyncer:
    def __init__(self, catalog, attachments, membership, *, interval: float = 1.0):
        self.catalog, self.attachments, self.membership = catalog, attachments, membership
        self.kv, self.cid, self.node = catalog.kv, catalog.cid, catalog.node
        self.interval = interval
        self.running: set[tuple[int, str]] = set()
        self.history: list[dict] = []     # finished resyncs, for tests and the API
        #: (volid, node) -> (monotonic time before which it is not tried
        #: again, the wait after its next failure): a resync that keeps failing
        #: (its source down, the target's pool full) is retried after 1, 2,
        #: 4 ... 30 s, not every scan
        self._backoff: dict[tuple[int, str], tuple[float, float]] = {}
        #: volid -> when its replica here was first seen resyncing with the
        #: volume attached nowhere (see _orphaned)
        self._orphan_seen: dict[int, float] = {}
        #: how long such a replica waits for its runner to come back
        self.orphan_grace = 4.0 * getattr(membership, "ttl", 5)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            task_status.started()
            said, failed = -1e9, 0          # an etcd outage: a line per 30 s, not per scan
            while True:
                try:
                    await self._scan(nursery)
                    if failed:
                        log.info("resync scans work again (%d failed)", failed)
                    failed = 0
                except PxfsError as exc:
                    failed += 1
                    if trio.current_time() - said >= 30:
                        said = trio.current_time()
                        log.warning("resync scan failed: %s%s", exc, f" ({failed} in a row)"
                                    if failed > 1 else "")
                await trio.sleep(self.interval)

    async def _scan(self, nursery) -> None:
        vols, atts, nodes, extra = await self.catalog.snapshot()
        known = {rec["id"] for rec in vols}
        for key in [k for k in self._backoff if k[0] not in known]:
            del self._backoff[key]                # deleted volumes
        orphans: set[int] = set()
        for rec in vols:
            att = atts.get(rec["id"])
            for r in rec["replicas"]:
                key = (rec["id"], r["node"])
                if (r["state"] == RESYNCING and r["node"] == self.node and not att
                        and key not in self.running):
                    orphans.add(rec["id"])
                    seen = self._orphan_seen.setdefault(rec["id"], trio.current_time())
                    if trio.current_time() - seen >= self.orphan_grace:
                        await self._orphaned(rec)
                    continue
                if r["state"] != OUT_OF_SYNC or key in self.running:
                    continue
                if self._backoff.get(key, (0.0,))[0] > trio.current_time():
                    continue
                if not nodes.get(r["node"], {}).get("online"):
                    continue
                loc = self.attachments.local.get(rec["id"])
                if att and att["node"] == self.node and loc and not loc.vol.fenced:
                    self.running.add(key)
                    nursery.start_soon(self._guard, key, self._live, loc, r["node"])
                elif rec.get("shared") and r["node"] == self.node and extra.get(("mounts", rec["id"])):
                    self.running.add(key)
                    nursery.start_soon(self._guard, key, self._shared, rec["id"])
                elif not att and r["node"] == self.node and not extra.get(("mounts", rec["id"])):
                    self.running.add(key)
                    nursery.start_soon(self._guard, key, self._offline, rec["id"])
        for volid in set(self._orphan_seen) - orphans:
            del self._orphan_seen[volid]      # taken back, attached again, or started over

    async def _orphaned(self, rec: dict) -> None:
        """This node's replica is marked resyncing, the volume is attached
        nowhere, and no resync of it runs here: the one that did died with
        its runner (the attached node stopped or was killed mid-copy, or
        this node restarted).  Out of sync again, it is picked up like any
        other; its ``missed_from`` stays, so the copy covers the live
        writes it took meanwhile too.  The attach term goes up with it: the
        runner may only be paused, its lease gone with its attach key, and
        must not take the volume back (nor mark this replica in sync) when
        it wakes up while this node copies.

        Called only once the replica has been left so for ``orphan_grace``
        (4 leases): a runner paused for a few seconds past its lease takes
        its attachment back when it wakes (attach.py, _retake) and its
        application's I/O goes on; started over at once, its I/O failed
        for good (the term it holds is old now)."""
        try:
            await self.catalog.set_replica_state(rec["id"], self.node, OUT_OF_SYNC,
                                                 expect_state=RESYNCING, require_detached=True,
                                                 bump_term=True)
        except PxfsError as exc:          # attached or changed meanwhile: next scan
            log.debug("volume %s: orphaned resync not reset: %s", rec["id"], exc)
            return
        log.info("volume %s: the resync of the replica here stopped with its runner; "
                 "starting over", rec["name"])

    async def _guard(self, key, fn, *args):
        ok = False
        try:
            await fn(*args)
            ok = True
        except PxfsError as exc:
            log.warning("resync of volume %s to %s stopped: %s", key[0], key[1], exc)
        except Exception:       # a bug must not take the node down with it
            log.exception("resync of volume %s to %s failed", key[0], key[1])
        finally:
            if ok:
                self._backoff.pop(key, None)
            else:
                wait = self._backoff.get(key, (0.0, 1.0))[1]
                self._backoff[key] = (trio.current_time() + wait, min(30.0, wait * 2))
            self.running.discard(key)
            with trio.CancelScope(shield=True):
                try:
                    await self.kv.txn([], [Delete(keys.resync_key(self.cid, key[0], key[1]))])
                except PxfsError:
                    pass

    def _reporter(self, volid: int, node: str):
        async def report(p):
            rec = {"done": p.done, "total": p.total, "percent": p.percent, "chunks": p.chunks,
                   "started": p.started}
            await self.kv.txn([], [Put(keys.resync_key(self.cid, volid, node),
                                       codec.pack_record(rec), self.membership.held())])
        return report

    async def _live(self, loc, node: str) -> None:
        vol = loc.vol
        sources = [n for n in vol.readers() if n != node]
        if not sources:
            return
        # a node killed a moment ago still looks online until its lease
        # expires: do not mark its replica resyncing only to fail at once
        try:
            await self.catalog.targets(node).ping(timeout=2)
        except PxfsError as exc:
            log.debug("volume %s: replica on %s not reachable yet: %s", loc.name, node, exc)
            return
        async with vol._state_lock:
            rec = await self.catalog.set_replica_state(vol.volid, node, RESYNCING, term=vol.term,
                                                       expect_state=OUT_OF_SYNC)
            missed = next(r["missed_from"] for r in rec["replicas"] if r["node"] == node)
            vol.states[node] = RESYNCING
        # writes that chose their replicas before this point may still be in
        # flight without the new one: wait for them (each holds its chunk lock)
        for lock in vol.locks:
            async with lock:
                pass
        src = sources[0]
        log.info("volume %s: resyncing replica on %s from %s (writes since gen %d)",
                 loc.name, node, src, missed)

        def source_gone():
            state = vol.states.get(src)
            return None if state == IN_SYNC else f"the source {src} is {state} now"
        try:
            prog = await resync_replica(vol.volid, self.catalog.targets(src),
                                        self.catalog.targets(node), missed_from=missed,
                                        term=vol.term, lock_fn=vol.chunk_lock,
                                        report=self._reporter(vol.volid, node), check=source_gone,
                                        fallbacks=lambda: [self.catalog.targets(n)
                                                           for n in vol.readers()
                                                           if n not in (src, node)])
            async with vol._state_lock:
                if vol.states.get(node) != RESYNCING:
                    return                        # a write to it failed meanwhile
                if source_gone():
                    raise PxfsError(f"resync of volume {vol.volid} stopped: {source_gone()}")
                rec = await self.catalog.set_replica_state(vol.volid, node, IN_SYNC,
                                                           term=vol.term, expect_state=RESYNCING,
                                                           source=src)
                vol.states = {r["node"]: r["state"] for r in rec["replicas"]}
                vol.set_gen(rec["gen"])
        except PxfsError:
            if vol.states.get(node) == RESYNCING and not vol.fenced:
                vol.set_gen(await self.attachments._failure_handler(vol.volid)([node], missed))
            raise
        self._done(vol.volid, node, prog)

    async def _offline(self, volid: int) -> None:
        rec, rev = await self.catalog.get(volid)
        me = next(r for r in rec["replicas"] if r["node"] == self.node)
        sources = await self._online_first(
            [r["node"] for r in rec["replicas"] if r["state"] == IN_SYNC])
        if not sources:
            return
        rec = await self.catalog.set_replica_state(volid, self.node, RESYNCING, expect_rev=rev,
                                                   require_detached=True)
        rev = rec.pop("mod_rev")
        log.info("volume %s: pulling changes since gen %d from %s", rec["name"], me["missed_from"],
                 sources[0])
        try:
            prog = await resync_replica(volid, self.catalog.targets(sources[0]),
                                        self.catalog.targets(self.node),
                                        missed_from=me["missed_from"], term=rec["term"],
                                        report=self._reporter(volid, self.node),
                                        fallbacks=lambda: self._others(sources))
            await self.catalog.set_replica_state(volid, self.node, IN_SYNC, expect_rev=rev,
                                                 require_detached=True, source=sources[0])
        except PxfsError:
            try:
                await self.catalog.set_replica_state(volid, self.node, OUT_OF_SYNC, expect_rev=rev,
                                                     require_detached=True)
            except PxfsError:
                pass
            raise
        self._done(volid, self.node, prog)

    async def _shared(self, volid: int) -> None:
        """Resync this node's replica of a shared volume while mounts on
        several nodes write to it.  No chunk lock spans those processes, so:
        note the blocks written here from before the replica is marked
        resyncing; wait until every mount has seen that (its record says
        which volume revision it follows), so none writes around it; copy,
        keeping the noted blocks (ReplicaService.put_chunk_merged)."""
        local = self.catalog.targets(self.node)
        rec, rev = await self.catalog.get(volid)
        me = next(r for r in rec["replicas"] if r["node"] == self.node)
        sources = await self._online_first(
            [r["node"] for r in rec["replicas"] if r["state"] == IN_SYNC])
        if not sources:
            return
        # mounts stamp writes with their own epochs: copy every chunk written
        # in the generation the replica dropped out of, whoever wrote it
        missed = (me["missed_from"] >> 32) << 32
        local.track(volid)
        try:
            rec = await self.catalog.set_replica_state(volid, self.node, RESYNCING, expect_rev=rev,
                                                       expect_state=OUT_OF_SYNC)
            await self._mounts_follow(volid, rec.pop("mod_rev"))
            log.info("volume %s: resyncing the replica here from %s while mounted (writes since "
                     "gen %d)", rec["name"], sources[0], missed >> 32)
            try:
                prog = await resync_replica(volid, self.catalog.targets(sources[0]), local,
                                            missed_from=missed, term=rec["term"],
                                            report=self._reporter(volid, self.node),
                                            put=local.put_chunk_merged,
                                            fallbacks=lambda: self._others(sources))
                await self.catalog.set_replica_state(volid, self.node, IN_SYNC,
                                                     expect_state=RESYNCING, source=sources[0])
            except PxfsError:
                try:
                    await self.catalog.set_replica_state(volid, self.node, OUT_OF_SYNC,
                                                         expect_state=RESYNCING)
                except PxfsError:
                    pass
                raise
        finally:
            local.untrack(volid)
        self._done(volid, self.node, prog)

    async def _mounts_follow(self, volid: int, rev: int, timeout: float = 30.0) -> None:
        with trio.move_on_after(timeout):
            while True:
                lagging = [m for m in await self.catalog.ns_mounts(volid)
                           if m.get("seen_rev", 0) < rev]
                if not lagging:
                    return
                await trio.sleep(0.2)
        raise PxfsError(f"volume {volid}: mounts did not pick up the resync: "
                        + ", ".join(f"{m['node']}:{m['path']}" for m in lagging))

    async def _online_first(self, nodes: list[str]) -> list[str]:
        """``nodes`` with those whose lease is alive first: a paused or dead
        node would hold a resync up for a whole request timeout per try."""
        online = {n["id"] for n in await list_nodes(self.kv, self.cid) if n["online"]}
        return sorted(nodes, key=lambda n: n not in online)

    def _others(self, sources: list[str]) -> list:
        """Targets of the in-sync replicas after the first, to copy a chunk
        from when the first's copy fails its checksums."""
        return [self.catalog.targets(n) for n in sources[1:]]

    def _done(self, volid, node, prog) -> None:
        log.info("volume %s: replica on %s in sync again (%d chunks, %d bytes copied)",
                 volid, node, prog.chunks, prog.done)
        self.history.append({"volume": str(volid), "node": node, "chunks": prog.chunks,
                             "bytes": prog.done})
        del self.history[:-100]
