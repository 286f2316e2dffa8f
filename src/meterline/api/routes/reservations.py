"""Two-phase metering over HTTP, for usage metered outside the gateway: reserve an estimate before the
work (429 when a limit would be exceeded), settle the actual usage after it, or release the hold.

A reservation left open past ``expires_at`` (or by a server that crashed) is settled at its estimate.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request

from meterline.api.access_log import note_row
from meterline.api.auth import PrincipalDep, ServicesDep
from meterline.api.errors import request_id_of
from meterline.api.responses import JSON
from meterline.api.routes.receipts import receipt_wanted
from meterline.api.schemas import ReservationIn, SettleIn, UsageVectorIn
from meterline.clock import rfc3339
from meterline.errors import InvalidRequest, NotFound, unpriced_refusal
from meterline.gateway.ratelimit import rate_limit_headers
from meterline.metering import UsageRecord
from meterline.metering.records import LedgerRow
from meterline.metering.reservations import Quarantined
from meterline.money import format_nanos
from meterline.quotas.engine import Subject
from meterline.services import Services
from meterline.tenancy import Principal

router = APIRouter(prefix="/v1/reservations", tags=["reservations"])
# The usage vector's fields of a settle body: sent together as the row's ``usage``.
_VECTOR_FIELDS = frozenset(UsageVectorIn.model_fields)


def _settled(reservation_id: str, row: LedgerRow, duplicate: bool, request: Request) -> dict[str, Any]:
    return {
        "id": reservation_id,
        "object": "reservation",
        "status": "settled",
        "duplicate": duplicate,
        "recovered": bool((row.metadata or {}).get("meterline.recovered")),
        "ledger_id": row.id,
        "receipt_id": row.receipt_id,
        "total_tokens": row.total_tokens,
        "cost": format_nanos(row.cost_nanos),
        "credits": format_nanos(row.credits_nanos),
        "currency": row.currency,
        "overage": row.overage,
        "request_id": request_id_of(request),
    }


@router.post("", status_code=201, response_model=None)
def reserve(body: ReservationIn, request: Request, principal: PrincipalDep, services: ServicesDep) -> JSON:
    """Hold an estimate against every applicable limit; 429 with the limit's name when one would be
    exceeded."""
    problem = body.check_tokens()
    if problem is not None:
        raise InvalidRequest(problem, param="cache_read_tokens")
    if principal.scope == "identifier" and body.identifier_id not in (None, principal.identifier_id):
        raise InvalidRequest("an access token reserves for its own identifier", param="identifier_id")
    identifier_id = body.identifier_id or principal.identifier_id
    org = services.tenancy.get_organization(principal.organization_id)
    estimate = UsageRecord(
        organization_id=org.id,
        workspace_id=principal.workspace_id,
        created_at=services.clock.now(),
        event=body.event,
        units=body.units,
        model=body.model,
        provider=body.provider,
        prompt_tokens=body.prompt_tokens,
        completion_tokens=body.completion_tokens,
        cache_read_tokens=body.cache_read_tokens,
        cache_write_tokens=body.cache_write_tokens,
        key_id=principal.key_id,
        key_prefix=principal.key_prefix,
        key_name=principal.key_name,
        identifier_id=identifier_id,
        user_id=body.user_id or identifier_id,
        source=body.source,
        endpoint=body.endpoint,
        receipt=receipt_wanted(request) is not False,
    )
    ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
    subject = services.subject_of(org, principal, identifier_id)
    reservation, priced = services.reservations.reserve(subject, estimate, services.account_of(org), ttl)
    answer = {
        "id": reservation.id,
        "object": "reservation",
        "status": "reserved",
        "expires_at": rfc3339(reservation.expires_at),
        "overage": reservation.overage,
        "estimate": {
            "total_tokens": priced.total_tokens,
            "cost": format_nanos(priced.cost_nanos),
            "credits": format_nanos(priced.credits_nanos),
            "currency": priced.currency,
        },
        "request_id": request_id_of(request),
    }
    return JSON(answer, status_code=201, headers=rate_limit_headers(reservation.rate_limits))


@router.post("/{reservation_id}/settle", response_model=None)
def settle(
    reservation_id: str, body: SettleIn, request: Request, principal: PrincipalDep, services: ServicesDep
) -> JSON:
    """Record the actual usage of a reservation. Settling again answers the same row (idempotent)."""
    actual = body.model_dump(exclude_unset=True, exclude=set(_VECTOR_FIELDS))
    if body.model_fields_set & _VECTOR_FIELDS:
        actual["usage"] = body.usage_vector()
    wanted = receipt_wanted(request)
    if wanted is not None:  # sent at settle: overrides what the reservation was made with
        actual["receipt"] = wanted
    held = services.reservation_store.get(reservation_id)
    if held is not None:
        _check_workspace(principal, held.estimate.workspace_id, reservation_id)
        merged = [
            actual.get(f, getattr(held.estimate, f))
            for f in ("prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_write_tokens")
        ]
        problem = body.nesting_problem(*merged)
        if problem is not None:
            raise InvalidRequest(problem[1], param=problem[0])
        if {"model", "provider"} & actual.keys():
            _refuse_unpriced(services, principal, replace(held.estimate, **actual))
    try:
        settled = services.reservations.settle(principal.organization_id, reservation_id, actual)
    except Quarantined as exc:
        # Kept for an operator, not lost: accepted, but not (yet) in the ledger.
        return JSON(
            {
                "id": reservation_id,
                "object": "reservation",
                "status": "quarantined",
                "quarantine_id": exc.entry.id,
                "message": exc.message,
                "request_id": request_id_of(request),
            },
            status_code=202,
        )
    _check_workspace(principal, settled.row.workspace_id, reservation_id)
    if not settled.duplicate:
        note_row(request, settled.row)
    headers = rate_limit_headers(services.quotas.rate_limits(_subject(services, principal, settled.row)))
    return JSON(_settled(reservation_id, settled.row, settled.duplicate, request), headers=headers)


@router.post("/{reservation_id}/release", response_model=None)
def release(reservation_id: str, request: Request, principal: PrincipalDep, services: ServicesDep) -> JSON:
    """Give the estimate back: the work did not happen. Nothing is written to the ledger."""
    held = services.reservations.get(principal.organization_id, reservation_id)
    _check_workspace(principal, held.estimate.workspace_id, reservation_id)
    services.reservations.release(principal.organization_id, reservation_id)
    return JSON(
        {
            "id": reservation_id,
            "object": "reservation",
            "status": "released",
            "request_id": request_id_of(request),
        }
    )


def _subject(services: Services, principal: Principal, row: LedgerRow) -> Subject:
    org = services.tenancy.get_organization(row.organization_id)
    return services.subject_of(org, principal, row.identifier_id)


def _check_workspace(principal: Principal, workspace_id: str, reservation_id: str) -> None:
    """A workspace key sees only its workspace's reservations; an organization key sees them all."""
    if principal.scope != "organization" and workspace_id != principal.workspace_id:
        raise NotFound(f"reservation {reservation_id!r} does not exist or has ended", param="id")


def _refuse_unpriced(services: Services, principal: Principal, actual: UsageRecord) -> None:
    """A settle that names another model must not escape a plan's ``unpriced = "block"``."""
    org = services.tenancy.get_organization(principal.organization_id)
    if services.plan_of(org).unpriced != "block":
        return
    row = services.settler.price(actual, services.account_of(org))
    if not row.priced and row.model is not None:
        raise unpriced_refusal(row.model)
