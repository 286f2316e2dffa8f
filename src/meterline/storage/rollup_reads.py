"""How a range of hours is read from the rollups: as few, as coarse entries as cover it exactly.

A range [first, end) of whole hours becomes its whole UTC days (day entries) and the hours left at either
end (hour entries where the narrow rollups keep them, else ``usage_hourly``); a range that is exactly one
billing period of the organization is one period entry. An identifier's scope is not kept narrowly (the
narrow rollups are per organization and workspace): it reads ``usage_hourly`` for the whole range, by its
(organization, identifier, hour) index, so only the identifier's own entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, select

from meterline.clock import MICROS_PER_DAY, MICROS_PER_HOUR, from_micros, to_micros
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
    period_start_day: int | None = None,
) -> list[Span]:
    """Cover hours [first, end). ``hours_kept``: the dimension has hour entries; ``days``: whole days may
    be read as day entries (not when the caller needs them split by hour); ``period_start_day``: the range
    is exactly that billing period."""
    if first >= end:
        return []
    if scope.identifier_id is not None:
        return [Span(FULL, first, end)]
    if period_start_day is not None:
        return [Span(PERIOD, period_start_day, period_start_day + 1)]
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


def period_start_day(conn: Connection, organization_id: str, first: int, end: int) -> int | None:
    """The day a billing period starts on if hours [first, end) are exactly that period, else None."""
    anchor = conn.execute(
        select(organizations.c.billing_anchor_day).where(organizations.c.id == organization_id)
    ).scalar_one_or_none()
    if anchor is None or first % 24:
        return None
    period = billing_period(from_micros(first * MICROS_PER_HOUR), int(anchor))
    start, stop = to_micros(period.start) // MICROS_PER_HOUR, to_micros(period.end) // MICROS_PER_HOUR
    return start * MICROS_PER_HOUR // MICROS_PER_DAY if (start, stop) == (first, end) else None


__all__ = ["DAY", "FULL", "HOUR", "PERIOD", "Span", "narrow_where", "period_start_day", "spans"]
