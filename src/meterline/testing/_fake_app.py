"""The fake upstream as a raw ASGI app: routing, auth, modes, the scripted queue and the request log.

Raw ASGI rather than a framework because this app is the upstream of the gateway's latency benchmark:
a request costs a dict lookup, one JSON parse and one JSON dump.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson

from meterline.testing import _fake_anthropic as anthropic
from meterline.testing import _fake_openai as openai
from meterline.testing._fake_common import MODES, Exchange, JsonBody, StreamBody, merged_params, replay

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Exchange, str, Mapping[str, Any]], JsonBody | StreamBody]

# path -> (method, provider, handler, subject to modes)
ROUTES: Mapping[str, tuple[str, str, Handler, bool]] = {
    "/v1/chat/completions": ("POST", "openai", openai.chat, True),
    "/v1/completions": ("POST", "openai", openai.completions, True),
    "/v1/embeddings": ("POST", "openai", openai.embeddings, True),
    "/v1/responses": ("POST", "openai", openai.responses, True),
    "/v1/audio/transcriptions": ("POST", "openai", openai.transcriptions, True),
    # Listing models is what health checks call: it always answers, and never eats a scripted mode.
    "/v1/models": ("GET", "openai", openai.models, False),
    "/v1/messages": ("POST", "anthropic", anthropic.messages, True),
    "/v1/messages/count_tokens": ("POST", "anthropic", anthropic.count_tokens, True),
}
# Azure OpenAI's shapes of the same endpoints: ``/openai/deployments/{deployment}/chat/completions`` ...
# and ``/openai/responses``, ``/openai/models``; all want ``?api-version=`` and the key as ``api-key``.
_AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/[^/]+(/.+)$")
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class CutConnection(Exception):
    """Raised mid-response on purpose: uvicorn then closes the socket without ending the body."""


class InvalidControl(ValueError):
    pass


def _azure_route(path: str) -> str:
    """The OpenAI path an Azure OpenAI path stands for (``/openai/deployments/d/chat/completions`` ->
    ``/v1/chat/completions``); unknown shapes map to themselves (a 404)."""
    found = _AZURE_DEPLOYMENT.match(path)
    if found is not None:
        return "/v1" + found.group(1)
    if path in ("/openai/responses", "/openai/models"):
        return "/v1" + path.removeprefix("/openai")
    return path


def check_behaviour(mode: Any, params: Any) -> tuple[str, dict[str, Any]]:
    if mode not in MODES:
        raise InvalidControl(f"unknown mode {mode!r}; modes: {', '.join(sorted(MODES))}")
    if not isinstance(params, dict):
        raise InvalidControl("params must be a JSON object")
    return str(mode), params


class FakeState:
    """The mutable part of the server: default behaviour, scripted queue (FIFO), bounded request log."""

    def __init__(
        self, api_key: str | None, mode: str, params: Mapping[str, Any], base: Mapping[str, Any], history: int
    ) -> None:
        self.api_key = api_key
        self.base = dict(base)  # server-wide parameters (from the command line) under every behaviour
        self.initial = check_behaviour(mode, dict(params))
        self.default = self.initial
        self.queue: deque[list[Any]] = deque()  # [mode, params, remaining]
        self.records: deque[dict[str, Any]] = deque(maxlen=history)
        self.numbers = itertools.count(1)

    def take(self) -> tuple[str, dict[str, Any]]:
        if self.queue:
            head = self.queue[0]
            head[2] -= 1
            if head[2] <= 0:
                self.queue.popleft()
            mode, params = head[0], head[1]
        else:
            mode, params = self.default
        return mode, merged_params(mode, {**self.base, **params})

    def authorized(self, headers: Mapping[str, str], *, azure: bool = False) -> bool:
        if self.api_key is None:
            return True
        if azure:  # Azure OpenAI takes its key in ``api-key`` only
            return headers.get("api-key") == self.api_key
        return (
            headers.get("authorization") == f"Bearer {self.api_key}"
            or headers.get("x-api-key") == self.api_key
        )


class Peer:
    """Notices the client going away, but only once someone waits: the fast path starts no task."""

    __slots__ = ("_gone", "_receive", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._gone: asyncio.Event | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def _watch(self, gone: asyncio.Event) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        gone.set()

    def _started(self) -> asyncio.Event:
        if self._gone is None:
            self._gone = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._gone))
        return self._gone

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False if the client disconnected meanwhile (or before)."""
        if seconds <= 0:
            return self._gone is None or not self._gone.is_set()
        gone = self._started()
        try:
            async with asyncio.timeout(seconds):
                await gone.wait()
        except TimeoutError:
            return True
        return False

    async def until_gone(self) -> None:
        await self._started().wait()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    start = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


