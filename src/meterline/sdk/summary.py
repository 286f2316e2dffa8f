"""``GET /v1/usage``: the caller's current usage (seeds 000, 002, 003), as typed values named as the API's
JSON names them (old names warn)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from meterline.sdk._json import Json, dec, obj, opt_dec, opt_str, opt_time, time
from meterline.sdk._renamed import renamed

UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class Allowance:
    """``usage`` of a meter against its ``limit``; ``limit == remaining == -1`` means unlimited."""

    usage: int
    limit: int
    remaining: int

    @property
    def unlimited(self) -> bool:
        return self.limit == UNLIMITED

    @classmethod
    def from_json(cls, data: Json) -> Allowance:
        return cls(int(data["usage"]), int(data["limit"]), int(data["remaining"]))


@dataclass(frozen=True, slots=True)
class WindowTotals:
    """Tokens and calls of a day or of the billing period, with what they cost."""

    tokens: Allowance
    calls: Allowance
    prompt_tokens: int
    completion_tokens: int
    units: int
    cost: Decimal
    credits: Decimal

    @classmethod
    def from_json(cls, data: Json) -> WindowTotals:
        return cls(
            tokens=Allowance.from_json(data["tokens"]),
            calls=Allowance.from_json(data["calls"]),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            units=int(data.get("units", 0)),
            cost=dec(data.get("cost", 0)),
            credits=dec(data.get("credits", 0)),
        )


@dataclass(frozen=True, slots=True)
class BillingPeriod:
    start: datetime
    end: datetime
    days: int
    days_elapsed: int
    days_remaining: int


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """One limit that applies to the caller; credits and spend limits are ``Decimal``, counts ``int``."""

    name: str
    meter: str
    window: str
    scope: str
    policy: str
    max: Decimal
    used: Decimal
    remaining: Decimal
    resets_at: datetime | None

    @property
    def unlimited(self) -> bool:
        return self.max == UNLIMITED

    @classmethod
    def from_json(cls, data: Json) -> LimitUsage:
        return cls(
            name=str(data["name"]),
            meter=str(data["meter"]),
            window=str(data["window"]),
            scope=str(data["scope"]),
            policy=str(data["policy"]),
            max=dec(data["max"]),
            used=dec(data["used"]),
            remaining=dec(data["remaining"]),
            resets_at=opt_time(data.get("resets_at")),
        )


@dataclass(frozen=True, slots=True)
class MonthlyCredits:
    """The plan's allowance for the billing period (``-1``: unlimited), drawn first."""

    allowance: Decimal
    used: Decimal
    remaining: Decimal


@dataclass(frozen=True, slots=True)
class BonusCredits:
    """Granted credits, drawn when the monthly allowance is spent; ``used`` is over all time."""

    granted: Decimal
    used: Decimal
    used_this_period: Decimal
    remaining: Decimal


@dataclass(frozen=True, slots=True)
class LimitedBy:
    """The limit the top-level usage/limit/remaining are measured against: the one on the primary meter
    over the billing period that leaves the caller least (its own, its key's, workspace's or
    organization's)."""

    name: str
    scope: str
    window: str
    resets_at: datetime | None

    @classmethod
    def from_json(cls, data: Any) -> LimitedBy | None:
        if not isinstance(data, dict):
            return None  # nothing caps the primary meter (limit -1), or an older server
        return cls(
            name=str(data["name"]),
            scope=str(data["scope"]),
            window=str(data["window"]),
            resets_at=opt_time(data.get("resets_at")),
        )


