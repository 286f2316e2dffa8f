"""``create_app(settings)``: the HTTP application. Everything HTTP-specific lives in this package."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from meterline import __version__
from meterline.api import garbage_collector
from meterline.api.access_log import GATEWAY_PATHS, AccessLog
from meterline.api.errors import install_error_handlers, outages, report_failure
from meterline.api.gateway import Gateway, RelayEndpoints
from meterline.api.middleware import RequestContext
from meterline.api.responses import JSON
from meterline.api.routes import (
    admin,
    alerts,
    analytics,
    dashboard,
    events,
    gateway,
    organization,
    otlp,
    receipts,
    reservations,
    tokens,
    usage,
    well_known,
    widget,
)
from meterline.api.standstill import Standstill
from meterline.api.webhook_sender import WebhookSender
from meterline.clock import Clock
from meterline.config import Settings
from meterline.gateway.metrics import Metrics
from meterline.gateway.tokens import load_encodings
from meterline.quotas.memory import MemoryCounterStore
from meterline.services import Services, build_services
from meterline.storage.outage import COUNTERS, DATABASE
from meterline.storage.token_store import SqlTokenStore
from meterline.tenancy.tokens import TokenService

REAP_EVERY_S = 5.0
# While a dependency is out, how often it is probed: its outage's end is logged within this.
PROBE_OUTAGE_EVERY_S = 1.0


class _Application(FastAPI):
    """FastAPI, except that the gateway's relay endpoints are answered ahead of its own layers (error
    telemetry, its body limit, exception handlers, exit stack, routing), through our middleware only.
    Every request to them passes those layers, and every piece of a stream their ``send`` wrappers.
    Errors still get the envelope: the relay answers domain errors itself, ``RequestContext`` the rest."""

    def build_middleware_stack(self) -> ASGIApp:
        relay: ASGIApp = RelayEndpoints()
        for cls, args, kwargs in reversed(self.user_middleware):
            relay = cls(relay, *args, **kwargs)
        return _RelayFirst(relay, super().build_middleware_stack())


class _RelayFirst:
    def __init__(self, relay: ASGIApp, rest: ASGIApp) -> None:
        self.relay = relay
        self.rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (self.relay if RelayEndpoints.serves(scope) else self.rest)(scope, receive, send)


async def _reap_forever(services: Services) -> None:
    """End reservations whose lease has passed (settled at their estimate; see metering.reservations)."""
    while True:
        await asyncio.sleep(REAP_EVERY_S)
        try:
            await run_in_threadpool(services.reservations.recover)
        except Exception as exc:  # a failed sweep is retried at the next tick
            report_failure("reaping expired reservations", exc)


async def _end_outages_forever(services: Services) -> None:
    """While the outage log has a dependency down, probe it as ``/readyz`` does; the end of its outage
    is logged once it answers (``storage.outage``)."""
    while True:
        await asyncio.sleep(PROBE_OUTAGE_EVERY_S)
        if not outages.active:
            continue
        probed_at = time.monotonic()
        try:
            _ready, checks = await run_in_threadpool(services.readiness)
        except Exception:  # a probe that fails is a dependency still out: asked again next time
            checks = {}
        if checks.get("database") == "ok":
            outages.back(DATABASE, probed_at)
        if checks.get("counters") == "ok":
            outages.back(COUNTERS, probed_at)


async def _send_webhooks_forever(sender: WebhookSender, every_s: float) -> None:
    """Deliver due webhook outbox rows; the rows are the state, so a restart loses nothing."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(sender.deliver_due)
        except Exception as exc:  # a failed pass is retried at the next tick
            report_failure("delivering webhooks", exc)


log = logging.getLogger("meterline.api")


def _seal_webhook_secrets(services: Services) -> None:
    """The start-up pass sealing webhook secrets still in the clear or under an older data key. It can
    never stop the server from starting: rows it cannot seal stay readable as they are, and the next
    start (or ``meterline keys rotate``) tries again."""
    from meterline.storage.outage import is_outage

    try:
        result = services.seal_webhook_secrets()
    except Exception as exc:
        if is_outage(exc):
            log.warning(
                "stored webhook secrets not sealed at start-up: the database is unavailable (%s); "
                "tried again at the next start",
                type(exc).__name__,
            )
        else:
            log.exception("sealing stored webhook secrets at start-up failed; tried again at the next start")
        return
    if result.skipped:
        log.warning("%d stored webhook secrets were not sealed at start-up (see above)", result.skipped)


