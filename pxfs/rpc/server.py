"""The data-port server: reads requests, calls ``handler(op, msg)`` and writes
its reply.  A malformed frame closes that connection only."""

from __future__ import annotations

import logging

import trio

from ..errors import FrameError, PxfsError, RpcError
from .frames import FrameReader, send

log = logging.getLogger(__name__)


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
                if not isinstance(op, str) or not isinstance(rid, int):
                    self.frames_rejected += 1
                    log.info("closing data connection: request without op/id")
                    return
                try:
                    reply = await self._handler(op, msg) or {}
                    reply.update(id=rid, ok=True)
                except PxfsError as exc:
                    reply = {"id": rid, "ok": False, "err": type(exc).__name__, "msg": str(exc)}
                except Exception as exc:      # a bug: loud, but only this request fails
                    log.exception("data-port request %s failed unexpectedly", op)
                    reply = {"id": rid, "ok": False, "err": "PxfsError", "msg": f"internal error: {exc}"}
                await send(reader.wire, reply)
        except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            await trio.aclose_forcefully(stream)
