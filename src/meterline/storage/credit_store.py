"""Credit buckets in SQL: the balances a settle's credit split is decided from, and its draws.

``credit_usage`` holds, per organization and billing period, the credits drawn from each bucket; it is
maintained in the settle transaction, after the organization's settles have been put in turn (the split
itself is decided by ``metering.unit_of_work.split_credits``), so the split is exact under concurrency.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection

from meterline.credits import CreditBalance
from meterline.storage.driver_sql import fetch, pg_columns, send, send_many

_UPSERT = (
    "INSERT INTO credit_usage (organization_id, period_start_us, monthly_nanos, bonus_nanos, overage_nanos) "
    "VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (organization_id, period_start_us) DO UPDATE SET "
    "monthly_nanos = credit_usage.monthly_nanos + excluded.monthly_nanos, "
    "bonus_nanos = credit_usage.bonus_nanos + excluded.bonus_nanos, "
    "overage_nanos = credit_usage.overage_nanos + excluded.overage_nanos"
)


_PG_UPSERT = (
    "INSERT INTO credit_usage (organization_id, period_start_us, monthly_nanos, bonus_nanos, overage_nanos) "
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
    + _UPSERT[_UPSERT.index("ON CONFLICT") :]
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
    return int(fetch(conn, _GRANTED.format(p=_marker(conn)), (organization_id,))[0][0])


def periods(conn: Connection, organization_id: str) -> dict[int, tuple[int, int, int]]:
    """Per period start: (monthly, bonus, overage) drawn."""
    rows = fetch(conn, _PERIODS.format(p=_marker(conn)), (organization_id,))
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


def credits_drawn(conn: Connection, organization_id: str) -> tuple[dict[int, int], int]:
    """Monthly credits drawn per period start, and bonus credits left (granted less drawn)."""
    return drawn_and_left(periods(conn, organization_id), granted(conn, organization_id))


def drawn_and_left(drawn: dict[int, tuple[int, int, int]], granted: int) -> tuple[dict[int, int], int]:
    """``credits_drawn`` from what ``periods`` and ``granted`` read."""
    bonus_left = granted - sum(b for _, b, _ in drawn.values())
    return {start: monthly for start, (monthly, _, _) in drawn.items()}, bonus_left


def add_credit_draws(conn: Connection, draws: Sequence[tuple[str, int, int, int, int]]) -> None:
    """Add (organization, period start, monthly, bonus, overage) draws to ``credit_usage``. On PostgreSQL
    one statement whatever the organizations (``unnest`` over one array per column), which may touch a
    row once: draws of one organization and period are summed first (a settle makes one per period)."""
    summed: dict[tuple[str, int], list[int]] = {}
    for organization_id, start, monthly, bonus, overage in draws:
        amounts = summed.setdefault((organization_id, start), [0, 0, 0])
        amounts[0] += monthly
        amounts[1] += bonus
        amounts[2] += overage
    entries = [(*key, *summed[key]) for key in sorted(summed)]
    if conn.dialect.name == "sqlite":
        send_many(conn, _UPSERT.format(p="?"), entries)
    else:
        send(conn, _PG_UPSERT, pg_columns(entries))
