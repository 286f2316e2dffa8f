"""SQLite: many rows inserted as a few multi-row statements (``storage.driver_sql.run_many``), with what
``executemany`` answered: the same rows, in the same order, the same count of rows changed."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine

from meterline.storage.driver_sql import fetch, run_many

UPSERT = "INSERT INTO t (k, v, note) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = v + excluded.v"
ONCE = "INSERT INTO t (k, v, note) VALUES (?, ?, ?) ON CONFLICT (k) DO NOTHING"


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Connection]:
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER, note TEXT)")
        statements: list[str] = []
        connection.connection.dbapi_connection.set_trace_callback(statements.append)  # type: ignore[union-attr]
        connection.info["statements"] = statements
        yield connection
    engine.dispose()


def test_many_rows_are_a_few_statements_and_all_written(conn: Connection) -> None:
    rows = [(f"k{i:03d}", i, "x" * (i % 7)) for i in range(203)]
    assert run_many(conn, ONCE, rows) == 203
    # 203 = 128 + 64 + 8 + 2 + 1: five statements, where one per row released the interpreter lock 203 times
    assert len([s for s in conn.info["statements"] if s.startswith("INSERT")]) == 5
    assert fetch(conn, "SELECT k, v, note FROM t ORDER BY k") == rows


def test_rows_taken_by_the_conflict_clause_are_not_counted(conn: Connection) -> None:
    run_many(conn, ONCE, [("a", 1, ""), ("b", 2, "")])
    assert run_many(conn, ONCE, [("a", 9, ""), ("c", 3, ""), ("b", 9, ""), ("d", 4, "")]) == 2
    assert fetch(conn, "SELECT k, v FROM t ORDER BY k") == [("a", 1), ("b", 2), ("c", 3), ("d", 4)]


def test_an_upsert_meets_a_key_twice_in_order_as_executemany_did(conn: Connection) -> None:
    run_many(conn, UPSERT, [("a", 1, ""), ("a", 2, ""), ("b", 5, ""), ("a", 4, "")])
    assert fetch(conn, "SELECT k, v FROM t ORDER BY k") == [("a", 7), ("b", 5)]


def test_statements_that_are_not_a_plain_values_insert_run_row_by_row(conn: Connection) -> None:
    run_many(conn, ONCE, [("a", 1, ""), ("b", 2, "")])
    statements = conn.info["statements"]
    statements.clear()
    assert run_many(conn, "UPDATE t SET v = v + ? WHERE k = ?", [(10, "a"), (20, "b")]) == 2
    run_many(conn, "INSERT INTO t (k, v, note) VALUES (?, ?, 'fixed')", [("c", 3), ("d", 4)])
    # A placeholder outside the VALUES group, or a VALUES inside a query: never repeated as a group.
    tail = "INSERT INTO t (k, v, note) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = ?"
    run_many(conn, tail, [("c", 0, "", 7), ("g", 8, "", 9)])
    run_many(conn, "INSERT INTO t SELECT * FROM (VALUES (?, ?, ?)) LIMIT 1", [("e", 5, ""), ("f", 6, "")])
    assert len([s for s in statements if not s.startswith("BEGIN")]) == 8  # one per row
    assert fetch(conn, "SELECT k, v, note FROM t ORDER BY k") == [
        ("a", 11, ""),
        ("b", 22, ""),
        ("c", 7, "fixed"),
        ("d", 4, "fixed"),
        ("e", 5, ""),
        ("f", 6, ""),
        ("g", 8, ""),
    ]


def test_wide_rows_stay_within_the_builds_bound_on_parameters(conn: Connection) -> None:
    """SQLite before 3.32 allows 999 parameters in a statement: 100 rows of 30 values are four statements."""
    columns = ", ".join(f"c{i} INTEGER" for i in range(30))
    conn.exec_driver_sql(f"CREATE TABLE wide ({columns})")
    dbapi = conn.connection.dbapi_connection
    dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # type: ignore[union-attr]
    statements = conn.info["statements"]
    statements.clear()
    rows = [tuple(range(r, r + 30)) for r in range(100)]
    sql = f"INSERT INTO wide VALUES ({', '.join('?' * 30)})"
    assert run_many(conn, sql, rows) == 100
    assert len([s for s in statements if s.startswith("INSERT")]) == 4  # 32 + 32 + 32 + 4 rows
    assert fetch(conn, "SELECT * FROM wide ORDER BY c0") == rows
