"""Pure-ASGI middleware (cheaper than BaseHTTPMiddleware): request ids, a request body size limit, the
text rule (``meterline.text``) for headers, query parameters and JSON or form bodies, and the last word
on any exception (an envelope, never a dropped connection)."""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meterline import ids, text
from meterline.api.errors import envelope, unexpected_error

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A JSON string can only carry NUL or a surrogate as an escape; bodies without one skip the parse.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_MAX_QUERY_VALUE = 4096
log = logging.getLogger("meterline.api")


class _BadText(Exception):
    def __init__(self, param: str, reason: str) -> None:
        self.param = param
        self.reason = reason


def _check_form(encoded: str, what: str) -> None:
    """Query strings and urlencoded forms: every name and value."""
    for name, value in parse_qsl(encoded, keep_blank_values=True):
        reason = text.problem(name, 256)
        if reason is not None:
            raise _BadText(text.clean(name)[:64], f"{what} parameter name {reason}")
        reason = text.problem(value, _MAX_QUERY_VALUE)
        if reason is not None:
            raise _BadText(name, f"{what} parameter {name!r} {reason}")


def _check_json(body: bytes) -> None:
    if not _SUSPECT_ESCAPE.search(body):
        return
    found = text.find_in_json(body)  # not JSON at all: the route's own parsing says so
    if found is not None:
        param, reason = found
        raise _BadText(param, f"{param or 'body'} {reason}")


class _TooLarge(StarletteHTTPException):
    """An HTTPException so that FastAPI's body parsing passes it through to the envelope handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes; send smaller batches")


class RequestContext:
    """Gives every request an id (``X-Request-Id``, echoed when the client sent a sane one) and refuses
    bodies over ``max_body_bytes`` with 413 before they are read into memory."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, passthrough: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Paths whose JSON body is relayed, not stored (the gateway): only the fields it reads are checked,
        # by the gateway itself, so a prompt is passed on as the client wrote it.
        self.passthrough = passthrough

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ids.request_id()
        content_type = b""
        for name, value in scope["headers"]:
            if b"\x00" in value:
                reason = f"header {name.decode('latin-1')} must not contain NUL characters"
                await self._bad_text(scope, receive, send, request_id, name.decode("latin-1"), reason)
                return
            if name == b"content-type":
                # The first one, as the routes read it: a later one must not steer the check away.
                content_type = content_type or value
            elif name == b"x-request-id":
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
        try:
            path_problem = text.problem(scope["path"], None)
            if path_problem is not None:  # ids in paths are stored and looked up like any other text
                raise _BadText("path", f"the path {path_problem}")
            _check_form(scope.get("query_string", b"").decode("latin-1"), "query")
            receive = await self._checked_body(scope, receive, content_type)
        except ClientDisconnect:
            _client_left(scope)
            return
        except _BadText as bad:
            await self._bad_text(scope, receive, send, request_id, bad.param, bad.reason)
            return
        except _TooLarge:
            await self._refuse(scope, receive, send, request_id)
            return

        read_whole = False

        async def limited_receive() -> Message:
            nonlocal received, read_whole
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _TooLarge(self.max_body_bytes)
                read_whole = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not (read_whole or started):
                # A body the route reads itself: FastAPI's parsing turns the disconnect into a 400 that
                # nobody receives; the access log and the server's log are told the truth here.
                _client_left(scope)
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
        except ClientDisconnect:
            if not started:  # a route reading the body; once answering, a disconnect ends the response
                _client_left(scope)
        except Exception as exc:
            # Handled here rather than by Starlette's ServerErrorMiddleware, which re-raises after
            # answering: the server then closes the connection, resetting the client's next request.
            response = unexpected_error(scope, exc, request_id, answered=not started)
            if not started:
                await response(scope, receive, send_with_id)

    async def _checked_body(self, scope: Scope, receive: Receive, content_type: bytes) -> Receive:
        """Reads a JSON or form body whole (it is anyway, by the route) to apply the text rule, and
        hands the route a ``receive`` that replays it. Other bodies (multipart audio) pass untouched."""
        kind = content_type.split(b";", 1)[0].strip().lower()
        is_json = kind == b"application/json" or kind.endswith(b"+json")
        is_form = kind == b"application/x-www-form-urlencoded"
        if not (is_json or is_form) or scope["path"] in self.passthrough:
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            if message["type"] != "http.request":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge(self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if is_json:
            _check_json(body)
        else:
            _check_form(body.decode("utf-8", "replace"), "form")
        return _replay([{"type": "http.request", "body": body, "more_body": False}], receive)

    async def _bad_text(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, param: str, reason: str
    ) -> None:
        response = envelope(
            400,
            "invalid_request",
            reason,
            param=text.clean(param)[:128] or None,
            request_id=request_id,
            headers={"X-Request-Id": request_id},
        )
        await response(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        response = envelope(
            413,
            "payload_too_large",
            f"request body is larger than {self.max_body_bytes} bytes; send smaller batches",
            request_id=request_id,
            headers={"X-Request-Id": request_id, "Connection": "close"},
        )
        await response(scope, receive, send)


def _client_left(scope: Scope) -> None:
    """The client closed its connection before its request was read whole (a timeout, a crash, a
    cancelled call): nobody is left to answer and nothing was recorded. Not a server error, so one quiet
    line instead of a 500's traceback; the access log says 499 (``access_log.CLIENT_CLOSED``)."""
    state = scope.setdefault("state", {})
    if state.get("client_closed"):
        return  # said already (the route saw the disconnect, then raised it)
    state["client_closed"] = True
    log.info(
        "%s %s: the client closed the connection before its request was read; nothing was answered or "
        "recorded",
        scope.get("method"),
        scope.get("path"),
    )


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that gives ``messages`` first, then waits on the connection (for a disconnect)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