def _form_summary(content_type: str, body: bytes) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, part in openai.parse_form(content_type, body).items():
        filename = part.get_filename()
        if filename is None:
            summary[name] = openai.field_text(part)
        else:
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            summary[name] = {"filename": filename, "content_type": part.get_content_type(), "size": size}
    return summary


class FakeUpstreamApp:
    def __init__(self, state: FakeState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].startswith("/_fake/"):
            await self._control(scope, receive, send)
        else:
            await self._api(scope, receive, send)

    # -- the provider API ------------------------------------------------------------------------------

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        body = await read_body(receive)
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        path: str = scope["path"].rstrip("/") or "/"
        method: str = scope["method"]
        content_type = headers.get("content-type", "")
        multipart = content_type.startswith("multipart/")
        number = next(state.numbers)
        parsed: Any = None
        if body and not multipart:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
        record: dict[str, Any] = {
            "number": number,
            "method": method,
            "path": path,
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "content_type": content_type,
            "body_size": len(body),
            # Kept as received (not re-serialized) so a test can compare bytes; uploads are summarized.
            "body": None if multipart else body,
            "json": parsed,
            "form": _form_summary(content_type, body) if multipart else None,
            "mode": None,
            "params": {},
            "status": None,
            "pieces_sent": 0,
            "outcome": "pending",
        }
        state.records.append(record)
        provider = "anthropic" if path.startswith("/v1/messages") else "openai"
        azure = path.startswith("/openai/")
        route = ROUTES.get(_azure_route(path) if azure else path)
        if route is None:
            await self._error(send, record, provider, 404, f"Unknown path {path}")
            return
        route_method, provider, handler, moded = route
        if method != route_method:
            await self._error(send, record, provider, 405, None)
            return
        if azure and "api-version=" not in record["query"]:
            await self._error(send, record, provider, 404, "Resource not found: the api-version is missing")
            return
        if not state.authorized(headers, azure=azure):
            await self._error(send, record, provider, 401, None)
            return
        if handler is openai.models and "anthropic-version" in headers:
            handler = anthropic.models  # Anthropic's list at the same path
        if not multipart and route_method == "POST" and not isinstance(parsed, dict):
            await self._error(send, record, provider, 400, "The body must be a JSON object.")
            return
        mode, params = state.take() if moded else ("ok", merged_params("ok", state.base))
        record["mode"], record["params"] = mode, params
        exchange = Exchange(method, path, headers, body, parsed, number, int(time.time()))
        peer = Peer(receive)
        try:
            await self._answer(send, peer, record, provider, handler, exchange, mode, params)
        finally:
            peer.close()

    async def _answer(
        self,
        send: Send,
        peer: Peer,
        record: dict[str, Any],
        provider: str,
        handler: Handler,
        exchange: Exchange,
        mode: str,
        params: Mapping[str, Any],
    ) -> None:
        if mode == "hang":
            await peer.until_gone()
            record["outcome"] = "disconnected"
            return
        if not await peer.pause(float(params["delay_ms"]) / 1000):
            record["outcome"] = "disconnected"
            return
        if mode == "status":
            code = int(params["code"])
            extra = [(b"retry-after", str(params["retry_after"]).encode())] if code == 429 else []
            await self._error(send, record, provider, code, params.get("message"), extra)
            return
        answer = replay(exchange, params) if mode == "replay" else handler(exchange, mode, params)
        if isinstance(answer, JsonBody):
            await self._send_whole(send, record, provider, answer, cut=mode == "cut")
        else:
            cut_after = int(params["after"]) if mode == "cut" else None
            await self._stream(send, peer, record, provider, answer, params, cut_after)

    def _id_headers(self, record: Mapping[str, Any], provider: str) -> list[tuple[bytes, bytes]]:
        request_id = f"req_fake{record['number']}".encode()
        name = b"request-id" if provider == "anthropic" else b"x-request-id"
        return [(name, request_id)]

    async def _send_whole(
        self, send: Send, record: dict[str, Any], provider: str, answer: JsonBody, cut: bool
    ) -> None:
        record["status"] = answer.status
        headers = [*answer.headers, *self._id_headers(record, provider)]
        if not cut:
            await send_json(send, answer.status, answer.body, headers)
            record["outcome"] = "completed"
            return
        length = str(len(answer.body)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [*headers, (b"content-length", length)],
            }
        )
        await send(
            {"type": "http.response.body", "body": answer.body[: len(answer.body) // 2], "more_body": True}
        )
        record["outcome"] = "cut"
        raise CutConnection

    async def _stream(
        self,
        send: Send,
        peer: Peer,
        record: dict[str, Any],
        provider: str,
        answer: StreamBody,
        params: Mapping[str, Any],
        cut_after: int | None,
    ) -> None:
        record["status"] = 200
        headers = [*SSE_HEADERS, *self._id_headers(record, provider)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for frame in answer.head:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        gap = float(params["chunk_delay_ms"]) / 1000
        for index in range(answer.count):
            if cut_after is not None and index >= cut_after:
                break
            if gap and not await peer.pause(gap):
                record["outcome"] = "disconnected"
                return
            await send({"type": "http.response.body", "body": answer.piece(index), "more_body": True})
            record["pieces_sent"] = index + 1
        if cut_after is not None:
            record["outcome"] = "cut"
            raise CutConnection
        await send({"type": "http.response.body", "body": b"".join(answer.tail())})
        record["outcome"] = "completed"

    async def _error(
        self,
        send: Send,
        record: dict[str, Any],
        provider: str,
        status: int,
        message: str | None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        record["status"] = status
        record["outcome"] = "completed"
        request_id = f"req_fake{record['number']}"
        if provider == "anthropic":
            body = anthropic.error(status, message, request_id)
        else:
            body = openai.error(status, message)
        headers = [*JSON_HEADERS, *self._id_headers(record, provider), *(extra or [])]
        await send_json(send, status, body, headers)

    # -- the control API (never recorded, never authenticated) -----------------------------------------

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        try:
            answer = self._control_answer(scope["method"], scope["path"], body)
        except (InvalidControl, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            await send_json(send, 400, orjson.dumps({"error": str(exc)}), JSON_HEADERS)
            return
        if answer is None:
            await send_json(send, 404, orjson.dumps({"error": "unknown control endpoint"}), JSON_HEADERS)
            return
        await send_json(send, 200, orjson.dumps(answer, default=_jsonable), JSON_HEADERS)

    def _control_answer(self, method: str, path: str, body: bytes) -> Any:
        state = self.state
        data: Any = orjson.loads(body) if body else {}
        if method == "GET" and path == "/_fake/health":
            return {"ok": True}
        if method == "GET" and path == "/_fake/requests":
            return {"requests": list(state.records)}
        if method == "GET" and path == "/_fake/state":
            queue = [{"mode": m, "params": p, "count": c} for m, p, c in state.queue]
            return {"default": {"mode": state.default[0], "params": state.default[1]}, "queue": queue}
        if method != "POST":
            return None
        if path == "/_fake/script":
            mode, params = check_behaviour(data.get("mode"), data.get("params", {}))
            count = data.get("count", 1)
            if not isinstance(count, int) or count < 1:
                raise InvalidControl("count must be a positive integer")
            state.queue.append([mode, params, count])
            return {"queued": len(state.queue)}
        if path == "/_fake/default":
            state.default = check_behaviour(data.get("mode"), data.get("params", {}))
            return {"ok": True}
        if path in ("/_fake/clear", "/_fake/reset"):
            state.records.clear()
            state.queue.clear()
            if path == "/_fake/reset":
                state.default = state.initial
            return {"ok": True}
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
