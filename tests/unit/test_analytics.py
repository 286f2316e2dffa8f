"""Pure analytics arithmetic: chart buckets, shares and the run-out forecast."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meterline.clock import rfc3339
from meterline.metering.analytics import chart, hour_after, hour_of, range_hours, share_pct
from meterline.metering.forecast import forecast

NOW = datetime(2026, 3, 14, 10, 30, tzinfo=UTC)


def _edges(name: str) -> list[tuple[str, str]]:
    return [(rfc3339(b.start_at), rfc3339(b.end_at)) for b in chart(name, NOW).buckets]  # type: ignore[arg-type]


def test_24h_is_hourly_ending_with_the_current_hour() -> None:
    edges = _edges("24h")
    assert len(edges) == 24
    assert edges[0] == ("2026-03-13T11:00:00Z", "2026-03-13T12:00:00Z")
    assert edges[-1] == ("2026-03-14T10:00:00Z", "2026-03-14T11:00:00Z")


def test_7d_is_daily_ending_with_today() -> None:
    edges = _edges("7d")
    assert len(edges) == 7
    assert edges[0] == ("2026-03-08T00:00:00Z", "2026-03-09T00:00:00Z")
    assert edges[-1] == ("2026-03-14T00:00:00Z", "2026-03-15T00:00:00Z")


def test_30d_is_weekly_counted_back_from_the_end_of_today() -> None:
    edges = _edges("30d")
    assert edges == [
        ("2026-02-13T00:00:00Z", "2026-02-15T00:00:00Z"),  # the 2 days left over
        ("2026-02-15T00:00:00Z", "2026-02-22T00:00:00Z"),
        ("2026-02-22T00:00:00Z", "2026-03-01T00:00:00Z"),
        ("2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z"),
        ("2026-03-08T00:00:00Z", "2026-03-15T00:00:00Z"),
    ]
    hours = range_hours("30d", NOW)
    assert hours.end - hours.first == 30 * 24
    shape = chart("30d", NOW)
    # bucket = (hour - anchor) // size maps the clipped first bucket to 0 and the last hour to the last.
    assert (hours.first - shape.anchor) // shape.bucket_hours == 0
    assert (hours.end - 1 - shape.anchor) // shape.bucket_hours == 4


def test_hour_bounds() -> None:
    assert hour_after(datetime(2026, 3, 14, 10, tzinfo=UTC)) == hour_of(datetime(2026, 3, 14, 10, tzinfo=UTC))
    assert hour_after(datetime(2026, 3, 14, 10, 0, 1, tzinfo=UTC)) == hour_of(NOW) + 1


@pytest.mark.parametrize(
    ("part", "total", "expected"),
    [(1, 3, "33.33"), (2, 3, "66.67"), (0, 0, "0.00"), (5, 5, "100.00"), (1, 8, "12.50")],
)
def test_share_pct_is_exact_to_two_decimals(part: int, total: int, expected: str) -> None:
    assert str(share_pct(part, total)) == expected


def test_forecast_average_and_run_out() -> None:
    # 30 consumed over 3 days (today counted whole): 10 a day; 70 left: 7 days; 10 days remain.
    f = forecast(unit="credits", consumed_nanos=30, remaining_nanos=70, days_elapsed=3, days_remaining=10)
    assert f.avg_per_day_nanos == 10
    assert f.run_out_in_days == Decimal("7.00")
    assert f.will_run_out_before_period_end is True
    f = forecast(unit="EUR", consumed_nanos=30, remaining_nanos=70, days_elapsed=3, days_remaining=5)
    assert (f.run_out_in_days, f.will_run_out_before_period_end, f.unit) == (Decimal("7.00"), False, "EUR")


def test_forecast_rounds_run_out_down_from_the_exact_ratio() -> None:
    f = forecast(unit="credits", consumed_nanos=3, remaining_nanos=10, days_elapsed=1, days_remaining=30)
    assert f.run_out_in_days == Decimal("3.33")
    f = forecast(unit="credits", consumed_nanos=2, remaining_nanos=0, days_elapsed=3, days_remaining=0)
    assert f.avg_per_day_nanos == 1  # 0.666… rounded half-even to a nano
    assert (f.run_out_in_days, f.will_run_out_before_period_end) == (Decimal("0.00"), True)


@pytest.mark.parametrize(("consumed", "remaining"), [(0, 100), (50, None)])
def test_forecast_has_no_run_out_without_usage_or_limit(consumed: int, remaining: int | None) -> None:
    f = forecast(
        unit="credits", consumed_nanos=consumed, remaining_nanos=remaining, days_elapsed=0, days_remaining=9
    )
    assert f.run_out_in_days is None
    assert f.will_run_out_before_period_end is False
    assert f.avg_per_day_nanos == consumed
