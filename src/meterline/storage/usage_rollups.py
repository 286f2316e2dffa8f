"""Narrow rollups: the ledger summed for an organization (and for each workspace) along ONE dimension at a
time, per hour, UTC day and billing period. They are what the read side groups, so a chart, a history or
a "top users" table costs about (buckets asked for) x (distinct values), whatever the ledger's size.

``usage_hourly`` keys every row by all ten dimensions at once, which at scale is most of a row per ledger
row; here a day of an organization is a few rows per source and model, and a billing period one row per
user, workspace, key, endpoint and model.

What is kept (``PLAN``), for the whole organization (``workspace_id = ''``) and for each workspace:

* ``source`` and ``model``, by hour and by day (time series, history, totals);
* ``model``, ``workspace`` (organization only), ``user``, ``endpoint``, ``key``, by day and by billing
  period (breakdowns). A billing period is whole UTC days (it starts at midnight of the anchor day), so
  its rows are exactly the sum of its days' rows; ``bucket`` is the day the period starts on. When an
  organization's anchor day changes, its period rows are recomputed from its day rows
  (``recompute_periods``) in the same transaction.

Invariants: written in the settle transaction with the ledger rows (``deltas`` + ``upsert``); every entry
equals the ledger grouped the same way (``meterline reconcile`` checks it, ``--rebuild`` rewrites it);
a ``''`` value stands for "none" (no user, no key, ...), as in ``usage_hourly``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from meterline.clock import MICROS_PER_DAY, MICROS_PER_HOUR, to_micros
from meterline.metering.records import LedgerRow
from meterline.quotas.periods import billing_period
from meterline.storage.driver_sql import pg_array, send, send_many
from meterline.storage.tables import NARROW_MEASURES

HOUR, DAY, PERIOD = "h", "d", "p"
WHOLE_ORGANIZATION = ""  # the workspace_id of an organization-wide entry


@dataclass(frozen=True, slots=True)
class Dimension:
    name: str
    grains: tuple[str, ...]
    ledger_sql: str  # the ledger column (None folded to '') it groups by
    organization_only: bool = False


PLAN = (
    Dimension("source", (HOUR, DAY), "source"),
    Dimension("model", (HOUR, DAY, PERIOD), "COALESCE(model, '')"),
    Dimension("workspace", (DAY, PERIOD), "workspace_id", organization_only=True),
    Dimension("user", (DAY, PERIOD), "COALESCE(user_id, '')"),
    Dimension("endpoint", (DAY, PERIOD), "COALESCE(endpoint, '')"),
    Dimension("key", (DAY, PERIOD), "COALESCE(key_id, '')"),
)
PERIOD_DIMENSIONS = tuple(d.name for d in PLAN if PERIOD in d.grains)
KEY = ("organization_id", "workspace_id", "dimension", "grain", "bucket", "value")
COLUMNS = (*KEY, *NARROW_MEASURES)

_CONFLICT = f"ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET " + ", ".join(
    f"{m} = usage_rollups.{m} + excluded.{m}" for m in NARROW_MEASURES
)
SQLITE_UPSERT = (
    f"INSERT INTO usage_rollups ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) {_CONFLICT}"
)
PG_UPSERT = (
    f"INSERT INTO usage_rollups ({', '.join(COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(["%s::text[]"] * 4 + ["%s::bigint[]", "%s::text[]"] + ["%s::bigint[]"] * len(NARROW_MEASURES))
    + ") "
    + _CONFLICT
)
_INSERT = f"INSERT INTO usage_rollups ({', '.join(COLUMNS)}) VALUES ({{p}}{', {p}' * (len(COLUMNS) - 1)})"


@functools.lru_cache(maxsize=4096)
def period_day(day: int, anchor_day: int) -> int:
    """The day (since the epoch) on which the billing period containing ``day`` starts."""
    start = billing_period(datetime.fromtimestamp(day * 86_400, UTC), anchor_day).start
    return to_micros(start) // MICROS_PER_DAY


_GRAIN_INDEX = {HOUR: 0, DAY: 1, PERIOD: 2}
_VALUE_INDEX = {"source": 0, "model": 1, "workspace": 2, "user": 3, "endpoint": 4, "key": 5}
# Every entry a ledger row adds to, flattened once: (per workspace?, dimension, grain, bucket index, value
# index). Settles run this per row, so it is kept to tuple indexing.
_ENTRIES = tuple(
    (per_workspace, d.name, grain, _GRAIN_INDEX[grain], _VALUE_INDEX[d.name])
    for per_workspace in (False, True)
    for d in PLAN
    if not (per_workspace and d.organization_only)
    for grain in d.grains
)


def deltas(rows: Sequence[LedgerRow], anchor_day: int) -> list[tuple[Any, ...]]:
    """Ledger rows folded into one delta per entry, in ``COLUMNS`` order, sorted by key (concurrent
    settles then lock shared entries in the same order and queue instead of deadlocking)."""
    # Rows first fold by what places them (organization, workspace, hour, dimension values), which
    # collapses a batch heavily; only those groups fan out to the entries (a row touches 24 of them).
    groups: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        place = (
            row.organization_id,
            row.workspace_id,
            to_micros(row.created_at) // MICROS_PER_HOUR,
            row.source,
            row.model or "",
            row.user_id or "",
            row.endpoint or "",
            row.key_id or "",
        )
        found = groups.get(place)
        if found is None:
            groups[place] = [
                1,
                row.units,
                row.prompt_tokens,
                row.completion_tokens,
                row.total_tokens,
                row.cost_nanos,
                row.credits_nanos,
            ]
        else:
            found[0] += 1
            found[1] += row.units
            found[2] += row.prompt_tokens
            found[3] += row.completion_tokens
            found[4] += row.total_tokens
            found[5] += row.cost_nanos
            found[6] += row.credits_nanos
    sums: dict[tuple[Any, ...], list[int]] = {}
    for (org, workspace, hour, source, model, user, endpoint, key_id), measures in groups.items():
        day = hour // 24
        buckets = (hour, day, period_day(day, anchor_day))
        values = (source, model, workspace, user, endpoint, key_id)
        for per_workspace, dimension, grain, b, v in _ENTRIES:
            key = (org, workspace if per_workspace else "", dimension, grain, buckets[b], values[v])
            found = sums.get(key)
            if found is None:
                sums[key] = list(measures)
            else:
                for i, m in enumerate(measures):
                    found[i] += m
    return [(*key, *sums[key]) for key in sorted(sums)]


def upsert(conn: Connection, entries: Sequence[tuple[Any, ...]]) -> None:
    if not entries:
        return
    if conn.dialect.name == "sqlite":
        send_many(conn, SQLITE_UPSERT, entries)
    else:
        send(conn, PG_UPSERT, tuple(pg_array(c) for c in zip(*entries, strict=True)))


# -- the same entries recomputed from the ledger (reconcile, rebuild) ----------------------------------
_MEASURE_SQL = (
    "COUNT(*)",
    "SUM(units)",
    "SUM(prompt_tokens)",
    "SUM(completion_tokens)",
    "SUM(total_tokens)",
    "SUM(cost_nanos)",
    "SUM(credits_nanos)",
)


def _selects(grain: str, dimensions: Iterable[Dimension], where: str) -> Iterator[str]:
    divisor = MICROS_PER_HOUR if grain == HOUR else MICROS_PER_DAY
    # CAST keeps PostgreSQL's SUM(bigint) (numeric) comparable with the stored bigints.
    measures = ", ".join(
        f"CAST({m} AS BIGINT) AS {name}" for m, name in zip(_MEASURE_SQL, NARROW_MEASURES, strict=True)
    )
    for scope in ("''", "workspace_id"):
        for d in dimensions:
            if d.organization_only and scope != "''":
                continue
            group = "" if scope == "''" else f"{scope}, "  # PostgreSQL refuses a constant in GROUP BY
            yield (
                f"SELECT organization_id, {scope} AS workspace_id, '{d.name}' AS dimension, "
                f"'{grain}' AS grain, created_at_us / {divisor} AS bucket, {d.ledger_sql} AS value, "
                f"{measures} FROM ledger {where} "
                f"GROUP BY organization_id, {group}created_at_us / {divisor}, {d.ledger_sql}"
            )


# Hour and day entries, as the ledger says they are (periods: ``expected_periods``). One derived table, so
# that it stays one operand of the EXCEPTs below (compound operators associate to the left).
EXPECTED_SQL = (
    "SELECT * FROM ("
    + " UNION ALL ".join(
        [*_selects(HOUR, [d for d in PLAN if HOUR in d.grains], ""), *_selects(DAY, PLAN, "")]
    )
    + ") AS expected"
)
STORED_SQL = f"SELECT {', '.join(COLUMNS)} FROM usage_rollups WHERE grain IN ('{HOUR}', '{DAY}')"
DIFF_SQL = (
    f"SELECT 'ledger', d.* FROM ({EXPECTED_SQL} EXCEPT {STORED_SQL}) AS d "
    f"UNION ALL SELECT 'stored', s.* FROM ({STORED_SQL} EXCEPT {EXPECTED_SQL}) AS s"
)
_PERIOD_SOURCE_SQL = (
    f"SELECT organization_id, workspace_id, dimension, bucket, value, {', '.join(NARROW_MEASURES)} "
    f"FROM usage_rollups WHERE grain = '{DAY}' AND dimension IN "
    f"({', '.join(repr(d) for d in PERIOD_DIMENSIONS)})"
)


def anchors(conn: Connection) -> dict[str, int]:
    return {
        str(o): int(d) for o, d in conn.exec_driver_sql("SELECT id, billing_anchor_day FROM organizations")
    }


def fold_periods(
    day_entries: Iterable[Sequence[Any]], anchor_of: dict[str, int]
) -> dict[tuple[Any, ...], list[int]]:
    """Day entries (organization, workspace, dimension, day, value, *measures) summed per billing period:
    key (organization, workspace, dimension, 'p', period start day, value)."""
    periods: dict[tuple[str, int], int] = {}
    out: dict[tuple[Any, ...], list[int]] = {}
    for org, workspace, dimension, day, value, *measures in day_entries:
        org, day = str(org), int(day)
        start = periods.get((org, day))
        if start is None:
            start = periods[(org, day)] = period_day(day, anchor_of.get(org, 1))
        key = (org, str(workspace), str(dimension), PERIOD, start, str(value))
        found = out.get(key)
        if found is None:
            out[key] = [int(m) for m in measures]
        else:
            for i, m in enumerate(measures):
                found[i] += int(m)
    return out


def expected_periods(conn: Connection) -> dict[tuple[Any, ...], list[int]]:
    """Period entries from the ledger: its day groups (one SQL pass) folded per period in Python."""
    day_sql = " UNION ALL ".join(_selects(DAY, [d for d in PLAN if PERIOD in d.grains], ""))
    rows = conn.exec_driver_sql(
        f"SELECT organization_id, workspace_id, dimension, bucket, value, {', '.join(NARROW_MEASURES)} "
        f"FROM ({day_sql}) AS days"
    )
    return fold_periods(rows, anchors(conn))


def stored_periods(conn: Connection) -> dict[tuple[Any, ...], list[int]]:
    rows = conn.exec_driver_sql(f"SELECT {', '.join(COLUMNS)} FROM usage_rollups WHERE grain = '{PERIOD}'")
    return {tuple(r[: len(KEY)]): [int(m) for m in r[len(KEY) :]] for r in rows}


def insert(conn: Connection, entries: dict[tuple[Any, ...], list[int]]) -> int:
    if entries:
        sql = _INSERT.replace("{p}", "?" if conn.dialect.name == "sqlite" else "%s")
        conn.exec_driver_sql(sql, [(*key, *entries[key]) for key in sorted(entries)])
    return len(entries)


def rebuild(conn: Connection) -> int:
    """Rewrite every entry from the ledger (inside the caller's write transaction); the count written."""
    conn.exec_driver_sql("DELETE FROM usage_rollups")
    written = int(
        conn.exec_driver_sql(f"INSERT INTO usage_rollups ({', '.join(COLUMNS)}) {EXPECTED_SQL}").rowcount
    )
    return written + insert(conn, fold_periods(conn.exec_driver_sql(_PERIOD_SOURCE_SQL), anchors(conn)))


def recompute_periods(conn: Connection, organization_id: str, anchor_day: int) -> None:
    """An organization's period entries again from its day entries (after its anchor day changed)."""
    p = "?" if conn.dialect.name == "sqlite" else "%s"
    conn.exec_driver_sql(
        f"DELETE FROM usage_rollups WHERE organization_id = {p} AND grain = '{PERIOD}'", (organization_id,)
    )
    days = conn.exec_driver_sql(f"{_PERIOD_SOURCE_SQL} AND organization_id = {p}", (organization_id,))
    insert(conn, fold_periods(days, {organization_id: anchor_day}))
