"""Which failures mean "a dependency is down" (answer 503 and retry later) rather than "this request is
bad" (never retried as it is), and one log line per outage episode instead of a traceback per request.

Database unreachable or gone mid-transaction, pool exhausted, SQLite busy past its timeout, disk full:
all are ``OperationalError``/``InterfaceError`` (or the pool's ``TimeoutError``) from SQLAlchemy, or
the driver's own class when a raw driver call raised it.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import exc as sa

from meterline.quotas.counters import CounterStoreUnavailable

log = logging.getLogger("meterline.outage")

_DRIVER_OUTAGES: tuple[type[BaseException], ...]
try:
    import psycopg

    _DRIVER_OUTAGES = (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover - psycopg is a dependency
    _DRIVER_OUTAGES = ()

_OUTAGES = (
    sa.OperationalError,
    sa.InterfaceError,
    sa.TimeoutError,
    sa.DisconnectionError,
    CounterStoreUnavailable,
    *_DRIVER_OUTAGES,
)
# How long after the last failure an outage is considered over, when nothing said so before.
EPISODE_GAP_S = 30.0
# A success this long after the last failure ends the outage.
QUIET_S = 1.0


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says a dependency is unavailable, not that the work itself is wrong."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _OUTAGES):
            return True
        if isinstance(current, sa.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def describe(exc: BaseException) -> str:
    """One line naming the failure, without SQL, parameters or a traceback (never a secret)."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first[:200]}" if first else type(orig).__name__


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
        log.error("dependency unavailable (%s): answering 503 until it is back", describe(exc))

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
