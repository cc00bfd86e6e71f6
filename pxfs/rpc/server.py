"""The data-port server: reads requests, calls ``handler(op, msg)`` and writes
its reply.  A malformed frame closes that connection only."""

from __future__ import annotations

import logging

import trio

from ..errors import FrameError, PxfsError, RpcError
from .frames import FrameReader, send

log = logging.getLogger(__name__)


class FollowUp:
    """A handler's answer that is sent now, followed on the same connection
    by the reply ``then()`` makes (same id), before the next request on it
    is read: a write acknowledged when applied, then again when durable."""
    __slots__ = ("reply", "then")

    def __init__(self, reply: dict, then):
        self.reply, self.then = reply, then


class RpcServer:
    def __init__(self, host: str, port: int, handler):
        self.host, self.port, self._handler = host, port, handler
        self.frames_rejected = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        await trio.serve_tcp(self._serve, self.port, host=self.host, task_status=task_status)

    async def _serve(self, stream: trio.SocketStream) -> None:
        reader = FrameReader(stream)
        try:
            while True:
                try:
                    msg = await reader.receive()
                except FrameError as exc:
                    self.frames_rejected += 1
                    log.info("closing data connection: %s", exc)
                    return
                if msg is None:
                    return
                rid = msg.get("id")
                op = msg.get("op")
                if not isinstance(op, str) or not isinstance(rid, int) or isinstance(rid, bool) \
                        or not 0 <= rid < 1 << 64:
                    self.frames_rejected += 1
                    log.info("closing data connection: request without op/id")
                    return
                reply = await self._answer(op, rid, self._handler, op, msg)
                then = None
                if isinstance(reply, FollowUp):
                    reply, then = reply.reply, reply.then
                    reply.update(id=rid, ok=True)
                await send(reader.wire, reply)
                if then is not None:
                    await send(reader.wire, await self._answer(op, rid, then))
        except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _answer(op: str, rid: int, fn, *args):
        try:
            reply = await fn(*args) or {}
            if not isinstance(reply, FollowUp):
                reply.update(id=rid, ok=True)
            return reply
        except PxfsError as exc:
            return {"id": rid, "ok": False, "err": type(exc).__name__, "msg": str(exc)}
        except Exception as exc:      # a bug: loud, but only this request fails
            log.exception("data-port request %s failed unexpectedly", op)
            return {"id": rid, "ok": False, "err": "PxfsError", "msg": f"internal error: {exc}"}
