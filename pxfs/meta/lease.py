"""Node membership: a node record plus an "alive" key bound to the node's
etcd lease.  A node whose lease expires is Offline; the keepalive service
re-registers by itself, and tells its listeners the old lease is gone (every
attach made under it vanished with it, so the node must stop writing).
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from .. import codec
from ..errors import MetaError
from . import keys
from .kv import KV, Put

log = logging.getLogger(__name__)

#: attached volumes hold their I/O once the lease has gone this long
#: (at most; a quarter of the TTL for short ones) without a refresh that
#: etcd answered: it may expire in etcd a little later, and I/O that is past
#: its check must finish before another node can attach
HOLD_MARGIN = 1.0


def _clock() -> float:
    """Seconds on a clock that goes on while the host is suspended (unlike
    time.monotonic): a host that slept through its TTL must find its lease
    expired as it wakes, before its first I/O."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Membership:
    def __init__(self, kv: KV, cid: str, node: str, ttl: int, info_fn):
        self.kv, self.cid, self.node, self.ttl = kv, cid, node, ttl
        self._info_fn = info_fn          # () -> dict, the node record's contents
        #: the etcd lease this node holds now; 0 from its loss to the rejoin
        self.lease = 0
        #: _clock() time until which the lease surely stands in etcd, less
        #: the margin: etcd counts the TTL from a request that was sent no
        #: earlier than the last answered one
        self.valid_until = 0.0
        self._renewed = trio.Event()
        self._lost_listeners = []
        self._rejoined_listeners = []
        self.started = time.time()
        self._since = 0.0               # when the lease held was granted

    def on_lease_lost(self, fn) -> None:
        """Register ``async fn(old_lease)`` to run when the lease was lost."""
        self._lost_listeners.append(fn)

    def on_rejoined(self, fn) -> None:
        """Register ``async fn(new_lease)`` to run when the node has a lease
        again after losing one."""
        self._rejoined_listeners.append(fn)

    def held(self) -> int:
        """The lease to bind a new key to; MetaError while the node has
        none (it lost its lease and is rejoining): a key put under the lost
        one would go with it, one put under no lease would outlive the node."""
        if not self.lease:
            raise MetaError(f"node {self.node} lost its etcd lease and is rejoining the cluster; "
                            "try again in a few seconds", errno=errno.EAGAIN)
        return self.lease

    def expired(self) -> bool:
        """Whether the lease may have run out in etcd (no refresh answered
        for nearly its TTL): attached volumes hold their I/O meanwhile."""
        return _clock() > self.valid_until

    def _refreshed(self, sent: float) -> None:
        self.valid_until = max(self.valid_until,
                               sent + self.ttl - min(HOLD_MARGIN, self.ttl / 4))
        ev, self._renewed = self._renewed, trio.Event()
        ev.set()

    async def wait_renewed(self) -> None:
        """Until the next refresh (or new lease) that etcd answered."""
        await self._renewed.wait()

    async def _register(self) -> None:
        sent = _clock()
        lease = await self.kv.lease_grant(self.ttl)
        rec = dict(self._info_fn(), id=self.node, started=self.started)
        self._since = time.time()
        try:
            await self.kv.txn([], [
                Put(keys.node_key(self.cid, self.node), codec.pack_record(rec)),
                Put(keys.alive_key(self.cid, self.node), codec.pack_record({"since": self._since}),
                    lease)])
        except MetaError:
            await self.kv.lease_revoke(lease)
            raise
        self.lease = lease
        self._refreshed(sent)

    async def end_previous_run(self, previous) -> None:
        """Revoke the lease of this node's previous process, killed less
        than a TTL ago, and the keys bound to it (its attachments, its
        resync claims): their loop devices and mounts were just undone, so
        the volumes may be attached elsewhere now rather than once the lease
        expires.  ``previous``: the alive key as it stood when that run was
        found dead (it did not answer on its API, and its record names the
        data address this process now holds; this process also holds the
        data_dir's lock); nothing is revoked unless the key still stands
        unchanged."""
        if previous is None or not previous.lease:
            return
        item = await self.kv.get(keys.alive_key(self.cid, self.node))
        if item is None or (item.lease, item.mod_rev) != (previous.lease, previous.mod_rev):
            return
        log.info("revoking lease %x of this node's previous run", item.lease)
        await self.kv.lease_revoke(item.lease)

    async def publish(self) -> None:
        """Write the node record (addresses, capacity), and the alive key
        again under the lease held: a stray process that registered under
        this node's id and left deleted it, and the node would otherwise
        stay Offline while it runs."""
        rec = dict(self._info_fn(), id=self.node, started=self.started)
        puts = [Put(keys.node_key(self.cid, self.node), codec.pack_record(rec))]
        if self.lease:
            puts.append(Put(keys.alive_key(self.cid, self.node),
                            codec.pack_record({"since": self._since}), self.lease))
        await self.kv.txn([], puts)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        await self._register()
        task_status.started()
        # listeners of a rejoin run beside the keepalive, which must go on
        # refreshing the new lease whatever they wait for
        async with trio.open_nursery() as nursery:
            await self._keepalive(nursery)

    async def _keepalive(self, nursery) -> None:
        # the capacity figures are published by their own task: a slow txn
        # must not delay the next refresh (attached volumes hold their I/O
        # once the refreshes lag)
        nursery.start_soon(self._publisher)
        last_ok = time.monotonic()
        lost = False
        while True:
            await trio.sleep(max(0.3, self.ttl / 4))
            if not lost:
                try:
                    sent = _clock()
                    alive = await self.kv.lease_refresh(self.lease)
                except MetaError as exc:
                    log.warning("lease keepalive failed: %s", exc)
                    if time.monotonic() - last_ok < self.ttl:
                        continue
                    alive = False
                if alive:
                    self._refreshed(sent)
                    last_ok = time.monotonic()
                    continue
                old, self.lease = self.lease, 0
                self.valid_until = 0.0
                log.warning("node %s lost its etcd lease %x; holding local attachments' I/O "
                            "and rejoining", self.node, old)
                for fn in self._lost_listeners:
                    await fn(old)
                # from here on only a new lease ends this: the old one may
                # answer again (etcd restarted and restored it), but the
                # listeners were told it is gone and wait for the rejoin
                lost = True
            try:
                await self._register()
                lost = False
                last_ok = time.monotonic()
                log.warning("node %s rejoined the cluster", self.node)
                # the old lease may still stand (etcd restarted and restored
                # it): end it, and the keys still bound to it, as the
                # listeners were told
                nursery.start_soon(self._revoke_old, old)
                for fn in self._rejoined_listeners:
                    nursery.start_soon(fn, self.lease)
            except MetaError as exc:
                log.warning("rejoin failed, will retry: %s", exc)

    async def _revoke_old(self, old: int) -> None:
        with trio.move_on_after(max(2.0, self.ttl)):
            try:
                await self.kv.lease_revoke(old)
            except MetaError as exc:
                log.info("old lease %x not revoked (it expires by itself): %s", old, exc)

    async def _publisher(self) -> None:
        while True:
            await trio.sleep(max(1.2, self.ttl))
            try:
                await self.publish()
            except MetaError as exc:
                log.info("node record not refreshed: %s", exc)

    async def revoke(self) -> None:
        self.valid_until = 0.0            # its attach keys go with it
        if self.lease:
            await self.kv.lease_revoke(self.lease)
            self.lease = 0


async def list_nodes(kv: KV, cid: str) -> list[dict]:
    """Every node ever registered, with ``online`` from its alive key."""
    alive = {keys.last_part(i.key) for i in await kv.range(keys.alive_prefix(cid))}
    out = []
    for item in await kv.range(keys.node_prefix(cid)):
        rec = codec.unpack_record(item.value)
        rec["online"] = rec["id"] in alive
        out.append(rec)
    return out
