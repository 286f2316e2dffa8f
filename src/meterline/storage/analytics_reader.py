"""SQL implementation of ``meterline.metering.analytics.AnalyticsReader``, and the ledger export reader.

Charts and breakdowns group the narrow rollups (``usage_rollups``: one dimension at a time, per hour, day
or billing period; see ``rollup_reads`` for how a range is covered): their cost follows the buckets and
distinct values asked for, not the ledger's size. Hours that the narrow rollups do not keep (a
breakdown's partial days) and identifier scopes read ``usage_hourly``. The export walks the ledger by
keyset on (created_at_us, seq) over the
(organization|workspace, created_at_us) indexes, one page per read, so memory stays flat.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, and_, func, literal, or_, select, union_all

from meterline.clock import Clock, to_micros
from meterline.metering.analytics import (
    BreakdownBy,
    BreakdownPage,
    BreakdownRow,
    Chart,
    HourRange,
    Measure,
    SeriesBy,
    SeriesPoint,
    hour_of,
)
from meterline.metering.reading import LedgerFilter, Scope
from meterline.metering.records import LedgerRow
from meterline.storage import usage_details
from meterline.storage.database import Database
from meterline.storage.ledger_store import row_from_db
from meterline.storage.rollup_reads import FULL, anchor_day, narrow_where, spans, with_periods
from meterline.storage.tables import api_keys, ledger, usage_hourly, usage_rollups, workspaces

_U = usage_hourly.c
_R = usage_rollups.c
_MEASURES = {"credits": _U.credits_nanos, "cost": _U.cost_nanos}
_NARROW_MEASURE = {"credits": "credits_nanos", "cost": "cost_nanos"}
_NARROW_DIMENSION = {
    "workspace": "workspace",
    "workspace_group": "workspace",  # then grouped by the workspaces' group
    "user": "user",
    "model": "model",
    "endpoint": "endpoint",
    "key": "key",
}


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
    """The ``usage_hourly`` column a breakdown groups by (groups: by workspace, then by its group)."""
    return {
        "workspace": _U.workspace_id,
        "workspace_group": _U.workspace_id,
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
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock  # which days are still to come (they hold no usage to subtract)

    def series(self, scope: Scope, chart: Chart, by: SeriesBy, measure: Measure) -> Sequence[SeriesPoint]:
        # Day entries only where a chart bucket is whole days (7d, 30d); the 24h chart reads hours.
        whole_days = chart.bucket_hours % 24 == 0 and chart.anchor % 24 == 0
        points: dict[tuple[int, str], int] = {}
        with self._db.read() as conn:
            for span in spans(scope, chart.hours.first, chart.hours.end, hours_kept=True, days=whole_days):
                if span.grain == FULL:
                    bucket: Any = _U.hour
                    name = _U.source if by == "source" else _U.model
                    query = (
                        select(bucket, name, func.sum(_MEASURES[measure]))
                        .where(*_scoped(usage_hourly, scope), _U.hour >= span.first, _U.hour < span.end)
                        .group_by(bucket, name)
                    )
                else:
                    query = (
                        select(_R.bucket, _R.value, func.sum(_R[_NARROW_MEASURE[measure]]))
                        .where(*narrow_where(scope, by, span))
                        .group_by(_R.bucket, _R.value)
                    )
                for at, value, amount in conn.execute(query):
                    index = (span.start_hour(int(at)) - chart.anchor) // chart.bucket_hours
                    points[(index, str(value))] = points.get((index, str(value)), 0) + int(amount)
        return [SeriesPoint(index, name, amount) for (index, name), amount in points.items()]

    def _contributions(self, conn: Connection, scope: Scope, hours: HourRange, by: BreakdownBy) -> Any:
        """Per part of the range, the (key, requests, tokens, credits, cost) of each ``by`` value."""
        # A workspace's own breakdown by workspace (or group) is that one workspace: the entries of any
        # dimension kept by day and period (model: every row has one, '' for none) sum to it.
        single = by in ("workspace", "workspace_group") and scope.workspace_id is not None
        dimension = "model" if single else _NARROW_DIMENSION[by]
        covered = spans(scope, hours.first, hours.end, hours_kept=False)
        anchor = anchor_day(conn, scope.organization_id)
        if anchor is not None:
            covered = with_periods(covered, anchor, hour_of(self._clock.now()) // 24)
        parts: list[Any] = []
        key: Any
        for span in covered:
            if span.grain == FULL:
                key = _dimension(by)
                parts.append(
                    select(
                        key.label("key"), _U.requests, _U.total_tokens, _U.credits_nanos, _U.cost_nanos
                    ).where(*_scoped(usage_hourly, scope), _U.hour >= span.first, _U.hour < span.end)
                )
            else:
                key = literal(scope.workspace_id) if single else _R.value
                measures: tuple[Any, ...] = (_R.requests, _R.total_tokens, _R.credits_nanos, _R.cost_nanos)
                if span.sign < 0:
                    measures = tuple((-m).label(m.name) for m in measures)
                parts.append(select(key.label("key"), *measures).where(*narrow_where(scope, dimension, span)))
        combined: Any = parts[0] if len(parts) == 1 else union_all(*parts)
        return combined.subquery("parts")

    def breakdown(
        self, scope: Scope, hours: HourRange, by: BreakdownBy, measure: Measure, *, limit: int, offset: int
    ) -> BreakdownPage:
        with self._db.read() as conn:
            parts = self._contributions(conn, scope, hours, by)
            p = parts.c
            key: Any = p.key
            source: Any = parts
            if by == "workspace_group":
                source = parts.outerjoin(workspaces, workspaces.c.id == p.key)
                key = func.coalesce(workspaces.c.group_name, "")
            groups = (
                select(
                    key.label("key"),
                    func.sum(p.requests).label("requests"),
                    func.sum(p.total_tokens).label("tokens"),
                    func.sum(p.credits_nanos).label("credits"),
                    func.sum(p.cost_nanos).label("cost"),
                )
                .select_from(source)
                .group_by(key)
                # Values whose rows all lie in subtracted days net to nothing: they are not in the range.
                .having(func.sum(p.requests) > 0)
                .subquery()
            )
            found, total, credits, cost = self._page(conn, groups, by, measure, limit=limit, offset=offset)
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

    def model_details(self, scope: Scope, hours: HourRange) -> Mapping[str, Mapping[str, int]]:
        with self._db.read() as conn:
            return usage_details.by_model(conn, scope, hours.first, hours.end)

    @staticmethod
    def _page(
        conn: Connection, groups: Any, by: BreakdownBy, measure: Measure, *, limit: int, offset: int
    ) -> tuple[list[Any], Any, Any, Any]:
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
        found = list(conn.execute(page).all())
        if found:
            total, credits, cost = found[0][7:10]
        else:  # past the last page: the window sums came back with no row
            total, credits, cost = conn.execute(
                select(func.count(), func.sum(g.credits), func.sum(g.cost)).select_from(groups)
            ).one()
        return found, total, credits, cost

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
