"""Statements of the hot path, straight to the driver's cursor, with SQLAlchemy's own error handling.

``Connection.exec_driver_sql`` costs ~35 µs of Python per statement on top of the driver's few µs:
an execution context, events, and result metadata built again from ``cursor.description`` on every
call (~55 µs for a wide ``SELECT``). A counter decision is seven statements and a settle a dozen, so
that overhead was most of their CPU (docs/benchmarks.md, "Hot statements straight to the driver").

These functions run one statement on the cursor of ``conn``'s own DBAPI connection, inside whatever
transaction ``conn`` holds, with the driver's paramstyle (``?`` on SQLite, ``%s`` on PostgreSQL), and
answer plain tuples. A driver error goes through the same handler as ``exec_driver_sql``'s: raised as
SQLAlchemy's exception (``OperationalError`` ...), and a lost connection invalidates ``conn`` (the writer
then fails the whole batch, and the outage rules in ``outage.py`` see what they always saw).

Round trips under a lock (PostgreSQL): a settle holds its organization's row lock from its first
statement to its commit, and every other process's settles of that organization wait for it. Each round
trip costs the writer thread a wait for the interpreter lock on its way back (0.7 to 1.5 ms under load,
against tens of µs of the server's time), so the round trips, not the statements, made the lock's hold.
Inside ``sending(conn)``, ``send`` queues a statement whose answer nobody reads; the queue goes to the
server with the next statement that needs an answer, in one pipeline (one round trip), and
``fetch_together`` asks several queries in one. A statement through SQLAlchemy sends the queue first
(``Database`` listens for it: SQLAlchemy cannot run in pipeline mode). On SQLite there are no round
trips: ``send`` runs at once.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine.interfaces import DBAPICursor

Params = Sequence[Any] | Mapping[str, Any]


# ``conn.info`` key: the statements ``send`` queued inside ``sending(conn)`` (PostgreSQL), oldest first.
_SENT = "meterline.sent"
Statement = tuple[str, Params | Sequence[Sequence[Any]], bool]  # SQL, parameters, many (executemany)


def _execute(
    conn: Connection, sql: str, params: Params | Sequence[Sequence[Any]], *, many: bool, rows: bool
) -> tuple[int, list[tuple[Any, ...]]]:
    if _queued(conn):
        return _execute_all(conn, [(sql, params, many)], rows=rows)[0]
    # The lone statement, as cheap as it was: every settle runs a dozen (SQLite always comes here).
    if not conn.in_transaction():
        conn.begin()  # as SQLAlchemy's autobegin: the caller's commit or rollback ends it
    cursor: DBAPICursor | None = None
    try:
        cursor = conn.connection.cursor()
        if many:
            many_rows = cast(Sequence[Sequence[Any]], params)
            if len(many_rows) > 1 and conn.dialect.name == "sqlite" and _values_of(sql) is not None:
                return _insert_rows(cursor, sql, many_rows), []
            cursor.executemany(sql, many_rows)
        else:
            cursor.execute(sql, params)
        return int(cursor.rowcount), [tuple(row) for row in cursor.fetchall()] if rows else []
    except BaseException as exc:
        # SQLAlchemy's own handler (private, stable since 1.4), as ``exec_driver_sql`` calls it: wraps a
        # driver error (and any error binding parameters), invalidates the connection when it is lost
        # or interrupted, and raises.
        conn._handle_dbapi_exception(exc, sql, params, cursor, None)
        raise  # never reached: the handler always raises
    finally:
        if cursor is not None:
            with contextlib.suppress(Exception):
                cursor.close()


# SQLite: an INSERT of many rows as a few multi-row statements, not one statement per row. Python's
# ``sqlite3`` lets go of the interpreter lock around every step of a statement, and the writer thread then
# waits to take it back behind the event loop, for up to the switch interval (5 ms) when the loop is busy:
# ``executemany`` of 16 rows beside a busy thread took 43 ms, one 16-row statement 5 ms (docs/
# benchmarks.md, "Ids drawn in blocks; rows written in few statements"). Chunks are powers of two (at most
# eight statement texts per INSERT, each prepared once and kept in the connection's statement cache);
# the rows are inserted in order, so an upsert meets the same key twice as ``executemany`` would.
_PLAIN_INSERT = re.compile(
    r"\s*INSERT\s+(?:OR\s+\w+\s+)?INTO\s+\w+\s*(?:\([\w\s,]*\))?\s*VALUES\s*(\([?,\s]*\))", re.IGNORECASE
)
_MOST_ROWS = 128


@functools.lru_cache(maxsize=256)
def _values_of(sql: str) -> tuple[str, str, str] | None:
    """``INSERT INTO table (columns) VALUES (?, ...) [tail]`` whose every placeholder is in that one group:
    (what comes before the group, the group, the tail); None for any other statement."""
    found = _PLAIN_INSERT.match(sql)
    if found is None or sql.count("?") != found.group(1).count("?"):
        return None
    return sql[: found.start(1)], found.group(1), sql[found.end(1) :]


@functools.lru_cache(maxsize=1024)
def _rows_sql(sql: str, count: int) -> str:
    shape = _values_of(sql)
    assert shape is not None
    before, group, after = shape
    return before + ", ".join([group] * count) + after


def _insert_rows(cursor: DBAPICursor, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """``rows`` inserted by ``sql`` (one VALUES group) in multi-row statements; the rows they changed."""
    # Within this build's bound on a statement's parameters (999 before SQLite 3.32, 32,766 after).
    bound = cursor.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    most = max(1, min(_MOST_ROWS, bound // max(1, len(rows[0]))))
    changed = at = 0
    while at < len(rows):
        count = 1 << (min(len(rows) - at, most).bit_length() - 1)  # the largest power of two that fits
        chunk = rows[at : at + count]
        cursor.execute(_rows_sql(sql, count), [value for row in chunk for value in row])
        changed += int(cursor.rowcount)
        at += count
    return changed


def _queued(conn: Connection) -> bool:
    try:
        return bool(conn.info.get(_SENT))
    except Exception:  # a lost connection: the statement itself raises, as it always did
        return False


def _execute_all(
    conn: Connection, statements: Sequence[Statement], *, rows: bool
) -> list[tuple[int, list[tuple[Any, ...]]]]:
    """``statements`` after whatever ``send`` queued, each answered (rows changed, rows if ``rows``); more
    than one (queued ones included) in one pipeline: one round trip."""
    if not conn.in_transaction():
        conn.begin()  # as SQLAlchemy's autobegin: the caller's commit or rollback ends it
    queued: list[Statement] = []
    cursors: list[DBAPICursor] = []
    sql, params = statements[-1][0], statements[-1][1]
    try:
        info = conn.info
        queued = info.get(_SENT) or []
        if queued:
            info[_SENT] = []  # taken now: a failure below must not send them a second time
        dbapi = conn.connection.dbapi_connection
        together = len(queued) + len(statements) > 1
        with dbapi.pipeline() if together else contextlib.nullcontext():  # type: ignore[union-attr]
            for sql, params, many in queued:
                _run_on(conn.connection.cursor(), sql, params, many, cursors)
            for sql, params, many in statements:
                _run_on(conn.connection.cursor(), sql, params, many, cursors)
        answered = cursors[len(queued) :]
        return [(int(c.rowcount), [tuple(row) for row in c.fetchall()] if rows else []) for c in answered]
    except BaseException as exc:
        # As in ``_execute``. (In a pipeline, the statement named may be an earlier one's.)
        conn._handle_dbapi_exception(exc, sql, params, cursors[-1] if cursors else None, None)
        raise  # never reached: the handler always raises
    finally:
        for cursor in cursors:
            with contextlib.suppress(Exception):
                cursor.close()


def _run_on(
    cursor: DBAPICursor,
    sql: str,
    params: Params | Sequence[Sequence[Any]],
    many: bool,
    cursors: list[DBAPICursor],
) -> None:
    cursors.append(cursor)
    if many:
        cursor.executemany(sql, cast(Sequence[Sequence[Any]], params))
    else:
        cursor.execute(sql, params)


@contextlib.contextmanager
def sending(conn: Connection) -> Iterator[None]:
    """Within the block, ``send`` queues statements (PostgreSQL): each goes with the next one answered,
    and what is left at the end goes then. Nested blocks share the outermost one's queue."""
    info = conn.info  # kept: once the connection is lost, reaching it through ``conn`` raises
    if conn.dialect.name == "sqlite" or _SENT in info:
        yield
        return
    info[_SENT] = []
    try:
        yield
        send_queued(conn)
    finally:
        info.pop(_SENT, None)  # on a failure, what was queued is dropped with the transaction


