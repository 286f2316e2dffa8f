"""The usage summary of a scope (``GET /v1/usage``, seeds 000 and 003)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from meterline.metering.reading import Scope, Totals, UsageReader
from meterline.quotas import Period, Plan, billing_period, remaining, utc_day
from meterline.quotas.engine import LimitStatus


@dataclass(frozen=True, slots=True)
class Allowance:
    usage: int
    limit: int
    remaining: int


def allowance(used: int, limit: int) -> Allowance:
    return Allowance(used, limit, remaining(limit, used))


@dataclass(frozen=True, slots=True)
class UsageSummary:
    plan: Plan
    period: Period
    today: Totals
    this_period: Totals
    days_elapsed: int
    days_remaining: int

    @property
    def daily_tokens(self) -> Allowance:
        return allowance(self.today.total_tokens, self.plan.daily_tokens)

    @property
    def daily_calls(self) -> Allowance:
        return allowance(self.today.requests, self.plan.daily_calls)

    @property
    def monthly_tokens(self) -> Allowance:
        return allowance(self.this_period.total_tokens, self.plan.monthly_tokens)

    @property
    def monthly_calls(self) -> Allowance:
        return allowance(self.this_period.requests, self.plan.monthly_calls)


def summarize(reader: UsageReader, scope: Scope, plan: Plan, anchor_day: int, now: datetime) -> UsageSummary:
    period = billing_period(now, anchor_day)
    day = utc_day(now)
    # Rollups are hourly: read up to the end of the current hour so the newest rows count.
    return UsageSummary(
        plan=plan,
        period=period,
        today=reader.totals(scope, day.start, day.end),
        this_period=reader.totals(scope, period.start, period.end),
        days_elapsed=period.days_elapsed(now),
        days_remaining=period.days_remaining(now),
    )


# Between limits that leave the same, the narrower one names the caller's own allowance.
_NARROWNESS = {"identifier": 0, "key": 1, "workspace": 2, "organization": 3}


def tightest(statuses: Iterable[LimitStatus], meter: str) -> LimitStatus | None:
    """Of the limits that apply to a caller, the one on ``meter`` over the billing period that leaves it
    the least: what the summary's top-level usage/limit/remaining report (seed 003's "remaining quota").
    An identifier's own 100,000 tokens, or its organization's 49,999,000 left of 50,000,000, whichever
    runs out first. Day and minute limits are not "the period's quota"; they are listed in ``limits``.
    None when no finite limit caps the meter (the top level then says -1, unlimited)."""
    candidates = [
        s for s in statuses if s.limit.meter == meter and s.limit.window == "period" and not s.limit.unlimited
    ]
    return min(candidates, key=lambda s: (s.remaining, s.limit.max, _NARROWNESS[s.limit.scope]), default=None)
