"""The period's allocation and how much of it is used: the usage page's progress bar and the usage bar.

Computed from the body of ``GET /v1/usage`` (decoded with exact decimals), so both show exactly what the
API says. For credit plans the allocation is the monthly allowance plus the bonus credits available
this period (seed 002: monthly credits are drawn first, then bonus credits); for spend-cap (BYOM)
organizations it is the cap in money; for unlimited plans there is no allocation, only what was used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

UNLIMITED = -1
# Seed 002: the referral button shows from half the allocation, the upgrade button from three quarters
# (and always on the free tier).
REFERRAL_AT_PCT = Decimal(50)
UPGRADE_AT_PCT = Decimal(75)
FREE_PLAN = "free"
_TENTH = Decimal("0.1")
_HUNDRED = Decimal(100)


@dataclass(frozen=True, slots=True)
class Allocation:
    plan: str
    unit: str  # "credits", or the currency of a spend cap
    used: Decimal
    total: Decimal | None  # None: unlimited
    monthly_used: Decimal  # credits plans: the part drawn from the monthly bucket (equals used for money)
    bonus_used: Decimal  # bonus credits drawn this period
    in_flight: Decimal  # consumed by streams still running (already counted in ``used``)

    @property
    def remaining(self) -> Decimal | None:
        return None if self.total is None else max(self.total - self.used, Decimal(0))

    @property
    def used_pct(self) -> Decimal | None:
        return _pct(self.used, self.total)

    @property
    def monthly_pct(self) -> Decimal | None:
        """The monthly segment's width on the bar (capped so the segments never exceed 100 %)."""
        pct = _pct(self.monthly_used, self.total)
        return None if pct is None else min(pct, _HUNDRED)

    @property
    def bonus_pct(self) -> Decimal | None:
        pct = _pct(self.bonus_used, self.total)
        monthly = self.monthly_pct
        if pct is None or monthly is None:
            return None
        return min(pct, _HUNDRED - monthly)

    def reached(self, pct: Decimal) -> bool:
        """Whether ``pct`` percent of the allocation is used, exactly (not the rounded percentage)."""
        if self.total is None:
            return False
        return self.used * _HUNDRED >= pct * self.total

    @property
    def show_upgrade(self) -> bool:
        return self.plan == FREE_PLAN or self.reached(UPGRADE_AT_PCT)

    @property
    def show_referral(self) -> bool:
        return self.reached(REFERRAL_AT_PCT)


def _pct(part: Decimal, whole: Decimal | None) -> Decimal | None:
    if whole is None:
        return None
    if whole <= 0:
        return _HUNDRED if part > 0 else Decimal(0)
    return (part * _HUNDRED / whole).quantize(_TENTH, rounding=ROUND_HALF_EVEN)


def _decimal(value: Any) -> Decimal:
    # Bodies are decoded with ``parse_float=Decimal``: numbers arrive as int or Decimal, never float.
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise TypeError(f"expected an exact number, got {type(value).__name__}")
    return Decimal(value)


def allocation_of(summary: Mapping[str, Any]) -> Allocation:
    """The allocation of a ``GET /v1/usage`` body."""
    plan = str(summary["plan"])
    spend = summary["spend"]
    if spend["cap"] is not None:
        used = _decimal(spend["amount"])
        return Allocation(
            plan=plan,
            unit=str(spend["currency"]),
            used=used,
            total=_decimal(spend["cap"]),
            monthly_used=used,
            bonus_used=Decimal(0),
            in_flight=_decimal(spend["in_flight"]),
        )
    credits = summary["credits"]
    monthly, bonus = credits["monthly"], credits["bonus"]
    allowance = _decimal(monthly["allowance"])
    total = (
        None
        if allowance == UNLIMITED
        else allowance + _decimal(bonus["remaining"]) + _decimal(bonus["used_this_period"])
    )
    return Allocation(
        plan=plan,
        unit="credits",
        used=_decimal(credits["used"]),
        total=total,
        monthly_used=_decimal(monthly["used"]) + _decimal(credits["overage"]),
        bonus_used=_decimal(bonus["used_this_period"]),
        in_flight=_decimal(credits["in_flight"]),
    )
