"""The text rule (what may be stored) and the outage rule (what is retried rather than refused)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import Connection, create_engine, exc, text

from meterline import text as rule
from meterline.errors import ServiceUnavailable
from meterline.quotas.counters import CounterStoreUnavailable
from meterline.storage.outage import COUNTERS, DATABASE, QUIET_S, OutageLog, dependency_of, is_outage


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("gpt-4o-mini\x00x", "NUL"),
        ("a\ud800", "surrogate"),
        ("\udfffz", "surrogate"),
        ("x" * (rule.MAX_TEXT + 1), "at most"),
    ],
)
def test_text_that_cannot_be_stored_is_named(value: str, reason: str) -> None:
    problem = rule.problem(value)
    assert problem is not None
    assert reason in problem
    assert rule.problem(rule.clean(value)[: rule.MAX_TEXT]) is None


def test_valid_text_passes_untouched() -> None:
    for value in ("gpt-4o-mini", "Café ☕ 😀", "", "x" * rule.MAX_TEXT):
        assert rule.problem(value) is None
        assert rule.clean(value) == value


def test_the_first_bad_string_of_a_json_value_is_found_with_its_path() -> None:
    body = {"events": [{"id": "ok", "metadata": {"note": "fine"}}, {"id": "e2", "metadata": {"k\x00": 1}}]}
    assert rule.find_problem(body) == (
        "events[1].metadata.k",
        "key must not contain NUL characters (\\u0000)",
    )
    assert rule.find_problem({"events": [{"id": "a\ud800"}]})[0] == "events[0].id"  # type: ignore[index]
    assert rule.find_problem({"n": 1, "l": [True, None, 2.5]}) is None
    assert rule.clean_json({"a\x00": ["b\ud800", 1]}) == {"a": ["b\ufffd", 1]}


def test_database_unavailability_is_an_outage_and_bad_data_is_not(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'full.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO t VALUES ('once')"))

    # Disk full: the file may not grow past its current pages.
    def fill(conn: Connection) -> None:
        conn.execute(text("PRAGMA max_page_count = 2"))
        for n in range(1000):
            conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": "x" * 1000 + str(n)})

    with engine.connect() as conn, pytest.raises(exc.OperationalError) as full:
        fill(conn)
    assert "full" in str(full.value)
    assert is_outage(full.value)
    # Busy: another connection holds the write lock past the busy timeout.
    holder = sqlite3.connect(tmp_path / "full.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    busy_engine = create_engine(f"sqlite:///{tmp_path / 'full.db'}", connect_args={"timeout": 0.05})
    with busy_engine.begin() as conn, pytest.raises(exc.OperationalError) as busy:
        conn.execute(text("INSERT INTO t VALUES ('two')"))
    holder.rollback()
    holder.close()
    assert "locked" in str(busy.value)
    assert is_outage(busy.value)
    # Bad data fails the same way every time: never an outage.
    with engine.begin() as conn, pytest.raises(exc.IntegrityError) as duplicate:
        conn.execute(text("INSERT INTO t VALUES ('once')"))
    assert not is_outage(duplicate.value)
    assert not is_outage(ValueError("bad"))
    # Wrapped or chained, as the counter store and the pool raise them.
    chained = RuntimeError("while reserving")
    chained.__cause__ = CounterStoreUnavailable("redis down")
    assert is_outage(chained)
    assert is_outage(exc.TimeoutError("QueuePool limit reached"))
    engine.dispose()
    busy_engine.dispose()


def test_postgresql_unavailability_is_an_outage_and_bad_data_is_not() -> None:
    # What psycopg raises, as the pool and SQLAlchemy hand it on: no server (no SQLSTATE), a server
    # shutting down or a serialization conflict are outages; a duplicate key or bad data never.
    assert is_outage(psycopg.OperationalError("connection refused"))
    assert is_outage(exc.OperationalError("SELECT 1", {}, pg_errors.AdminShutdown()))
    assert is_outage(exc.OperationalError("UPDATE", {}, pg_errors.SerializationFailure()))
    assert not is_outage(exc.IntegrityError("INSERT", {}, pg_errors.UniqueViolation()))
    assert not is_outage(exc.DataError("INSERT", {}, pg_errors.CharacterNotInRepertoire()))


def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    log = OutageLog()
    caplog.set_level("WARNING", logger="meterline.outage")
    down = exc.OperationalError("SELECT 1", {}, pg_errors.AdminShutdown())
    for _ in range(50):
        log.failed(down, answered=True)
    for _ in range(7):  # the reaper's passes: no request was answered 503 for them
        log.failed(down, answered=False)
    log.back(COUNTERS, time.monotonic())  # another dependency answering says nothing of this one
    assert log.down() == [DATABASE]
    # A probe that reads may pass while writes still fail (a full disk): not over while failures go on.
    log.back(DATABASE, time.monotonic())
    assert log.down() == [DATABASE]
    log._episodes[DATABASE].last -= QUIET_S + 1  # the failures stopped a while ago
    log.back(DATABASE, time.monotonic())
    log.back(DATABASE, time.monotonic())
    assert not log.active
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("the database is unavailable (")
    assert "answering 503" in messages[0]
    assert messages[1].startswith("the database is available again after ")
    assert messages[1].endswith("; 50 request(s) were answered 503")


def test_an_outage_is_of_the_dependency_whose_error_it_is() -> None:
    redis_down = CounterStoreUnavailable("Redis at redis://... is unavailable")
    assert dependency_of(redis_down) == COUNTERS
    # Counters kept in the database: its driver's error, under the store's, names the database.
    held = CounterStoreUnavailable("the database holding the counters did not answer")
    held.__cause__ = exc.OperationalError("SELECT 1", {}, pg_errors.AdminShutdown())
    assert dependency_of(held) == DATABASE
    refused = ServiceUnavailable("usage limits cannot be checked right now")
    refused.__cause__ = redis_down
    assert is_outage(refused)
    assert dependency_of(refused) == COUNTERS
