"""Framing on the data port: a 4-byte big-endian length, then that many bytes
of msgpack holding a map.  A frame whose length has the top bit set carries
a large ``data`` field raw: the length (flag cleared) is followed by a 4-byte
header length, the msgpack map without ``data``, then the data.  Requests are ``{"op": str, "id": int, ...}``;
replies ``{"id": int, "ok": True, ...}`` or ``{"id", "ok": False, "err":
<error class name>, "msg": str}``.  Frames over MAX_FRAME, or whose body is
not a map, are malformed: the connection carrying them is closed.
"""

from __future__ import annotations

import struct

import trio

from .. import MAX_FRAME, codec
from ..errors import FrameError, InvalidArgument, PeerUnavailable
from .wire import Wire

_LEN = struct.Struct(">I")
_RAW = 0x80000000          # length flag: a header length and a raw payload follow
RAW_MIN = 4096             # payloads from this size travel outside msgpack
#: a raw payload up to this size is joined to its header: one send, one
#: segment, one wakeup of the receiver (a copy of it costs less than that)
JOIN_MAX = 64 * 1024


def encode_parts(msg: dict) -> tuple[bytes, bytes | None]:
    """(head, payload): a large ``data`` field is sent raw after the msgpack
    header, so neither side copies it through msgpack."""
    data = msg.get("data")
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) >= RAW_MIN:
        head = codec.pack({k: v for k, v in msg.items() if k != "data"})
        total = 4 + len(head) + len(data)
        if total > MAX_FRAME:
            raise FrameError(f"frame of {total} bytes exceeds {MAX_FRAME}")
        return _LEN.pack(_RAW | total) + _LEN.pack(len(head)) + head, data
    body = codec.pack(msg)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body, None


def encode_wire(msg: dict) -> tuple[bytes, bytes | None]:
    """encode_parts, with a small payload already joined to its head."""
    head, payload = encode_parts(msg)
    if payload is not None and len(payload) <= JOIN_MAX:
        return head + payload, None
    return head, payload


def encode(msg: dict) -> bytes:
    head, payload = encode_parts(msg)
    return head + bytes(payload) if payload is not None else head


async def send(wire: Wire, msg: dict) -> None:
    head, payload = encode_wire(msg)
    if payload is None:
        await wire.send_all(head)
    else:
        await wire.send_parts((head, payload))


_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: a frame whose first bytes came must be whole within this many seconds: a
#: peer that stops inside one (a bug, a half-dead host, a slowloris) does not
#: hold a server task and its buffer for ever
FRAME_TIMEOUT = 30.0


class FrameReader:
    def __init__(self, stream):
        self.wire = self._wire = stream if isinstance(stream, Wire) else Wire(stream)
        self._buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            try:
                chunk = await self._wire.receive_some(max(65536, n - len(self._buf)))
            except _BROKEN as exc:
                raise PeerUnavailable(f"connection broken: {exc}") from exc
            if not chunk:
                if self._buf:
                    raise FrameError("connection closed inside a frame")
                return False
            self._buf += chunk
        return True

    async def _read_payload(self, n: int) -> bytearray:
        """Exactly n bytes, received straight into one buffer when possible."""
        out = bytearray(n)
        have = min(n, len(self._buf))
        out[:have] = self._buf[:have]
        del self._buf[:have]
        view = memoryview(out)
        while have < n:
            try:
                got = await self._wire.receive_into(view[have:])
            except _BROKEN as exc:
                raise PeerUnavailable(f"connection broken: {exc}") from exc
            if not got:
                raise FrameError("connection closed inside a frame")
            have += got
        return out

    def has_frame(self) -> bool:
        """Whether a whole frame is here, taking what the socket holds
        without waiting: ``receive`` then returns it without waiting."""
        got = self._wire.read_now(65536)
        if got:
            self._buf += got
        return self._whole()

    def _whole(self) -> bool:
        """Whether the buffer holds a whole frame."""
        buf = self._buf
        return len(buf) >= 4 and len(buf) >= 4 + (_LEN.unpack_from(buf)[0] & ~_RAW)

    async def receive(self) -> dict | None:
        """The next frame's map, or None at a clean end of stream.  Between
        frames it waits as long as it takes; inside one, FRAME_TIMEOUT."""
        if not self._buf and not await self._fill(1):
            return None
        if self._whole():
            return await self._receive()        # all here (the common case): no timer
        with trio.move_on_after(FRAME_TIMEOUT):
            return await self._receive()
        raise FrameError(f"frame not complete after {FRAME_TIMEOUT:.0f} s")

    async def _receive(self) -> dict:
        if not await self._fill(4):
            raise FrameError("connection closed inside a frame")
        (n,) = _LEN.unpack_from(self._buf)
        raw, n = bool(n & _RAW), n & ~_RAW
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        payload = None
        if raw:
            if not await self._fill(8):
                raise FrameError("connection closed inside a frame")
            (hlen,) = _LEN.unpack_from(self._buf, 4)
            if hlen > n - 4:
                raise FrameError("frame header longer than the frame")
            if not await self._fill(8 + hlen):
                raise FrameError("connection closed inside a frame")
            body = bytes(self._buf[8:8 + hlen])
            del self._buf[:8 + hlen]
            payload = await self._read_payload(n - 4 - hlen)
        else:
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
        if payload is not None:
            if "data" in msg:
                raise FrameError("frame has data twice")
            msg["data"] = payload
        await self._wire.fair()     # frames already buffered cost no I/O, still count
        return msg
