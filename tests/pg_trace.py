"""libpq's trace of what an engine sends PostgreSQL: the protocol messages, one a line."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event


@contextmanager
def traced(engine: Engine) -> Iterator[list[str]]:
    """libpq's trace of every connection the pool hands out meanwhile: one line per protocol message."""
    lines: list[str] = []
    traces: dict[int, Any] = {}

    def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        trace = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed at checkin
        traces[id(dbapi_connection)] = trace
        dbapi_connection.pgconn.trace(trace.fileno())

    def checkin(dbapi_connection: Any, _record: Any) -> None:
        trace = traces.pop(id(dbapi_connection), None)
        if trace is not None:
            dbapi_connection.pgconn.untrace()
            trace.seek(0)
            lines.extend(trace.read().splitlines())
            trace.close()

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    try:
        yield lines
    finally:
        event.remove(engine, "checkout", checkout)
        event.remove(engine, "checkin", checkin)
