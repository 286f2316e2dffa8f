"""The gateway's HTTP side: a thin adapter around the framework-free relay (``meterline.gateway.relay``).

It reads and parses the request, names the caller (authentication, the access log), hands the relay a
``Call`` and turns its ``Reply`` or ``Refusal`` into a response. The six relay endpoints are one plain
ASGI app (``RelayEndpoints``) that the application answers ahead of FastAPI's own layers (see
``meterline.api.app``); ``meterline.api.routes.gateway`` has their FastAPI twins, which OpenAPI
documents.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from meterline.api.access_log import CLIENT_CLOSED, note_model, note_row
from meterline.api.auth import cached_principal, get_principal
from meterline.api.errors import domain_error, envelope, report_failure, request_id_of
from meterline.errors import InvalidRequest, LimitExceeded, MeterlineError
from meterline.gateway import wire
from meterline.gateway.catalog import Catalog
from meterline.gateway.exchange import Exchanges
from meterline.gateway.flavors import Api
from meterline.gateway.metrics import Metrics
from meterline.gateway.relay import Call, Refusal, Relay, Reply
from meterline.gateway.routing import RouteTable
from meterline.gateway.upstream import UPSTREAM_ERRORS, Upstreams
from meterline.metering.records import LedgerRow
from meterline.services import Services
from meterline.storage.outage import is_outage
from meterline.tenancy import Principal
from meterline.tenancy.tokens import TokenService

# The relay endpoints: path -> (API flavour, the same endpoint on an upstream).
ENDPOINTS: dict[str, tuple[Api, str]] = {
    "/v1/chat/completions": ("chat", "/chat/completions"),
    "/v1/completions": ("completions", "/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
    "/v1/responses": ("responses", "/responses"),
    "/v1/audio/transcriptions": ("transcriptions", "/audio/transcriptions"),
    "/v1/messages": ("messages", "/messages"),
}


class _Faults:
    """``relay.Faults`` as the API logs them (``api.errors``: one line per outage episode)."""

    def is_outage(self, exc: BaseException) -> bool:
        return is_outage(exc)

    def report(self, what: str, exc: BaseException) -> bool:
        return report_failure(what, exc)


@dataclass
class Gateway:
    services: Services
    tokens: TokenService
    routes: RouteTable
    upstreams: Upstreams
    metrics: Metrics
    relay: Relay
    catalog: Catalog

    @classmethod
    def build(cls, services: Services, tokens: TokenService, metrics: Metrics) -> Gateway:
        routes = RouteTable(services.settings.upstreams)
        upstreams = Upstreams()
        relay = Relay(
            Exchanges(services),
            routes,
            upstreams,
            metrics,
            _Faults(),
            progress_interval_s=services.settings.stream_progress_interval_ms / 1000,
        )
        listing_errors = (*UPSTREAM_ERRORS, ValueError)
        catalog = Catalog(routes, upstreams.list_models, services.clock.now_us, listing_errors)
        return cls(services, tokens, routes, upstreams, metrics, relay, catalog)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


class _Caller:
    """``relay.Caller`` for one HTTP request: its credentials, and its access-log entry."""

    __slots__ = ("gateway", "request")

    def __init__(self, request: Request, gateway: Gateway) -> None:
        self.request = request
        self.gateway = gateway

    def principal_now(self) -> Principal | None:
        return cached_principal(self.request, self.gateway.services)

    def principal(self) -> Principal:
        return get_principal(self.request, self.gateway.services, self.gateway.tokens)

    def saw_model(self, model: str) -> None:
        note_model(self.request, model)

    def wrote(self, row: LedgerRow, *, upstream: str, ended: str) -> None:
        note_row(self.request, row, upstream=upstream, ended=ended)


async def respond(request: Request, path: str) -> Response:
    """Serve one request to the relay endpoint ``path``. Domain errors are answered here (the envelope, as
    the application's handler would); anything else goes on to the middleware's last word."""
    gateway = gateway_of(request)
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await _serve(request, gateway, path)
        except MeterlineError as exc:
            if isinstance(exc, LimitExceeded):
                gateway.metrics.refusals.labels(exc.code).inc()
            response = domain_error(request, exc)
        status = response.status_code
        return response
    except ClientDisconnect:
        status = CLIENT_CLOSED  # the client left before its request was read: not a server error
        raise
    finally:
        gateway.metrics.requests.labels(path, str(status)).inc()
        gateway.metrics.latency.labels(path).observe(time.perf_counter() - started)


async def _serve(request: Request, gateway: Gateway, path: str) -> Response:
    api, upstream_path = ENDPOINTS[path]
    raw = await request.body()
    parsed = await _parse(gateway, api, raw, request)
    headers = request.headers
    call = Call(
        api=api,
        endpoint=path,
        upstream_path=upstream_path,
        parsed=parsed,
        headers=headers.raw,
        receipt=not wire.receipt_opt_out(headers.get("x-meterline-receipt")),
        source=wire.source_of(headers.get("x-meterline-source")),
        caller=_Caller(request, gateway),
    )
    return _response(request, await gateway.relay.serve(call))


async def count_tokens(request: Request) -> Response:
    """Anthropic's ``POST /v1/messages/count_tokens``: for a Meterline key, passed to an upstream that
    serves the model; not metered (it uses no model), so no reservation and no row."""
    gateway = gateway_of(request)
    if cached_principal(request, gateway.services) is None:
        await run_in_threadpool(get_principal, request, gateway.services, gateway.tokens)
    body = await request.body()
    path = "/messages/count_tokens"
    outcome = await gateway.relay.pass_through("messages", path, body, request.headers.raw)
    return _response(request, outcome)


def _response(request: Request, outcome: Reply | Refusal) -> Response:
    if isinstance(outcome, Refusal):
        return envelope(
            outcome.status,
            "upstream_error",
            outcome.message,
            request_id=request_id_of(request),
            error_extra={"upstream_status": outcome.upstream_status},
        )
    if isinstance(outcome.body, bytes):
        return Response(outcome.body, status_code=outcome.status, headers=outcome.headers)
    return _Streamed(outcome.body, status_code=outcome.status, headers=outcome.headers)


class RelayEndpoints:
    """The six relay endpoints as one plain ASGI app (POST only, see ``serves``): no routing table, no
    dependency solving, no response model."""

    @staticmethod
    def serves(scope: Scope) -> bool:
        return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ENDPOINTS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await respond(Request(scope, receive, send), scope["path"])
        await response(scope, receive, send)


async def _parse(gateway: Gateway, api: Api, raw: bytes, request: Request) -> wire.Parsed:
    if api != "transcriptions":
        return wire.parse_json_request(api, raw, gateway.services.settings.gateway_default_max_tokens)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("send the audio as multipart/form-data with the fields file and model")
    try:
        form = await request.form(max_files=1, max_fields=64)
    except (MultiPartException, HTTPException) as exc:
        raise InvalidRequest(f"malformed multipart body: {getattr(exc, 'detail', None) or exc}") from None
    try:
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("file")
        file = None
        if isinstance(upload, UploadFile):
            file = (upload.filename or "", upload.content_type or "", await upload.read())
        return wire.parse_transcription(raw, content_type, fields, file)
    finally:
        await form.close()


class _Streamed(StreamingResponse):
    """A streamed answer whose generator is always closed, so its ``finally`` (the settle) always runs:
    when the client goes away Starlette cancels the send loop and may leave the generator suspended."""

    body_iterator: AsyncIterator[bytes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
