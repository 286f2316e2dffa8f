"""Billing periods are calendar months from the anchor day, clamped to short months."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meterline.quotas import billing_period, utc_day


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "anchor", "start", "end"),
    [
        ("2026-03-14 10:30", 14, "2026-03-14", "2026-04-14"),
        ("2026-03-13 23:59:59", 14, "2026-02-14", "2026-03-14"),
        ("2026-01-31 00:00", 31, "2026-01-31", "2026-02-28"),
        ("2026-02-28 12:00", 31, "2026-02-28", "2026-03-31"),
        ("2026-02-27 12:00", 31, "2026-01-31", "2026-02-28"),
        ("2028-02-29 00:00", 31, "2028-02-29", "2028-03-31"),
        ("2028-02-28 23:00", 30, "2028-01-30", "2028-02-29"),
        ("2026-12-31 23:59", 1, "2026-12-01", "2027-01-01"),
        ("2027-01-01 00:00", 15, "2026-12-15", "2027-01-15"),
    ],
)
def test_periods(now: str, anchor: int, start: str, end: str) -> None:
    period = billing_period(at(now), anchor)
    assert (period.start, period.end) == (at(start), at(end))


def test_days_elapsed_and_remaining() -> None:
    period = billing_period(at("2026-03-01 00:00"), 1)
    assert period.days == 31
    assert period.days_elapsed(at("2026-03-01 00:00")) == 1
    assert period.days_elapsed(at("2026-03-14 10:30")) == 14
    assert period.days_remaining(at("2026-03-14 10:30")) == 17
    assert period.days_elapsed(at("2026-03-31 23:59")) == 31
    assert period.days_remaining(at("2026-03-31 23:59")) == 0


def test_bad_anchor() -> None:
    with pytest.raises(ValueError, match="anchor"):
        billing_period(at("2026-03-01 00:00"), 0)


def test_utc_day() -> None:
    day = utc_day(datetime(2026, 3, 14, 23, 30, tzinfo=UTC))
    assert (day.start, day.end) == (at("2026-03-14"), at("2026-03-15"))
