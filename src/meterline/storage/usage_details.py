"""What the tokens were: the usage vector, cache reads and writes, and unpriced requests, summed per hour
and model. The cost breakdown of ``/v1/usage/breakdown?by=model`` and the dashboard read it.

Entries, keyed (organization, workspace, identifier, hour, model), ``''`` standing for "all" or "none":

* ``(org, '', '', hour, model)``: the whole organization;
* ``(org, workspace, '', hour, model)``: one workspace;
* ``(org, workspace, identifier, hour, model)``: one identifier, for rows that carry one.

Only ledger rows with some detail (a non-zero measure) add to it: a plain chat completion priced as usual
costs the settle a few attribute reads and no statement. Hour entries answer any whole-hour range exactly
(billing periods start at midnight), and a month of an organization is at most hours x models entries.

Invariants: written in the settle transaction with the ledger rows (``deltas`` + ``upsert``); the entries
with a non-zero measure equal the ledger grouped the same way (``meterline reconcile`` checks it,
``--rebuild`` rewrites it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection

from meterline.clock import MICROS_PER_HOUR, to_micros
from meterline.metering.reading import Scope
from meterline.metering.records import VECTOR_COUNTS, LedgerRow
from meterline.storage.driver_sql import pg_columns, send, send_many
from meterline.storage.tables import DETAIL_MEASURES

KEY = ("organization_id", "workspace_id", "identifier_id", "hour", "model")
COLUMNS = (*KEY, *DETAIL_MEASURES)
_ALL = ""

_CONFLICT = f"ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET " + ", ".join(
    f"{m} = usage_details.{m} + excluded.{m}" for m in DETAIL_MEASURES
)
_UPSERT = f"INSERT INTO usage_details ({', '.join(COLUMNS)}) VALUES ({{p}}{', {p}' * (len(COLUMNS) - 1)}) "
SQLITE_UPSERT = _UPSERT.replace("{p}", "?") + _CONFLICT
PG_UPSERT = _UPSERT.replace("{p}", "%s") + _CONFLICT
# PostgreSQL, several entries: one statement over one array per column (``deltas`` makes each key once,
# as an upsert that touches a row twice in one statement would be refused), not ``executemany``'s one a row.
_PG_UPSERT_MANY = (
    f"INSERT INTO usage_details ({', '.join(COLUMNS)}) SELECT * FROM unnest(%s::text[], %s::text[], "
    f"%s::text[], %s::bigint[], %s::text[]{', %s::bigint[]' * len(DETAIL_MEASURES)}) " + _CONFLICT
)


def measures_of(row: LedgerRow) -> list[int] | None:
    """The row's detail in ``DETAIL_MEASURES`` order, or None when it has none."""
    usage = row.usage
    unpriced = 0 if row.priced or not row.model else 1
    found = [row.cache_read_tokens, row.cache_write_tokens, *(getattr(usage, n) for n in VECTOR_COUNTS)]
    found.append(unpriced)
    return found if any(found) else None


def deltas(rows: Sequence[LedgerRow]) -> list[tuple[Any, ...]]:
    """Rows with detail folded into one delta per entry, in ``COLUMNS`` order, sorted by key (concurrent
    settles then take the entries they share in one order)."""
    sums: dict[tuple[str, str, str, int, str], list[int]] = {}
    for row in rows:
        found = measures_of(row)
        if found is None:
            continue
        hour, model = to_micros(row.created_at) // MICROS_PER_HOUR, row.model or ""
        keys = [
            (row.organization_id, _ALL, _ALL, hour, model),
            (row.organization_id, row.workspace_id, _ALL, hour, model),
        ]
        if row.identifier_id:
            keys.append((row.organization_id, row.workspace_id, row.identifier_id, hour, model))
        for key in keys:
            into = sums.get(key)
            if into is None:
                sums[key] = list(found)
            else:
                for i, m in enumerate(found):
                    into[i] += m
    return [(*key, *sums[key]) for key in sorted(sums)]


def upsert(conn: Connection, entries: Sequence[tuple[Any, ...]]) -> None:
    """Add ``deltas`` (each key once) to the entries."""
    if conn.dialect.name == "sqlite":
        send_many(conn, SQLITE_UPSERT, entries)
    elif len(entries) > 1:
        send(conn, _PG_UPSERT_MANY, pg_columns(entries))
    else:
        send_many(conn, PG_UPSERT, entries)


