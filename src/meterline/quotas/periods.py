"""Windows in time: UTC days and monthly billing periods anchored on an organization's day.

"Monthly" is calendar months, not 30 days: a period anchored on the 31st runs Jan 31 -> Feb 28 (29 in a
leap year) -> Mar 31; the anchor day is clamped to each month's length.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta


@dataclass(frozen=True, slots=True)
class Period:
    start: datetime
    end: datetime  # exclusive

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    def days_elapsed(self, now: datetime) -> int:
        """Days begun so far, the current one included (1 on the first day of the period)."""
        seconds = (now - self.start).total_seconds()
        return min(max(int(seconds // 86_400) + 1, 1), self.days)

    def days_remaining(self, now: datetime) -> int:
        return self.days - self.days_elapsed(now)


def _anchored(year: int, month: int, anchor_day: int) -> datetime:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime.combine(date(year, month, day), time(), tzinfo=UTC)


def _shift(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + by
    return index // 12, index % 12 + 1


def billing_period(now: datetime, anchor_day: int) -> Period:
    """The billing period containing ``now`` for an organization anchored on ``anchor_day`` (1-31)."""
    if not 1 <= anchor_day <= 31:
        raise ValueError("billing anchor day must be between 1 and 31")
    now = now.astimezone(UTC)
    start = _anchored(now.year, now.month, anchor_day)
    if start > now:
        start = _anchored(*_shift(now.year, now.month, -1), anchor_day)
    end = _anchored(*_shift(start.year, start.month, 1), anchor_day)
    return Period(start, end)


def utc_day(now: datetime) -> Period:
    start = datetime.combine(now.astimezone(UTC).date(), time(), tzinfo=UTC)
    return Period(start, start + timedelta(days=1))
