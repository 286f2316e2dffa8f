"""PostgreSQL connections kept by the pool: one that died while idle (a restarted server, an idle
timeout on the way) is replaced before it is used, so the next request does not fail on it."""

from __future__ import annotations

import time

from sqlalchemy import create_engine

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