@dataclass(frozen=True, slots=True)
class Credits:
    """Seed 002's buckets: the plan's monthly allowance is drawn first, then bonus credits."""

    monthly: MonthlyCredits
    bonus: BonusCredits
    overage: Decimal
    in_flight: Decimal
    used: Decimal
    remaining: Decimal

    monthly_allowance = renamed("monthly_allowance", "monthly.allowance")
    monthly_used = renamed("monthly_used", "monthly.used")
    monthly_remaining = renamed("monthly_remaining", "monthly.remaining")
    bonus_granted = renamed("bonus_granted", "bonus.granted")
    bonus_used = renamed("bonus_used", "bonus.used")
    bonus_remaining = renamed("bonus_remaining", "bonus.remaining")

    @classmethod
    def from_json(cls, data: Json) -> Credits:
        monthly, bonus = obj(data.get("monthly")), obj(data.get("bonus"))
        return cls(
            monthly=MonthlyCredits(
                allowance=dec(monthly["allowance"]),
                used=dec(monthly["used"]),
                remaining=dec(monthly["remaining"]),
            ),
            bonus=BonusCredits(
                granted=dec(bonus["granted"]),
                used=dec(bonus["used"]),
                used_this_period=dec(bonus.get("used_this_period", 0)),
                remaining=dec(bonus["remaining"]),
            ),
            overage=dec(data["overage"]),
            in_flight=dec(data.get("in_flight", 0)),
            used=dec(data["used"]),
            remaining=dec(data["remaining"]),
        )


@dataclass(frozen=True, slots=True)
class Spend:
    """Money spent this period in ``currency``; ``cap``/``remaining`` only for spend-capped organizations."""

    amount: Decimal
    in_flight: Decimal
    cap: Decimal | None
    remaining: Decimal | None
    currency: str


@dataclass(frozen=True, slots=True)
class Forecast:
    """Average consumption per day and the days until the allowance runs out (None: never/unlimited)."""

    avg_per_day: Decimal
    run_out_in_days: Decimal | None
    will_run_out_before_period_end: bool
    unit: str


@dataclass(frozen=True, slots=True)
class UsageSummary:
    plan: str
    meter: str
    usage: int
    limit: int
    remaining: int
    limited_by: LimitedBy | None
    currency: str
    daily: WindowTotals
    monthly: WindowTotals
    billing_period: BillingPeriod
    limits: list[LimitUsage]
    credits: Credits
    spend: Spend
    forecast: Forecast
    scope: Json
    request_id: str | None
    raw: Json

    @classmethod
    def from_json(cls, data: Json) -> UsageSummary:
        period, spend, forecast = obj(data["billing_period"]), obj(data["spend"]), obj(data["forecast"])
        return cls(
            plan=str(data["plan"]),
            meter=str(data.get("meter", "tokens")),
            usage=int(data["usage"]),
            limit=int(data["limit"]),
            remaining=int(data["remaining"]),
            limited_by=LimitedBy.from_json(data.get("limited_by")),
            currency=str(data["currency"]),
            daily=WindowTotals.from_json(data["daily"]),
            monthly=WindowTotals.from_json(data["monthly"]),
            billing_period=BillingPeriod(
                start=time(period["start"]),
                end=time(period["end"]),
                days=int(period["days"]),
                days_elapsed=int(period["days_elapsed"]),
                days_remaining=int(period["days_remaining"]),
            ),
            limits=[LimitUsage.from_json(item) for item in data.get("limits", [])],
            credits=Credits.from_json(data["credits"]),
            spend=Spend(
                amount=dec(spend["amount"]),
                in_flight=dec(spend.get("in_flight", 0)),
                cap=opt_dec(spend.get("cap")),
                remaining=opt_dec(spend.get("remaining")),
                currency=str(spend["currency"]),
            ),
            forecast=Forecast(
                avg_per_day=dec(forecast["avg_per_day"]),
                run_out_in_days=opt_dec(forecast.get("run_out_in_days")),
                will_run_out_before_period_end=bool(forecast.get("will_run_out_before_period_end")),
                unit=str(forecast["unit"]),
            ),
            scope=obj(data.get("scope")),
            request_id=opt_str(data.get("request_id")),
            raw=data,
        )


def parse_summary(data: Any) -> UsageSummary:
    return UsageSummary.from_json(data)
