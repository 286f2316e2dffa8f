"""Statements of the hot path, straight to the driver's cursor, with SQLAlchemy's own error handling.

``Connection.exec_driver_sql`` costs ~35 µs of Python per statement on top of the driver's few µs:
an execution context, events, and result metadata built again from ``cursor.description`` on every
call (~55 µs for a wide ``SELECT``). A counter decision is seven statements and a settle a dozen, so
that overhead was most of their CPU (docs/benchmarks.md, "Hot statements straight to the driver").

These functions run one statement on the cursor of ``conn``'s own DBAPI connection, inside whatever
transaction ``conn`` holds, with the driver's paramstyle (``?`` on SQLite, ``%s`` on PostgreSQL), and
answer plain tuples. A driver error goes through the same handler as ``exec_driver_sql``'s: raised as
SQLAlchemy's exception (``OperationalError`` ...), and a lost connection invalidates ``conn`` (the writer
then fails the whole batch, and the outage rules in ``outage.py`` see what they always saw).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine.interfaces import DBAPICursor

Params = Sequence[Any] | Mapping[str, Any]


def _execute(
    conn: Connection, sql: str, params: Params | Sequence[Sequence[Any]], *, many: bool, rows: bool
) -> tuple[int, list[tuple[Any, ...]]]:
    if not conn.in_transaction():
        conn.begin()  # as SQLAlchemy's autobegin: the caller's commit or rollback ends it
    cursor: DBAPICursor | None = None
    try:
        cursor = conn.connection.cursor()
        if many:
            cursor.executemany(sql, cast(Sequence[Sequence[Any]], params))
        else:
            cursor.execute(sql, params)
        return int(cursor.rowcount), [tuple(row) for row in cursor.fetchall()] if rows else []
    except BaseException as exc:
        # SQLAlchemy's own handler (private, stable since 1.4), as ``exec_driver_sql`` calls it: wraps a
        # driver error (and any error binding parameters), invalidates the connection when it is lost
        # or interrupted, and raises.
        conn._handle_dbapi_exception(exc, sql, params, cursor, None)
        raise  # never reached: the handler always raises
    finally:
        if cursor is not None:
            with contextlib.suppress(Exception):
                cursor.close()


def fetch(conn: Connection, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
    """The rows of one query, as tuples."""
    return _execute(conn, sql, params, many=False, rows=True)[1]


def fetch_one(conn: Connection, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
    """The first row of one query, or None."""
    found = fetch(conn, sql, params)
    return found[0] if found else None


def run(conn: Connection, sql: str, params: Params = ()) -> int:
    """One statement that answers no rows; the rows it changed."""
    return _execute(conn, sql, params, many=False, rows=False)[0]


def run_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """One statement for each parameter row (``executemany``); the rows they changed."""
    if not rows:
        return 0
    return _execute(conn, sql, rows, many=True, rows=False)[0]
