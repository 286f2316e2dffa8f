"""The usage read API (SPEC §5): summary, daily history, billable events and the per-request ledger."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from meterline.api import render
from meterline.api.auth import PrincipalDep, ServicesDep, scope_of
from meterline.api.errors import request_id_of
from meterline.api.responses import JSON
from meterline.clock import rfc3339, to_micros
from meterline.credits import CreditBalance
from meterline.errors import InvalidRequest
from meterline.metering.forecast import Forecast, forecast
from meterline.metering.reading import LedgerFilter, Scope, Totals
from meterline.metering.reservations import InFlight
from meterline.metering.summary import Allowance, UsageSummary, allowance, summarize, tightest
from meterline.quotas.engine import LimitStatus, WindowQuery
from meterline.quotas.limits import UNLIMITED
from meterline.quotas.limits import Scope as LimitScope
from meterline.services import Services
from meterline.tenancy import Organization, Principal

router = APIRouter(prefix="/v1/usage", tags=["usage"])

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9999, 1, 1, tzinfo=UTC)


def parse_rfc3339(value: str | None, param: str) -> datetime | None:
    if value is None:
        return None
    text = value.strip()
    if not _RFC3339.match(text):
        raise InvalidRequest(
            f"{param} must be an RFC 3339 timestamp such as 2026-05-06T10:52:02Z, got {value[:64]!r}",
            param=param,
        )
    # Python keeps microseconds only; nanosecond digits beyond that are dropped, not rounded.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("z", "Z").replace("t", "T"))
    try:
        at = datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        raise InvalidRequest(f"{param} is not a valid date/time: {value[:64]!r}", param=param) from None
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        at = _EARLIEST - timedelta(days=1)
    if not _EARLIEST <= at < _LATEST:
        raise InvalidRequest(f"{param} must be between 1970 and 9999", param=param)
    return at


def ledger_filter(
    start: str | None,
    end: str | None,
    *,
    model: str | None,
    key_prefix: str | None,
    modality: str | None,
    provider: str | None,
) -> LedgerFilter:
    """The ledger filters of ``/v1/usage/ledger`` and its CSV export, checked."""
    where = LedgerFilter(
        start=parse_rfc3339(start, "start"),
        end=parse_rfc3339(end, "end"),
        model=model,
        key_prefix=key_prefix,
        modality=modality,
        provider=provider,
    )
    if where.start and where.end and where.start > where.end:
        raise InvalidRequest("start must not be after end", param="start")
    return where


def scope_for(principal: Principal, request: Request, identifier_id: str | None) -> Scope:
    """The caller's scope, narrowed to ``identifier_id`` when one is asked for (and allowed)."""
    scope = scope_of(principal, request)
    if identifier_id is not None:
        if principal.identifier_id is not None and identifier_id != principal.identifier_id:
            raise InvalidRequest("an access token can only read its own identifier", param="identifier_id")
        scope = Scope(scope.organization_id, scope.workspace_id, identifier_id)
    return scope


def _forecast(
    org: Organization,
    summary: UsageSummary,
    balance: CreditBalance,
    allowance_nanos: int,
    org_period: Totals,
    in_flight: InFlight,
    spent_nanos: int,
) -> Forecast:
    """Run-out of the organization's allowance: its spend cap (BYOM) if it has one, else its credits."""
    days = {"days_elapsed": summary.days_elapsed, "days_remaining": summary.days_remaining}
    if org.spend_cap_nanos is not None:
        left = org.spend_cap_nanos - spent_nanos
        return forecast(unit=org.currency, consumed_nanos=spent_nanos, remaining_nanos=left, **days)
    consumed = org_period.credits_nanos + in_flight.credits_nanos
    if allowance_nanos == UNLIMITED:
        return forecast(unit="credits", consumed_nanos=consumed, remaining_nanos=None, **days)
    # What the credits card shows as remaining: the monthly bucket's rest, then the bonus bucket.
    left = balance.including(in_flight.credits_nanos, allowance_nanos).left(allowance_nanos)
    return forecast(unit="credits", consumed_nanos=consumed, remaining_nanos=left, **days)


def _own_usage(services: Services, summary: UsageSummary, scope: Scope, meter: str) -> int:
    """The scope's own consumption of ``meter`` this billing period (nothing caps it, so no counter)."""
    if meter == "tokens":
        return summary.this_period.total_tokens
    if meter == "calls":
        return summary.this_period.requests
    # units:<event>: the totals sum every event's units; the rollups have them per event.
    narrowest: LimitScope = (
        "identifier" if scope.identifier_id else "workspace" if scope.workspace_id else "organization"
    )
    period = summary.period
    query = WindowQuery(
        scope.organization_id,
        narrowest,
        scope.workspace_id,
        None,
        scope.identifier_id,
        meter,
        to_micros(period.start),
        to_micros(period.end),
    )
    return services.quotas.source.window_usage(query)


