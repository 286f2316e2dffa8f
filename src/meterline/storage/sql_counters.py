"""Quota counters in the database itself: exact across every process that shares the database.

Every call is a job of the database's writer (group commit), merged with the counter calls queued
beside it: the run loads the counters and holds they touch into a ``CounterBook`` (``quotas/memory.py``:
the one statement of what reserving, settling and seeding do), applies the calls there in queue order,
and writes back what changed. Two processes can never decide on the same counter at once:

* SQLite: the writer's transaction holds the database's one write lock (across processes too), so
  decisions are serialized;
* PostgreSQL: seeded counters are inserted first (set if absent, in key order), then the holds being
  finished and the counters are locked ``FOR UPDATE`` in id and key order (a rolling window's buckets
  are only written under its marker row's lock), then tallies: every run takes its locks in that order,
  so concurrent decisions on a counter queue and never deadlock, and on different counters run side by
  side.

Tables (``tables.py``): ``quota_counters`` (a fixed window's ``used``/``reserved``; for a rolling minute a
marker row whose ``reset_s`` is its horizon), ``quota_seconds`` (a rolling minute's one-second buckets),
``quota_holds`` (each open reservation, its lines as JSON: durable, so a process that dies leaves its
holds for the reaper, which ``expired`` lists), ``quota_tallies`` (refusals per minute).

This is what ``meterline serve --workers N`` uses when no Redis is configured: every worker decides on
the same counters. One process alone keeps the faster in-process store.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from meterline.quotas.counters import (
    TALLY_MINUTES,
    CounterStoreUnavailable,
    Hold,
    Level,
    Line,
    Release,
    Seed,
    Settlement,
    Verdict,
    WindowKind,
    answered,
    group_of,
)
from meterline.quotas.memory import CounterBook, Fixed, Held, Rolling
from meterline.storage.database import Database
from meterline.storage.driver_sql import fetch, run_rows
from meterline.storage.outage import is_outage
from meterline.storage.writer import Together, after_commit, answered_before, wait

log = logging.getLogger("meterline.quotas.database")
T = TypeVar("T")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MERGED = "quota-counters"  # the writer merges every queued counter call into one run
_TALLIES_KEPT = 10_000  # keys whose minutes are remembered (refusals of that many organizations)

_FORGET_AFTER_S = 86_400  # as memory.py: a finished fixed window is kept a day
_SWEEP_EVERY = 1_000  # reserves between sweeps of what no longer counts
_KIND_CODE: dict[str, str] = {"fixed": "f", "rolling": "r"}
_KIND: dict[str, WindowKind] = {"f": "fixed", "r": "rolling"}

# PostgreSQL: a run's write-back, one statement each, ``unnest`` over one array per column, where
# ``executemany`` ran each once a row (a request's hold made and deleted, its counters written): the
# writer's CPU for a run of 8 reservations and 8 settlements fell by a quarter (docs/benchmarks.md,
# "Reservations of a batch in one statement").
_PG_FIXED = (
    "UPDATE quota_counters AS c SET used = u.used, reserved = u.reserved "
    "FROM unnest(%s::bigint[], %s::bigint[], %s::text[]) AS u(used, reserved, key) "
    "WHERE c.key = u.key AND c.kind = 'f'"
)
_PG_HORIZONS = (
    "UPDATE quota_counters AS c SET reset_s = u.reset_s "
    "FROM unnest(%s::bigint[], %s::text[]) AS u(reset_s, key) WHERE c.key = u.key AND c.kind = 'r'"
)
_PG_SECONDS = (
    "INSERT INTO quota_seconds (key, second, amount) "
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
    "ON CONFLICT (key, second) DO UPDATE SET amount = excluded.amount"
)
_PG_HOLDS_GONE = "DELETE FROM quota_holds WHERE id = ANY(%s::text[])"
_PG_HOLDS_NEW = (
    "INSERT INTO quota_holds (id, expires_us, second, lines) "
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[])"
)


def _encode_lines(lines: Sequence[Line]) -> str:
    return orjson.dumps(
        [[ln.key, _KIND_CODE[ln.kind], ln.amount, ln.maximum, ln.block, ln.reset_s] for ln in lines]
    ).decode()


def _int(value: int) -> int:
    """A value a BIGINT column holds (as Redis' counters: 64 bits), else the caller's ``ValueError``."""
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} does not fit a 64-bit counter")
    return value


def _report_lost(done: Future[Any]) -> None:
    error = done.exception()
    if error is not None:
        log.warning(
            "settlements not applied to the counters (the reaper settles them from the ledger): %s", error
        )
    elif isinstance(done.result(), ValueError):
        log.error("a settlement did not match its reservation: %s", done.result())


def _unavailable(exc: OperationalError) -> CounterStoreUnavailable | None:
    """What an outage of the database means to a caller of the counters; None for any other error."""
    if not is_outage(exc):
        return None
    unavailable = CounterStoreUnavailable(f"the database holding the counters is unavailable: {exc.orig}")
    unavailable.__cause__ = exc  # the outage is the database's (``storage.outage.dependency_of``)
    return unavailable


def _copy_verdicts(done: Future[Any], verdicts: Future[list[Verdict]]) -> None:
    """A reserve call's answer, as ``reserve`` answers it: the fault of a hold (``ValueError``) raised, an
    outage as ``CounterStoreUnavailable``."""
    error = done.exception()
    if error is None and isinstance(done.result(), ValueError):
        error = done.result()
    if isinstance(error, OperationalError):
        error = _unavailable(error) or error
    if error is not None:
        verdicts.set_exception(error)
    else:
        verdicts.set_result(done.result())


def _decode_lines(text: str) -> tuple[Line, ...]:
    # Stored by ``_encode_lines``: JSON numbers and booleans come back as Python's own. ``tuple.__new__``
    # builds a Line in half the time of ``Line(...)``; a batch decodes every hold it finishes.
    new = tuple.__new__
    return tuple([new(Line, (k, a, m, b, _KIND[c], r)) for k, c, a, m, b, r in orjson.loads(text)])


def _hold(hold_id: str, lines: tuple[Line, ...], expires_us: int) -> Hold:
    # The group is not stored: it is the lines' own (a hold without lines has none to be routed by here).
    return Hold(hold_id, lines, expires_us, group_of(lines[0].key) if lines else "")


_Stored = tuple[str, int, int, tuple[Line, ...]]  # a hold as read: id, expires_us, second, lines


class _Verdicts(Future[list[Verdict]]):
    """A reserve's verdicts, and the writer's job they come from (for ``verdicts_so_far``)."""

    def __init__(self, job: Future[Any]) -> None:
        super().__init__()
        self.job = job


class _State:
    """What one transaction loaded, kept to write back only what changed."""

    def __init__(self) -> None:
        self.book = CounterBook()
        self.fixed: dict[str, tuple[int, int]] = {}  # key -> (used, reserved) as loaded
        self.rolling: dict[str, tuple[int, dict[int, int]]] = {}  # key -> (horizon, {second: amount})
        self.holds: dict[str, Held] = {}  # as loaded


@dataclass(frozen=True, slots=True)
class _Call:
    """One call of the store, queued to the database's writer (``kind``: reserve, finish, seed, levels)."""

    kind: str
    now_us: int
    holds: Sequence[Hold] = ()
    finishes: Sequence[tuple[str, Sequence[int] | None]] = ()
    seeds: Sequence[Seed] = ()
    lines: Sequence[Line] = ()
    key: str = ""  # tally
    limit: int = 0  # expired


class SqlCounterStore:
    """Every call is a job of the database's writer (``storage/writer.py``), mergeable with the others
    queued meanwhile: a batch of decisions loads its counters once, applies the calls in queue order
    and writes back once, in one transaction with whatever else the batch holds. Settlements and
    releases are queued and not waited for (as Redis' are buffered): every later call of this process
    runs after them, and one lost with its batch leaves its hold to the reaper, which settles it from
    the ledger row."""

    in_process = False
    queued = True
    in_writer = True

    def __init__(self, db: Database) -> None:
        self._db = db
        self._p = "?" if db.is_sqlite else "%s"
        self._lock_rows = "" if db.is_sqlite else " FOR UPDATE"
        self._ops = 0
        self._tally_lock = threading.Lock()
        self._tallies_pending: dict[str, dict[int, int]] = {}  # key -> minute -> not yet answered
        self._tallies_known: dict[str, dict[int, int]] = {}  # key -> minute -> events, as last read

    # -- the protocol ---------------------------------------------------------------------------
    def reserve(self, holds: Sequence[Hold], now_us: int) -> list[Verdict]:
        return self._wait(self.reserve_queued(holds, now_us))

    def reserve_queued(self, holds: Sequence[Hold], now_us: int) -> Future[list[Verdict]]:
        if not holds:
            return answered(list)
        for hold in holds:  # refused before anything is queued, as Redis refuses to encode them
            for line in hold.lines:
                _int(line.amount)
                _int(line.maximum)
        queued = self._db.writer.submit_together(
            Together(_MERGED, _Call("reserve", now_us, holds=holds), self._apply), rows=len(holds)
        )
        verdicts = _Verdicts(queued)
        queued.add_done_callback(lambda done: _copy_verdicts(done, verdicts))
        return verdicts

    def verdicts_so_far(self, verdicts: Future[list[Verdict]]) -> list[Verdict]:
        if not isinstance(verdicts, _Verdicts):
            raise TypeError("verdicts_so_far takes what this store's reserve_queued answered")
        answer = answered_before(verdicts.job)
        if isinstance(answer, ValueError):
            raise answer
        found: list[Verdict] = answer
        return found

    def settle(self, settlements: Sequence[Settlement], now_us: int) -> None:
        for settlement in settlements:
            for amount in settlement.actual:
                _int(amount)
        self._queue(_Call("finish", now_us, finishes=[(s.hold_id, s.actual) for s in settlements]))

    def release(self, releases: Sequence[Release], now_us: int) -> None:
        self._queue(_Call("finish", now_us, finishes=[(r.hold_id, None) for r in releases]))

    def seed(self, seeds: Sequence[Seed], now_us: int) -> None:
        if seeds:
            self._call(_Call("seed", now_us, seeds=seeds), rows=len(seeds))

    def levels(self, lines: Sequence[Line], now_us: int) -> list[Level | None]:
        if not lines:
            return []
        # A write: reading a rolling minute moves its horizon (the buckets that left it).
        found: list[Level | None] = self._call(_Call("levels", now_us, lines=lines))
        return found

    def expired(self, now_us: int, limit: int = 100) -> list[Hold]:
        due: list[Hold] = self._call(_Call("expired", now_us, limit=max(limit, 0)))
        return due

    def tally(self, key: str, now_us: int) -> int:
        """Counted in the database without waiting for it (a 429 is answered on the event loop): the
        answer is the key's minutes as the database last gave them, plus this process's counts since."""
        minute = now_us // 60_000_000
        with self._tally_lock:
            pending = self._tallies_pending.setdefault(key, {})
            pending[minute] = pending.get(minute, 0) + 1
            known = self._tallies_known.get(key, {})
            count = sum(n for m, n in [*known.items(), *pending.items()] if m > minute - TALLY_MINUTES)
        queued = self._db.writer.submit_together(
            Together(_MERGED, _Call("tally", now_us, key=key), self._apply)
        )
        queued.add_done_callback(lambda done: self._tallied(key, minute, done))
        return count

    def _tallied(self, key: str, minute: int, done: Future[Any]) -> None:
        with self._tally_lock:
            pending = self._tallies_pending[key]
            pending[minute] -= 1
            if not pending[minute]:
                del pending[minute]
            if not pending:
                del self._tallies_pending[key]
            if done.exception() is None and isinstance(done.result(), dict):
                if len(self._tallies_known) >= _TALLIES_KEPT and key not in self._tallies_known:
                    self._tallies_known.clear()
                self._tallies_known[key] = done.result()

    def ping(self, now_us: int) -> None:
        try:
            with self._db.read() as conn:
                conn.exec_driver_sql("SELECT 1 FROM quota_holds LIMIT 1")
        except Exception as exc:  # whatever the driver raises: the counters cannot be read
            raise CounterStoreUnavailable("the database holding the counters did not answer") from exc

    def close(self) -> None:
        return None  # the database (and its writer) is the services' to close

    # -- through the writer -----------------------------------------------------------------------
    def _call(self, call: _Call, rows: int = 1) -> Any:
        return self._wait(self._db.writer.submit_together(Together(_MERGED, call, self._apply), rows=rows))

    def _queue(self, call: _Call) -> None:
        if call.finishes:
            queued = self._db.writer.submit_together(
                Together(_MERGED, call, self._apply), rows=len(call.finishes)
            )
            queued.add_done_callback(_report_lost)

    @staticmethod
    def _wait(future: Future[T]) -> T:
        try:
            return wait(future)
        except OperationalError as exc:
            unavailable = _unavailable(exc)
            if unavailable is None:
                raise
            raise unavailable from exc

    def _apply(self, conn: Connection, calls: list[_Call]) -> list[Any]:
        """The calls of one batch, in queue order, on one book: loaded once, written back once."""
        self._ops += len(calls)
        sweep = self._ops >= _SWEEP_EVERY
        if sweep:
            after_commit(self._swept)  # a sweep rolled back with its batch is made by the next run
        finishing = [hold_id for call in calls for hold_id, _ in call.finishes]
        hold_ids = [*finishing, *(hold.id for call in calls for hold in call.holds)]
        holds = self._holds(conn, hold_ids)
        lines = [
            *(line for _, _, _, held_lines in holds for line in held_lines),
            *(line for call in calls for hold in call.holds for line in hold.lines),
            *(Line(s.key, 0, -1, False, s.kind, s.reset_s) for call in calls for s in call.seeds),
            *(line for call in calls for line in call.lines),
        ]
        seeds = [(seed, call.now_us) for call in calls for seed in call.seeds]
        if seeds:
            self._insert_seeds(conn, seeds)
        state = self._load(conn, lines, holds)
        book = state.book
        answers: list[Any] = []
        for call in calls:
            now_s = call.now_us // 1_000_000
            if call.kind in ("tally", "expired"):
                answers.append(None)  # after the counters: see below
                continue
            try:
                if call.kind == "reserve":
                    answers.append([book.reserve_one(hold, now_s) for hold in call.holds])
                elif call.kind == "finish":
                    for hold_id, actual in call.finishes:
                        book.finish(hold_id, actual)
                    answers.append(None)
                elif call.kind == "seed":
                    for seed in call.seeds:
                        book.seed(seed, now_s)
                    answers.append(None)
                else:
                    answers.append(
                        [book.level(line, now_s) if book.has(line) else None for line in call.lines]
                    )
            except ValueError as exc:
                # As the in-process store: what the call did before the fault stands; the caller is told.
                answers.append(exc)
        self._write_back(conn, state)
        # Rows taken after the counters' (as in every run), tallies in key order: two processes' runs
        # never hold one another's next lock.
        tallies = sorted((call.key, index) for index, call in enumerate(calls) if call.kind == "tally")
        for key, index in tallies:
            answers[index] = self._tally(conn, key, calls[index].now_us)
        for index, call in enumerate(calls):
            if call.kind == "expired":
                answers[index] = self._expired(conn, call.now_us, call.limit)
        if sweep:
            self._sweep(conn, calls[-1].now_us // 1_000_000)
        return answers

    def _swept(self) -> None:
        self._ops = 0

    def _insert_seeds(self, conn: Connection, seeds: Sequence[tuple[Seed, int]]) -> None:
        """Seeded counters written before any is loaded (set if absent, in key order), so that the run
        then locks and loads them like any other: a counter another process seeded meanwhile is read,
        never shadowed by this run's own copy."""
        p = self._p
        scratch = CounterBook()
        for seed, now_us in seeds:
            scratch.seed(seed, now_us // 1_000_000)  # the first seed of a key in the batch wins
        for key in sorted(scratch.fixed):
            counter = scratch.fixed[key]
            conn.exec_driver_sql(
                "INSERT INTO quota_counters (key, kind, used, reserved, reset_s) "
                f"VALUES ({p}, 'f', {p}, 0, {p}) ON CONFLICT (key, kind) DO NOTHING",
                (key, _int(counter.used), counter.reset_s),
            )
        for key in sorted(scratch.rolling):
            rolling = scratch.rolling[key]
            made = conn.exec_driver_sql(
                "INSERT INTO quota_counters (key, kind, used, reserved, reset_s) "
                f"VALUES ({p}, 'r', 0, 0, {p}) ON CONFLICT (key, kind) DO NOTHING",
                (key, rolling.horizon),
            ).rowcount
            if made and rolling.buckets:
                conn.exec_driver_sql(
                    f"INSERT INTO quota_seconds (key, second, amount) VALUES ({p}, {p}, {p})",
                    [(key, int(s), _int(int(a))) for s, a in rolling.buckets],
                )

    def _tally(self, conn: Connection, key: str, now_us: int) -> dict[int, int]:
        p = self._p
        minute = now_us // 60_000_000
        conn.exec_driver_sql(
            f"INSERT INTO quota_tallies (key, minute, events) VALUES ({p}, {p}, 1) "
            "ON CONFLICT (key, minute) DO UPDATE SET events = quota_tallies.events + 1",
            (key, minute),
        )
        conn.exec_driver_sql(
            f"DELETE FROM quota_tallies WHERE key = {p} AND minute <= {p}", (key, minute - TALLY_MINUTES)
        )
        rows = conn.exec_driver_sql(f"SELECT minute, events FROM quota_tallies WHERE key = {p}", (key,))
        return {int(m): int(n) for m, n in rows}

    def _expired(self, conn: Connection, now_us: int, limit: int) -> list[Hold]:
        p = self._p
        rows = conn.exec_driver_sql(
            f"SELECT id, expires_us, lines FROM quota_holds WHERE expires_us < {p} "
            f"ORDER BY expires_us, id LIMIT {p}",
            (now_us, limit),
        ).all()
        return [_hold(str(r[0]), _decode_lines(str(r[2])), int(r[1])) for r in rows]

    def _holds(self, conn: Connection, hold_ids: Sequence[str]) -> list[_Stored]:
        """The stored holds among ``hold_ids`` (those being finished, and any already made under the id
        of one being reserved), read once and locked first on PostgreSQL, in id order: a settle and the
        reaper finishing one hold at once must not both apply it (the second finds it gone)."""
        if not hold_ids:
            return []
        ids = sorted(set(hold_ids))
        rows = fetch(
            conn,
            f"SELECT id, expires_us, second, lines FROM quota_holds WHERE id IN "
            f"({', '.join([self._p] * len(ids))}) ORDER BY id{self._lock_rows}",
            ids,
        )
        return [
            (str(i), int(expires_us), int(second), _decode_lines(str(text)))
            for i, expires_us, second, text in rows
        ]

    def _load(self, conn: Connection, lines: Iterable[Line], holds: Sequence[_Stored]) -> _State:
        """The counters of ``lines`` (locked on PostgreSQL, in key order) in a book, with ``holds``."""
        p = self._p
        state = _State()
        book = state.book
        wanted = {(line.key, _KIND_CODE[line.kind]) for line in lines}
        if wanted:
            keys = sorted({key for key, _ in wanted})
            rows = fetch(
                conn,
                f"SELECT key, kind, used, reserved, reset_s FROM quota_counters WHERE key IN "
                f"({', '.join([p] * len(keys))}) ORDER BY key, kind{self._lock_rows}",
                keys,
            )
            horizons: dict[str, int] = {}
            for key, kind, used, reserved, reset_s in rows:
                if (key, kind) not in wanted:
                    continue
                if kind == "f":
                    book.fixed[key] = Fixed(int(used), int(reserved), int(reset_s))
                    state.fixed[key] = (int(used), int(reserved))
                else:
                    horizons[key] = int(reset_s)
            if horizons:
                names = sorted(horizons)
                buckets: dict[str, dict[int, int]] = {key: {} for key in names}
                for key, second, amount in fetch(
                    conn,
                    f"SELECT key, second, amount FROM quota_seconds WHERE key IN "
                    f"({', '.join([p] * len(names))}) ORDER BY key, second",
                    names,
                ):
                    if int(second) > horizons[key]:
                        buckets[key][int(second)] = int(amount)
                for key in names:
                    seconds = buckets[key]
                    book.rolling[key] = Rolling(
                        deque([s, a] for s, a in seconds.items()), sum(seconds.values()), horizons[key]
                    )
                    state.rolling[key] = (horizons[key], dict(seconds))
        for hold_id, expires_us, second, held_lines in holds:
            counters: list[Fixed | Rolling] = []
            for line in held_lines:
                found = (book.fixed if line.kind == "fixed" else book.rolling).get(line.key)
                # A counter swept while a hold sat on it (never: a fixed window is swept only with nothing
                # reserved, a rolling one not at all): finishing moves a detached copy, as in memory.
                counters.append(
                    found if found is not None else (Fixed(0, 0, 0) if line.kind == "fixed" else Rolling())
                )
            book.holds[hold_id] = Held(_hold(hold_id, held_lines, expires_us), second, counters)
            state.holds[hold_id] = book.holds[hold_id]
        return state

    def _write_back(self, conn: Connection, state: _State) -> None:
        p = self._p
        book = state.book
        updates: list[tuple[Any, ...]] = []
        for key, counter in book.fixed.items():
            loaded = state.fixed.get(key)
            if loaded is None:
                # Seeds are written before the run loads (``_insert_seeds``): a counter the run did not
                # load is one it never touched, or a bug that must not pass silently.
                raise RuntimeError(f"counter {key!r} was not loaded by this run")
            if loaded != (counter.used, counter.reserved):
                updates.append((_int(counter.used), _int(counter.reserved), key))
        run_rows(
            conn,
            f"UPDATE quota_counters SET used = {p}, reserved = {p} WHERE key = {p} AND kind = 'f'",
            _PG_FIXED,
            updates,
        )
        set_seconds: list[tuple[str, int, int]] = []
        horizons: list[tuple[int, str]] = []
        for key, rolling in book.rolling.items():
            loaded_rolling = state.rolling.get(key)
            if loaded_rolling is None:
                raise RuntimeError(f"rolling counter {key!r} was not loaded by this run")
            horizon, seconds = loaded_rolling
            if rolling.horizon != horizon:
                horizons.append((rolling.horizon, key))
            set_seconds += [
                (key, int(s), _int(int(a))) for s, a in rolling.buckets if seconds.get(int(s)) != a
            ]
        run_rows(
            conn,
            f"UPDATE quota_counters SET reset_s = {p} WHERE key = {p} AND kind = 'r'",
            _PG_HORIZONS,
            horizons,
        )
        run_rows(
            conn,
            f"INSERT INTO quota_seconds (key, second, amount) VALUES ({p}, {p}, {p}) "
            "ON CONFLICT (key, second) DO UPDATE SET amount = excluded.amount",
            _PG_SECONDS,
            set_seconds,
        )
        # A hold finished and made again under its id in one batch is gone and new.
        gone = [(hold_id,) for hold_id, held in state.holds.items() if book.holds.get(hold_id) is not held]
        run_rows(conn, f"DELETE FROM quota_holds WHERE id = {p}", _PG_HOLDS_GONE, gone)
        new = [
            (hold_id, held.hold.expires_us, held.second, _encode_lines(held.hold.lines))
            for hold_id, held in book.holds.items()
            if state.holds.get(hold_id) is not held
        ]
        run_rows(
            conn,
            f"INSERT INTO quota_holds (id, expires_us, second, lines) VALUES ({p}, {p}, {p}, {p})",
            _PG_HOLDS_NEW,
            new,
        )

    def _sweep(self, conn: Connection, now_s: int) -> None:
        """What no longer counts: fixed windows a day past their end with nothing reserved (as memory.py),
        and rolling buckets behind their window's horizon."""
        p = self._p
        conn.exec_driver_sql(
            f"DELETE FROM quota_counters WHERE kind = 'f' AND reserved = 0 AND reset_s < {p}",
            (now_s - _FORGET_AFTER_S,),
        )
        conn.exec_driver_sql(
            "DELETE FROM quota_seconds WHERE second <= (SELECT c.reset_s FROM quota_counters c "
            "WHERE c.key = quota_seconds.key AND c.kind = 'r')"
        )


def reset_counters(conn: Connection) -> None:
    """Forget every counter, hold and tally kept in the database (they reload from the ledger)."""
    for table in ("quota_counters", "quota_seconds", "quota_holds", "quota_tallies"):
        conn.exec_driver_sql(f"DELETE FROM {table}")
