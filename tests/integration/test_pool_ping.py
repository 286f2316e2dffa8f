"""PostgreSQL connections kept by the pool: one that died while idle (a restarted server, an idle
timeout on the way) is replaced before it is used, so the next request does not fail on it."""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from meterline.storage import database
from meterline.storage.database import Database


def test_a_connection_that_died_while_idle_is_replaced_before_use(pg_url: str) -> None:
    db = Database(pg_url)
    other = create_engine(pg_url)
    try:
        with db.engine.connect() as conn:
            first = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with other.connect() as conn:  # as a restart would: the kept connection's server process ends
            assert conn.exec_driver_sql("SELECT pg_terminate_backend(%s)", (first,)).scalar() is True
        time.sleep(database._FRESH_S + 0.2)  # idle long enough to be pinged
        with db.engine.connect() as conn:
            second = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert second is not None
        assert second != first
    finally:
        other.dispose()
        db.dispose()


def test_a_connection_stuck_in_pipeline_mode_is_discarded_without_a_traceback(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server shutting down in the middle of a many-row statement (psycopg sends those in pipeline mode)
    can leave a connection whose socket still looks open but that can no longer leave pipeline mode: its
    every statement, and the pool's rollback when it is given back, fail with "cannot exit pipeline mode
    while busy". Such a connection is thrown away on its first failure, as a lost one is: the next
    statement gets a working connection, and the pool logs no traceback for resetting it."""
    db = Database(pg_url)
    try:
        with db.engine.connect() as conn:
            first = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            raw = conn.connection.dbapi_connection
            assert raw is not None
            # The state such a shutdown leaves: libpq in pipeline mode with a query in flight.
            raw.pgconn.enter_pipeline_mode()  # type: ignore[attr-defined]
            raw.pgconn.send_query_params(b"SELECT 1", None)  # type: ignore[attr-defined]
            with caplog.at_level(logging.ERROR), pytest.raises(OperationalError) as failed:
                conn.exec_driver_sql("SELECT 1")
            assert failed.value.connection_invalidated
        with db.engine.connect() as conn:
            second = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert second is not None
        assert second != first
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    finally:
        db.dispose()
