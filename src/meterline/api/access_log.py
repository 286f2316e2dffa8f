"""The access log: one JSON line per request to a metered endpoint (one that writes ledger rows: the
gateway, ``POST /v1/events``, ``POST /v1/reservations/{id}/settle``), on the ``meterline.access`` logger.

A line is written for every such request, refused (429) or failed ones included, when the request is
over (a stream: after its settle). Its fields are ids, the model, the status, what the request added to
the ledger (rows, tokens, cost) and its duration — never a key, a header or a body. Handlers add what
only they know with :func:`note_model` and :func:`note_row`; both cost nothing while the logger is off,
and so does :class:`AccessLog` (no per-request state is made).

Nothing is configured at import: ``meterline serve`` calls :func:`configure_access_log` with the
``access_log`` setting (``stderr``, ``stdout``, ``off`` or a file path). Lines are written by a
background thread, so a slow reader of stderr never blocks the event loop.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meterline.clock import Clock, rfc3339
from meterline.metering.records import LedgerRow
from meterline.money import format_nanos
from meterline.tenancy import Principal

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when telemetry is on
    from meterline.api.telemetry import GatewayTelemetry

access_log = logging.getLogger("meterline.access")

# The gateway's metered endpoints. Their bodies are relayed to an upstream as the client wrote them, so
# the text rule checks only the fields the gateway stores there (api.middleware, gateway.wire).
GATEWAY_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/audio/transcriptions",
        "/v1/messages",
    }
)
_METERED = GATEWAY_PATHS | {"/v1/events"}
_SETTLE = re.compile(r"^/v1/reservations/[^/]+/settle$")
_UNSET = object()  # a model not yet seen (``None`` is a row without a model)
# The status of a request whose client left before it was read whole (nginx's "client closed request"):
# nothing was answered, so no status was sent.
CLIENT_CLOSED = 499


def is_metered(path: str) -> bool:
    return path in _METERED or _SETTLE.match(path) is not None


@dataclass(slots=True)
class AccessEntry:
    """What one metered request added to the ledger, filled in by its handler."""

    model: object = _UNSET
    provider: object = _UNSET
    upstream: str | None = None
    failover: bool | None = None
    ended: str | None = None
    rows: int = 0
    tokens: int = 0
    cost_nanos: int = 0
    currency: str | None = None
    requested: str | None = None  # the model the client asked for
    last: LedgerRow | None = None  # the request's (last) row, for its telemetry span

    def see_model(self, model: str | None) -> None:
        # One model for the request, or none when a batch names several.
        if self.requested is None:
            self.requested = model
        self.model = model if self.model in (_UNSET, model) else None

    def add(self, row: LedgerRow) -> None:
        self.see_model(row.model)
        self.provider = row.provider if self.provider in (_UNSET, row.provider) else None
        self.last = row
        self.rows += 1
        self.tokens += row.total_tokens
        self.cost_nanos += row.cost_nanos
        self.currency = row.currency


def _entry(request: Request) -> AccessEntry | None:
    entry: AccessEntry | None = request.scope.get("state", {}).get("access")
    return entry


def note_model(request: Request, model: str | None) -> None:
    """The model a request asked for (so a refused or failed request's line names it too)."""
    entry = _entry(request)
    if entry is not None:
        entry.see_model(model)


def note_row(
    request: Request,
    row: LedgerRow,
    *,
    upstream: str | None = None,
    ended: str | None = None,
) -> None:
    """A ledger row this request wrote (not one it answered again as a repeat)."""
    entry = _entry(request)
    if entry is None:
        return
    entry.add(row)
    if upstream is not None:
        entry.upstream = upstream
        entry.failover = row.failover
    if ended is not None:
        entry.ended = ended


class AccessLog:
    """ASGI middleware writing the line; outermost, so refusals answered by other middleware (413, bad
    text) and unexpected errors get their line too."""

    def __init__(self, app: ASGIApp, *, clock: Clock, telemetry: GatewayTelemetry | None = None) -> None:
        self.app = app
        self.clock = clock
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_metered(scope["path"]):
            await self.app(scope, receive, send)
            return
        logged = access_log.isEnabledFor(logging.INFO)
        traced = self.telemetry is not None and scope["path"] in GATEWAY_PATHS
        if not (logged or traced):
            await self.app(scope, receive, send)
            return
        entry = AccessEntry()
        state = scope.setdefault("state", {})
        state["access"] = entry
        arrived = self.clock.now()
        started = time.perf_counter()
        started_ns = time.time_ns()
        status = 500
        request_id: str | None = None

        async def observed(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            if state.get("client_closed"):
                status = CLIENT_CLOSED
            if traced:
                self._trace(scope, state, entry, status, started_ns, started, request_id)
            if logged:
                self._log(scope, state, entry, status, arrived, started, request_id)

    def _trace(
        self,
        scope: Scope,
        state: dict[str, Any],
        entry: AccessEntry,
        status: int,
        started_ns: int,
        started: float,
        request_id: str | None,
    ) -> None:
        assert self.telemetry is not None
        principal: Principal | None = state.get("principal")
        try:
            self.telemetry.record(
                path=scope["path"],
                status=status,
                start_ns=started_ns,
                end_ns=time.time_ns(),
                # From the monotonic clock: a step of the wall clock never makes a duration negative.
                duration_s=time.perf_counter() - started,
                requested_model=entry.requested,
                row=entry.last,
                upstream=entry.upstream,
                ids={
                    "request_id": request_id or state.get("request_id"),
                    "organization_id": state.get("organization_id")
                    or (principal.organization_id if principal else None),
                    "workspace_id": principal.workspace_id if principal else None,
                },
            )
        except Exception:
            # Telemetry never fails a request that has already been answered.
            logging.getLogger("meterline.telemetry").exception("recording a gateway span failed")

    @staticmethod
    def _log(
        scope: Scope,
        state: dict[str, Any],
        entry: AccessEntry,
        status: int,
        arrived: datetime,
        started: float,
        request_id: str | None,
    ) -> None:
        line = {
            "ts": rfc3339(arrived),
            "request_id": request_id or state.get("request_id"),
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            **_who(state.get("principal"), state.get("organization_id")),
            "model": None if entry.model is _UNSET else entry.model,
            "provider": None if entry.provider is _UNSET else entry.provider,
            "upstream": entry.upstream,
            "failover": entry.failover,
            "ended": entry.ended,
            "rows": entry.rows,
            "tokens": entry.tokens,
            "cost": format_nanos(entry.cost_nanos),
            "currency": entry.currency,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        access_log.info(orjson.dumps(line).decode())


def _who(principal: Principal | None, organization_id: str | None) -> dict[str, Any]:
    if principal is None:  # refused before authentication said who it was
        return {"organization_id": organization_id, "workspace_id": None, "key_prefix": None}
    return {
        "organization_id": principal.organization_id,
        "workspace_id": principal.workspace_id,
        "key_prefix": principal.key_prefix,
    }


def configure_access_log(destination: str) -> Callable[[], None]:
    """Point the access log at ``stderr``, ``stdout`` or a file (appended), or turn it ``off``; returns
    the function that flushes and closes it. Lines are the bare JSON (no level or logger prefix) and do
    not reach the root logger."""
    for handler in list(access_log.handlers):
        access_log.removeHandler(handler)
    access_log.propagate = False
    if destination == "off":
        access_log.setLevel(logging.CRITICAL + 1)
        return lambda: None
    target: logging.Handler
    if destination in ("stderr", "stdout"):
        target = logging.StreamHandler(sys.stderr if destination == "stderr" else sys.stdout)
    else:
        # Reopened when rotated away (logrotate) rather than written to a deleted file.
        target = logging.handlers.WatchedFileHandler(destination, encoding="utf-8")
    target.setFormatter(logging.Formatter("%(message)s"))
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.handlers.QueueHandler(lines)
    listener = logging.handlers.QueueListener(lines, target)
    listener.start()
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)

    def close() -> None:
        access_log.removeHandler(handler)
        listener.stop()  # writes what is queued first
        target.close()

    return close
