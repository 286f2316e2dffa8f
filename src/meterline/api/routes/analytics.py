"""The usage analytics API (SPEC §5, seed 002): chart time series, ranked breakdowns and the CSV export.

Figures are credits, or money in the organization's currency for organizations with a spend cap (BYOM:
they pay for what they use instead of drawing credits); ``unit`` says which. Money and credits are
exact decimal strings, as in ``/v1/usage/history``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from meterline.api.auth import PrincipalDep, ServicesDep
from meterline.api.csv_export import csv_chunks
from meterline.api.errors import request_id_of
from meterline.api.focus_export import focus_chunks
from meterline.api.responses import JSON
from meterline.api.routes.usage import ledger_filter, parse_rfc3339, scope_for
from meterline.clock import rfc3339
from meterline.errors import InvalidRequest
from meterline.metering.analytics import (
    BreakdownBy,
    HourRange,
    Measure,
    RangeName,
    SeriesBy,
    chart,
    hour_after,
    hour_of,
    range_hours,
    share_pct,
)
from meterline.money import format_nanos
from meterline.quotas import billing_period
from meterline.services import Services
from meterline.storage.analytics_reader import SqlAnalyticsReader
from meterline.storage.tables import DETAIL_MEASURES
from meterline.tenancy import Organization

router = APIRouter(prefix="/v1/usage", tags=["usage"])

IdentifierParam = Annotated[str | None, Query(min_length=1, max_length=128)]
_NO_VALUE = "(none)"  # series name for rows without a model


def _measure(org: Organization) -> tuple[Measure, str]:
    return ("cost", org.currency) if org.spend_cap_nanos is not None else ("credits", "credits")


def _reader(services: Services) -> SqlAnalyticsReader:
    return SqlAnalyticsReader(services.db, services.clock)


@router.get("/timeseries")
def get_timeseries(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    range_: Annotated[
        RangeName, Query(alias="range", description="24h: hourly; 7d: daily; 30d: weekly buckets.")
    ] = "7d",
    by: Annotated[
        SeriesBy, Query(description="Split the series by source (default) or by model.")
    ] = "source",
    identifier_id: IdentifierParam = None,
) -> JSON:
    """Credits (or money) per bucket, one series per source or model plus the total; zeros included."""
    scope = scope_for(principal, request, identifier_id)
    org = services.tenancy.get_organization(principal.organization_id)
    measure, unit = _measure(org)
    shape = chart(range_, services.clock.now())
    buckets = shape.buckets
    values: list[dict[str, int]] = [{} for _ in buckets]
    for point in _reader(services).series(scope, shape, by, measure):
        name = point.name or _NO_VALUE
        values[point.bucket][name] = values[point.bucket].get(name, 0) + point.nanos
    names = sorted({name for bucket in values for name in bucket})
    return JSON(
        {
            "object": "usage.timeseries",
            "range": range_,
            "granularity": shape.granularity,
            "by": by,
            "unit": unit,
            "start": rfc3339(shape.hours.start_at),
            "end": rfc3339(shape.hours.end_at),
            "series": names,
            "data": [
                {
                    "start": rfc3339(b.start_at),
                    "end": rfc3339(b.end_at),
                    "total": format_nanos(sum(v.values())),
                    "values": {name: format_nanos(v.get(name, 0)) for name in names},
                }
                for b, v in zip(buckets, values, strict=True)
            ],
            "identifier_id": scope.identifier_id,
            "request_id": request_id_of(request),
        }
    )


def _breakdown_hours(
    services: Services, org: Organization, range_: RangeName | None, start: str | None, end: str | None
) -> HourRange:
    now = services.clock.now()
    if range_ is not None:
        if start is not None or end is not None:
            raise InvalidRequest("give either range or start/end, not both", param="range")
        return range_hours(range_, now)
    if start is None and end is None:
        period = billing_period(now, org.billing_anchor_day)
        return HourRange(hour_of(period.start), hour_of(period.end))
    if start is None or end is None:
        raise InvalidRequest("start and end go together: give both (RFC 3339) or neither", param="start")
    begin, finish = parse_rfc3339(start, "start"), parse_rfc3339(end, "end")
    if begin is None or finish is None:  # not reached: both were given
        raise InvalidRequest("start and end are required", param="start")
    # Rollups are hourly: the range widens to whole hours (start down, end up).
    hours = HourRange(hour_of(begin), hour_after(finish))
    if hours.end <= hours.first:
        raise InvalidRequest("start must be before end", param="start")
    return hours


def _detail_fields(detail: Mapping[str, int]) -> dict[str, Any]:
    """A model's ``usage`` (every field, 0 when absent) and ``unpriced_requests``."""
    return {
        "usage": {name: detail.get(name, 0) for name in DETAIL_MEASURES if name != "unpriced_requests"},
        "unpriced_requests": detail.get("unpriced_requests", 0),
    }


