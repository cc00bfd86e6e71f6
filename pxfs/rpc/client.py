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
        self.wire = self.reader.wire


_NET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, PeerUnavailable,
               FrameError)


class Pending:
    """A request on the wire whose reply is still to come (Peer.begin).
    Collect it with ``result()``, or ``abandon()`` it: its connection is
    then closed, never reused with a reply still owed on it."""

    def __init__(self, peer: "Peer", op: str, rid: int, head: bytes, payload, deadline: float):
        self.peer, self.op, self.rid = peer, op, rid
        self._head, self._payload, self._deadline = head, payload, deadline
        self._conn: _Conn | None = None
        self._reused = False

    async def _send(self) -> None:
        """Put the request on a connection; trio.TooSlowError past the deadline."""
        peer = self.peer
        with trio.CancelScope(deadline=self._deadline) as scope:
            while True:
                self._reused = bool(peer._idle)
                conn = peer._idle.pop() if self._reused else None
                try:
                    if conn is None:
                        conn = _Conn(await trio.open_tcp_stream(peer.host, peer.port))
                    if self._payload is None:
                        await conn.wire.send_all(self._head)
                    else:
                        await conn.wire.send_parts((self._head, self._payload))
                    self._conn = conn
                    return
                except _NET_ERRORS as exc:
                    await peer._drop(conn)
                    if not self._reused:
                        raise PeerUnavailable(f"{peer.host}:{peer.port}: {self.op}: {exc}") from None
                except BaseException:
                    # cancelled, maybe halfway through the request: the
                    # connection cannot carry another one
                    with trio.CancelScope(shield=True):
                        await peer._drop(conn)
                    raise
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def result(self, keep: bool = False) -> dict:
        """The reply.  With ``keep`` the connection stays with this request
        for its follow-up reply (``follow_up``), else it goes back to the pool."""
        peer = self.peer
        reply = None
        try:
            with trio.CancelScope(deadline=self._deadline):
                while True:
                    try:
                        reply = await self._conn.reader.receive()
                        if reply is None or reply.get("id") != self.rid:
                            raise PeerUnavailable("connection closed")
                        break
                    except _NET_ERRORS as exc:
                        conn, self._conn = self._conn, None
                        await peer._drop(conn)
                        if not self._reused:
                            raise PeerUnavailable(f"{peer.host}:{peer.port}: {self.op}: {exc}") from None
                        # a pooled connection the peer had closed (it may have
                        # restarted): every op is idempotent, send it again
                        await self._send()
            if reply is None:
                raise trio.TooSlowError
        except trio.TooSlowError:
            await self.abandon()
            raise PeerUnavailable(f"{peer.host}:{peer.port} did not answer {self.op} in time") from None
        except BaseException:
            await self.abandon()
            raise
        if not keep or not reply.get("ok"):      # a refusal has no follow-up
            await self._release()
        if not reply.get("ok"):
            raise from_wire(reply.get("err", ""), reply.get("msg", "remote error"))
        return reply

    async def follow_up(self, timeout: float | None = None) -> dict:
        """The second reply of a request whose first was taken with
        ``result(keep=True)``; the connection then goes back to the pool."""
        peer = self.peer
        reply = None
        reader = self._conn.reader
        try:
            if reader.has_frame():      # usually: then no cancel scope is needed
                reply = await reader.receive()
            else:
                with trio.move_on_after(timeout or peer.timeout):
                    reply = await reader.receive()
            if reply is None or reply.get("id") != self.rid:
                raise PeerUnavailable(f"{peer.host}:{peer.port}: no second answer to {self.op}"
                                      if reply is None else "connection out of step")
        except _NET_ERRORS as exc:
            await self.abandon()
            raise PeerUnavailable(f"{peer.host}:{peer.port}: {self.op}: {exc}") from None
        except BaseException:
            await self.abandon()
            raise
        await self._release()
        if not reply.get("ok"):
            raise from_wire(reply.get("err", ""), reply.get("msg", "remote error"))
        return reply

    async def _release(self) -> None:
        peer = self.peer
        conn, self._conn = self._conn, None
        if len(peer._idle) < peer._max_idle:
            peer._idle.append(conn)
        else:
            await peer._drop(conn)

    async def abandon(self) -> None:
        conn, self._conn = self._conn, None
        await self.peer._drop(conn)


class Peer:
    """Requests to one node's data port."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0, max_idle: int = 16):
        self.host, self.port, self.timeout = host, port, timeout
        self._idle: list[_Conn] = []
        self._max_idle = max_idle

    async def begin(self, op: str, *, timeout: float | None = None, **args) -> Pending:
        """Send one request; its reply is collected with ``result()``, so a
        caller can do other work (the local replica's copy) meanwhile.
        Every op is idempotent: a request that failed on a pooled
        connection (the peer may have restarted since) is sent once more
        on a fresh one."""
        msg = dict(args, op=op, id=next(_ids))
        head, payload = encode_wire(msg)
        p = Pending(self, op, msg["id"], head, payload,
                    trio.current_time() + (timeout or self.timeout))
        try:
            await p._send()
        except trio.TooSlowError:
            raise PeerUnavailable(f"{self.host}:{self.port} did not take {op} in time") from None
        return p

    async def call(self, op: str, *, timeout: float | None = None, **args) -> dict:
        """Send one request and return its reply."""
        return await (await self.begin(op, timeout=timeout, **args)).result()

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

    async def begin(self, op: str, **kw) -> Pending:
        return await (await self._book._late(self._node)).begin(op, **kw)
