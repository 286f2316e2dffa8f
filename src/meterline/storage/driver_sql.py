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

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine.interfaces import DBAPICursor

Params = Sequence[Any] | Mapping[str, Any]


def _cursor(conn: Connection) -> DBAPICursor:
    if not conn.in_transaction():
        conn.begin()  # as SQLAlchemy's autobegin: the caller's commit or rollback ends it
    return conn.connection.cursor()


def fetch(conn: Connection, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
    """The rows of one query, as tuples."""
    cursor = _cursor(conn)
    try:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]
    except conn.dialect.loaded_dbapi.Error as exc:
        # SQLAlchemy's handler (private, stable since 1.4): wraps, invalidates on disconnect, raises.
        conn._handle_dbapi_exception(exc, sql, params, cursor, None)
        raise  # never reached: the handler always raises
    finally:
        cursor.close()


def fetch_one(conn: Connection, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
    """The first row of one query, or None."""
    rows = fetch(conn, sql, params)
    return rows[0] if rows else None


def run(conn: Connection, sql: str, params: Params = ()) -> int:
    """One statement that answers no rows; the rows it changed."""
    cursor = _cursor(conn)
    try:
        cursor.execute(sql, params)
        return int(cursor.rowcount)
    except conn.dialect.loaded_dbapi.Error as exc:
        conn._handle_dbapi_exception(exc, sql, params, cursor, None)
        raise
    finally:
        cursor.close()


def run_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """One statement for each parameter row (``executemany``); the rows they changed."""
    if not rows:
        return 0
    cursor = _cursor(conn)
    try:
        cursor.executemany(sql, rows)
        return int(cursor.rowcount)
    except conn.dialect.loaded_dbapi.Error as exc:
        conn._handle_dbapi_exception(exc, sql, rows, cursor, None)
        raise
    finally:
        cursor.close()