def send(conn: Connection, sql: str, params: Params = ()) -> None:
    """One statement whose answer nobody reads: queued inside ``sending(conn)``, else run now."""
    _send(conn, (sql, params, False))


def send_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``send`` of one statement for each parameter row."""
    if rows:
        _send(conn, (sql, rows, True))


def _send(conn: Connection, statement: Statement) -> None:
    queued: list[Statement] | None = conn.info.get(_SENT)
    if queued is None:
        sql, params, many = statement
        _execute(conn, sql, params, many=many, rows=False)
    else:
        queued.append(statement)


def send_queued(conn: Connection) -> None:
    """What ``send`` queued on ``conn``, sent now (one round trip), before a statement that does not go
    through these functions."""
    queued: list[Statement] | None = conn.info.get(_SENT)
    if queued:
        last = queued.pop()
        _execute_all(conn, [last], rows=False)


def pg_array(values: Iterable[str | int | bool | None]) -> str:
    """``values`` as the text of one PostgreSQL array, for a parameter cast to one (``%s::text[]``,
    ``bigint[]``, ``boolean[]``): the settle's bulk statements pass each column so (``unnest``).
    psycopg's own list adapter writes the same text one element at a time in Python, 3 to 7 times slower
    (docs/benchmarks.md, "One read of a kept value at a time; the settle's PostgreSQL parameters made
    cheap"). Strings are quoted, a backslash and a double quote escaped (``array_in`` reads every other
    character inside quotes as it is), integers written out, booleans ``t``/``f``, None ``NULL``;
    anything else is refused rather than written inexactly."""
    return (
        "{"
        + ",".join(
            '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            if isinstance(v, str)
            else str(v)
            if type(v) is int  # (not a bool: ``_element``)
            else _element(v)
            for v in values
        )
        + "}"
    )


def pg_columns(rows: Iterable[Sequence[Any]]) -> tuple[str, ...]:
    """``rows`` as one ``pg_array`` per column, in the rows' order: the parameters of an ``unnest`` over
    them (``INSERT ... SELECT * FROM unnest(%s::text[], %s::bigint[], ...)``)."""
    return tuple(pg_array(column) for column in zip(*rows, strict=True))


def _element(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(int(value))
    raise TypeError(f"an array parameter holds str, int, bool or None, not {type(value).__name__}")


def fetch_together(conn: Connection, queries: Sequence[tuple[str, Params]]) -> list[list[tuple[Any, ...]]]:
    """The rows of each of ``queries``, asked in one round trip (PostgreSQL: one pipeline)."""
    if conn.dialect.name == "sqlite":
        return [fetch(conn, sql, params) for sql, params in queries]
    return [found for _, found in _execute_all(conn, [(sql, p, False) for sql, p in queries], rows=True)]


def fetch(conn: Connection, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
    """The rows of one query, as tuples."""
    return _execute(conn, sql, params, many=False, rows=True)[1]


def fetch_one(conn: Connection, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
    """The first row of one query, or None."""
    found = fetch(conn, sql, params)
    return found[0] if found else None


def run(conn: Connection, sql: str, params: Params = ()) -> int:
    """One statement that answers no rows; the rows it changed."""
    return _execute(conn, sql, params, many=False, rows=False)[0]


def run_rows(conn: Connection, each: str, together: str, rows: Sequence[Sequence[Any]]) -> None:
    """Rows written by ``each`` (``run_many``: SQLite, or a single row), or on PostgreSQL by ``together``
    once, with one array per column in the rows' order (``pg_array``: an ``unnest`` over them)."""
    if len(rows) > 1 and conn.dialect.name != "sqlite":
        run(conn, together, pg_columns(rows))
    else:
        run_many(conn, each, rows)


def run_in(conn: Connection, head: str, values: Sequence[Any], chunk: int = 500) -> int:
    """``head`` followed by ``IN (...)`` of ``values``, in statements of at most ``chunk`` values; the rows
    they changed (``run_in(conn, "DELETE FROM t WHERE id", ids)``)."""
    marker = "?" if conn.dialect.name == "sqlite" else "%s"
    changed = 0
    for start in range(0, len(values), chunk):
        part = list(values[start : start + chunk])
        changed += run(conn, f"{head} IN ({', '.join([marker] * len(part))})", part)
    return changed


def run_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """The statement for each parameter row (``executemany``; on SQLite, an INSERT of placeholders as a few
    multi-row statements: ``_insert_rows``); the rows they changed. One row is a plain execute: cheaper
    than ``executemany`` of one on PostgreSQL."""
    if not rows:
        return 0
    if len(rows) == 1:
        return _execute(conn, sql, rows[0], many=False, rows=False)[0]
    return _execute(conn, sql, rows, many=True, rows=False)[0]
