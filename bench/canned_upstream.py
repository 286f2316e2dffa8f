"""An upstream for the workers benchmark that answers every request with one recorded answer.

``bench/workers.py`` measures how ``meterline serve`` scales from one worker to two on this 2-vCPU
machine, where everything else of the run (the load client, the upstream) takes from the same two cores.
The fake upstream (``meterline.testing.FakeUpstream``: uvicorn and an ASGI app) costs 130 to 190 µs of CPU
per chat completion here, a tenth of the machine beside a gateway request's 1 to 2 ms, and a real
deployment's upstream is another company's machine. This server answers the benchmark's one request with
the bytes the fake answered it once (``record``: status line, headers and body, taken from a running
``FakeUpstream``), on a raw asyncio protocol: ~17 µs of CPU a request. It reads each request whole
(``Content-Length``; keep-alive, pipelined requests answered in order) and checks the bearer key, so the
gateway's traffic is what it would be; it knows nothing else of HTTP (no chunked request bodies).

Run: ``python bench/canned_upstream.py PORT ANSWER_FILE API_KEY`` (``CannedUpstream.start`` does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import cast

import httpx

ROOT = Path(__file__).resolve().parent.parent


class _Answering(asyncio.Protocol):
    def __init__(self, answer: bytes, key: bytes) -> None:
        self._answer = answer
        self._refusal = (
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        )
        self._key = b"bearer " + key
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15 : stop if stop >= 0 else len(head)])
            whole = end + 4 + length
            if len(buffer) < whole:
                break
            out.append(self._answer if self._key in head else self._refusal)
            buffer = buffer[whole:]
        self._buffer = buffer
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


async def _serve(port: int, answer: bytes, key: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Answering(answer, key), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def record(base_url: str, api_key: str, body: bytes) -> bytes:
    """The whole HTTP/1.1 answer (status line, headers, body) ``base_url`` gives ``body`` once, with the
    headers that describe a connection or a moment (date, server) left out and a length set."""
    with httpx.Client(timeout=10) as client:
        got = client.post(
            f"{base_url}/chat/completions",
            content=body,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )
    got.raise_for_status()
    skip = {"date", "server", "content-length", "connection", "transfer-encoding", "keep-alive"}
    lines = [f"HTTP/1.1 {got.status_code} {got.reason_phrase}".encode()]
    lines += [f"{k}: {v}".encode() for k, v in got.headers.items() if k.lower() not in skip]
    lines.append(f"content-length: {len(got.content)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + got.content


class CannedUpstream:
    """A running ``canned_upstream.py`` subprocess (``url`` as ``FakeUpstream.url``, ``process``)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}/v1"

    @classmethod
    def start(cls, port: int, answer: bytes, api_key: str, scratch: Path) -> CannedUpstream:
        answer_file = scratch / "canned-answer.http"
        answer_file.write_bytes(answer)
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__)), str(port), str(answer_file), api_key],
            cwd=ROOT,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if process.poll() is None:  # ours listens (not another process that took the port)
                    return cls(process, port)
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("bench/canned_upstream.py did not start listening")
            time.sleep(0.05)

    def __enter__(self) -> CannedUpstream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    import uvloop

    port, answer_file, key = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].lower().encode()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(port, answer_file.read_bytes(), key))


if __name__ == "__main__":
    main()