@router.get("/breakdown")
def get_breakdown(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    by: Annotated[BreakdownBy, Query(description="The dimension to rank.")],
    range_: Annotated[RangeName | None, Query(alias="range", description="24h, 7d or 30d.")] = None,
    start: Annotated[str | None, Query(max_length=64, description="RFC 3339, with end.")] = None,
    end: Annotated[str | None, Query(max_length=64, description="RFC 3339, with start.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Rows per page, 1-1000.")] = 10,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")] = 0,
    identifier_id: IdentifierParam = None,
) -> JSON:
    """The top ``by`` values of a range (default: the current billing period), ranked by credits/cost."""
    scope = scope_for(principal, request, identifier_id)
    org = services.tenancy.get_organization(principal.organization_id)
    measure, unit = _measure(org)
    hours = _breakdown_hours(services, org, range_, start, end)
    page = _reader(services).breakdown(scope, hours, by, measure, limit=limit, offset=offset)
    overall = page.cost_nanos if measure == "cost" else page.credits_nanos
    # By model, each row also says what its tokens were (the usage vector) and how many requests had no
    # price; the totals count unpriced requests over every model of the range, not only this page's.
    details = _reader(services).model_details(scope, hours) if by == "model" else None
    data: list[dict[str, Any]] = []
    for row in page.rows:
        figure = row.cost_nanos if measure == "cost" else row.credits_nanos
        item: dict[str, Any] = {
            "key": row.key or None,
            "name": row.name if row.name is not None else (row.key or None),
            "requests": row.requests,
            "tokens": row.tokens,
            "credits": format_nanos(row.credits_nanos),
            "cost": format_nanos(row.cost_nanos),
            "share_pct": str(share_pct(figure, overall)),
        }
        if by == "key":
            item["key_prefix"] = row.key_prefix
        if details is not None:
            item.update(_detail_fields(details.get(row.key, {})))
        data.append(item)
    totals: dict[str, Any] = {
        "credits": format_nanos(page.credits_nanos),
        "cost": format_nanos(page.cost_nanos),
    }
    if details is not None:
        totals["unpriced_requests"] = sum(d["unpriced_requests"] for d in details.values())
    return JSON(
        {
            "object": "list",
            "by": by,
            "unit": unit,
            "currency": org.currency,
            "start": rfc3339(hours.start_at),
            "end": rfc3339(hours.end_at),
            "data": data,
            "total": page.total,
            "has_more": offset + len(page.rows) < page.total,
            "limit": limit,
            "offset": offset,
            "totals": totals,
            "request_id": request_id_of(request),
        }
    )


def _workspace_names(services: Services, organization_id: str) -> dict[str, str]:
    names: dict[str, str] = {}
    while True:
        page, total = services.tenancy.list_workspaces(organization_id, limit=500, offset=len(names))
        names.update((w.id, w.name) for w in page)
        if not page or len(names) >= total:
            return names


def _filename_part(at: datetime | None, fallback: str) -> str:
    return fallback if at is None else at.strftime("%Y%m%dT%H%M%SZ")


@router.get("/export.csv", response_class=StreamingResponse)
def get_export(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    start: Annotated[str | None, Query(max_length=64, description="RFC 3339; created_at >= start.")] = None,
    end: Annotated[str | None, Query(max_length=64, description="RFC 3339; created_at <= end.")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    key_prefix: Annotated[str | None, Query(max_length=32)] = None,
    identifier_id: IdentifierParam = None,
    modality: Annotated[str | None, Query(max_length=32)] = None,
    provider: Annotated[str | None, Query(max_length=64)] = None,
    export_format: Annotated[
        Literal["ledger", "focus"],
        Query(
            alias="format",
            description="ledger: Meterline's columns; focus: the FinOps Foundation's FOCUS 1.2 columns, "
            "one line per ledger row (docs/focus.md).",
        ),
    ] = "ledger",
) -> StreamingResponse:
    """Ledger rows as CSV, oldest first, streamed; the filters of ``/v1/usage/ledger``."""
    scope = scope_for(principal, request, identifier_id)
    where = ledger_filter(
        start, end, model=model, key_prefix=key_prefix, modality=modality, provider=provider
    )
    kind = "focus" if export_format == "focus" else "usage"
    filename = (
        f"meterline-{kind}-{_filename_part(where.start, 'start')}-{_filename_part(where.end, 'now')}.csv"
    )
    rows = _reader(services).ledger_rows(scope, where)
    if export_format == "focus":
        org = services.tenancy.get_organization(principal.organization_id)
        chunks = focus_chunks(rows, org, _workspace_names(services, org.id))
    else:
        chunks = csv_chunks(rows)
    return StreamingResponse(
        chunks,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )
