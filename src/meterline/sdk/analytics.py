"""Chart series and ranked breakdowns (seeds 001, 002): credits, or money for spend-capped organizations
(``unit`` says which)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from meterline.sdk._json import Json, dec, obj, opt_str, time


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
    points: list[TimeseriesPoint]

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
            points=[
                TimeseriesPoint(
                    start=time(p["start"]),
                    end=time(p["end"]),
                    total=dec(p["total"]),
                    values={str(k): dec(v) for k, v in obj(p.get("values")).items()},
                )
                for p in data["data"]
            ],
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
class Breakdown:
    """One page of the top ``by`` values, ranked by credits (or cost); ``has_more`` is "Show More"."""

    by: str
    unit: str
    currency: str
    start: datetime
    end: datetime
    rows: list[BreakdownRow]
    total: int
    has_more: bool
    limit: int
    offset: int
    total_credits: Decimal
    total_cost: Decimal
    unpriced_requests: int | None = None  # by model: over every model of the range

    @classmethod
    def from_json(cls, data: Json) -> Breakdown:
        totals = obj(data.get("totals"))
        return cls(
            by=str(data["by"]),
            unit=str(data["unit"]),
            currency=str(data["currency"]),
            start=time(data["start"]),
            end=time(data["end"]),
            rows=[BreakdownRow.from_json(r) for r in data["data"]],
            total=int(data["total"]),
            has_more=bool(data["has_more"]),
            limit=int(data["limit"]),
            offset=int(data["offset"]),
            total_credits=dec(totals.get("credits", 0)),
            total_cost=dec(totals.get("cost", 0)),
            unpriced_requests=None if "unpriced_requests" not in totals else int(totals["unpriced_requests"]),
        )
