"""A TCP proxy that delays every chunk by a fixed time in each direction, order kept: a database "over the
network" on one machine (no ``tc netem`` here). Event-loop timers have millisecond resolution, so the
delay is whole milliseconds; 1 ms each way gives ~2.5 ms round trips on this VM.

Usage::

    .venv/bin/python bench/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

``bench/workers.py --postgres-delay-ms N`` starts one in front of PostgreSQL.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class _Direction(asyncio.Protocol):
    """What one side sends, written to the other side ``delay`` seconds later."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.to: asyncio.Transport | None = None  # the other side, once connected
        self.queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._forward())

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait((asyncio.get_running_loop().time() + self.delay, data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait((0.0, None))

    async def _forward(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            while self.to is None:
                await asyncio.sleep(0.001)
            if data is None:
                self.to.close()
                return
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.to.write(data)


class _Client(_Direction):
    def __init__(self, delay: float, target: int) -> None:
        super().__init__(delay)
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connecting = asyncio.ensure_future(self._connect(cast(asyncio.Transport, transport)))

    async def _connect(self, client: asyncio.Transport) -> None:
        back = _Direction(self.delay)
        back.to = client
        server, _ = await asyncio.get_running_loop().create_connection(lambda: back, "127.0.0.1", self.target)
        self.to = server


async def _serve(listen: int, target: int, delay: float) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(delay, target), "127.0.0.1", listen
    )
    await server.serve_forever()


if __name__ == "__main__":
    listen_port, target_port, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    uvloop.run(_serve(listen_port, target_port, delay_ms / 1000))
