"""Socket I/O for the data port with as few trips through trio's scheduler
as possible.

trio's SocketStream yields to the scheduler after every successful send and
receive; on a small VM one scheduler round costs ~10-20 us, and a replicated
4 KiB write makes several of them per round trip.  Wire tries the system
call first and waits for readiness only when it would block, which is what
the data path spends its time on (a reply to a small request is usually
already there or arrives within one wait).  To stay fair to the other tasks
of the node, it still yields once every ``YIELD_EVERY`` calls that did not
wait.  Streams that are not sockets (tests' memory streams) use the stream
API as it is.
"""

from __future__ import annotations

import os

import trio

YIELD_EVERY = 16


class Wire:
    def __init__(self, stream):
        self.stream = stream
        sock = getattr(stream, "socket", None)
        self.fd = sock.fileno() if sock is not None else None
        self._streak = 0

    async def fair(self) -> None:
        """Count one call that did not wait; yield once every YIELD_EVERY."""
        self._streak += 1
        if self._streak >= YIELD_EVERY:
            self._streak = 0
            await trio.lowlevel.checkpoint()

    async def _read(self, call, arg):
        """``call(fd, arg)`` once the socket has something to give."""
        while True:
            try:
                got = call(self.fd, arg)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self.fd)
                continue
            await self.fair()
            return got

    def read_now(self, n: int) -> bytes | None:
        """Up to ``n`` bytes the socket holds now: None if it holds none
        (or this is not a socket), b"" at the end of the stream."""
        if self.fd is None:
            return None
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            return None

    async def receive_some(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end of the stream."""
        if self.fd is None:
            return await self.stream.receive_some(n)
        return await self._read(os.read, n)

    async def receive_into(self, view: memoryview) -> int:
        if self.fd is None:
            chunk = await self.stream.receive_some(len(view))
            view[:len(chunk)] = chunk
            return len(chunk)
        return await self._read(os.readv, [view])

    async def send_parts(self, parts) -> None:
        """Send the buffers in order, in one system call when the socket
        takes them (a frame's header and its raw payload)."""
        if self.fd is None:
            for p in parts:
                await self.stream.send_all(p)
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            try:
                n = os.writev(self.fd, views)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_writable(self.fd)
                continue
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0], n = views[0][n:], 0
        await self.fair()

    async def send_all(self, data) -> None:
        await self.send_parts((data,))
