"""Credits: the monthly bucket (the plan's allowance, new each billing period) is drawn first, then the
bonus bucket (operator grants, never reset); what neither covers is overage (seed 002).

The split is decided once per ledger row, when it settles, and stored on the row: balances are then
sums of ledger rows, and a recomputation from the ledger gives the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from meterline.quotas.limits import UNLIMITED


@dataclass(frozen=True, slots=True)
class CreditTerms:
    """How an organization's credits are drawn: its plan's monthly allowance and its billing anchor."""

    organization_id: str
    monthly_allowance_nanos: int  # -1: unlimited (everything is drawn from the monthly bucket)
    billing_anchor_day: int
    # Credits gate this organization (no spend cap and a limited allowance): only then is a draw past
    # both buckets marked as overage on the row.
    enforced: bool
    # Spend-cap organizations (BYOM): alerts measure money spent against this cap instead of credits.
    spend_cap_nanos: int | None = None


@dataclass(frozen=True, slots=True)
class Draw:
    monthly: int
    bonus: int
    overage: int


def draw(amount: int, *, allowance: int, monthly_used: int, bonus_left: int) -> Draw:
    """Split ``amount`` (nanos): monthly first, then bonus, the rest overage. Never negative."""
    if amount < 0:
        raise ValueError("credits drawn cannot be negative")
    if allowance == UNLIMITED:
        return Draw(amount, 0, 0)
    monthly = min(amount, max(allowance - monthly_used, 0))
    bonus = min(amount - monthly, max(bonus_left, 0))
    return Draw(monthly, bonus, amount - monthly - bonus)
