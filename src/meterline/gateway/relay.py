"""The metered relay of one gateway request (SPEC §3), free of any web framework.

Per request: authenticate -> estimate -> reserve (429 if a limit would be exceeded) -> forward, failing
over between routes -> settle with the usage the upstream reported (or a local count) -> answer with the
upstream's body, ``usage``, rate-limit headers and ``X-Meterline-Receipt-Id``.

Storage work never runs on the event loop. Admission (authenticate, estimate, reserve) runs on the loop
when it needs no read (a cached key and organization, counters with their windows loaded), else in a
worker thread; a shared counter store's decision (database, Redis), the durable reservation and the
settle are awaited. The relay of a stream never buffers more than one server-sent event.

The HTTP side (``meterline.api.gateway``) parses the request, names the caller (``Caller``) and turns the
outcome (a ``Reply`` or a ``Refusal``) into its response; errors are the domain's (``meterline.errors``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from meterline.errors import NotFound, UpstreamError
from meterline.gateway import wire
from meterline.gateway.exchange import Exchanges, Ticket
from meterline.gateway.exchange import Request as Estimate
from meterline.gateway.flavors import Api, TokenUsage
from meterline.gateway.metrics import Metrics
from meterline.gateway.ratelimit import rate_limit_headers
from meterline.gateway.routing import Route, RouteTable
from meterline.gateway.sse import SSEEventTooLarge, SSEParser
from meterline.gateway.streams import StreamMeter
from meterline.gateway.upstream import UPSTREAM_ERRORS, AllRoutesFailed, Failure, Opened, Upstreams, scrub
from meterline.metering.records import LedgerRow
from meterline.metering.reservations import Quarantined, answer_of
from meterline.tenancy import Principal

log = logging.getLogger("meterline.gateway")

T = TypeVar("T")

# Upstream statuses passed on as they are (the request's own fault); any other failure is a 502.
_CLIENT_FAULTS = frozenset({400, 404, 409, 413, 422})


class Caller(Protocol):
    """Who is calling, and where what the request did is noted (the access log)."""

    def principal_now(self) -> Principal | None:
        """The caller when that needs no I/O (a cached key), else None: called on the event loop."""

    def principal(self) -> Principal:
        """The caller, reading what it must (called in a worker thread)."""

    def saw_model(self, model: str) -> None: ...
    def wrote(self, row: LedgerRow, *, upstream: str, ended: str) -> None: ...


class Faults(Protocol):
    """How failures are told apart and logged: an outage (database or counter store down) counts into
    its episode; anything else is logged with its traceback."""

    def is_outage(self, exc: BaseException) -> bool: ...
    def report(self, what: str, exc: BaseException) -> bool: ...


@dataclass(frozen=True, slots=True)
class Call:
    """One gateway request as the relay needs it."""

    api: Api
    endpoint: str  # the path the client called
    upstream_path: str  # the same endpoint on an upstream
    parsed: wire.Parsed
    headers: Sequence[tuple[bytes, bytes]]  # as received; the upstream leg picks what may pass
    receipt: bool  # False when the client opted out (``X-Meterline-Receipt: false``)
    source: str | None  # ``X-Meterline-Source``
    caller: Caller


@dataclass(slots=True)
class Reply:
    """The answer to send: whole (``bytes``) or streamed (the generator settles when it ends, however)."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upstream's final refusal (a 4xx that is the request's own fault, or anything else that cannot
    be retried). Nothing was billed."""

    status: int
    message: str
    upstream_status: int


async def in_thread(fn: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(fn)


class Relay:
    def __init__(
        self,
        exchanges: Exchanges,
        routes: RouteTable,
        upstreams: Upstreams,
        metrics: Metrics,
        faults: Faults,
        *,
        progress_interval_s: float,
    ) -> None:
        self.exchanges = exchanges
        self.routes = routes
        self.upstreams = upstreams
        self.metrics = metrics
        self.faults = faults
        self.progress_interval_s = progress_interval_s

    async def serve(self, call: Call) -> Reply | Refusal:
        """Serve one gateway request end to end (see the module docstring)."""
        call.caller.saw_model(call.parsed.model)
        routes, ticket = await self._admit(call)
        self.metrics.in_flight.inc()
        started = time.perf_counter()
        parsed = call.parsed
        try:
            forward = parsed.forward_body
            if ticket.max_output is not None:  # a token limit holds the output: the upstream is told
                forward = wire.with_output_limit(call.api, forward, ticket.max_output)
            opened = await self.upstreams.open(
                routes,
                call.upstream_path,
                forward,
                call.headers,
                model=parsed.model,
                content_type=parsed.content_type,
            )
        except AllRoutesFailed as exc:
            self._count_failures(exc.failures)
            await self._release(ticket)
            raise UpstreamError(
                f"no upstream could serve {parsed.model!r}: " + "; ".join(_describe(f) for f in exc.failures)
            ) from None
        except BaseException:
            await self._release(ticket)
            raise
        self.metrics.upstream_latency.labels(opened.route.name).observe(time.perf_counter() - started)
        self._count_failures(opened.failures)
        if opened.failover:
            self.metrics.failovers.labels(opened.route.name).inc()
        upstream = opened.response
        if parsed.stream and upstream.status_code < 300 and wire.is_event_stream(upstream.headers):
            headers = _metered_headers(ticket, ticket.receipt_id)
            headers["content-type"] = upstream.headers.get("content-type", "text/event-stream")
            headers["cache-control"] = "no-cache"
            headers["x-accel-buffering"] = "no"
            return Reply(upstream.status_code, headers, self._stream(call, ticket, opened))
        return await self._complete(call, ticket, opened)

    async def pass_through(
        self, api: Api, path: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> Reply | Refusal:
        """A request that uses no model, so costs nothing (Anthropic's ``count_tokens``): sent to the
        routes of the model it names, with failover, and answered as the upstream answered. No
        reservation, no row; the caller was authenticated by the HTTP side."""
        model = wire.model_of(body)
        routes = self.routes.routes_for(api, model)
        if not routes:
            raise NotFound(f"no upstream serves model {model!r}; see GET /v1/models", param="model")
        try:
            opened = await self.upstreams.open(routes, path, body, headers, model=model)
        except AllRoutesFailed as exc:
            self._count_failures(exc.failures)
            raise UpstreamError(
                f"no upstream could serve {model!r}: " + "; ".join(_describe(f) for f in exc.failures)
            ) from None
        self._count_failures(opened.failures)
        upstream = opened.response
        try:
            content = await upstream.aread()
        except UPSTREAM_ERRORS as exc:
            broke = type(exc).__name__
            raise UpstreamError(f"upstream {opened.route.name} broke off its answer ({broke})") from None
        finally:
            await upstream.aclose()
        status = upstream.status_code
        if status >= 300:
            detail = scrub(wire.upstream_message(content), opened.route)
            message = f"upstream {opened.route.name} answered {status}: {detail}"
            return Refusal(status if status in _CLIENT_FAULTS else 502, message, status)
        content_type = upstream.headers.get("content-type", "application/json")
        return Reply(status, {"content-type": content_type}, content)

    async def _admit(self, call: Call) -> tuple[tuple[Route, ...], Ticket]:
        """Authenticate and reserve the estimate. On the loop when it needs no read (cached key and
        organization, counters with their windows loaded): what is stored elsewhere is awaited.
        Otherwise one hop to a worker thread."""
        principal = call.caller.principal_now()
        if principal is not None:
            routes, estimate = self._estimate(call, principal)
            ticket = await self.exchanges.reserve_soon(principal, estimate, routes[0])
            if ticket is not None:
                return routes, ticket

        def admit() -> tuple[tuple[Route, ...], Ticket]:
            principal = call.caller.principal()
            routes, estimate = self._estimate(call, principal)
            return routes, self.exchanges.reserve(principal, estimate, routes[0])

        return await in_thread(admit)

    def _estimate(self, call: Call, principal: Principal) -> tuple[tuple[Route, ...], Estimate]:
        parsed = call.parsed
        routes = self.routes.routes_for(call.api, parsed.model)
        if not routes:
            raise NotFound(
                f"no upstream serves model {parsed.model!r} on {call.endpoint}; see GET /v1/models",
                param="model",
            )
        estimate = Estimate(
            api=call.api,
            endpoint=call.endpoint,
            model=parsed.model,
            prompt_tokens=parsed.prompt_tokens,
            max_output_tokens=parsed.max_output_tokens,
            source=call.source or principal.default_source or "api",
            user_id=parsed.user_id,
            receipt=call.receipt,
            audio_seconds=parsed.audio_seconds,
            min_output=parsed.min_output,
            own_output_limit=parsed.own_output_limit,
        )
        return routes, estimate

    async def _complete(self, call: Call, ticket: Ticket, opened: Opened) -> Reply | Refusal:
        """A non-streamed answer: read it whole, settle, answer."""
        upstream = opened.response
        try:
            content = await upstream.aread()
        except UPSTREAM_ERRORS as exc:
            await self._release(ticket)
            self.metrics.upstream_errors.labels(opened.route.name, "protocol").inc()
            broke = type(exc).__name__
            raise UpstreamError(
                f"upstream {opened.route.name} broke off its answer ({broke}); nothing was billed"
            ) from None
        finally:
            await upstream.aclose()
        status = upstream.status_code
        if status >= 300:
            await self._release(ticket)
            detail = scrub(wire.upstream_message(content), opened.route)
            return Refusal(
                status if status in _CLIENT_FAULTS else 502,
                f"upstream {opened.route.name} answered {status}: {detail}; nothing was billed",
                status,
            )
        answer = wire.read_answer(call.api, call.parsed, content, upstream.headers.get("content-type"))
        row = await self._settle(ticket, answer.usage, opened, audio_seconds=answer.audio_seconds)
        self._count_tokens(answer.usage)
        headers = _metered_headers(ticket, None if row is None else row.receipt_id)
        headers["content-type"] = upstream.headers.get("content-type", "application/json")
        if row is not None:
            call.caller.wrote(row, upstream=opened.route.name, ended="complete")
        return Reply(status, headers, answer.body)

    async def _stream(self, call: Call, ticket: Ticket, opened: Opened) -> AsyncIterator[bytes]:
        """Pass events on as they arrive, metering as they go; settle exactly once, whatever ends it.

        The final event is held back until the row is written, so a client that has seen the end of the
        stream finds the request in the ledger. Whoever sends the stream must close this generator (its
        ``finally`` is the settle) even when the client went away."""
        api = call.api
        upstream = opened.response
        parser = SSEParser()
        meter = StreamMeter(api, call.parsed.model, call.parsed.prompt_tokens, call.parsed.client_wants_usage)
        interval = self.progress_interval_s
        # A chat client that asked for usage gets it even from an upstream that sends none (counted here).
        wants_usage = api in ("chat", "completions") and call.parsed.client_wants_usage
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
            if how == "disconnect":
                # The plan's policy for a client that left, stated on the row.
                # An answer that said it was complete is billed whatever the policy: the client
                # leaving before the last event does not make it free.
                policy = "bill_generated" if meter.finished or meter.reported else ticket.plan.disconnect
                metadata = {"meterline.stream_end": how, "meterline.disconnect": policy}
                if policy == "void":
                    usage = TokenUsage(0, 0)
            row = await self._settle(ticket, usage, opened, metadata=metadata)
            self._count_tokens(usage)
            if row is not None:
                call.caller.wrote(row, upstream=opened.route.name, ended=how)

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
                            if wants_usage and not meter.reported:
                                yield wire.usage_event(api, call.parsed.model, meter.usage_so_far())
                        if forward:
                            out.append(event.raw)
                    if out:
                        yield b"".join(out)
                    if time.monotonic() >= next_progress:
                        next_progress = time.monotonic() + interval
                        if await self._progress(ticket, meter.progress_so_far()):
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
                self.metrics.upstream_errors.labels(opened.route.name, "protocol").inc()
                log.warning("upstream %s cut a stream: %s", opened.route.name, type(exc).__name__)
                yield wire.error_event(api, "upstream_error", "the upstream ended the stream early")
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
                await settle(ended)

    async def _settle(
        self,
        ticket: Ticket,
        usage: TokenUsage,
        opened: Opened,
        *,
        audio_seconds: Decimal | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerRow | None:
        """Settle what the upstream served. The answer goes to the client whatever happens here, since
        the work is done: None when the usage could not be written now. It is never lost: quarantined
        (logged, alerted) when it can never be written as it is, or, in an outage, kept with its actual
        usage and settled by the reaper's next sweep once the database is back (a crash before then
        leaves the durable reservation, settled at its estimate)."""
        try:
            # Shielded: the row commits whatever happens to this request, and the counters must follow it.
            with anyio.CancelScope(shield=True):
                row = await self.exchanges.settle_soon(
                    ticket,
                    usage,
                    opened.route,
                    in_thread,
                    failover=opened.failover,
                    audio_seconds=audio_seconds,
                    metadata=metadata,
                )
            return row
        except Quarantined:
            return None
        except Exception as exc:
            if not self.faults.is_outage(exc):
                raise
            self.faults.report("settling a gateway request", exc)
            return None
        finally:
            # Settled, or left to recovery or the quarantine: no longer in flight here either way.
            self.metrics.in_flight.dec()

    async def _progress(self, ticket: Ticket, usage: TokenUsage) -> bool:
        """Publish the stream's consumption so far; True when the stream must be cut (out of credits).

        Priced on the loop and queued to the writer; waited for, and the credits read in a thread, only
        when the stream can be cut."""
        try:
            written = self.exchanges.progress(ticket, usage)
            if not self.exchanges.may_cut(ticket):
                written.add_done_callback(self._report_progress_failure)
                return False
            await answer_of(written)
            return await in_thread(partial(self.exchanges.out_of_credits, ticket))
        except Exception as exc:  # progress is a view; the settle at the end is what counts
            self.faults.report("publishing stream progress", exc)
            return False

    def _report_progress_failure(self, done: Future[None]) -> None:
        error = done.exception()
        if error is not None:
            self.faults.report("publishing stream progress", error)

    async def _release(self, ticket: Ticket) -> None:
        with anyio.CancelScope(shield=True):
            await in_thread(partial(self.exchanges.release, ticket))
        self.metrics.in_flight.dec()

    def _count_failures(self, failures: list[Failure]) -> None:
        for failure in failures:
            self.metrics.upstream_errors.labels(failure.route, failure.kind).inc()

    def _count_tokens(self, usage: TokenUsage) -> None:
        self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(usage.completion_tokens)


def _metered_headers(ticket: Ticket, receipt_id: str | None) -> dict[str, str]:
    headers = rate_limit_headers(ticket.rate_limits)
    if receipt_id is not None:
        headers["X-Meterline-Receipt-Id"] = receipt_id
    return headers


def _describe(failure: Failure) -> str:
    what = f"{failure.kind} {failure.status}" if failure.status else failure.kind
    return f"{failure.route} ({what})"
