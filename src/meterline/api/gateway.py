"""The gateway's per-process state and the metered relay of one request (SPEC §3).

Per request: authenticate -> estimate -> reserve (429 if a limit would be exceeded) -> forward, failing
over between routes -> settle with the usage the upstream reported (or a local count) -> respond with the
upstream's body, ``usage``, rate-limit headers, ``X-Request-Id`` and ``X-Meterline-Receipt-Id``.

Storage work never runs on the event loop. Admission (authenticate, estimate, reserve) runs on the loop
when it needs no read (a cached key and organization, an in-process counter store), else in the thread
pool; the durable reservation and the settle are awaited on the database's writer. The relay of a
stream never buffers more than one server-sent event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from meterline.api.access_log import note_model, note_row
from meterline.api.auth import cached_principal, get_principal
from meterline.api.errors import envelope, outages, report_failure, request_id_of
from meterline.api.metrics import Metrics
from meterline.api.ratelimit import rate_limit_headers
from meterline.errors import InvalidRequest, LimitExceeded, NotFound, UpstreamError
from meterline.gateway import wire
from meterline.gateway.exchange import Exchanges, Ticket
from meterline.gateway.exchange import Request as GatewayRequest
from meterline.gateway.flavors import Api, TokenUsage
from meterline.gateway.routing import Route, RouteTable
from meterline.gateway.sse import SSEEventTooLarge, SSEParser
from meterline.gateway.streams import StreamMeter
from meterline.gateway.upstream import UPSTREAM_ERRORS, AllRoutesFailed, Failure, Opened, Upstreams, scrub
from meterline.metering.records import LedgerRow
from meterline.metering.reservations import Quarantined, answer_of
from meterline.services import Services
from meterline.storage.outage import is_outage
from meterline.tenancy import Principal
from meterline.tenancy.tokens import TokenService

log = logging.getLogger("meterline.gateway")

# Upstream statuses passed on as they are (the request's own fault); any other failure is a 502.
_CLIENT_FAULTS = frozenset({400, 404, 409, 413, 422})


@dataclass
class Gateway:
    services: Services
    tokens: TokenService
    routes: RouteTable
    upstreams: Upstreams
    exchanges: Exchanges
    metrics: Metrics

    @classmethod
    def build(cls, services: Services, tokens: TokenService, metrics: Metrics) -> Gateway:
        return cls(
            services,
            tokens,
            RouteTable(services.settings.upstreams),
            Upstreams(),
            Exchanges(services),
            metrics,
        )


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def relay(request: Request, api: Api, upstream_path: str) -> Response:
    """Serve one gateway request end to end (see the module docstring)."""
    gateway = gateway_of(request)
    started = time.perf_counter()
    endpoint = request.url.path
    status = 500
    try:
        response = await _relay(gateway, request, api, upstream_path)
        status = response.status_code
        return response
    except LimitExceeded as exc:
        gateway.metrics.refusals.labels(exc.code).inc()
        status = 429
        raise
    except UpstreamError:
        status = 502
        raise
    except (InvalidRequest, NotFound) as exc:
        status = 404 if isinstance(exc, NotFound) else 400
        raise
    finally:
        elapsed = time.perf_counter() - started
        gateway.metrics.requests.labels(endpoint, str(status)).inc()
        gateway.metrics.latency.labels(endpoint).observe(elapsed)


async def _relay(gateway: Gateway, request: Request, api: Api, upstream_path: str) -> Response:
    raw = await request.body()
    parsed = await _parse(gateway, api, raw, request)
    note_model(request, parsed.model)
    opt_out = wire.receipt_opt_out(request.headers.get("x-meterline-receipt"))
    source = wire.source_of(request.headers.get("x-meterline-source"))

    def routes_for(principal: Principal) -> tuple[tuple[Route, ...], GatewayRequest]:
        routes = gateway.routes.routes_for(api, parsed.model)
        if not routes:
            raise NotFound(
                f"no upstream serves model {parsed.model!r} on {request.url.path}; see GET /v1/models",
                param="model",
            )
        estimate = GatewayRequest(
            api=api,
            endpoint=request.url.path,
            model=parsed.model,
            prompt_tokens=parsed.prompt_tokens,
            max_output_tokens=parsed.max_output_tokens,
            source=source or principal.default_source or "api",
            user_id=parsed.user_id,
            receipt=not opt_out,
            audio_seconds=parsed.audio_seconds,
        )
        return routes, estimate

    def admit() -> tuple[tuple[Route, ...], Ticket]:
        principal = get_principal(request, gateway.services, gateway.tokens)
        routes, estimate = routes_for(principal)
        return routes, gateway.exchanges.reserve(principal, estimate, routes[0])

    # Admission on the loop when it needs no read (cached key and organization, in-process counters):
    # the durable reservation is awaited on the writer. Otherwise one hop to the thread pool.
    quick: Ticket | None = None
    principal = cached_principal(request, gateway.services)
    if principal is not None:
        routes, estimate = routes_for(principal)
        quick = await gateway.exchanges.reserve_soon(principal, estimate, routes[0])
    if quick is not None:
        ticket = quick
    else:
        routes, ticket = await run_in_threadpool(admit)
    gateway.metrics.in_flight.inc()
    upstream_started = time.perf_counter()
    try:
        opened = await gateway.upstreams.open(
            routes, upstream_path, parsed.forward_body, request.headers.raw, content_type=parsed.content_type
        )
    except AllRoutesFailed as exc:
        _count_failures(gateway, exc.failures)
        await _release(gateway, ticket)
        raise UpstreamError(
            f"no upstream could serve {parsed.model!r}: " + "; ".join(_describe(f) for f in exc.failures)
        ) from None
    except BaseException:
        await _release(gateway, ticket)
        raise
    gateway.metrics.upstream_latency.labels(opened.route.name).observe(time.perf_counter() - upstream_started)
    _count_failures(gateway, opened.failures)
    if opened.failover:
        gateway.metrics.failovers.labels(opened.route.name).inc()
    upstream = opened.response
    if parsed.stream and upstream.status_code < 300 and wire.is_event_stream(upstream.headers):
        return _stream(gateway, request, api, parsed, ticket, opened)
    return await _complete(gateway, request, api, parsed, ticket, opened)


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


async def _complete(
    gateway: Gateway, request: Request, api: Api, parsed: wire.Parsed, ticket: Ticket, opened: Opened
) -> Response:
    """A non-streamed answer: read it whole, settle, answer."""
    upstream = opened.response
    try:
        content = await upstream.aread()
    except UPSTREAM_ERRORS as exc:
        await _release(gateway, ticket)
        gateway.metrics.upstream_errors.labels(opened.route.name, "protocol").inc()
        raise UpstreamError(
            f"upstream {opened.route.name} broke off its answer ({type(exc).__name__}); nothing was billed"
        ) from None
    finally:
        await upstream.aclose()
    if upstream.status_code >= 300:
        await _release(gateway, ticket)
        return _upstream_refusal(request, opened, content)
    answer = wire.read_answer(api, parsed, content, upstream.headers.get("content-type"))
    row = await _settle(gateway, ticket, answer.usage, opened, audio_seconds=answer.audio_seconds)
    _count_tokens(gateway, answer.usage)
    headers = _metered_headers(ticket, None if row is None else row.receipt_id)
    headers["content-type"] = upstream.headers.get("content-type", "application/json")
    if row is not None:
        note_row(request, row, upstream=opened.route.name, ended="complete")
    return Response(answer.body, status_code=upstream.status_code, headers=headers)


def _stream(
    gateway: Gateway, request: Request, api: Api, parsed: wire.Parsed, ticket: Ticket, opened: Opened
) -> Response:
    headers = _metered_headers(ticket, ticket.receipt_id)
    headers["content-type"] = opened.response.headers.get("content-type", "text/event-stream")
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    return _Relay(_relay_stream(gateway, request, api, parsed, ticket, opened), headers=headers)


class _Relay(StreamingResponse):
    """A streamed answer whose generator is always closed, so its ``finally`` (the settle) always runs:
    when the client goes away Starlette cancels the send loop and may leave the generator suspended."""

    body_iterator: AsyncIterator[bytes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _relay_stream(
    gateway: Gateway, request: Request, api: Api, parsed: wire.Parsed, ticket: Ticket, opened: Opened
) -> AsyncIterator[bytes]:
    """Pass events on as they arrive, metering as they go; settle exactly once, whatever ends it.

    The final event is held back until the row is written, so a client that has seen the end of the
    stream finds the request in the ledger."""
    upstream = opened.response
    parser = SSEParser()
    meter = StreamMeter(api, parsed.model, parsed.prompt_tokens, parsed.client_wants_usage)
    interval = gateway.services.settings.stream_progress_interval_ms / 1000
    next_progress = time.monotonic() + interval
    ended = "disconnect"  # what ended the stream, if it did not end normally
    settled = False

    async def settle(how: str) -> None:
        nonlocal settled
        if settled:
            return
        settled = True
        metadata = None if how == "complete" else {"meterline.stream_end": how}
        usage = meter.usage_so_far()
        row = await _settle(gateway, ticket, usage, opened, metadata=metadata)
        _count_tokens(gateway, usage)
        if row is not None:
            note_row(request, row, upstream=opened.route.name, ended=how)

    try:
        try:
            async for chunk in upstream.aiter_raw():
                out: list[bytes] = []
                for event in parser.feed(chunk):
                    forward = meter.observe(event)
                    if wire.is_terminal(api, event):
                        if out:
                            yield b"".join(out)
                            out = []
                        await settle("complete")
                    if forward:
                        out.append(event.raw)
                if out:
                    yield b"".join(out)
                if time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + interval
                    if await _progress(gateway, ticket, meter.usage_so_far()):
                        ended = "credits_exhausted"
                        yield wire.error_event(
                            api,
                            "credits_exhausted",
                            "the organization ran out of credits; the response was cut",
                        )
                        return
            tail = [e.raw for e in parser.flush() if meter.observe(e)]
            if tail:
                yield b"".join(tail)
            ended = "complete" if meter.reported or settled else "upstream_closed"
        except (*UPSTREAM_ERRORS, SSEEventTooLarge) as exc:
            ended = "upstream_cut"
            gateway.metrics.upstream_errors.labels(opened.route.name, "protocol").inc()
            log.warning("upstream %s cut a stream: %s", opened.route.name, type(exc).__name__)
            yield wire.error_event(api, "upstream_error", "the upstream ended the stream early")
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()
            await settle(ended)


async def _settle(
    gateway: Gateway,
    ticket: Ticket,
    usage: TokenUsage,
    opened: Opened,
    *,
    audio_seconds: Decimal | None = None,
    metadata: dict[str, Any] | None = None,
) -> LedgerRow | None:
    """Settle what the upstream served. The answer goes to the client whatever happens here, since the
    work is done: None when the usage could not be written now. It is never lost: quarantined (logged,
    alerted) when it can never be written as it is, or, in an outage, kept with its actual usage and
    settled by the reaper's next sweep once the database is back (a crash before then leaves the durable
    reservation, settled at its estimate)."""
    try:
        # Shielded: the row commits whatever happens to this request, and the counters must follow it.
        with anyio.CancelScope(shield=True):
            row = await gateway.exchanges.settle_soon(
                ticket,
                usage,
                opened.route,
                run_in_threadpool,
                failover=opened.failover,
                audio_seconds=audio_seconds,
                metadata=metadata,
            )
        return row
    except Quarantined:
        return None
    except Exception as exc:
        if not is_outage(exc):
            raise
        outages.failed(exc)
        return None
    finally:
        # Settled, or left to recovery or the quarantine: no longer in flight here either way.
        gateway.metrics.in_flight.dec()


async def _progress(gateway: Gateway, ticket: Ticket, usage: TokenUsage) -> bool:
    """Publish the stream's consumption so far; True when the stream must be cut (out of credits).

    Priced on the loop and queued to the writer; waited for, and the credits read in a thread, only
    when the stream can be cut."""
    try:
        written = gateway.exchanges.progress(ticket, usage)
        if not gateway.exchanges.may_cut(ticket):
            written.add_done_callback(_report_progress_failure)
            return False
        await answer_of(written)
        return await run_in_threadpool(gateway.exchanges.out_of_credits, ticket)
    except Exception as exc:  # progress is a view; the settle at the end is what counts
        report_failure("publishing stream progress", exc)
        return False


def _report_progress_failure(done: Future[None]) -> None:
    error = done.exception()
    if error is not None:
        report_failure("publishing stream progress", error)


async def _release(gateway: Gateway, ticket: Ticket) -> None:
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(gateway.exchanges.release, ticket)
    gateway.metrics.in_flight.dec()


def _metered_headers(ticket: Ticket, receipt_id: str | None) -> dict[str, str]:
    headers = rate_limit_headers(ticket.rate_limits)
    if receipt_id is not None:
        headers["X-Meterline-Receipt-Id"] = receipt_id
    return headers


def _upstream_refusal(request: Request, opened: Opened, content: bytes) -> Response:
    """An upstream's final refusal (a 4xx that is the request's own fault, or anything else that cannot
    be retried), in our envelope. Nothing was billed."""
    status = opened.response.status_code
    detail = scrub(wire.upstream_message(content), opened.route)
    return envelope(
        status if status in _CLIENT_FAULTS else 502,
        "upstream_error",
        f"upstream {opened.route.name} answered {status}: {detail}; nothing was billed",
        request_id=request_id_of(request),
        error_extra={"upstream_status": status},
    )


def _describe(failure: Failure) -> str:
    what = f"{failure.kind} {failure.status}" if failure.status else failure.kind
    return f"{failure.route} ({what})"


def _count_failures(gateway: Gateway, failures: list[Failure]) -> None:
    for failure in failures:
        gateway.metrics.upstream_errors.labels(failure.route, failure.kind).inc()


def _count_tokens(gateway: Gateway, usage: TokenUsage) -> None:
    gateway.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
    gateway.metrics.tokens.labels("completion").inc(usage.completion_tokens)
