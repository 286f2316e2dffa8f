"""The decision rules: pure functions of amounts and times, so each is unit-tested without a database.

Amounts are integers (credits or money in nanos); ratios are ``Decimal``: never ``float`` (a threshold
at exactly 80 % must fire at exactly 80 %).
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from meterline.alerts.kinds import (
    PROJECTED_RUN_OUT,
    QUARANTINED,
    RATE_LIMITED,
    THRESHOLD,
    UNPRICED,
    UNUSUAL_USAGE,
)
from meterline.money import NANOS_PER_UNIT

DEFAULT_THRESHOLDS = (50, 75, 80, 100)
_DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert decided by a rule. ``(kind, threshold, period_start)`` is what fires only once."""

    kind: str
    threshold: int
    period_start: datetime
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def _percent(used: int, allowance: int) -> Decimal:
    return (Decimal(used) * 100 / Decimal(allowance)).quantize(Decimal("0.01"))


def crossed_thresholds(
    used: int, allowance: int, thresholds: Sequence[int], fired: Collection[int] = ()
) -> list[int]:
    """Thresholds (percent of ``allowance``) that ``used`` has reached and that have not fired yet."""
    if allowance <= 0:
        return []
    return sorted(t for t in set(thresholds) if t not in fired and used * 100 >= t * allowance)


def threshold_alert(
    threshold: int, used: int, allowance: int, period_start: datetime, period_end: datetime, measure: str
) -> Alert:
    what = "spend cap" if measure == "spend" else "monthly credit allowance"
    return Alert(
        kind=THRESHOLD,
        threshold=threshold,
        period_start=period_start,
        message=f"{threshold}% of the {what} used in the billing period ending {period_end:%Y-%m-%d}",
        details={
            "measure": measure,
            "used_nanos": used,
            "allowance_nanos": allowance,
            "used_pct": str(_percent(used, allowance)),
            "period_end": period_end.isoformat(),
        },
    )


# The quota engine's limits that are an organization's period allowance (``quotas.engine.limits_of``): its
# credits (monthly allowance plus bonus) and its spend cap, by name and meter.
_ALLOWANCE_LIMITS = {("credits", "credits"), ("spend_cap", "spend")}


# Used up: so little is left that the refusal is the allowance ending, not one large request that did
# not fit (at 50 % a request for 60 % is refused, and the allowance is far from its 100 % alert).
EXHAUSTED_PCT = 99


def refused_by_allowance(limit: Mapping[str, Any] | None) -> bool:
    """A refusal's ``limit`` details (``LimitExceeded.details``) name the organization's period allowance
    (its credits or its spend cap, not a key's, an identifier's or a rate limit), used up: at least
    ``EXHAUSTED_PCT`` of it consumed."""
    if not limit or limit.get("scope") != "organization" or limit.get("window") != "period":
        return False
    if (limit.get("name"), limit.get("meter")) not in _ALLOWANCE_LIMITS:
        return False
    try:
        consumed, allowance = int(limit["consumed"]), int(limit["max"])
    except (KeyError, TypeError, ValueError):
        return False
    return allowance <= 0 or consumed * 100 >= allowance * EXHAUSTED_PCT


def allowance_refused(
    used: int, allowance: int, requested: int, period_start: datetime, period_end: datetime, measure: str
) -> Alert:
    """The 100 % threshold, said by a refusal: what is left of the allowance (``allowance - used``) cannot
    pay for a request that needs ``requested``, so the organization is blocked short of 100 % (credits
    exhausted at 0.9997 of 1), where no settle would ever cross it. The same alert as the settle's
    (kind, threshold 100, billing period): whichever comes first fires, once."""
    what = "spend cap" if measure == "spend" else "monthly credit allowance"
    used_pct = _percent(used, allowance) if allowance > 0 else Decimal(100)
    return Alert(
        kind=THRESHOLD,
        threshold=100,
        period_start=period_start,
        message=(
            f"100% of the {what} reached in the billing period ending {period_end:%Y-%m-%d}: "
            f"{used_pct}% is used and requests that need more than is left are refused"
        ),
        details={
            "measure": measure,
            "used_nanos": used,
            "allowance_nanos": allowance,
            "used_pct": str(used_pct),
            "period_end": period_end.isoformat(),
            "refused": True,
            "requested_nanos": requested,
        },
    )


