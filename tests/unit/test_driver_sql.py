"""Statements straight to the driver (``storage/driver_sql.py``) behave as ``exec_driver_sql`` does: in
the connection's transaction, with SQLAlchemy's exceptions, and a lost connection is invalidated (so the
writer fails its whole batch and the outage rules answer 503)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, exc

from meterline.storage.database import Database
from meterline.storage.driver_sql import (
    fetch,
    fetch_one,
    fetch_together,
    pg_array,
    run,
    run_many,
    send,
    send_many,
    sending,
)
from meterline.storage.outage import is_outage


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    with database.write() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS driver_probe")
        conn.exec_driver_sql("CREATE TABLE driver_probe (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    yield database
    with database.write() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS driver_probe")
    database.dispose()


def _marker(db: Database) -> str:
    return "?" if db.is_sqlite else "%s"


def test_rows_come_back_as_tuples_and_writes_commit_with_the_transaction(db: Database) -> None:
    p = _marker(db)
    with db.write() as conn:
        assert (
            run_many(conn, f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})", [(1, "a"), (2, "b")])
            == 2
        )
        assert run(conn, f"UPDATE driver_probe SET name = {p} WHERE id = {p}", ("c", 2)) == 1
    with db.read() as conn:
        assert fetch(conn, "SELECT id, name FROM driver_probe ORDER BY id") == [(1, "a"), (2, "c")]
        assert fetch_one(conn, f"SELECT name FROM driver_probe WHERE id = {p}", (3,)) is None


def test_a_rolled_back_transaction_keeps_nothing_written_through_the_driver(db: Database) -> None:
    p = _marker(db)

    def failing_job() -> None:
        with db.write() as conn:
            run(conn, f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})", (1, "a"))
            raise RuntimeError("the job failed after its write")

    with pytest.raises(RuntimeError):
        failing_job()
    # Outside any transaction, a statement opens one (as SQLAlchemy's autobegin): rolled back, it is gone.
    with db.engine.connect() as conn:
        run(conn, f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})", (2, "b"))
        assert conn.in_transaction()
        conn.rollback()
    with db.read() as conn:
        assert fetch(conn, "SELECT id FROM driver_probe") == []


def test_a_failed_statement_raises_sqlalchemys_error_and_the_transaction_goes_on(db: Database) -> None:
    p = _marker(db)
    with db.write() as conn:
        run(conn, f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})", (1, "a"))
        savepoint = conn.begin_nested()
        with pytest.raises(exc.IntegrityError) as raised:
            run(conn, f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})", (1, "again"))
        savepoint.rollback()
        assert "driver_probe" in str(raised.value.statement)
        assert not is_outage(raised.value)
    with db.read() as conn:
        assert fetch(conn, "SELECT id, name FROM driver_probe") == [(1, "a")]


def test_a_lost_postgresql_connection_is_invalidated_and_reads_as_an_outage(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        with db.engine.connect() as conn:
            conn.begin()
            pid = fetch_one(conn, "SELECT pg_backend_pid()")
            assert pid is not None
            with db.engine.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid[0]})
                other.commit()
            assert_lost(conn)
    finally:
        db.dispose()


def assert_lost(conn: Connection) -> None:
    """A statement on ``conn`` raises SQLAlchemy's error for a lost connection and invalidates it."""
    with pytest.raises(exc.DBAPIError) as raised:
        fetch(conn, "SELECT 1")
    assert raised.value.connection_invalidated
    assert conn.invalidated
    assert is_outage(raised.value)


def test_an_error_before_the_statement_runs_is_handled_the_same_way(sqlite_url: str) -> None:
    """Making the cursor on a connection the driver has closed: SQLAlchemy's error, the connection
    invalidated (a 503 and a whole failed batch, never a raw driver error)."""
    db = Database(sqlite_url)
    try:
        with db.engine.connect() as conn:
            conn.begin()
            conn.connection.driver_connection.close()  # type: ignore[union-attr]
            assert_lost(conn)
    finally:
        db.dispose()


def test_sent_statements_are_seen_by_what_follows_and_commit_with_the_transaction(db: Database) -> None:
    """``send`` inside ``sending``: the next answered statement, one through SQLAlchemy, and the commit all
    see what was sent before them, in order."""
    p = _marker(db)
    insert = f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})"
    with db.write() as conn, sending(conn):
        send(conn, insert, (1, "a"))
        send_many(conn, insert, [(2, "b"), (3, "c")])
        assert fetch(conn, "SELECT count(*) FROM driver_probe") == [(3,)]
        send(conn, f"UPDATE driver_probe SET name = {p} WHERE id = {p}", ("B", 2))
        assert conn.exec_driver_sql("SELECT name FROM driver_probe WHERE id = 2").scalar() == "B"
        send(conn, f"DELETE FROM driver_probe WHERE id = {p}", (3,))
        assert run(conn, f"UPDATE driver_probe SET name = {p} WHERE id = {p}", ("A", 1)) == 1
        send(conn, insert, (4, "d"))  # sent at the block's end
        first, second = fetch_together(
            conn,
            [
                ("SELECT max(id) FROM driver_probe", ()),
                (f"SELECT name FROM driver_probe WHERE id = {p}", (1,)),
            ],
        )
        assert (first, second) == ([(4,)], [("A",)])
        send(conn, insert, (5, "e"))
    with db.read() as conn:
        assert fetch(conn, "SELECT id, name FROM driver_probe ORDER BY id") == [
            (1, "A"),
            (2, "B"),
            (4, "d"),
            (5, "e"),
        ]


