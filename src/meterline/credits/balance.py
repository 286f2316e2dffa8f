"""An organization's credit balance in one billing period, as drawn by settled rows."""

from __future__ import annotations

from dataclasses import dataclass

from meterline.credits.terms import draw


@dataclass(frozen=True, slots=True)
class CreditBalance:
    """An organization's credits in one billing period (nanos)."""

    monthly_used: int
    bonus_used_this_period: int
    overage: int
    bonus_granted: int
    bonus_used: int  # all periods

    @property
    def bonus_left(self) -> int:
        return self.bonus_granted - self.bonus_used

    def left(self, allowance_nanos: int) -> int:
        """Credits still to draw: the monthly bucket's rest, then the bonus bucket's (never negative).
        For a limited allowance; an unlimited one has no end."""
        return max(allowance_nanos - self.monthly_used, 0) + max(self.bonus_left, 0)

    def including(self, in_flight_nanos: int, allowance_nanos: int) -> CreditBalance:
        """The balance as it will be once work in flight (streams still running) settles at what it has
        consumed so far: drawn monthly first, then bonus, like a settle."""
        if in_flight_nanos <= 0:
            return self
        split = draw(
            in_flight_nanos,
            allowance=allowance_nanos,
            monthly_used=self.monthly_used,
            bonus_left=self.bonus_left,
        )
        return CreditBalance(
            monthly_used=self.monthly_used + split.monthly,
            bonus_used_this_period=self.bonus_used_this_period + split.bonus,
            overage=self.overage + split.overage,
            bonus_granted=self.bonus_granted,
            bonus_used=self.bonus_used + split.bonus,
        )
