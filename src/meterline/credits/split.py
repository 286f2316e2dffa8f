"""The credit split of a settle: each row's draw, in order, from the balances before it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from meterline.clock import to_micros
from meterline.credits.terms import CreditTerms, draw
from meterline.quotas.periods import billing_period

if TYPE_CHECKING:  # metering's records carry credit terms: a runtime import would be circular
    from meterline.metering.records import LedgerRow


def split(
    rows: Sequence[LedgerRow], terms: CreditTerms, monthly_drawn: Mapping[int, int], bonus_left: int
) -> list[tuple[int, int, int, int]]:
    """Decide each row's draw, in order: monthly bucket first, then bonus, the rest overage (marked on
    the row where credits gate the organization). ``monthly_drawn`` is what each billing period (by its
    start, µs) has drawn so far. Answers the draws to add, per period: (start, monthly, bonus, overage)."""
    deltas: dict[int, list[int]] = {}
    for row in rows:
        start = to_micros(billing_period(row.created_at, terms.billing_anchor_day).start)
        delta = deltas.setdefault(start, [0, 0, 0])
        share = draw(
            row.credits_nanos,
            allowance=terms.monthly_allowance_nanos,
            monthly_used=monthly_drawn.get(start, 0) + delta[0],
            bonus_left=bonus_left,
        )
        row.credits_monthly_nanos = share.monthly
        row.credits_bonus_nanos = share.bonus
        if share.overage and terms.enforced:
            row.overage = True
        bonus_left -= share.bonus
        delta[0] += share.monthly
        delta[1] += share.bonus
        delta[2] += share.overage
    return [(start, monthly, bonus, overage) for start, (monthly, bonus, overage) in sorted(deltas.items())]