def _quarantined(services: Services) -> float:
    try:
        return float(services.quarantine.unresolved())
    except Exception:  # a scrape during a database outage still shows every other metric
        return float("nan")


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    services: Services | None = None,
    tune_collector: bool = False,
) -> FastAPI:
    """The application. ``tune_collector``: once started, what start-up built is kept out of the garbage
    collector's walks and its youngest generation is collected less often (``api/garbage_collector.py``);
    for a process that serves this application only."""
    owned = services is None
    services = services or build_services(settings, clock=clock)
    signing_keys = services.signing_keys
    token_service = TokenService(SqlTokenStore(services.db), services.tenancy, signing_keys, services.clock)
    sender = WebhookSender(
        services.webhooks,
        services.clock,
        allow_private=settings.webhook_allow_private,
        timeout_s=settings.webhook_timeout_seconds,
        max_attempts=settings.webhook_max_attempts,
    )

    telemetry = None
    if settings.otel_endpoint is not None:
        from meterline.api.telemetry import GatewayTelemetry

        telemetry = GatewayTelemetry(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The tokenizer's tables take ~0.15 s to load: not on the first request.
        await run_in_threadpool(load_encodings)
        await run_in_threadpool(_seal_webhook_secrets, services)
        # An in-process counter store starts empty: every durable reservation left in the database
        # belongs to a process that is gone, so it is settled now. A shared store waits for the lease.
        everything = isinstance(services.counters, MemoryCounterStore)
        try:
            await run_in_threadpool(services.reservations.recover_all, everything=everything)
        except Exception as exc:
            # Nothing that recovery meets can stop the service from starting: a reservation that cannot
            # be settled is quarantined, and an outage is retried by the reaper below.
            report_failure("recovering reservations at start-up", exc)
        standstill = Standstill(asyncio.get_running_loop())
        if services.db.is_sqlite:
            # Several workers on one SQLite file: this loop stands still while its writer holds the lock
            # the others wait for (only after this process waited for one of them: ``Database.write``).
            services.db.hold_still = standstill
        reaper = asyncio.create_task(_reap_forever(services))
        prober = asyncio.create_task(_end_outages_forever(services))
        webhooks = asyncio.create_task(_send_webhooks_forever(sender, settings.webhook_poll_seconds))
        if tune_collector:
            # Last of start-up: what it built is what is frozen, and nothing after this can fail
            # before the ``finally`` that gives it back.
            garbage_collector.tune()
        try:
            yield
        finally:
            if tune_collector:
                garbage_collector.restore()  # first: a step below that fails must not skip it
            if services.db.hold_still is standstill:  # not another application's, on shared services
                services.db.hold_still = None
            reaper.cancel()
            prober.cancel()
            webhooks.cancel()
            # A pass already running in a worker thread finishes first (a thread cannot be cancelled):
            # closing the sender's client or the database under it would strand its connection.
            await asyncio.gather(reaper, prober, webhooks, return_exceptions=True)
            sender.close()
            await _app.state.gateway.upstreams.aclose()
            if telemetry is not None:
                await run_in_threadpool(telemetry.shutdown)  # exports what is queued
            if owned:
                services.close()

    app = _Application(
        title="Meterline",
        version=__version__,
        description="Usage metering, quotas, credits and cost tracking for LLM APIs.",
        default_response_class=JSON,
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.signing_key = signing_keys
    app.state.tokens = token_service
    app.state.webhook_sender = sender
    metrics = Metrics()
    metrics.quarantined.set_function(lambda: _quarantined(services))
    app.state.gateway = Gateway.build(services, token_service, metrics)
    install_error_handlers(app)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, passthrough=GATEWAY_PATHS)
    # Added last, so outermost: the access log sees what RequestContext answers by itself too.
    app.add_middleware(AccessLog, clock=services.clock, telemetry=telemetry)

    @app.get("/healthz", tags=["meta"])
    def health() -> JSON:
        """Liveness: the process answers (a load balancer's ``/readyz`` says whether it can serve)."""
        return JSON({"status": "ok", "version": __version__})

    @app.get("/readyz", tags=["meta"])
    def ready() -> JSON:
        """Readiness: the database answers and its schema is current, and the counter store answers (or
        ``quota_fail_open`` admits requests without it). 503 naming what is not, so a load balancer sends
        requests elsewhere meanwhile."""
        ok, checks = services.readiness()
        return JSON(
            {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
        )

    # The gateway's routes first: a request is matched against the routes in order, and these are the
    # hot ones (up to ~50 regex matches per gateway request otherwise). The relay endpoints themselves
    # are answered before any route is matched (``_Application``); their FastAPI twins in
    # ``gateway.router`` are what OpenAPI documents.
    app.include_router(gateway.router)
    app.include_router(events.router)
    app.include_router(otlp.router)
    app.include_router(reservations.router)
    app.include_router(usage.router)
    app.include_router(analytics.router)
    app.include_router(admin.router)
    app.include_router(tokens.router)
    app.include_router(well_known.router)
    app.include_router(receipts.router)
    app.include_router(alerts.router)
    app.include_router(organization.router)
    app.include_router(dashboard.router)
    app.include_router(widget.router)
    # The dashboard's stylesheet and scripts, from the installed package (nothing from the network).
    app.mount("/dashboard/static", StaticFiles(packages=[("meterline.dashboard", "static")]), name="static")
    return app
