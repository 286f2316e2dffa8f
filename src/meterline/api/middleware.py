"""Pure-ASGI middleware (cheaper than BaseHTTPMiddleware): request ids and a request body size limit."""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meterline import ids
from meterline.api.errors import envelope

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _TooLarge(StarletteHTTPException):
    """An HTTPException so that FastAPI's body parsing passes it through to the envelope handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes; send smaller batches")


class RequestContext:
    """Gives every request an id (``X-Request-Id``, echoed when the client sent a sane one) and refuses
    bodies over ``max_body_bytes`` with 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ids.request_id()
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _CLIENT_REQUEST_ID.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await self._refuse(scope, receive, send, request_id)
                    return
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _TooLarge(self.max_body_bytes)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send, request_id)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        response = envelope(
            413,
            "payload_too_large",
            f"request body is larger than {self.max_body_bytes} bytes; send smaller batches",
            request_id=request_id,
            headers={"X-Request-Id": request_id, "Connection": "close"},
        )
        await response(scope, receive, send)
