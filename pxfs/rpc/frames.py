"""Framing on the data port: a 4-byte big-endian length, then that many bytes
of msgpack holding a map.  Requests are ``{"op": str, "id": int, ...}``;
replies ``{"id": int, "ok": True, ...}`` or ``{"id", "ok": False, "err":
<error class name>, "msg": str}``.  Frames over MAX_FRAME, or whose body is
not a map, are malformed: the connection carrying them is closed.
"""

from __future__ import annotations

import struct

import trio

from .. import MAX_FRAME, codec
from ..errors import FrameError, InvalidArgument, PeerUnavailable

_LEN = struct.Struct(">I")


def encode(msg: dict) -> bytes:
    body = codec.pack(msg)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class FrameReader:
    def __init__(self, stream: trio.abc.ReceiveStream):
        self._stream = stream
        self._buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            try:
                chunk = await self._stream.receive_some(max(65536, n - len(self._buf)))
            except (trio.BrokenResourceError, OSError) as exc:
                raise PeerUnavailable(f"connection broken: {exc}") from exc
            if not chunk:
                if self._buf:
                    raise FrameError("connection closed inside a frame")
                return False
            self._buf += chunk
        return True

    async def receive(self) -> dict | None:
        """The next frame's map, or None at a clean end of stream."""
        if not await self._fill(4):
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        if not await self._fill(4 + n):
            raise FrameError("connection closed inside a frame")
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        try:
            msg = codec.unpack(body)
        except InvalidArgument as exc:
            raise FrameError(str(exc)) from None
        if not isinstance(msg, dict):
            raise FrameError("frame body is not a map")
        return msg
