"""How a range of hours is read from the rollups: as few, as coarse entries as cover it exactly.

A range [first, end) of whole hours becomes its whole UTC days (day entries) and the hours left at either
end (hour entries where the narrow rollups keep them, else ``usage_hourly``). Breakdowns read whole days
through billing-period entries where fewer entries cover them (``with_periods``): a period entry, minus
the days of that period outside the range. An identifier's scope is not kept narrowly (the
narrow rollups are per organization and workspace): it reads ``usage_hourly`` for the whole range, by its
(organization, identifier, hour) index, so only the identifier's own entries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, select

from meterline.clock import MICROS_PER_DAY, from_micros, to_micros
from meterline.metering.reading import Scope
from meterline.quotas.periods import billing_period
from meterline.storage.tables import organizations, usage_rollups
from meterline.storage.usage_rollups import DAY, HOUR, PERIOD, WHOLE_ORGANIZATION

FULL = "u"  # hours read from usage_hourly (every dimension, hourly)
_R = usage_rollups.c


@dataclass(frozen=True, slots=True)
class Span:
    grain: str  # HOUR, DAY, PERIOD or FULL
    first: int  # in the grain's unit: hours (HOUR, FULL) or days (DAY, PERIOD)
    end: int
    sign: int = 1  # -1: subtracted (the days of a period entry that lie outside the range)

    def start_hour(self, bucket: int) -> int:
        """The first hour of one of this span's buckets."""
        return bucket if self.grain in (HOUR, FULL) else bucket * 24


def spans(
    scope: Scope,
    first: int,
    end: int,
    *,
    hours_kept: bool,
    days: bool = True,
) -> list[Span]:
    """Cover hours [first, end). ``hours_kept``: the dimension has hour entries; ``days``: whole days may
    be read as day entries (not when the caller needs them split by hour)."""
    if first >= end:
        return []
    if scope.identifier_id is not None:
        return [Span(FULL, first, end)]
    by_hour = HOUR if hours_kept else FULL
    first_day, end_day = -(-first // 24), end // 24
    if not days or first_day >= end_day:
        return [Span(by_hour, first, end)]
    out = []
    if first < first_day * 24:
        out.append(Span(by_hour, first, first_day * 24))
    out.append(Span(DAY, first_day, end_day))
    if end_day * 24 < end:
        out.append(Span(by_hour, end_day * 24, end))
    return out


def narrow_where(scope: Scope, dimension: str, span: Span) -> list[ColumnElement[bool]]:
    """The narrow entries of ``scope`` for ``dimension`` in ``span`` (one range of the primary key)."""
    return [
        _R.organization_id == scope.organization_id,
        _R.workspace_id == (scope.workspace_id or WHOLE_ORGANIZATION),
        _R.dimension == dimension,
        _R.grain == span.grain,
        _R.bucket >= span.first,
        _R.bucket < span.end,
    ]


def with_periods(covered: list[Span], anchor_day: int, today: int) -> list[Span]:
    """``covered`` with its whole days read through billing-period entries where that reads fewer entries.

    A period overlapping the days either adds its days inside the range, or is its one period entry minus
    its days outside the range (exact: a period entry is the sum of its days). Days after ``today`` hold no
    usage, so subtracting them costs nothing: a range that ends today and reaches back past the start of
    the current period reads that period as one entry. A range that is exactly a period: one entry."""
    out: list[Span] = []
    for span in covered:
        if span.grain != DAY:
            out.append(span)
            continue
        day = span.first
        while day < span.end:
            start, stop = period_days(day, anchor_day)
            lo, hi = day, min(stop, span.end)
            outside = (lo - start) + max(0, min(stop, today + 1) - hi)  # entries read to subtract
            if 1 + outside < hi - lo:
                out.append(Span(PERIOD, start, start + 1))
                if start < lo:
                    out.append(Span(DAY, start, lo, -1))
                if hi < stop:
                    out.append(Span(DAY, hi, stop, -1))
            else:
                out.append(Span(DAY, lo, hi))
            day = hi
    return out


@functools.lru_cache(maxsize=4096)
def period_days(day: int, anchor_day: int) -> tuple[int, int]:
    """[start, end) in days of the billing period containing ``day``."""
    period = billing_period(from_micros(day * MICROS_PER_DAY), anchor_day)
    return to_micros(period.start) // MICROS_PER_DAY, to_micros(period.end) // MICROS_PER_DAY


def anchor_day(conn: Connection, organization_id: str) -> int | None:
    found = conn.execute(
        select(organizations.c.billing_anchor_day).where(organizations.c.id == organization_id)
    ).scalar_one_or_none()
    return None if found is None else int(found)


__all__ = [
    "DAY",
    "FULL",
    "HOUR",
    "PERIOD",
    "Span",
    "anchor_day",
    "narrow_where",
    "period_days",
    "spans",
    "with_periods",
]
