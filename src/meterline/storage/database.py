"""Engines chosen by URL, and the one rule for writing.

SQLite (embedded default) gets WAL, a busy timeout and **one serialized writer per database file**:
write transactions take an in-process lock, then an exclusive ``flock`` on ``<database>.write.lock``, and
start with ``BEGIN IMMEDIATE``, so concurrent writers queue instead of failing with "database is locked"
half-way through a transaction. The file lock is what several processes on one file (``serve --workers
N``) queue on: a waiter polls it at most 1 ms apart (and gives up after 30 s, as the busy timeout
does), where SQLite's own busy handler sleeps up to 100 ms between tries. Within a second of having
waited for another process, a process runs its transactions inside ``hold_still`` (set by the server:
its event loop stands still, ``api/standstill.py``), so that the lock every process waits for is not
held by a thread waiting for its own interpreter lock. PostgreSQL (scale-out) relies on its own row
locks and a connection pool.

On both, the hot writes (settles, event batches, durable reservations) are queued to the database's one
``Writer`` (``storage.writer``), which group-commits them: one transaction for what queued meanwhile. On
SQLite, commits leave the WAL's checkpoints to a thread of their own (``storage.wal_checkpoints``), which
runs them without the write lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import InvalidatePoolError, TimeoutError
from sqlalchemy.pool import NullPool

from meterline.storage.driver_sql import send_queued
from meterline.storage.wal_checkpoints import BACKSTOP_PAGES, WalCheckpoints
from meterline.storage.writer import Writer

# As SQLite's busy timeout: a writer that waits this long for another process gives up (503), never hangs.
_LOCK_WAIT_S = 30.0
# The write lock counts as shared (``hold_still`` is entered) this long after a wait for another process.
_SHARED_S = 1.0
# PostgreSQL: a pooled connection idle this long is pinged before use (``_ping_when_idle``).
_FRESH_S = 1.0


def _wait_for(fd: int) -> None:
    """The write lock, polled (a blocking ``flock`` cannot time out): at most 1 ms late when it frees."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    pause = 0.0001
    while True:
        time.sleep(pause)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"another process has held the database's write lock for over {_LOCK_WAIT_S:.0f} s"
                ) from None
            pause = min(pause * 2, 0.001)


