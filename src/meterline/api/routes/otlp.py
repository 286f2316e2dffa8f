"""``POST /v1/traces``: OpenTelemetry GenAI spans (OTLP/HTTP) metered as usage events.

An exporter sends a Meterline key as a header (``OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer …"``).
Each span that is a model call becomes one event of ``POST /v1/events`` (``metering.genai_spans``) and
takes the same validation and settle. The calls have already happened, so limits count them and never
refuse them (over a limit they are recorded as overage, and alerts fire). The answer follows OTLP's
partial-success contract: spans that could not be recorded are counted in ``rejected_spans`` with the
first reason; spans that are not model calls are ignored, counted in ``/metrics``, and named in a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from meterline.api import otlp
from meterline.api.auth import PrincipalDep, ServicesDep
from meterline.api.gateway import gateway_of
from meterline.api.routes.events import MAX_BATCH, meter_events
from meterline.metering.genai_spans import event_of
from meterline.services import Services
from meterline.tenancy import Principal

router = APIRouter(tags=["opentelemetry"])

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            otlp.PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
            otlp.JSON: {"schema": {"type": "object", "description": "OTLP/JSON ExportTraceServiceRequest"}},
        },
    }
}


@dataclass
class _Tally:
    metered: int = 0
    duplicate: int = 0
    rejected: int = 0
    first_problem: str = ""


def _meter(
    bodies: list[dict[str, Any]], request: Request, principal: Principal, services: Services
) -> _Tally:
    tally = _Tally()
    for first in range(0, len(bodies), MAX_BATCH):
        chunk = bodies[first : first + MAX_BATCH]
        outcomes = meter_events(chunk, request, principal, services, after_the_fact=True, where="spans")
        for offset, result in enumerate(outcomes.results):
            assert result is not None
            if result["status"] == "accepted":
                if result["duplicate"]:
                    tally.duplicate += 1
                else:
                    tally.metered += 1
            elif result["error"]["code"] == "conflict":
                # Another span reported the same response (OpenLLMetry's Anthropic spans come in pairs).
                tally.duplicate += 1
            else:
                tally.rejected += 1
                if not tally.first_problem:
                    error = result["error"]
                    where = f"spans[{first + offset}]" + error["param"].partition("]")[2]
                    tally.first_problem = f"{where}: {error['message']}"
    return tally


@router.post("/v1/traces", response_model=None, openapi_extra=_BODY)
async def post_traces(request: Request, principal: PrincipalDep, services: ServicesDep) -> Response:
    """Meter the GenAI spans of an OTLP/HTTP trace export (protobuf or JSON, gzip or not)."""
    kind = otlp.media_type(request.headers.get("content-type"))
    raw = await request.body()
    body = otlp.inflate(raw, request.headers.get("content-encoding"), services.settings.max_body_bytes)
    export = otlp.decode(body, kind)
    bodies: list[dict[str, Any]] = []
    ignored = 0
    for span in otlp.spans(export):
        event = event_of(span)
        if event is None:
            ignored += 1
        else:
            bodies.append(event)
    tally = await run_in_threadpool(_meter, bodies, request, principal, services)
    counter = gateway_of(request).metrics.otlp_spans
    for outcome, count in (
        ("metered", tally.metered),
        ("duplicate", tally.duplicate),
        ("rejected", tally.rejected),
        ("ignored", ignored),
    ):
        if count:
            counter.labels(outcome).inc(count)
    if tally.rejected:
        not_recorded = f"{tally.rejected} of {len(bodies)} GenAI spans were not recorded"
        message = f"{not_recorded}; the first: {tally.first_problem}"
    elif ignored:
        message = f"{ignored} spans are not model calls (no model or token counts) and were ignored"
    else:
        message = ""
    return otlp.answer(kind, tally.rejected, message)
