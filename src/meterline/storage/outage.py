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
from dataclasses import dataclass

from sqlalchemy import exc as sa

from meterline.metering.quarantine import describe_error
from meterline.quotas.counters import CounterStoreUnavailable

log = logging.getLogger("meterline.outage")


_SQLITE_OUTAGE_CODES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
     sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL}
)  # fmt: skip
_PG_OUTAGE_STATES = ("08", "53", "57P01", "57P02", "57P03", "40001", "40P01")
# An outage ends once a probe finds its dependency answering and nothing failed for this long before.
QUIET_S = 5.0
# The dependencies an outage is told of by: the database, or the counter store (Redis; the database
# too when it holds the counters, named "the database" when its own error is what was raised).
DATABASE, COUNTERS = "the database", "the counter store"


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says a dependency is unavailable, not that the work itself is wrong. Follows
    explicit causes (``raise … from``) only: an unrelated bug raised while handling an outage is a bug."""
    return any(_says_outage(link) for link in _causes(exc))


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


def dependency_of(exc: BaseException) -> str:
    """Which dependency an outage (``is_outage``) is of: the database when a driver's error says so
    anywhere along the explicit causes, else the counter store."""
    return DATABASE if _driver_cause(exc) is not None else COUNTERS


def _driver_cause(exc: BaseException) -> BaseException | None:
    """Along the explicit causes, the first error a database driver raised that says "outage"."""
    for link in _causes(exc):
        if not isinstance(link, CounterStoreUnavailable) and _says_outage(link):
            return link
    return None


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__
    return chain


def _what_failed(exc: BaseException) -> BaseException:
    """The error that says what is out (the driver's, or the counter store's), not a wrapper of it
    such as the quota engine's ``ServiceUnavailable``: what the log line shows."""
    found = _driver_cause(exc)
    if found is not None:
        return found
    stores = [link for link in _causes(exc) if isinstance(link, CounterStoreUnavailable)]
    return stores[0] if stores else exc


@dataclass(slots=True)
class _Episode:
    since: float
    last: float  # the latest failure
    answered: int = 0


class OutageLog:
    """Per dependency, one line when an outage starts ("... is unavailable") and one when it ends ("...
    is available again after N s; M request(s) were answered 503"), nothing in between: failures of
    background passes (the reaper, webhooks) start an outage but are not requests answered 503. The end
    is told by ``back``, which the application calls when a probe of the dependency succeeds again
    (``api/app.py``), so it is logged when it happens, with or without requests coming in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._episodes: dict[str, _Episode] = {}

    @property
    def active(self) -> bool:
        return bool(self._episodes)

    def down(self) -> list[str]:
        """The dependencies in an outage now."""
        with self._lock:
            return list(self._episodes)

    def failed(self, exc: BaseException, *, answered: bool) -> None:
        """An outage met: ``answered`` when a request was answered 503 for it."""
        dependency = dependency_of(exc)
        now = time.monotonic()
        with self._lock:
            episode = self._episodes.get(dependency)
            first = episode is None
            if episode is None:
                episode = self._episodes[dependency] = _Episode(now, now)
            episode.last = max(episode.last, now)
            episode.answered += answered
        if first:
            log.error(
                "%s is unavailable (%s): answering 503 until it is back",
                dependency,
                describe_error(_what_failed(exc)),
            )

    def back(self, dependency: str, probed_at: float) -> None:
        """A probe of ``dependency`` started at ``probed_at`` (monotonic) found it answering: the end of
        its outage, unless something failed since ``QUIET_S`` before the probe. A probe reads; an
        outage that lets reads through (a full disk, a busy SQLite file, a cluster master failing
        over) goes on failing writes, and stays one outage while it does."""
        with self._lock:
            episode = self._episodes.get(dependency)
            if episode is None or episode.last >= probed_at - QUIET_S:
                return
            del self._episodes[dependency]
        log.warning(
            "%s is available again after %.1f s; %d request(s) were answered 503",
            dependency,
            time.monotonic() - episode.since,
            episode.answered,
        )