def _headline(
    services: Services, summary: UsageSummary, scope: Scope, statuses: list[LimitStatus]
) -> tuple[Allowance, dict[str, Any] | None]:
    """Seed 003's usage/limit/remaining: the plan's primary meter this billing period, measured against
    the tightest period limit that applies to the caller (its identifier's, key's, workspace's or
    organization's), with that limit named; unlimited (-1) with the scope's own usage when none does."""
    meter = summary.plan.meter
    bound = tightest(statuses, meter)
    if bound is None:
        return allowance(_own_usage(services, summary, scope, meter), UNLIMITED), None
    limited_by = {
        "name": bound.limit.name,
        "scope": bound.limit.scope,
        "window": bound.limit.window,
        "resets_at": None if bound.window is None else rfc3339(bound.window.end),
    }
    return Allowance(bound.consumed, bound.limit.max, bound.remaining), limited_by


def _summary_body(services: Services, principal: Principal, scope: Scope) -> dict[str, Any]:
    org = services.tenancy.get_organization(principal.organization_id)
    plan = services.plan_of(org)
    now = services.clock.now()
    summary = summarize(services.reader, scope, plan, org.billing_anchor_day, now)
    subject = services.subject_of(org, principal, scope.identifier_id)
    statuses = services.quotas.status(subject)
    primary, limited_by = _headline(services, summary, scope, statuses)
    credits = services.account_of(org).credits
    account_allowance = credits.monthly_allowance_nanos if credits else UNLIMITED
    org_period = (
        summary.this_period
        if scope == Scope(org.id)
        else services.reader.totals(Scope(org.id), summary.period.start, summary.period.end)
    )
    # Streams still running count with what they have consumed so far (seed 002: credits drop while the
    # response streams); the settle replaces that with the final figure.
    in_flight = services.reservations.in_flight(org.id)
    spent = org_period.cost_nanos + in_flight.cost_nanos
    balance = services.credit_balance(org, now)
    return {
        "object": "usage.summary",
        # Seed 003's fields first: the plan's primary meter this billing period, against the tightest
        # limit on it that applies to the caller (``limited_by``; null when nothing caps it).
        "usage": primary.usage,
        "limit": primary.limit,
        "remaining": primary.remaining,
        "plan": plan.name,
        "meter": plan.meter,
        "limited_by": limited_by,
        # Seed 000: daily and monthly tokens and calls.
        "daily": {
            "tokens": render.allowance(summary.daily_tokens),
            "calls": render.allowance(summary.daily_calls),
            **{k: v for k, v in render.totals(summary.today).items() if k not in ("tokens", "calls")},
        },
        "monthly": {
            "tokens": render.allowance(summary.monthly_tokens),
            "calls": render.allowance(summary.monthly_calls),
            **{k: v for k, v in render.totals(summary.this_period).items() if k not in ("tokens", "calls")},
        },
        "currency": org.currency,
        "billing_period": {
            "start": rfc3339(summary.period.start),
            "end": rfc3339(summary.period.end),
            "days": summary.period.days,
            "days_elapsed": summary.days_elapsed,
            "days_remaining": summary.days_remaining,
        },
        "scope": {
            "organization_id": scope.organization_id,
            "workspace_id": scope.workspace_id,
            "identifier_id": scope.identifier_id,
        },
        # Every limit that applies to this caller, with what its current window has consumed (settled
        # and reserved), then the organization's credit buckets and spend.
        "limits": [render.limit_status(s) for s in statuses],
        "credits": render.credits(balance, account_allowance, in_flight.credits_nanos),
        "spend": {
            "amount": render.money_number(spent),
            "in_flight": render.money_number(in_flight.cost_nanos),
            "cap": None if org.spend_cap_nanos is None else render.money_number(org.spend_cap_nanos),
            "remaining": None
            if org.spend_cap_nanos is None
            else render.money_number(max(org.spend_cap_nanos - spent, 0)),
            "currency": org.currency,
        },
        "forecast": render.forecast(
            _forecast(org, summary, balance, account_allowance, org_period, in_flight, spent)
        ),
    }


