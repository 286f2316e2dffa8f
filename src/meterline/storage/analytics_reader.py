"""SQL implementation of ``meterline.metering.analytics.AnalyticsReader``, and the ledger export reader.

Charts and breakdowns group the hourly rollups in SQL over the (organization_id, hour, ...) unique index
(or (workspace_id, hour) for a workspace scope): their cost follows the hours and groups asked for, not
the ledger's size. The export walks the ledger by keyset on (created_at_us, seq) over the
(organization|workspace, created_at_us) indexes, one page per read, so memory stays flat.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, func, literal, or_, select

from meterline.clock import to_micros
from meterline.metering.analytics import (
    BreakdownBy,
    BreakdownPage,
    BreakdownRow,
    Chart,
    HourRange,
    Measure,
    SeriesBy,
    SeriesPoint,
)
from meterline.metering.reading import LedgerFilter, Scope
from meterline.metering.records import LedgerRow
from meterline.storage.database import Database
from meterline.storage.ledger_store import row_from_db
from meterline.storage.tables import api_keys, ledger, usage_hourly, workspaces

_U = usage_hourly.c
_MEASURES = {"credits": _U.credits_nanos, "cost": _U.cost_nanos}


def _scoped(table: Table, scope: Scope) -> list[ColumnElement[bool]]:
    conditions = [table.c.organization_id == scope.organization_id]
    if scope.workspace_id is not None:
        conditions.append(table.c.workspace_id == scope.workspace_id)
    if scope.identifier_id is not None:
        conditions.append(table.c.identifier_id == scope.identifier_id)
    return conditions


def _in_hours(scope: Scope, hours: HourRange) -> list[ColumnElement[bool]]:
    return [*_scoped(usage_hourly, scope), _U.hour >= hours.first, _U.hour < hours.end]


def _dimension(by: BreakdownBy) -> Any:
    if by == "workspace_group":
        return func.coalesce(workspaces.c.group_name, "")
    return {
        "workspace": _U.workspace_id,
        "user": _U.user_id,
        "model": _U.model,
        "endpoint": _U.endpoint,
        "key": _U.key_id,
    }[by]


def _filters(where: LedgerFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if where.start is not None:
        conditions.append(ledger.c.created_at_us >= to_micros(where.start))
    if where.end is not None:
        conditions.append(ledger.c.created_at_us <= to_micros(where.end))
    for column, value in (
        (ledger.c.model, where.model),
        (ledger.c.key_prefix, where.key_prefix),
        (ledger.c.modality, where.modality),
        (ledger.c.provider, where.provider),
    ):
        if value is not None:
            conditions.append(column == value)
    return conditions


class SqlAnalyticsReader:
    def __init__(self, db: Database) -> None:
        self._db = db

    def series(self, scope: Scope, chart: Chart, by: SeriesBy, measure: Measure) -> Sequence[SeriesPoint]:
        bucket = (_U.hour - chart.anchor) // chart.bucket_hours
        name = _U.source if by == "source" else _U.model
        query = (
            select(bucket.label("bucket"), name.label("name"), func.sum(_MEASURES[measure]))
            .where(*_in_hours(scope, chart.hours))
            .group_by(bucket, name)
        )
        with self._db.read() as conn:
            return [SeriesPoint(int(r[0]), str(r[1]), int(r[2])) for r in conn.execute(query)]

    def breakdown(
        self, scope: Scope, hours: HourRange, by: BreakdownBy, measure: Measure, *, limit: int, offset: int
    ) -> BreakdownPage:
        key = _dimension(by).label("key")
        source: Any = usage_hourly
        if by == "workspace_group":
            source = usage_hourly.join(workspaces, workspaces.c.id == _U.workspace_id)
        groups = (
            select(
                key,
                func.sum(_U.requests).label("requests"),
                func.sum(_U.total_tokens).label("tokens"),
                func.sum(_U.credits_nanos).label("credits"),
                func.sum(_U.cost_nanos).label("cost"),
            )
            .select_from(source)
            .where(*_in_hours(scope, hours))
            .group_by(key)
            .subquery()
        )
        g = groups.c
        name: Any = literal(None)
        prefix: Any = literal(None)
        joined: Any = groups
        if by == "workspace":
            joined = groups.outerjoin(workspaces, workspaces.c.id == g.key)
            name = workspaces.c.name
        elif by == "key":
            joined = groups.outerjoin(api_keys, api_keys.c.id == g.key)
            name, prefix = api_keys.c.name, api_keys.c.key_prefix
        # Window aggregates give the group count and the range's sums with the page, in one query.
        page = (
            select(
                g.key,
                name,
                prefix,
                g.requests,
                g.tokens,
                g.credits,
                g.cost,
                func.count().over(),
                func.sum(g.credits).over(),
                func.sum(g.cost).over(),
            )
            .select_from(joined)
            .order_by(g[measure].desc(), g.key)
            .limit(limit)
            .offset(offset)
        )
        with self._db.read() as conn:
            found = conn.execute(page).all()
            if found:
                total, credits, cost = found[0][7:10]
            else:  # past the last page: the window sums came back with no row
                total, credits, cost = conn.execute(
                    select(func.count(), func.sum(g.credits), func.sum(g.cost)).select_from(groups)
                ).one()
        rows = [
            BreakdownRow(
                key=str(r[0]),
                name=None if r[1] is None else str(r[1]),
                key_prefix=None if r[2] is None else str(r[2]),
                requests=int(r[3]),
                tokens=int(r[4]),
                credits_nanos=int(r[5]),
                cost_nanos=int(r[6]),
            )
            for r in found
        ]
        return BreakdownPage(rows, int(total or 0), int(credits or 0), int(cost or 0))

    def ledger_rows(self, scope: Scope, where: LedgerFilter, *, page_size: int = 1000) -> Iterator[LedgerRow]:
        """Every matching ledger row, oldest first, read ``page_size`` at a time (one snapshot per page)."""
        conditions = [*_scoped(ledger, scope), *_filters(where)]
        after: tuple[int, int] | None = None
        while True:
            query = select(ledger).where(*conditions)
            if after is not None:
                at, seq = after
                query = query.where(
                    ledger.c.created_at_us >= at,
                    or_(ledger.c.created_at_us > at, and_(ledger.c.created_at_us == at, ledger.c.seq > seq)),
                )
            query = query.order_by(ledger.c.created_at_us, ledger.c.seq).limit(page_size)
            with self._db.read() as conn:
                page = conn.execute(query).all()
            yield from (row_from_db(r) for r in page)
            if len(page) < page_size:
                return
            after = (int(page[-1].created_at_us), int(page[-1].seq))
