"""A lean HTTP/1.1 load client for bench/gateway.py: asyncio protocol + httptools' C parser on uvloop.

The load generator shares the 2 vCPUs with the servers it measures, so it must cost as little as
possible per request and exactly the same for every target. A request is pre-encoded bytes written on
a keep-alive connection; the response is parsed by ``httptools`` (llhttp) and timed with
``perf_counter``:

* ``ttfb``: from just before the request is written to the first byte of the response *body*
  (for a stream, the first SSE event); headers alone do not count;
* ``total``: to the end of the response (``on_message_complete``: the last chunk of a chunked body
  or the last byte of a ``Content-Length`` body), i.e. time to last byte.

The body is kept (a list of byte strings) so that the caller can check it; joining and parsing it is
the caller's business and happens outside the timed span.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httptools


@dataclass(slots=True)
class Result:
    status: int
    ttfb: float  # seconds
    total: float  # seconds
    body: list[bytes]
    start: float  # perf_counter at write


class ConnectionClosed(ConnectionError):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.future: asyncio.Future[Result] | None = None
        self.body: list[bytes] = []
        self.start = 0.0
        self.first = 0.0
        self.keep_alive = True
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionClosed("connection closed by the server"))

    # -- httptools callbacks
    def on_body(self, body: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()
        self.body.append(body)

    def on_message_complete(self) -> None:
        end = time.perf_counter()
        self.keep_alive = self.parser.should_keep_alive()
        future, self.future = self.future, None
        if future is not None and not future.done():
            first = self.first or end
            status = self.parser.get_status_code()
            future.set_result(Result(status, first - self.start, end - self.start, self.body, self.start))

    def _fail(self, exc: BaseException) -> None:
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_exception(exc)

    # -- API
    def send(self, request: bytes) -> asyncio.Future[Result]:
        assert self.transport is not None
        assert self.future is None
        loop = asyncio.get_running_loop()
        self.future = loop.create_future()
        self.body = []
        self.first = 0.0
        self.start = time.perf_counter()
        self.transport.write(request)
        return self.future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Endpoint:
    """Where requests go: host, port, path prefix, fixed headers; builds and sends requests."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.headers = {"Host": f"{host}:{port}", **headers}

    def request(self, body: bytes, path: str | None = None) -> bytes:
        lines = [f"POST {path or self.path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(lines).encode() + body

    async def connect(self) -> Client:
        client = Client(self)
        await client.reconnect()
        return client


class Client:
    """A connection that reconnects (outside the timed span) when the server closed the last one."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: Connection | None = None
        self.reconnects = -1

    async def reconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(Connection, self.endpoint.host, self.endpoint.port)
        self.conn = protocol
        self.reconnects += 1

    async def send(self, request: bytes) -> Result:
        if self.conn is None or self.conn.closed or not self.conn.keep_alive:
            await self.reconnect()
        assert self.conn is not None
        return await self.conn.send(request)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