def connections_free(url: str) -> tuple[int, int] | None:
    """PostgreSQL: (connections a client like this one may still open, ``max_connections``), counting
    every client connected now (other processes and machines included) and the reserved slots. None on
    SQLite. One connection of its own, closed again."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        return None
    # A database that does not answer is not this look's to report: serving meets it with its own message.
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            most, reserved, clients = conn.execute(
                text(
                    "SELECT current_setting('max_connections')::int,"
                    " current_setting('superuser_reserved_connections')::int"
                    # PostgreSQL 16's slots for pg_use_reserved_connections (absent before: 0)
                    " + COALESCE(current_setting('reserved_connections', true), '0')::int,"
                    " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
                )
            ).one()
    finally:
        engine.dispose()
    # This look's own connection is among the clients, and is closed again.
    return int(most) - int(reserved) - int(clients) + 1, int(most)


def normalize_url(url: str) -> str:
    """Accept the operator's plain ``postgresql://`` and use the psycopg 3 driver for it."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20) -> None:
        """``pool_size``, ``max_overflow``: PostgreSQL's connections kept, and opened past them at the
        busiest (SQLite keeps one per worker thread: see ``_create_engine``)."""
        self.url = normalize_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None
        self.engine = self._create_engine(pool_size, max_overflow)
        self._file_lock = self._open_lock_file() if self.dialect == "sqlite" else None
        # SQLite: entered once the write lock is held, within a second of this process having waited for
        # another one (the server holds its event loop still: ``api/standstill.py``). None: nothing is.
        self.hold_still: Callable[[], AbstractContextManager[object]] | None = None
        self._shared_until = 0.0  # time.monotonic() until which the write lock counts as shared
        # The hot writes (settles, event batches, reservations) go through it, group-committed.
        self.writer = Writer(self.write)
        self._checkpoints = WalCheckpoints(self.engine.raw_connection)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def _create_engine(self, pool_size: int, max_overflow: int) -> Engine:
        if self.dialect != "sqlite":
            engine = create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=max_overflow,
                # Every statement here is short; JIT compilation (~50 ms) fires on the cost estimates of
                # range reads that then touch a few hundred rows, and would dominate them.
                connect_args={"options": "-c jit=off"},
                # Errors never quote bound values: some are secrets (webhook signing secrets, sealed or
                # from before sealing), and error text reaches logs.
                hide_parameters=True,
            )
            _ping_when_idle(engine)
            _discard_when_unusable(engine)
            # A statement through SQLAlchemy (which cannot run in a pipeline) sends what the hot path
            # queued on its connection first, so that it sees those writes (``driver_sql.sending``).
            event.listen(engine, "before_cursor_execute", _send_queued_first)
            return engine
        path = make_url(self.url).database
        if not path or path == ":memory:":
            raise ValueError("SQLite needs a file path (sqlite:///path/to/meterline.db), not :memory:")
        engine = create_engine(
            self.url,
            # ``cached_statements``: the writer's many-row INSERTs run as multi-row statements of up to
            # eight sizes each (``driver_sql._insert_rows``); each is prepared once, kept here.
            connect_args={"check_same_thread": False, "timeout": 30, "cached_statements": 512},
            # One kept for each of the server's worker threads (AnyIO's default limit is 40): with 8, the
            # threads of the sync routes opened and closed overflow connections all the time (each new
            # one runs the PRAGMAs below and parses the schema), and events cost ~19 % more CPU
            # (docs/benchmarks.md, "A SQLite connection kept for each worker thread"). A connection is a
            # few open files and a page cache that fills only with what it reads.
            pool_size=40,
            max_overflow=16,
            hide_parameters=True,  # as above
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control away from the sqlite3 module so BEGIN is ours (see _on_begin).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Checkpoints are ``WalCheckpoints``' (off the write lock); a commit runs one only past this.
            cursor.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Connection) -> None:
            immediate = connection.info.get("write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self._across_processes(), self._still(), self.engine.connect() as conn:
            conn.info["write"] = True
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.info["write"] = False
        self._checkpoints.committed()  # the lock is free again: the checkpoint runs beside the writers

    @contextmanager
    def _across_processes(self) -> Iterator[None]:
        if self._file_lock is None:  # disposed, and written to again (as the engine reconnects)
            self._file_lock = self._open_lock_file()
        fd = self._file_lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait_for(fd)
            self._shared_until = time.monotonic() + _SHARED_S
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def _still(self) -> Iterator[None]:
        hold = self.hold_still
        if hold is None or time.monotonic() >= self._shared_until:
            yield
            return
        with hold():
            yield

    def _open_lock_file(self) -> int:
        path = Path(str(make_url(self.url).database)).resolve()
        return os.open(path.with_name(path.name + ".write.lock"), os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only unit of work (one snapshot on both backends)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.writer.close()
        self._checkpoints.close()
        self.engine.dispose()
        if self._file_lock is not None:
            fd, self._file_lock = self._file_lock, None
            os.close(fd)


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled PostgreSQL connection before use only if it has been idle ``_FRESH_S`` or more.

    A connection idle that long may have been dropped (a restarted server, an idle timeout on the way):
    pinged, and replaced if dead, it never fails a request. One back in the pool within ``_FRESH_S`` was
    working a moment ago; pinging it anyway (``pool_pre_ping``) cost a round trip on every checkout
    (4.4 ms of the writer's 35 ms transaction under load, mostly waiting to take the interpreter lock
    back: docs/benchmarks.md, "fewer round trips under the organization's lock"). The price: a server
    that went away within a second of a connection's last use (a failover that is back at once) fails
    that connection's next statement, a 503 that says to retry (for the writer, its whole batch);
    SQLAlchemy then replaces every connection of the pool. A failed ping replaces them all too."""

    def _idle_from_now(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    event.listen(engine, "connect", _idle_from_now)  # a new connection is known to work
    event.listen(engine, "checkin", _idle_from_now)

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is not None and time.monotonic() - since < _FRESH_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise InvalidatePoolError("a pooled connection failed its ping") from exc
        if not alive:
            raise InvalidatePoolError("a pooled connection failed its ping")


def _send_queued_first(conn: Connection, *_: Any) -> None:
    send_queued(conn)


def _discard_when_unusable(engine: Engine) -> None:
    """Treat a PostgreSQL connection that failed and cannot leave libpq's pipeline mode as lost.

    psycopg sends a many-row statement (``executemany``) in pipeline mode. A server shutting down in the
    middle of one can leave the connection with its socket seemingly open (so SQLAlchemy does not count
    the failure as a disconnect) but stuck in pipeline mode: every later statement on it, and the pool's
    rollback when it is given back, fail with "cannot exit pipeline mode while busy", each reset logged
    with a traceback. Marked as a disconnect, it is discarded at its first failure, as a lost one is."""

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        if context.is_disconnect or context.connection is None or context.connection.invalidated:
            return
        raw = context.connection.connection.dbapi_connection
        pgconn = getattr(raw, "pgconn", None)
        if pgconn is not None and pgconn.pipeline_status != 0:  # 0: libpq's PQ_PIPELINE_OFF
            context.is_disconnect = True


__all__ = ["Database", "normalize_url"]
