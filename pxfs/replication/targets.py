"""One interface to a replica, wherever it is: LocalReplica calls this node's
ReplicaService directly; RemoteReplica sends the same request over the data
port.  Writes, flushes and drops take ``sent``, an Event set once the
request left this node (at once for the local replica), so the fan-out
starts the remote copies before it does the local one."""

from __future__ import annotations

from ..rpc.client import Peer
from .replica import ReplicaService


class LocalReplica:
    local = True

    def __init__(self, node: str, svc: ReplicaService):
        self.node, self._svc = node, svc

    async def write(self, volid, idx, off, data, term, gen, crcs=None, timeout=None, sent=None):
        await self._svc.write(volid, idx, off, data, term, gen, crcs)

    async def read(self, volid, idx, off, size, timeout=None):
        return await self._svc.read(volid, idx, off, size)

    async def flush(self, volid, term, timeout=None, sent=None):
        await self._svc.flush(volid, term)

    async def fence(self, volid, term, timeout=None):
        await self._svc.fence(volid, term)

    async def get_chunk(self, volid, idx):
        return await self._svc.get_chunk(volid, idx)

    async def put_chunk(self, volid, idx, gen, bitmap, data, term):
        await self._svc.put_chunk(volid, idx, gen, bitmap, data, term)

    async def list_chunks(self, volid, min_gen):
        return await self._svc.list_chunks(volid, min_gen)

    async def drop_chunks(self, volid, first, count, term, timeout=None, sent=None):
        await self._svc.drop_chunks(volid, first, count, term)

    # live resync of a shared volume into this replica (ReplicaService)
    def track(self, volid):
        self._svc.track(volid)

    def untrack(self, volid):
        self._svc.untrack(volid)

    async def put_chunk_merged(self, volid, idx, gen, bitmap, data, term):
        await self._svc.put_chunk_merged(volid, idx, gen, bitmap, data, term)

    async def delete_volume(self, volid):
        await self._svc.delete_volume(volid)

    async def usage(self, volid):
        return await self._svc.usage(volid)


class RemoteReplica:
    local = False

    def __init__(self, node: str, peer: Peer):
        self.node, self._peer = node, peer

    async def write(self, volid, idx, off, data, term, gen, crcs=None, timeout=None, sent=None):
        args = {} if crcs is None else {"crcs": crcs}
        await self._peer.call("write", vol=volid, idx=idx, off=off, data=data, term=term,
                              gen=gen, timeout=timeout, sent=sent, **args)

    async def read(self, volid, idx, off, size, timeout=None):
        return (await self._peer.call("read", vol=volid, idx=idx, off=off, size=size,
                                      timeout=timeout))["data"]

    async def flush(self, volid, term, timeout=None, sent=None):
        await self._peer.call("flush", vol=volid, term=term, timeout=timeout, sent=sent)

    async def fence(self, volid, term, timeout=None):
        await self._peer.call("fence", vol=volid, term=term, timeout=timeout)

    async def get_chunk(self, volid, idx):
        r = await self._peer.call("get_chunk", vol=volid, idx=idx)
        return (r["gen"], r["bitmap"], r["data"]) if r["present"] else None

    async def put_chunk(self, volid, idx, gen, bitmap, data, term):
        await self._peer.call("put_chunk", vol=volid, idx=idx, gen=gen, present=data is not None,
                              bitmap=bitmap, data=data, term=term, timeout=30)

    async def drop_chunks(self, volid, first, count, term, timeout=None, sent=None):
        await self._peer.call("drop_chunks", vol=volid, first=first, count=count, term=term,
                              timeout=timeout, sent=sent)

    async def list_chunks(self, volid, min_gen):
        return (await self._peer.call("list_chunks", vol=volid, min_gen=min_gen, timeout=30))["chunks"]

    async def delete_volume(self, volid):
        await self._peer.call("delete_volume", vol=volid, timeout=30)

    async def usage(self, volid):
        return (await self._peer.call("usage", vol=volid))["bytes"]
