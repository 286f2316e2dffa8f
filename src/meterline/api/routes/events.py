"""``POST /v1/events``: batches of usage metered elsewhere, settled through the same path as the gateway."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from meterline.api.access_log import note_row
from meterline.api.auth import PrincipalDep, ServicesDep
from meterline.api.errors import count_refusal, envelope, first_problem, note_exhausted, request_id_of
from meterline.api.responses import JSON
from meterline.api.routes.receipts import receipt_wanted
from meterline.api.schemas import EventIn, EventsBatchIn
from meterline.errors import InvalidRequest, LimitExceeded, PayloadTooLarge
from meterline.gateway.ratelimit import rate_limit_headers
from meterline.metering import UsageRecord, fingerprint, ingest
from meterline.metering.records import LedgerRow
from meterline.money import format_nanos
from meterline.quotas.engine import RateLimits, Subject
from meterline.quotas.gate import QuotaGate
from meterline.services import Services
from meterline.tenancy import Principal

router = APIRouter(tags=["events"])

MAX_BATCH = 1000
MAX_FUTURE = timedelta(minutes=5)
MAX_AGE = timedelta(days=400)


def _record(
    event: EventIn, body: dict[str, Any], principal: Principal, services: Services, receipt: bool
) -> UsageRecord:
    return UsageRecord(
        organization_id=principal.organization_id,
        workspace_id=principal.workspace_id,
        created_at=event.timestamp or services.clock.now(),
        event=event.event,
        units=event.units,
        model=event.model,
        provider=event.provider,
        region=event.region,
        modality=event.modality,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        cache_read_tokens=event.cache_read_tokens,
        cache_write_tokens=event.cache_write_tokens,
        audio_seconds=event.audio_seconds,
        key_id=principal.key_id,
        key_prefix=principal.key_prefix,
        key_name=principal.key_name,
        identifier_id=event.identifier_id or principal.identifier_id,
        user_id=event.user_id or event.identifier_id or principal.identifier_id,
        source=event.source,
        endpoint=event.endpoint,
        run_id=event.run_id,
        metadata=event.metadata,
        idempotency_key=event.id,
        request_hash=fingerprint(body),
        receipt=receipt,
        usage=event.usage_vector(),
    )


@dataclass
class Outcomes:
    """What became of a batch of event bodies: one result per body (accepted or rejected), and what the
    limits said."""

    results: list[dict[str, Any] | None]
    currency: str | None = None
    rates: RateLimits | None = None
    refusals: list[LimitExceeded] = field(default_factory=list)


def meter_events(
    bodies: list[dict[str, Any]],
    request: Request,
    principal: Principal,
    services: Services,
    *,
    after_the_fact: bool = False,
    where: str = "events",
) -> Outcomes:
    """Validate each body as an event and settle the valid ones through the one settle path.

    ``after_the_fact``: the usage has already happened (reported by OpenTelemetry): every limit counts it
    and none refuses it; what passes a limit is recorded as overage, and alerts fire as usual."""
    now = services.clock.now()
    receipt = receipt_wanted(request) is not False
    outcomes = Outcomes([None] * len(bodies))
    results = outcomes.results
    valid: list[tuple[int, UsageRecord]] = []
    for index, body in enumerate(bodies):
        event_id = body.get("id") if isinstance(body.get("id"), str) else None
        try:
            event = EventIn.model_validate(body)
        except ValidationError as exc:
            message, param = first_problem(exc.errors())
            param = f"{where}[{index}].{param or ''}"
            results[index] = _rejected(event_id, "invalid_request", message, param)
            continue
        problem: str | None = None
        field_name = ""
        nesting = event.check_tokens()
        if nesting is not None:
            field_name, problem = nesting
        foreign = event.identifier_id not in (None, principal.identifier_id)
        if problem is None and principal.scope == "identifier" and foreign:
            # Else a token holder could spend another identifier's allowance, or escape their own.
            problem = "an access token reports usage for its own identifier only; leave identifier_id out"
            field_name = "identifier_id"
        if problem is None and event.timestamp is not None:
            field_name = "timestamp"
            if event.timestamp > now + MAX_FUTURE:
                problem = "timestamp is in the future; send the time the usage happened (UTC)"
            elif event.timestamp < now - MAX_AGE:
                problem = f"timestamp is older than {MAX_AGE.days} days"
        if problem is not None:
            results[index] = _rejected(event.id, "invalid_request", problem, f"{where}[{index}].{field_name}")
            continue
        # The body as sent is what "same body" means for a repeated id; fingerprinting it avoids a dump.
        valid.append((index, _record(event, body, principal, services, receipt)))
    if not valid:
        return outcomes

    org = services.tenancy.get_organization(principal.organization_id)
    outcomes.currency = org.currency
    subjects: dict[str | None, Subject] = {}

    def subject_of(row: LedgerRow) -> Subject:
        if row.identifier_id not in subjects:
            subject = services.subject_of(org, principal, row.identifier_id)
            subjects[row.identifier_id] = replace(subject, after_the_fact=True) if after_the_fact else subject
        return subjects[row.identifier_id]

    gate = QuotaGate(services.quotas, subject_of)
    settled = ingest(
        services.settler,
        services.account_of(org),
        [r for _, r in valid],
        gate,
        refuse_unpriced=services.plan_of(org).unpriced == "block" and not after_the_fact,
    )
    if gate.last:
        outcomes.rates = gate.last[-1].rate_limits
    for (index, _), outcome in zip(valid, settled, strict=True):
        if outcome.refusal is not None:
            outcomes.refusals.append(outcome.refusal)
            rejected = _rejected(
                outcome.event_id, outcome.refusal.code, outcome.refusal.message, f"{where}[{index}]"
            )
            rejected["error"]["limit"] = outcome.refusal.details
            results[index] = rejected
            continue
        if outcome.error is not None:
            error = outcome.error
            results[index] = _rejected(
                outcome.event_id, error.code, error.message, f"{where}[{index}].{error.param or ''}"
            )
            continue
        row = outcome.row
        if outcome.status == "conflict" or row is None:
            results[index] = _rejected(
                outcome.event_id,
                "conflict",
                f"event id {outcome.event_id!r} was already recorded with a different body",
                f"{where}[{index}].id",
            )
            continue
        if not outcome.duplicate:
            note_row(request, row)
        results[index] = {
            "id": outcome.event_id,
            "status": "accepted",
            "duplicate": outcome.duplicate,
            "ledger_id": row.id,
            "receipt_id": row.receipt_id,
            "cost": format_nanos(row.cost_nanos),
            "credits": format_nanos(row.credits_nanos),
            "priced": row.priced,
        }
    return outcomes


@router.post("/v1/events", response_model=None)
def post_events(
    batch: EventsBatchIn, request: Request, principal: PrincipalDep, services: ServicesDep
) -> JSON:
    """Record up to 1000 usage events. Each event's ``id`` makes it idempotent within the organization."""
    if len(batch.events) > MAX_BATCH:
        raise PayloadTooLarge(
            f"a batch holds at most {MAX_BATCH} events, got {len(batch.events)}; split it", param="events"
        )
    if not batch.events:
        raise InvalidRequest("events must hold at least one event", param="events")
    outcomes = meter_events(batch.events, request, principal, services)
    rates, refusals = outcomes.rates, outcomes.refusals
    data = [r for r in outcomes.results if r is not None]
    accepted = sum(1 for r in data if r["status"] == "accepted")
    answer = {
        "object": "list",
        "currency": outcomes.currency,
        "data": data,
        "accepted": accepted,
        "duplicates": sum(1 for r in data if r.get("duplicate")),
        "rejected": len(data) - accepted,
        "request_id": request_id_of(request),
    }
    if rates is None and refusals and isinstance(refusals[0].rate_limits, RateLimits):
        rates = refusals[0].rate_limits
    headers = rate_limit_headers(rates) if rates is not None else {}
    if accepted == 0:
        if refusals:
            # Nothing counted and limits refused what could have: the batch as a whole is a 429.
            count_refusal(request, refusals)
            first_refusal = refusals[0]
            return envelope(
                429,
                first_refusal.code,
                first_refusal.message,
                param=first_refusal.param,
                request_id=request_id_of(request),
                headers={"Retry-After": str(min(r.retry_after for r in refusals)), **headers},
                extra=answer,
                error_extra={"limit": first_refusal.details},
            )
        codes = {r["error"]["code"] for r in data}
        status, code = {"conflict": (409, "conflict"), "forbidden": (403, "forbidden")}.get(
            codes.pop() if len(codes) == 1 else "", (422, "invalid_request")
        )
        first = data[0]["error"]
        return envelope(
            status,
            code,
            first["message"],
            param=first["param"],
            request_id=request_id_of(request),
            extra=answer,
        )
    # Some events recorded, others refused: no 429 to count, but an allowance they used up still says so.
    note_exhausted(request, refusals)
    return JSON(answer, headers=headers)


def _rejected(event_id: str | None, code: str, message: str, param: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "status": "rejected",
        "duplicate": False,
        "error": {"code": code, "message": message, "param": param.rstrip(".")},
    }
