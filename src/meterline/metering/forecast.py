"""Run-out forecast of an allowance (seed 002 metric cards): average per day and days until it is gone.

Pure arithmetic on exact integers (nanos of a credit or of the currency) and ``Decimal``. The average
counts the current, partial day as a whole day, so early in a day it is conservative (lower), and a
period's first day never divides by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal

_HUNDREDTH = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Forecast:
    unit: str
    avg_per_day_nanos: int
    # Days (two decimals, rounded down: the warning errs early) until the allowance is gone; None when
    # nothing has been consumed yet or the allowance is unlimited.
    run_out_in_days: Decimal | None
    will_run_out_before_period_end: bool


def forecast(
    *, unit: str, consumed_nanos: int, remaining_nanos: int | None, days_elapsed: int, days_remaining: int
) -> Forecast:
    """``remaining_nanos`` None means unlimited; ``days_elapsed`` includes the current day (≥ 1)."""
    days = max(days_elapsed, 1)
    consumed = max(consumed_nanos, 0)
    average = int((Decimal(consumed) / days).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    if remaining_nanos is None or consumed == 0:
        return Forecast(unit, average, None, False)
    left = max(remaining_nanos, 0)
    # remaining / (consumed / days), kept as one exact division instead of dividing by a rounded average.
    run_out = (Decimal(left) * days / consumed).quantize(_HUNDREDTH, rounding=ROUND_DOWN)
    will_run_out = left == 0 or run_out < days_remaining
    return Forecast(unit, average, run_out, will_run_out)
