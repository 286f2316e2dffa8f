"""SQL implementation of ``meterline.quotas.engine.UsageSource``: what the ledger says a counter holds.

Day and period windows read the hourly rollups (their windows start on whole hours); the rolling minute
reads the last minute of ledger rows through the (organization, created_at) index.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Table, func, select

from meterline.clock import MICROS_PER_HOUR
from meterline.quotas.engine import WindowQuery
from meterline.storage import credit_store
from meterline.storage.database import Database
from meterline.storage.tables import ledger, usage_hourly

# Meter -> (rollup measure, ledger column); ``calls`` counts rows.
_MEASURES = {
    "tokens": ("total_tokens", "total_tokens"),
    "credits": ("credits_nanos", "credits_nanos"),
    "spend": ("cost_nanos", "cost_nanos"),
}


def _conditions(table: Table, query: WindowQuery) -> list[ColumnElement[bool]]:
    conditions = [table.c.organization_id == query.organization_id]
    if query.workspace_id is not None:
        conditions.append(table.c.workspace_id == query.workspace_id)
    if query.key_id is not None:
        conditions.append(table.c.key_id == query.key_id)
    if query.identifier_id is not None:
        conditions.append(table.c.identifier_id == query.identifier_id)
    if query.meter.startswith("units:"):
        conditions.append(table.c.event == query.meter.removeprefix("units:"))
    return conditions


def _amount(table: Table, meter: str, *, rollup: bool) -> Any:
    if meter == "calls":
        return table.c.requests if rollup else 1
    if meter.startswith("units:"):
        return table.c.units
    rollup_name, ledger_name = _MEASURES[meter]
    return table.c[rollup_name if rollup else ledger_name]


class SqlUsageSource:
    def __init__(self, db: Database) -> None:
        self._db = db

    def window_usage(self, query: WindowQuery) -> int:
        first, last = query.start_us // MICROS_PER_HOUR, query.end_us // MICROS_PER_HOUR
        statement = select(func.coalesce(func.sum(_amount(usage_hourly, query.meter, rollup=True)), 0)).where(
            *_conditions(usage_hourly, query), usage_hourly.c.hour >= first, usage_hourly.c.hour < last
        )
        with self._db.read() as conn:
            return int(conn.execute(statement).scalar_one())

    def recent_usage(self, query: WindowQuery) -> list[tuple[int, int]]:
        second = ledger.c.created_at_us // 1_000_000
        amount = _amount(ledger, query.meter, rollup=False)
        total = func.count() if query.meter == "calls" else func.sum(amount)
        statement = (
            select(second, total)
            .where(
                *_conditions(ledger, query),
                ledger.c.created_at_us >= query.start_us,
                ledger.c.created_at_us < query.end_us,
            )
            .group_by(second)
        )
        with self._db.read() as conn:
            return [(int(s), int(a)) for s, a in conn.execute(statement) if a]

    def bonus_available(self, organization_id: str, period_start_us: int) -> int:
        with self._db.read() as conn:
            drawn = credit_store.periods(conn, organization_id)
            before = sum(bonus for start, (_, bonus, _) in drawn.items() if start != period_start_us)
            return credit_store.granted(conn, organization_id) - before
