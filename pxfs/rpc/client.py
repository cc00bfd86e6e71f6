"""Client side of the data port: a small pool of connections per peer, one
request in flight per connection."""

from __future__ import annotations

import itertools
import logging

import trio

from ..errors import FrameError, PeerUnavailable, PxfsError, from_wire
from .frames import FrameReader, encode_wire

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class _Conn:
    def __init__(self, stream):
        self.stream = stream
        self.reader = FrameReader(stream)


class Peer:
    """Requests to one node's data port."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0, max_idle: int = 16):
        self.host, self.port, self.timeout = host, port, timeout
        self._idle: list[_Conn] = []
        self._max_idle = max_idle

    async def call(self, op: str, *, timeout: float | None = None, sent: trio.Event | None = None,
                   **args) -> dict:
        """Send one request and return its reply.  Every op is idempotent, so a
        request that failed on a pooled connection (the peer may have
        restarted since) is sent once more on a fresh one.  ``sent`` is set
        once the request is on the wire (or the call failed)."""
        msg = dict(args, op=op, id=next(_ids))
        head, payload = encode_wire(msg)
        try:
            return await self._call(op, msg["id"], head, payload, timeout, sent)
        finally:
            if sent is not None:
                sent.set()

    async def _call(self, op, rid, head, payload, timeout, sent) -> dict:
        with trio.move_on_after(timeout or self.timeout) as scope:
            while True:
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else None
                try:
                    if conn is None:
                        conn = _Conn(await trio.open_tcp_stream(self.host, self.port))
                    await conn.stream.send_all(head)
                    if payload is not None:
                        await conn.stream.send_all(payload)
                    if sent is not None:
                        sent.set()
                    reply = await conn.reader.receive()
                    if reply is None or reply.get("id") != rid:
                        raise PeerUnavailable("connection closed")
                    break
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                        PeerUnavailable, FrameError) as exc:
                    await self._drop(conn)
                    if not reused:
                        raise PeerUnavailable(f"{self.host}:{self.port}: {op}: {exc}") from None
        if scope.cancelled_caught:
            await self._drop(conn)
            raise PeerUnavailable(f"{self.host}:{self.port} did not answer {op} in time")
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            await self._drop(conn)
        if not reply.get("ok"):
            raise from_wire(reply.get("err", ""), reply.get("msg", "remote error"))
        return reply

    async def _drop(self, conn) -> None:
        if conn is not None:
            await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for c in idle:
            await trio.aclose_forcefully(c.stream)


class PeerBook:
    """The data-port address of every node, and one Peer (with its pool of
    connections) per node.  ``refresh`` (async, returns the node records)
    is called once when a node nobody has heard of yet is asked for: it may
    have registered since the addresses were last read."""

    def __init__(self, refresh=None):
        self.addrs: dict[str, str] = {}
        self._peers: dict[str, Peer] = {}
        self._refresh = refresh

    def learn(self, nodes: list[dict]) -> None:
        for n in nodes:
            self.addrs[n["id"]] = n["data"]

    def known(self, node: str) -> Peer | None:
        addr = self.addrs.get(node)
        if addr is None:
            return None
        peer = self._peers.get(node)
        if peer is None or f"{peer.host}:{peer.port}" != addr:
            host, _, port = addr.rpartition(":")
            peer = self._peers[node] = Peer(host, int(port))
        return peer

    def peer(self, node: str):
        """The node's Peer, or one that looks the node up on first use."""
        return self.known(node) or _LatePeer(self, node)

    async def _late(self, node: str) -> Peer:
        if self.known(node) is None and self._refresh is not None:
            try:
                self.learn(await self._refresh())
            except PxfsError:
                pass
        peer = self.known(node)
        if peer is None:
            raise PeerUnavailable(f"no address known for node {node}; is it registered?")
        return peer


class _LatePeer:
    def __init__(self, book: PeerBook, node: str):
        self._book, self._node = book, node

    async def call(self, op: str, **kw) -> dict:
        return await (await self._book._late(self._node)).call(op, **kw)