def test_a_sent_statement_that_fails_fails_the_next_answered_one_and_nothing_is_kept(db: Database) -> None:
    p = _marker(db)
    insert = f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})"

    def twice() -> None:
        with db.write() as conn, sending(conn):
            send(conn, insert, (1, "a"))
            send(conn, insert, (1, "again"))
            fetch(conn, "SELECT count(*) FROM driver_probe")

    with pytest.raises(exc.IntegrityError):
        twice()
    with db.read() as conn:
        assert fetch(conn, "SELECT count(*) FROM driver_probe") == [(0,)]


def test_writes_still_queued_when_a_job_fails_are_never_sent(db: Database) -> None:
    """A job that fails (not the database) with writes queued: they go with its transaction, rolled back,
    and the pooled connection carries none of them into the next transaction."""
    p = _marker(db)
    insert = f"INSERT INTO driver_probe (id, name) VALUES ({p}, {p})"

    def failing() -> None:
        with db.write() as conn, sending(conn):
            send(conn, insert, (1, "a"))
            send(conn, insert, (2, "b"))
            raise RuntimeError("the job failed with writes queued")

    with pytest.raises(RuntimeError):
        failing()
    for _ in range(3):  # whichever pooled connection comes next
        with db.write() as conn, sending(conn):
            send(conn, insert, (3, "c"))
        with db.write() as conn:
            assert fetch(conn, "SELECT id FROM driver_probe ORDER BY id") == [(3,)]
            run(conn, "DELETE FROM driver_probe")


@contextmanager
def round_trips(conn: Connection) -> Iterator[Callable[[], int]]:
    """Counts the round trips to PostgreSQL on ``conn`` (libpq's trace: one ReadyForQuery each)."""
    raw: Any = conn.connection.dbapi_connection
    with tempfile.TemporaryFile(mode="w+") as trace:
        raw.pgconn.trace(trace.fileno())
        done = False

        def count() -> int:
            if not done:
                raw.pgconn.untrace()
            trace.seek(0)
            return sum(1 for line in trace if "ReadyForQuery" in line)

        try:
            yield count
        finally:
            raw.pgconn.untrace()
            done = True


def test_on_postgresql_what_was_sent_goes_with_the_next_answer_in_one_round_trip(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        with db.write() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS driver_trips")
            conn.exec_driver_sql("CREATE TABLE driver_trips (id INTEGER PRIMARY KEY)")
        with db.write() as conn, sending(conn):
            fetch(conn, "SELECT 1")  # the transaction begun
            with round_trips(conn) as count:
                send(conn, "INSERT INTO driver_trips (id) VALUES (%s)", (1,))
                send_many(conn, "INSERT INTO driver_trips (id) VALUES (%s)", [(2,), (3,)])
                send(conn, "UPDATE driver_trips SET id = id + 10 WHERE id = %s", (3,))
                assert fetch(conn, "SELECT count(*) FROM driver_trips") == [(3,)]
                fetch_together(
                    conn, [("SELECT min(id) FROM driver_trips", ()), ("SELECT max(id) FROM driver_trips", ())]
                )
                assert count() == 2
        with db.read() as conn:
            assert fetch(conn, "SELECT id FROM driver_trips ORDER BY id") == [(1,), (2,), (13,)]
    finally:
        with db.write() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS driver_trips")
        db.dispose()


HOSTILE = [
    "plain",
    "",
    "NULL",
    "null",
    'a "quoted" word',
    'back\\slash \\" both',
    "{braces},commas,",
    "  spaces kept  ",
    "tab\tnew\nline\r",
    "émoji 🚀 ünïcode 漢字",
    "'single'",
    "\\",
    '"',
    "}",
]


def test_a_column_passed_as_one_array_text_reads_back_as_it_was_given(pg_url: str) -> None:
    # The settle's bulk statements pass each column as ``pg_array(values)`` to ``%s::<type>[]``.
    database = Database(pg_url)
    try:
        with database.read() as conn:
            texts = [*HOSTILE, None]
            assert fetch(conn, "SELECT unnest(%s::text[])", (pg_array(texts),)) == [(t,) for t in texts]
            numbers = [0, -1, 2**63 - 1, -(2**63), None, 10**18]
            assert fetch(conn, "SELECT unnest(%s::bigint[])", (pg_array(numbers),)) == [(n,) for n in numbers]
            flags = [True, False, None]
            assert fetch(conn, "SELECT unnest(%s::boolean[])", (pg_array(flags),)) == [(f,) for f in flags]
            assert fetch(conn, "SELECT cardinality(%s::text[])", (pg_array([]),)) == [(0,)]
    finally:
        database.dispose()


def test_an_array_text_refuses_what_it_cannot_write_exactly() -> None:
    for value in (1.5, b"bytes", object()):
        with pytest.raises(TypeError, match="array"):
            pg_array(["fine", value])
