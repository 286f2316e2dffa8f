"""Which failures mean "a dependency is down" (answer 503 and retry later) rather than "this work is
bad" (never retried as it is: a request gets its error, a reservation goes to the quarantine), and one
log line per outage episode instead of a traceback per request.

An outage is decided by what the database said, not by the exception's class alone: SQLite raises
``OperationalError`` for a syntax error as for a busy file, and PostgreSQL's class covers statement
timeouts and program limits too. Outages: no connection (or one lost mid-transaction), the pool
exhausted, PostgreSQL SQLSTATE classes 08 (connection), 53 (insufficient resources), 57P0x (shutting
down) and 40001/40P01 (serialization failure, deadlock: retry), SQLite busy/locked past its timeout,
disk full, I/O error or cannot open; and the counter store unreachable.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
import time

from sqlalchemy import exc as sa

from meterline.metering.quarantine import describe_error
from meterline.quotas.counters import CounterStoreUnavailable

log = logging.getLogger("meterline.outage")


_SQLITE_OUTAGE_CODES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
     sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL}
)  # fmt: skip
_PG_OUTAGE_STATES = ("08", "53", "57P01", "57P02", "57P03", "40001", "40P01")
# How long after the last failure an outage is considered over, when nothing said so before.
EPISODE_GAP_S = 30.0
# A success this long after the last failure ends the outage.
QUIET_S = 1.0


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says a dependency is unavailable, not that the work itself is wrong. Follows
    explicit causes (``raise … from``) only: an unrelated bug raised while handling an outage is a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _says_outage(current):
            return True
        current = current.__cause__
    return False


def _says_outage(exc: BaseException) -> bool:
    if isinstance(exc, CounterStoreUnavailable | sa.TimeoutError | sa.DisconnectionError):
        return True
    if isinstance(exc, sa.DBAPIError):
        if exc.connection_invalidated:
            return True
        return _driver_says_outage(exc.orig)
    return _driver_says_outage(exc)


def _driver_says_outage(exc: BaseException | None) -> bool:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF) in _SQLITE_OUTAGE_CODES
    # A psycopg error exists only once psycopg is imported (importing a submodule or unpickling one
    # imports the package first): a worker on SQLite never loads the driver (~120 ms and ~5 MB).
    psycopg = sys.modules.get("psycopg")
    error = getattr(psycopg, "Error", None)  # None too while another thread is still importing it
    if psycopg is None or error is None or not isinstance(exc, error):
        return False
    state: str | None = getattr(exc, "sqlstate", None)
    if state is None:  # no answer from a server at all: connecting failed or the connection broke
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state.startswith(_PG_OUTAGE_STATES)


class OutageLog:
    """Logs the first failure of an outage and its end ("back after N refusals"), nothing in between."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._last = 0.0
        self._count = 0

    @property
    def active(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if self._since is not None and now - self._last > EPISODE_GAP_S:
                self._end(now)
            self._last = now
            self._count += 1
            if self._since is not None:
                return
            self._since = now
        log.error("dependency unavailable (%s): answering 503 until it is back", describe_error(exc))

    def succeeded(self) -> None:
        """A request went through. It ends the episode only once failures have stopped for a while:
        requests that need no database (a cached key, an answer already served) succeed mid-outage."""
        if self._since is None:
            return
        now = time.monotonic()
        with self._lock:
            if self._since is not None and now - self._last >= QUIET_S:
                self._end(now)

    def _end(self, now: float) -> None:
        assert self._since is not None
        log.warning(
            "dependency available again after %.1f s; %d request(s) were answered 503",
            now - self._since,
            self._count,
        )
        self._since = None
        self._count = 0
