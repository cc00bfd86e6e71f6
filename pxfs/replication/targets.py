"""One interface to a replica, wherever it is: LocalReplica calls this node's
ReplicaService directly; RemoteReplica sends the same request over the data
port.  The fan-out of writes, flushes and drops (ReplicatedVolume) uses
``RemoteReplica.begin`` to put the request on the wire, then does the local
replica's copy, then collects the replies: the local copy overlaps the
remote round trips without a task per replica."""

from __future__ import annotations

import array

from ..rpc.client import Peer
from .replica import CHUNK_IDS_PAGE, ReplicaService


class LocalReplica:
    local = True

    def __init__(self, node: str, svc: ReplicaService):
        self.node, self._svc = node, svc

    async def write(self, volid, idx, off, data, term, gen, crcs=None, timeout=None):
        await self._svc.write(volid, idx, off, data, term, gen, crcs)

    async def do(self, op: str, args: dict, timeout=None) -> None:
        """One fan-out op with the data port's argument names."""
        svc, vol, term = self._svc, args["vol"], args["term"]
        if op == "write":
            await svc.write(vol, args["idx"], args["off"], args["data"], term, args["gen"],
                            args.get("crcs"))
        elif op == "flush":
            await svc.flush(vol, term)
        elif op == "trim":
            await svc.trim(vol, args["idx"], args["first"], args["last"], term, args["gen"])
        elif op == "drop_chunks":
            await svc.drop_chunks(vol, args["first"], args["count"], term)
        else:
            raise ValueError(f"not a fan-out op: {op}")

    async def read(self, volid, idx, off, size, timeout=None, term=None):
        return await self._svc.read(volid, idx, off, size, term)

    async def flush(self, volid, term, timeout=None):
        await self._svc.flush(volid, term)

    async def fence(self, volid, term, timeout=None):
        await self._svc.fence(volid, term)

    async def get_chunk(self, volid, idx):
        return await self._svc.get_chunk(volid, idx)

    async def put_chunk(self, volid, idx, gen, bitmap, data, term):
        await self._svc.put_chunk(volid, idx, gen, bitmap, data, term)

    async def list_chunks(self, volid, min_gen):
        return await self._svc.list_chunks(volid, min_gen)

    async def chunk_ids(self, volid, start: int = 0, stop: int = 1 << 62) -> set[int]:
        return {i for i in await self._svc.chunk_ids(volid, start, 1 << 62) if i < stop}

    async def drop_chunks(self, volid, first, count, term, timeout=None):
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

    async def ping(self, timeout=None):
        pass


class RemoteReplica:
    local = False

    def __init__(self, node: str, peer: Peer):
        self.node, self._peer = node, peer

    async def begin(self, op: str, args: dict, timeout=None):
        """Send a fan-out op; ``await (await begin(...)).result()`` ends it."""
        return await self._peer.begin(op, timeout=timeout, **args)

    async def do(self, op: str, args: dict, timeout=None) -> dict:
        return await self._peer.call(op, timeout=timeout, **args)

    async def write(self, volid, idx, off, data, term, gen, crcs=None, timeout=None):
        args = {} if crcs is None else {"crcs": crcs}
        await self._peer.call("write", vol=volid, idx=idx, off=off, data=data, term=term,
                              gen=gen, timeout=timeout, **args)

    async def read(self, volid, idx, off, size, timeout=None, term=None):
        args = {} if term is None else {"term": term}
        return (await self._peer.call("read", vol=volid, idx=idx, off=off, size=size,
                                      timeout=timeout, **args))["data"]

    async def flush(self, volid, term, timeout=None):
        await self._peer.call("flush", vol=volid, term=term, timeout=timeout)

    async def fence(self, volid, term, timeout=None):
        await self._peer.call("fence", vol=volid, term=term, timeout=timeout)

    async def get_chunk(self, volid, idx):
        r = await self._peer.call("get_chunk", vol=volid, idx=idx)
        return (r["gen"], r["bitmap"], r["data"]) if r["present"] else None

    async def put_chunk(self, volid, idx, gen, bitmap, data, term):
        await self._peer.call("put_chunk", vol=volid, idx=idx, gen=gen, present=data is not None,
                              bitmap=bitmap, data=data, term=term, timeout=30)

    async def drop_chunks(self, volid, first, count, term, timeout=None):
        await self._peer.call("drop_chunks", vol=volid, first=first, count=count, term=term,
                              timeout=timeout)

    async def list_chunks(self, volid, min_gen):
        return (await self._peer.call("list_chunks", vol=volid, min_gen=min_gen, timeout=30))["chunks"]

    async def chunk_ids(self, volid, start: int = 0, stop: int = 1 << 62) -> set[int]:
        """The chunks start..stop-1 the replica holds, a page at a time."""
        out: set[int] = set()
        while True:
            raw = (await self._peer.call("chunk_ids", vol=volid, start=start,
                                         limit=CHUNK_IDS_PAGE, timeout=30))["ids"]
            page = array.array("Q")
            page.frombytes(raw)
            out.update(i for i in page if i < stop)
            if len(page) < CHUNK_IDS_PAGE or page[-1] >= stop - 1:
                return out
            start = page[-1] + 1

    async def delete_volume(self, volid):
        await self._peer.call("delete_volume", vol=volid, timeout=30)

    async def usage(self, volid):
        return (await self._peer.call("usage", vol=volid))["bytes"]

    async def ping(self, timeout=None):
        await self._peer.call("ping", timeout=timeout)
