"""Analytics over the hourly rollups (seed 002 chart and "top" tables): time ranges, buckets, shares.

Ranges are whole hours because rollups are hourly. The chart ranges, for a clock at ``now``:

* ``24h``: 24 hourly buckets, the last one the current (partial) hour.
* ``7d``: 7 daily buckets (UTC days), the last one today.
* ``30d``: the 30 UTC days ending with today, in weekly buckets counted back from the end of today:
  four full weeks and, first, the 2 days left over. The range is exactly 30 days so its totals equal a
  ``range=30d`` breakdown; every bucket says its own ``start`` and ``end``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal, Protocol

from meterline.metering.reading import Scope

RangeName = Literal["24h", "7d", "30d"]
BreakdownBy = Literal["workspace", "workspace_group", "user", "model", "endpoint", "key"]
SeriesBy = Literal["source", "model"]
# What the figures are counted in: credits, or money for organizations with a spend cap (BYOM).
Measure = Literal["credits", "cost"]

HOUR = timedelta(hours=1)
_CHARTS: dict[str, tuple[str, int, int]] = {
    # range: (granularity, hours per bucket, hours in the range)
    "24h": ("hour", 1, 24),
    "7d": ("day", 24, 7 * 24),
    "30d": ("week", 7 * 24, 30 * 24),
}
_HUNDREDTH = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class HourRange:
    """[first, end) in whole hours since the epoch."""

    first: int
    end: int

    @property
    def start_at(self) -> datetime:
        return at_hour(self.first)

    @property
    def end_at(self) -> datetime:
        return at_hour(self.end)


@dataclass(frozen=True, slots=True)
class Chart:
    granularity: str
    hours: HourRange
    bucket_hours: int

    @property
    def buckets(self) -> list[HourRange]:
        """Oldest first; counted back from the end, so only the first bucket can be shorter."""
        edges = list(range(self.hours.end, self.hours.first, -self.bucket_hours))[::-1]
        return [HourRange(max(e - self.bucket_hours, self.hours.first), e) for e in edges]

    @property
    def anchor(self) -> int:
        """The hour that bucket 0 would start at if it were full: bucket = (hour - anchor) // size."""
        return self.hours.end - len(self.buckets) * self.bucket_hours


def at_hour(hour: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + hour * HOUR


def hour_of(at: datetime) -> int:
    """The hour containing ``at`` (floor)."""
    return int((at.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // HOUR)


def hour_after(at: datetime) -> int:
    """The first whole hour at or after ``at`` (ceiling): an end bound that keeps ``at`` inside."""
    floor = hour_of(at)
    return floor if at_hour(floor) == at else floor + 1


def range_hours(name: RangeName, now: datetime) -> HourRange:
    """A chart range ending with the current hour (24h) or the current UTC day (7d, 30d)."""
    _, bucket, total = _CHARTS[name]
    end = hour_of(now) + 1 if bucket == 1 else (hour_of(now) // 24 + 1) * 24
    return HourRange(end - total, end)


def chart(name: RangeName, now: datetime) -> Chart:
    granularity, bucket, _ = _CHARTS[name]
    return Chart(granularity, range_hours(name, now), bucket)


def share_pct(part: int, total: int) -> Decimal:
    """``part`` as a percentage of ``total``, two decimals (0 when the total is 0)."""
    if total == 0:
        return Decimal("0.00")
    return (Decimal(part) * 100 / Decimal(total)).quantize(_HUNDREDTH, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    bucket: int  # index into Chart.buckets
    name: str  # the source or the model ("" when the rows carry none)
    nanos: int


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    key: str  # "" when the rows carry no value for the dimension
    name: str | None  # display name (workspace name, group, key name); None when there is none
    key_prefix: str | None  # keys only
    requests: int
    tokens: int
    credits_nanos: int
    cost_nanos: int


@dataclass(frozen=True, slots=True)
class BreakdownPage:
    rows: Sequence[BreakdownRow]
    total: int  # number of groups in the range
    credits_nanos: int  # sums over the whole range, for shares
    cost_nanos: int


class AnalyticsReader(Protocol):
    def series(self, scope: Scope, chart: Chart, by: SeriesBy, measure: Measure) -> Sequence[SeriesPoint]:
        """Non-zero (bucket, name) sums; the caller fills the zeros."""
        ...

    def breakdown(
        self, scope: Scope, hours: HourRange, by: BreakdownBy, measure: Measure, *, limit: int, offset: int
    ) -> BreakdownPage:
        """Groups ranked by ``measure`` descending (then key), one page of them."""
        ...

    def model_details(self, scope: Scope, hours: HourRange) -> Mapping[str, Mapping[str, int]]:
        """Per model ("" for none): what its tokens were (cache reads and writes, the usage vector's
        counts) and how many requests were recorded at cost 0 for want of a price; models with none of
        it are absent."""
        ...
