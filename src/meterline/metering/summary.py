"""The usage summary of a scope (``GET /v1/usage``, seeds 000 and 003)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from meterline.metering.reading import Scope, Totals, UsageReader
from meterline.quotas import Period, Plan, billing_period, remaining, utc_day


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
    def primary(self) -> Allowance:
        """The plan's primary meter: tokens this billing period."""
        return allowance(self.this_period.total_tokens, self.plan.monthly_tokens)

    @property
    def daily_tokens(self) -> Allowance:
        return allowance(self.today.total_tokens, self.plan.daily_tokens)

    @property
    def daily_calls(self) -> Allowance:
        return allowance(self.today.requests, self.plan.daily_calls)

    @property
    def monthly_tokens(self) -> Allowance:
        return self.primary

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