def by_model(conn: Connection, scope: Scope, first_hour: int, end_hour: int) -> dict[str, dict[str, int]]:
    """Per model ('' for rows without one), the detail of ``scope`` in hours [first, end)."""
    p = "?" if conn.dialect.name == "sqlite" else "%s"
    where = [f"organization_id = {p}"]
    params: list[Any] = [scope.organization_id]
    if scope.identifier_id is not None:
        where.append(f"identifier_id = {p}")
        params.append(scope.identifier_id)
        if scope.workspace_id is not None:
            where.append(f"workspace_id = {p}")
            params.append(scope.workspace_id)
    else:
        where += [f"workspace_id = {p}", f"identifier_id = {p}"]
        params += [scope.workspace_id or _ALL, _ALL]
    where += [f"hour >= {p}", f"hour < {p}"]
    params += [first_hour, end_hour]
    sums = ", ".join(f"CAST(SUM({m}) AS BIGINT)" for m in DETAIL_MEASURES)
    sql = f"SELECT model, {sums} FROM usage_details WHERE {' AND '.join(where)} GROUP BY model"
    return {
        str(model): dict(zip(DETAIL_MEASURES, (int(m) for m in measures), strict=True))
        for model, *measures in conn.exec_driver_sql(sql, tuple(params))
    }


# -- the same entries recomputed from the ledger (reconcile, rebuild) ----------------------------------
_MEASURE_SQL = {
    **{m: f"SUM({m})" for m in ("cache_read_tokens", "cache_write_tokens", *VECTOR_COUNTS)},
    "unpriced_requests": "SUM(CASE WHEN priced OR model IS NULL OR model = '' THEN 0 ELSE 1 END)",
}
_ANY = " OR ".join(f"{_MEASURE_SQL[m]} <> 0" for m in DETAIL_MEASURES)
_SCOPES = (
    ("''", "''", ""),
    ("workspace_id", "''", ""),
    ("workspace_id", "identifier_id", "WHERE identifier_id IS NOT NULL AND identifier_id <> '' "),
)


def _expected_selects() -> list[str]:
    measures = ", ".join(f"CAST({_MEASURE_SQL[m]} AS BIGINT) AS {m}" for m in DETAIL_MEASURES)
    hour = f"created_at_us / {MICROS_PER_HOUR}"
    selects = []
    for workspace, identifier, where in _SCOPES:
        # PostgreSQL refuses a constant in GROUP BY: only real columns are grouped.
        groups = ", ".join(c for c in (workspace, identifier) if c != "''")
        selects.append(
            f"SELECT organization_id, {workspace} AS workspace_id, {identifier} AS identifier_id, "
            f"{hour} AS hour, COALESCE(model, '') AS model, {measures} FROM ledger {where}"
            f"GROUP BY organization_id, {groups + ', ' if groups else ''}{hour}, COALESCE(model, '') "
            f"HAVING {_ANY}"
        )
    return selects


EXPECTED_SQL = "SELECT * FROM (" + " UNION ALL ".join(_expected_selects()) + ") AS expected"
STORED_SQL = f"SELECT {', '.join(COLUMNS)} FROM usage_details WHERE " + " OR ".join(
    f"{m} <> 0" for m in DETAIL_MEASURES
)
DIFF_SQL = (
    f"SELECT 'ledger', d.* FROM ({EXPECTED_SQL} EXCEPT {STORED_SQL}) AS d "
    f"UNION ALL SELECT 'stored', s.* FROM ({STORED_SQL} EXCEPT {EXPECTED_SQL}) AS s"
)


def rebuild(conn: Connection) -> int:
    """Rewrite every entry from the ledger (inside the caller's write transaction); the count written."""
    conn.exec_driver_sql("DELETE FROM usage_details")
    return int(
        conn.exec_driver_sql(f"INSERT INTO usage_details ({', '.join(COLUMNS)}) {EXPECTED_SQL}").rowcount
    )


def totals(details: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """The per-model detail summed over the models."""
    return {m: sum(d[m] for d in details.values()) for m in DETAIL_MEASURES}
