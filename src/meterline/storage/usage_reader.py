"""SQL implementation of ``meterline.metering.reading.UsageReader``.

Totals and daily history read the narrow rollups (``usage_rollups``: per source, by day and by hour; an
identifier's scope reads ``usage_hourly``), never the ledger: their cost depends on the days and hours
asked for, not on the number of ledger rows. Ledger pages use the (organization|workspace,
created_at) indexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, func, select

from meterline.clock import MICROS_PER_HOUR, to_micros
from meterline.metering.reading import DailyTotals, LedgerFilter, Page, Scope, Totals
from meterline.storage.database import Database
from meterline.storage.ledger_store import row_from_db
from meterline.storage.rollup_reads import FULL, narrow_where, spans
from meterline.storage.tables import NARROW_MEASURES, ledger, usage_hourly, usage_rollups

_SUMS = (
    func.coalesce(func.sum(usage_hourly.c.requests), 0),
    func.coalesce(func.sum(usage_hourly.c.units), 0),
    func.coalesce(func.sum(usage_hourly.c.prompt_tokens), 0),
    func.coalesce(func.sum(usage_hourly.c.completion_tokens), 0),
    func.coalesce(func.sum(usage_hourly.c.total_tokens), 0),
    func.coalesce(func.sum(usage_hourly.c.cost_nanos), 0),
    func.coalesce(func.sum(usage_hourly.c.credits_nanos), 0),
)


def _totals(row: Any) -> Totals:
    return Totals(*(int(v) for v in row))


def _scoped(table: Table, scope: Scope) -> list[ColumnElement[bool]]:
    """Conditions confining ``table`` (the ledger or a rollup: same column names) to ``scope``."""
    conditions = [table.c.organization_id == scope.organization_id]
    if scope.workspace_id is not None:
        conditions.append(table.c.workspace_id == scope.workspace_id)
    if scope.identifier_id is not None:
        conditions.append(table.c.identifier_id == scope.identifier_id)
    return conditions


_R = usage_rollups.c
_NARROW_SUMS = tuple(func.coalesce(func.sum(_R[m]), 0) for m in NARROW_MEASURES)


class SqlUsageReader:
    def __init__(self, db: Database) -> None:
        self._db = db

    def totals(self, scope: Scope, start: datetime, end: datetime) -> Totals:
        first, last = to_micros(start) // MICROS_PER_HOUR, to_micros(end) // MICROS_PER_HOUR
        sums = [0] * len(NARROW_MEASURES)
        with self._db.read() as conn:
            for span in spans(scope, first, last, hours_kept=True):
                if span.grain == FULL:
                    query = select(*_SUMS).where(
                        *_scoped(usage_hourly, scope),
                        usage_hourly.c.hour >= span.first,
                        usage_hourly.c.hour < span.end,
                    )
                else:
                    query = select(*_NARROW_SUMS).where(*narrow_where(scope, "source", span))
                for i, value in enumerate(conn.execute(query).one()):
                    sums[i] += int(value)
        return Totals(*sums)

    def daily(self, scope: Scope, first_day: date, days: int) -> Sequence[DailyTotals]:
        first = (first_day - date(1970, 1, 1)).days * 24
        if days <= 0:
            return []
        (span,) = spans(scope, first, first + days * 24, hours_kept=True)  # whole days: one span
        if span.grain == FULL:
            day: Any = usage_hourly.c.hour // 24
            query = (
                select(day.label("day"), *_SUMS)
                .where(
                    *_scoped(usage_hourly, scope),
                    usage_hourly.c.hour >= span.first,
                    usage_hourly.c.hour < span.end,
                )
                .group_by(day)
            )
        else:
            day = _R.bucket
            query = select(day, *_NARROW_SUMS).where(*narrow_where(scope, "source", span)).group_by(day)
        with self._db.read() as conn:
            found = {int(r[0]): _totals(r[1:]) for r in conn.execute(query)}
        base = first // 24
        return [
            DailyTotals(first_day + timedelta(days=i), found.get(base + i, Totals())) for i in range(days)
        ]

    def ledger_page(self, scope: Scope, where: LedgerFilter, *, limit: int, offset: int) -> Page:
        conditions = _scoped(ledger, scope)
        if where.start is not None:
            conditions.append(ledger.c.created_at_us >= to_micros(where.start))
        if where.end is not None:
            conditions.append(ledger.c.created_at_us <= to_micros(where.end))
        if where.model is not None:
            conditions.append(ledger.c.model == where.model)
        if where.key_prefix is not None:
            conditions.append(ledger.c.key_prefix == where.key_prefix)
        if where.modality is not None:
            conditions.append(ledger.c.modality == where.modality)
        if where.provider is not None:
            conditions.append(ledger.c.provider == where.provider)
        condition = and_(*conditions)
        query = (
            select(ledger)
            .where(condition)
            .order_by(ledger.c.created_at_us.desc(), ledger.c.seq.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._db.read() as conn:
            rows = [row_from_db(r) for r in conn.execute(query)]
            total = conn.execute(select(func.count()).select_from(ledger).where(condition)).scalar_one()
        return Page(rows=rows, total=int(total))
