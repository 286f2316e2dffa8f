"""Chart series and ranked breakdowns (seeds 001, 002): credits, or money for spend-capped organizations
(``unit`` says which). Fields are named as the API's JSON names them; old names warn (``_renamed``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from meterline.sdk._json import Json, dec, obj, opt_str, time
from meterline.sdk._renamed import renamed


@dataclass(frozen=True, slots=True)
class TimeseriesPoint:
    start: datetime
    end: datetime
    total: Decimal
    values: dict[str, Decimal]


@dataclass(frozen=True, slots=True)
class Timeseries:
    range: str
    granularity: str
    by: str
    unit: str
    start: datetime
    end: datetime
    series: list[str]
    data: list[TimeseriesPoint]
    identifier_id: str | None = None
    request_id: str | None = None

    points = renamed("points", "data")

    @classmethod
    def from_json(cls, data: Json) -> Timeseries:
        return cls(
            range=str(data["range"]),
            granularity=str(data["granularity"]),
            by=str(data["by"]),
            unit=str(data["unit"]),
            start=time(data["start"]),
            end=time(data["end"]),
            series=[str(s) for s in data["series"]],
            data=[
                TimeseriesPoint(
                    start=time(p["start"]),
                    end=time(p["end"]),
                    total=dec(p["total"]),
                    values={str(k): dec(v) for k, v in obj(p.get("values")).items()},
                )
                for p in data["data"]
            ],
            identifier_id=opt_str(data.get("identifier_id")),
            request_id=opt_str(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    key: str | None
    name: str | None
    requests: int
    tokens: int
    credits: Decimal
    cost: Decimal
    share_pct: Decimal
    key_prefix: str | None = None
    # By model: what the tokens were (usage vector counts, cache reads and writes) and the requests
    # recorded at cost 0 for want of a price.
    usage: dict[str, int] | None = None
    unpriced_requests: int | None = None

    @classmethod
    def from_json(cls, data: Json) -> BreakdownRow:
        usage = data.get("usage")
        unpriced = data.get("unpriced_requests")
        return cls(
            key=opt_str(data.get("key")),
            name=opt_str(data.get("name")),
            requests=int(data["requests"]),
            tokens=int(data["tokens"]),
            credits=dec(data["credits"]),
            cost=dec(data["cost"]),
            share_pct=dec(data["share_pct"]),
            key_prefix=opt_str(data.get("key_prefix")),
            usage=None if usage is None else {str(k): int(v) for k, v in obj(usage).items()},
            unpriced_requests=None if unpriced is None else int(unpriced),
        )


@dataclass(frozen=True, slots=True)
class BreakdownTotals:
    """The whole range's credits and cost (every row, not only this page's)."""

    credits: Decimal
    cost: Decimal
    unpriced_requests: int | None = None  # by model: over every model of the range

    @classmethod
    def from_json(cls, data: Json) -> BreakdownTotals:
        unpriced = data.get("unpriced_requests")
        return cls(
            credits=dec(data.get("credits", 0)),
            cost=dec(data.get("cost", 0)),
            unpriced_requests=None if unpriced is None else int(unpriced),
        )


@dataclass(frozen=True, slots=True)
class Breakdown:
    """One page of the top ``by`` values, ranked by credits (or cost); ``has_more`` is "Show More"."""

    by: str
    unit: str
    currency: str
    start: datetime
    end: datetime
    data: list[BreakdownRow]
    total: int
    has_more: bool
    limit: int
    offset: int
    totals: BreakdownTotals
    request_id: str | None = None

    rows = renamed("rows", "data")
    total_credits = renamed("total_credits", "totals.credits")
    total_cost = renamed("total_cost", "totals.cost")
    unpriced_requests = renamed("unpriced_requests", "totals.unpriced_requests")

    @classmethod
    def from_json(cls, data: Json) -> Breakdown:
        return cls(
            by=str(data["by"]),
            unit=str(data["unit"]),
            currency=str(data["currency"]),
            start=time(data["start"]),
            end=time(data["end"]),
            data=[BreakdownRow.from_json(r) for r in data["data"]],
            total=int(data["total"]),
            has_more=bool(data["has_more"]),
            limit=int(data["limit"]),
            offset=int(data["offset"]),
            totals=BreakdownTotals.from_json(obj(data.get("totals"))),
            request_id=opt_str(data.get("request_id")),
        )