_COUNT = {"type": "integer", "minimum": -1}
# The seed-003 fields, described (the rest of the summary is listed in the README's endpoint table).
_SUMMARY: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The caller's usage summary.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["usage", "limit", "remaining", "plan", "meter", "limited_by", "request_id"],
                    "properties": {
                        "usage": {
                            **_COUNT,
                            "description": "Consumed this billing period of `meter`, settled and reserved, "
                            "by the scope of the limit named in `limited_by` (the caller's own when null).",
                        },
                        "limit": {**_COUNT, "description": "Maximum of that limit; -1: unlimited."},
                        "remaining": {**_COUNT, "description": "`limit - usage`, at least 0; -1: unlimited."},
                        "plan": {"type": "string"},
                        "meter": {
                            "type": "string",
                            "description": "The plan's primary meter: `tokens`, `calls` or `units:<event>` "
                            "(plan setting `primary_meter`; by default tokens, or for a plan that limits no "
                            "tokens the meter of its first extra limit).",
                        },
                        "limited_by": {
                            "type": ["object", "null"],
                            "description": "The limit the top level reports: of the billing-period limits on "
                            "`meter` that apply to the caller (its organization's, workspace's, key's, "
                            "identifier's), the one with the least remaining. Null when none caps it.",
                            "properties": {
                                "name": {"type": "string"},
                                "scope": {"enum": ["organization", "workspace", "key", "identifier"]},
                                "window": {"const": "period"},
                                "resets_at": {"type": ["string", "null"], "format": "date-time"},
                            },
                        },
                        "request_id": {"type": "string"},
                    },
                    "additionalProperties": True,
                },
                "example": {
                    "object": "usage.summary",
                    "usage": 1247,
                    "limit": 5000,
                    "remaining": 3753,
                    "plan": "pro",
                    "meter": "units:case.execute",
                    "limited_by": {
                        "name": "period_units:case.execute",
                        "scope": "organization",
                        "window": "period",
                        "resets_at": "2026-04-14T00:00:00Z",
                    },
                    "request_id": "req_01J8X",
                },
            }
        },
    }
}


@router.get("", responses=_SUMMARY)
def get_usage(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    identifier_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> JSON:
    """Current usage of the caller's scope: plan; ``usage``/``limit``/``remaining`` of the plan's primary
    meter this billing period against the tightest limit on it that applies to the caller
    (``limited_by``); daily and monthly tokens and calls; every limit; credits, spend and forecast."""
    scope = scope_for(principal, request, identifier_id)
    body = _summary_body(services, principal, scope)
    body["request_id"] = request_id_of(request)
    return JSON(body)


@router.get("/history")
def get_history(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    days: Annotated[int, Query(ge=1, le=366, description="How many days back, today included.")] = 30,
    identifier_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> JSON:
    """Daily aggregates for the past ``days`` days (seed 000), oldest first, zero days included."""
    scope = scope_for(principal, request, identifier_id)
    today = services.clock.now().astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    daily = services.reader.daily(scope, first, days)
    return JSON(
        {
            "object": "list",
            "data": [{"date": d.day.isoformat(), **render.totals(d.totals)} for d in daily],
            "days": days,
            "identifier_id": scope.identifier_id,
            "request_id": request_id_of(request),
        }
    )


@router.get("/events")
def get_events(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    page: Annotated[int, Query(ge=1, le=1_000_000, description="Page number (min 1).")] = 1,
    per_page: Annotated[int, Query(ge=1, le=100, description="Results per page (1-100).")] = 20,
) -> JSON:
    """Billable events, newest first (seed 003)."""
    scope = scope_of(principal, request)
    result = services.reader.ledger_page(scope, LedgerFilter(), limit=per_page, offset=(page - 1) * per_page)
    return JSON(
        {
            "data": [render.usage_event(r) for r in result.rows],
            "pagination": {
                "page": page,
                "per_page": per_page,
                "total": result.total,
                "has_more": page * per_page < result.total,
            },
            "request_id": request_id_of(request),
        }
    )


@router.get("/ledger")
def get_ledger(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size. Maximum 1000.")] = 100,
    offset: Annotated[int, Query(ge=0, le=100_000_000, description="Rows to skip (newest first).")] = 0,
    start: Annotated[str | None, Query(max_length=64, description="RFC 3339; created_at >= start.")] = None,
    end: Annotated[str | None, Query(max_length=64, description="RFC 3339; created_at <= end.")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    key_prefix: Annotated[str | None, Query(max_length=32)] = None,
    identifier_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    modality: Annotated[str | None, Query(max_length=32)] = None,
    provider: Annotated[str | None, Query(max_length=64)] = None,
) -> JSON:
    """Per-request ledger rows, newest first (seed 004)."""
    scope = scope_for(principal, request, identifier_id)
    where = ledger_filter(
        start, end, model=model, key_prefix=key_prefix, modality=modality, provider=provider
    )
    result = services.reader.ledger_page(scope, where, limit=limit, offset=offset)
    return JSON(
        {
            "object": "list",
            "data": [render.ledger_row(r, services.rates) for r in result.rows],
            "total_count": result.total,
            "limit": limit,
            "offset": offset,
            "request_id": request_id_of(request),
        }
    )
