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
from meterline.metering.genai_spans import event_of, ids_valid
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
    ignored: int = 0
    genai: int = 0
    first_problem: str = ""

    def reject(self, span_id: str, problem: str) -> None:
        self.rejected += 1
        if not self.first_problem:
            self.first_problem = f"span {span_id or '(no id)'}: {problem}"


def _meter(
    raw: bytes,
    kind: str,
    encoding: str | None,
    request: Request,
    principal: Principal,
    services: Services,
) -> _Tally:
    """Decode, map and settle one export, off the event loop (a large export takes a while to decode)."""
    body = otlp.inflate(raw, encoding, services.settings.max_body_bytes)
    export = otlp.decode(body, kind)
    tally = _Tally()
    bodies: list[dict[str, Any]] = []
    span_ids: list[str] = []
    for span in otlp.spans(export):
        event = event_of(span)
        if event is None:
            tally.ignored += 1
            continue
        tally.genai += 1
        if not ids_valid(span):
            tally.reject(span.span_id, "a span needs a 16-byte trace id and an 8-byte span id, not all zeros")
            continue
        bodies.append(event)
        span_ids.append(span.span_id)
    for first in range(0, len(bodies), MAX_BATCH):
        chunk = bodies[first : first + MAX_BATCH]
        outcomes = meter_events(chunk, request, principal, services, after_the_fact=True, where="span")
        for offset, result in enumerate(outcomes.results):
            assert result is not None
            if result["status"] == "accepted":
                if result["duplicate"]:
                    tally.duplicate += 1
                else:
                    tally.metered += 1
            elif result["error"]["code"] == "conflict":
                # Another span of the same trace reported the same response, differently: the first
                # one received stands (docs/opentelemetry.md).
                tally.duplicate += 1
            else:
                error = result["error"]
                field = error["param"].partition("]")[2].lstrip(".")
                tally.reject(span_ids[first + offset], f"{field + ': ' if field else ''}{error['message']}")
    return tally


@router.post("/v1/traces", response_model=None, openapi_extra=_BODY)
async def post_traces(request: Request, principal: PrincipalDep, services: ServicesDep) -> Response:
    """Meter the GenAI spans of an OTLP/HTTP trace export (protobuf or JSON, gzip or not)."""
    kind = otlp.media_type(request.headers.get("content-type"))
    raw = await request.body()
    encoding = request.headers.get("content-encoding")
    tally = await run_in_threadpool(_meter, raw, kind, encoding, request, principal, services)
    counter = gateway_of(request).metrics.otlp_spans
    for outcome, count in (
        ("metered", tally.metered),
        ("duplicate", tally.duplicate),
        ("rejected", tally.rejected),
        ("ignored", tally.ignored),
    ):
        if count:
            counter.labels(outcome).inc(count)
    if tally.rejected:
        not_recorded = f"{tally.rejected} of {tally.genai} GenAI spans were not recorded"
        message = f"{not_recorded}; the first: {tally.first_problem}"
    elif tally.ignored:
        message = f"{tally.ignored} spans are not model calls (no model or token counts) and were ignored"
    else:
        message = ""
    return otlp.answer(kind, tally.rejected, message)