def days_elapsed(now: datetime, period_start: datetime) -> int:
    """Whole days begun since the period started (the first day counts as one)."""
    return max(1, -(-(now - period_start) // _DAY))


def projected_run_out(
    used: int, allowance: int, now: datetime, period_start: datetime, period_end: datetime
) -> Alert | None:
    """Average per day so far x days in the period > allowance, while the allowance is not yet used up
    (once it is, the 100 % threshold says so)."""
    if allowance <= 0 or used >= allowance or used <= 0:
        return None
    elapsed = days_elapsed(now, period_start)
    period_days = max(1, round((period_end - period_start) / _DAY))
    if used * period_days <= allowance * elapsed:
        return None
    per_day = used // elapsed
    run_out_in_days = -(-(allowance - used) // max(per_day, 1))
    return Alert(
        kind=PROJECTED_RUN_OUT,
        threshold=100,
        period_start=period_start,
        message=(
            f"at the current rate the allowance runs out in about {run_out_in_days} day(s), "
            f"before the billing period ends on {period_end:%Y-%m-%d}"
        ),
        details={
            "used_nanos": used,
            "allowance_nanos": allowance,
            "avg_per_day_nanos": per_day,
            "projected_nanos": used * period_days // elapsed,
            "days_elapsed": elapsed,
            "days_in_period": period_days,
            "run_out_in_days": run_out_in_days,
        },
    )


def frequent_refusals(refusals_last_hour: int, limit: int, hour_start: datetime) -> Alert | None:
    """``limit`` or more quota refusals (HTTP 429) within the last hour: once per clock hour."""
    if limit <= 0 or refusals_last_hour < limit:
        return None
    return Alert(
        kind=RATE_LIMITED,
        threshold=limit,
        period_start=hour_start,
        message=f"you exceed rate limits frequently: {refusals_last_hour} requests refused in the last hour",
        details={"refusals_last_hour": refusals_last_hour, "limit": limit},
    )


def _amount(nanos: int | Decimal) -> str:
    """Nanos as a whole-unit amount with two decimals, for people (details keep the exact nanos)."""
    return str((Decimal(nanos) / NANOS_PER_UNIT).quantize(Decimal("0.01")))


def unusual_trigger(previous_days: Sequence[int], *, factor: Decimal, min_volume: int) -> int | None:
    """The least usage today for which ``unusual_usage`` fires, given the previous days (None: never, for
    want of previous days). What a process compares its running total with before it reads the
    database's."""
    if not previous_days:
        return None
    above = factor * (Decimal(sum(previous_days)) / len(previous_days))  # as unusual_usage computes it
    return max(min_volume, int(above.to_integral_value(rounding=ROUND_FLOOR)) + 1)


def unusual_usage(
    today: int,
    previous_days: Sequence[int],
    day_start: datetime,
    *,
    factor: Decimal,
    min_volume: int,
    unit: str = "credits",
) -> Alert | None:
    """Today's usage more than ``factor`` x the mean of the previous days (missing days count as 0), and at
    least ``min_volume`` (a quiet organization's first busy day is not an anomaly worth a page). Amounts
    are nanos; the message says them in ``unit`` (credits, or the currency of spend-cap organizations)."""
    if not previous_days or today < min_volume:
        return None
    baseline = Decimal(sum(previous_days)) / len(previous_days)
    if Decimal(today) <= factor * baseline:
        return None
    ratio = None if baseline == 0 else (Decimal(today) / baseline).quantize(Decimal("0.01"))
    why = "no usage in the previous days" if ratio is None else f"{ratio}x the daily mean"
    return Alert(
        kind=UNUSUAL_USAGE,
        threshold=int(factor * 100),
        period_start=day_start,
        message=(
            f"unusual usage pattern: {_amount(today)} {unit} today, {why} of the previous "
            f"{len(previous_days)} days ({_amount(baseline)} {unit} a day)"
        ),
        details={
            "today_nanos": today,
            "baseline_nanos": str(baseline.quantize(Decimal(1))),
            "baseline_days": len(previous_days),
            "factor": None if ratio is None else str(ratio),
            "trigger_factor": str(factor),
        },
    )


def quarantined_usage(reservation_id: str, now: datetime) -> Alert:
    """Usage that could not be settled was set aside for an operator; at most one alert a day. The
    error itself stays with the operator (``meterline quarantine show``): it may name internals."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return Alert(
        kind=QUARANTINED,
        threshold=0,
        period_start=day,
        message=(
            f"usage of reservation {reservation_id} could not be recorded yet and is held for the "
            "operator to review; it is not lost"
        ),
        details={"reservation_id": reservation_id},
    )


def unpriced_usage(model: str, period_start: datetime) -> Alert:
    """Usage of ``model`` was recorded at cost 0: the price book has no price for it. Once per model and
    billing period (the model's tag is the alert's ``threshold``, which makes it fire once)."""
    return Alert(
        kind=UNPRICED,
        threshold=model_tag(model),
        period_start=period_start,
        message=(
            f"usage of model {model!r} was recorded at cost 0: no price is known for it "
            "(said once per model and billing period)"
        ),
        details={"model": model},
    )


def model_tag(model: str) -> int:
    """A stable non-negative 31-bit number for a model name (what makes its alert unique)."""
    return zlib.crc32(model.encode("utf-8")) & 0x7FFFFFFF
