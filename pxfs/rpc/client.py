"""Client side of the data port: a small pool of connections per peer, one
request in flight per connection."""

from __future__ import annotations

import itertools
import logging

import trio

from ..errors import FrameError, PeerUnavailable, from_wire
from .frames import FrameReader, encode

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

    async def call(self, op: str, *, timeout: float | None = None, **args) -> dict:
        msg = dict(args, op=op, id=next(_ids))
        frame = encode(msg)
        conn = None
        try:
            with trio.fail_after(timeout or self.timeout):
                conn = self._idle.pop() if self._idle else _Conn(
                    await trio.open_tcp_stream(self.host, self.port))
                await conn.stream.send_all(frame)
                reply = await conn.reader.receive()
        except trio.TooSlowError:
            await self._drop(conn)
            raise PeerUnavailable(f"{self.host}:{self.port} did not answer {op} in time") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, PeerUnavailable, FrameError) as exc:
            await self._drop(conn)
            raise PeerUnavailable(f"{self.host}:{self.port}: {op}: {exc}") from None
        if reply is None or reply.get("id") != msg["id"]:
            await self._drop(conn)
            raise PeerUnavailable(f"{self.host}:{self.port}: {op}: connection closed")
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
