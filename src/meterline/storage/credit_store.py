"""Credit buckets in SQL: the split of each settling row and the balances it is decided from.

``credit_usage`` holds, per organization and billing period, the credits drawn from each bucket; it is
maintained in the settle transaction, after the organization's settles have been put in turn (see
``SqlLedgerStore.append_in``), so the split is exact under concurrency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection

from meterline.clock import to_micros
from meterline.metering.records import LedgerRow
from meterline.quotas.credits import CreditTerms, draw
from meterline.quotas.limits import UNLIMITED
from meterline.quotas.periods import billing_period

_UPSERT = (
    "INSERT INTO credit_usage (organization_id, period_start_us, monthly_nanos, bonus_nanos, overage_nanos) "
    "VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (organization_id, period_start_us) DO UPDATE SET "
    "monthly_nanos = credit_usage.monthly_nanos + excluded.monthly_nanos, "
    "bonus_nanos = credit_usage.bonus_nanos + excluded.bonus_nanos, "
    "overage_nanos = credit_usage.overage_nanos + excluded.overage_nanos"
)


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


# Plain SQL with the driver's markers: these run in every settle transaction, where compiling a
# SQLAlchemy statement cost more than running it.
_GRANTED = "SELECT COALESCE(SUM(credits_nanos), 0) FROM credit_grants WHERE organization_id = {p}"
_PERIODS = (
    "SELECT period_start_us, monthly_nanos, bonus_nanos, overage_nanos FROM credit_usage "
    "WHERE organization_id = {p}"
)


def _marker(conn: Connection) -> str:
    return "?" if conn.dialect.name == "sqlite" else "%s"


def granted(conn: Connection, organization_id: str) -> int:
    return int(conn.exec_driver_sql(_GRANTED.format(p=_marker(conn)), (organization_id,)).scalar_one())


def periods(conn: Connection, organization_id: str) -> dict[int, tuple[int, int, int]]:
    """Per period start: (monthly, bonus, overage) drawn."""
    rows = conn.exec_driver_sql(_PERIODS.format(p=_marker(conn)), (organization_id,))
    return {int(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def balance(conn: Connection, organization_id: str, period_start_us: int) -> CreditBalance:
    drawn = periods(conn, organization_id)
    monthly, bonus, overage = drawn.get(period_start_us, (0, 0, 0))
    return CreditBalance(
        monthly_used=monthly,
        bonus_used_this_period=bonus,
        overage=overage,
        bonus_granted=granted(conn, organization_id),
        bonus_used=sum(b for _, b, _ in drawn.values()),
    )


def split_credits(conn: Connection, rows: Sequence[LedgerRow], terms: CreditTerms) -> None:
    """Decide each row's draw, in order, and add it to ``credit_usage``; marks rows past both buckets
    as overage where credits gate the organization."""
    if terms.monthly_allowance_nanos == UNLIMITED:
        # Everything is drawn from the monthly bucket: no balance to read.
        drawn: dict[int, tuple[int, int, int]] = {}
        bonus_left = 0
    else:
        drawn = periods(conn, terms.organization_id)
        bonus_left = granted(conn, terms.organization_id) - sum(b for _, b, _ in drawn.values())
    deltas: dict[int, list[int]] = {}
    for row in rows:
        start = to_micros(billing_period(row.created_at, terms.billing_anchor_day).start)
        used = drawn.get(start, (0, 0, 0))[0] + deltas.get(start, [0, 0, 0])[0]
        share = draw(
            row.credits_nanos,
            allowance=terms.monthly_allowance_nanos,
            monthly_used=used,
            bonus_left=bonus_left,
        )
        row.credits_monthly_nanos = share.monthly
        row.credits_bonus_nanos = share.bonus
        if share.overage and terms.enforced:
            row.overage = True
        bonus_left -= share.bonus
        delta = deltas.setdefault(start, [0, 0, 0])
        delta[0] += share.monthly
        delta[1] += share.bonus
        delta[2] += share.overage
    conn.exec_driver_sql(
        _UPSERT.format(p=_marker(conn)),
        [(terms.organization_id, start, *delta) for start, delta in sorted(deltas.items())],
    )
