"""One writer per database, with group commit.

The hot writes (settles, event batches, durable reservations) are queued to one thread that owns the
write transaction. It takes what is queued (at most ``max_jobs`` jobs or ``max_rows`` rows, never waiting
for more: while it commits one batch the next one queues, so batches grow with the load and a lone
request is not delayed), and takes what queued again once its transaction holds the write lock (on
SQLite shared by several processes, opening it may have waited for another one). It runs the jobs in
**one transaction**, commits once, and only then answers each caller. Nothing acknowledged is ever lost:
a caller whose job is not committed gets an exception, never a result.

One job's failure is its own. A batch first runs without savepoints; if a job raises beside others, the
whole transaction is rolled back and the same jobs run again in a new one, each inside a savepoint: a
job that raises is rolled back to its savepoint and its caller gets the exception, while its neighbours
go on and commit. (So a job may run twice: its writes go with the transaction, each run starts from
what the job was given, and what a process remembers of its writes waits for ``after_commit``.) A
failure of the transaction itself (the commit, an outage, a savepoint that cannot be rolled back) fails
every job of the batch, none of which was committed.

Jobs run in the order of their ``order`` key (stable: one key keeps its submission order), a merged run
where its first job is. Settles pass their organization: a batch's settles lock their organizations in
one statement, in id order, and when they run again part by part (one organization each) they still
take them in that order, so two processes' batches queue instead of deadlocking.

Models: Datasette's single write thread (``datasette/database.py``) and group commit in PostgreSQL and
InnoDB.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Connection

log = logging.getLogger("meterline.writer")

T = TypeVar("T")
P = TypeVar("P")

Job = Callable[[Connection], T]


@dataclass(frozen=True, slots=True)
class Together(Generic[P, T]):
    """A job that can run as one with others of its kind: queued jobs with equal ``key`` are merged,
    ``run`` gets their payloads in queue order and answers one result per payload.

    Merging is what makes a batch cheaper than its jobs: a batch's settles, of every organization, take
    their turns, look up their keys, insert, upsert rollups and write receipts once. If the merged run
    raises, it is rolled back and runs again by ``part``, then job by job, so a bad job still fails only
    itself."""

    key: Hashable
    payload: P
    run: Callable[[Connection, list[P]], list[T]]
    # A key within the kind (a settle's organization): a merged run that raised runs again as one run
    # per part, each in a savepoint, and job by job only within a part that raises too, so one bad job
    # does not make every job of its kind in the batch pay a savepoint and a run of its own.
    part: Callable[[P], Hashable] | None = None


@dataclass(slots=True)
class _Queued(Generic[T]):
    job: Job[T]
    rows: int
    order: str
    together: Together[Any, T] | None = None
    future: Future[T] = field(default_factory=Future)


class Writer:
    """Runs write jobs on one thread, group-committed (see the module docstring). ``transaction`` opens
    the database's write transaction (``Database.write``), which owns the rule for writing."""

    def __init__(
        self,
        transaction: Callable[[], AbstractContextManager[Connection]],
        *,
        max_jobs: int = 128,
        max_rows: int = 2000,
    ) -> None:
        self._transaction = transaction
        self._max_jobs = max_jobs
        self._max_rows = max_rows
        self._lock = threading.Lock()
        # The running thread and its own queue (a thread after ``close`` gets a fresh pair).
        self._thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[_Queued[Any] | None] = queue.SimpleQueue()
        # Figures for the benchmarks: batches committed, jobs in them, batches run again (a job failed).
        self.batches = 0
        self.jobs = 0
        self.retried = 0

    def submit(self, job: Job[T], *, rows: int = 1, order: str = "") -> Future[T]:
        """Queue ``job`` (called with the batch's connection, inside the transaction); its future is
        answered after the batch commits."""
        return self._put(_Queued(job, max(rows, 1), order))

    def submit_together(self, together: Together[P, T], *, rows: int = 1, order: str = "") -> Future[T]:
        """``submit`` for a job that may be merged with others of its kind (see ``Together``)."""

        def alone(conn: Connection) -> T:
            return together.run(conn, [together.payload])[0]

        return self._put(_Queued(alone, max(rows, 1), order, together))

    def _put(self, queued: _Queued[T]) -> Future[T]:
        with self._lock:
            if self._thread is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._queue,), name="meterline-writer", daemon=True
                )
                self._thread.start()
            self._queue.put(queued)
        return queued.future

    @property
    def pending(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return self._queue.qsize()

    def run(self, job: Job[T], *, rows: int = 1, order: str = "") -> T:
        """``submit`` and wait for the answer (from any thread but a writer's own)."""
        return wait(self.submit(job, rows=rows, order=order))

    def close(self) -> None:
        """Finish what is queued, then stop the thread (a later ``submit`` starts a new one, as a
        disposed SQLAlchemy engine opens new connections)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._queue.put(None)
        if thread is not threading.current_thread():
            thread.join()

    # -- the writer thread ---------------------------------------------------------------------------
    def _loop(self, jobs: queue.SimpleQueue[_Queued[Any] | None]) -> None:
        _here.writer = True
        intake = _Intake(jobs, self._max_jobs, self._max_rows)
        while not intake.stopping:
            first = jobs.get()
            if first is None:
                return
            batch: list[_Queued[Any]] = [first]
            try:
                self._commit(batch, intake)
            except BaseException as exc:  # never let the writer die with callers waiting
                log.exception("the database writer failed a batch")
                _fail(batch, exc)

    def _commit(self, batch: list[_Queued[Any]], intake: _Intake) -> None:
        """Run ``batch``, and what else is queued, in one transaction."""
        intake.take(batch)
        if all(item.future.cancelled() for item in batch):
            for item in batch:
                item.future.set_running_or_notify_cancel()  # wakes whoever waits on a cancelled one
            return
        live: list[_Queued[Any]] = []
        ran = _Ran()
        try:
            try:
                with self._transaction() as conn:
                    # Taken again once the transaction holds its lock: on SQLite shared by several
                    # processes, opening it may have waited for another process, and what queued meanwhile
                    # shares this commit instead of waiting for one more turn of the lock
                    # (docs/benchmarks.md, "What queued while the writer waited joins its commit").
                    intake.take(batch)
                    live = [item for item in batch if item.future.set_running_or_notify_cancel()]
                    live.sort(key=lambda item: item.order)
                    self._run(conn, live, ran)
            except _Retry as retry:
                # A job failed beside others: all of it was rolled back, and the same jobs run again,
                # each unit in a savepoint of its own, so that the failure is that job's alone.
                ran = _Ran()
                self.retried += 1
                with self._transaction() as conn:
                    self._run_guarded(conn, live, ran, retry.unit)
        except BaseException as exc:
            _fail(batch, exc)  # the transaction may have failed to open, before any job was running
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            _here.so_far = None
        self.batches += 1
        self.jobs += len(live)
        # Committed: only now is anyone told.
        for item, result in ran.results:
            item.future.set_result(result)
        for item, error in ran.failed:
            with contextlib.suppress(Exception):
                item.future.set_exception(error)
        for action in ran.actions:
            try:
                action()
            except Exception:
                log.exception("an after-commit action failed")

    @staticmethod
    def _run(conn: Connection, live: list[_Queued[Any]], ran: _Ran) -> None:
        """The batch's jobs without savepoints (two statements, on PostgreSQL two round trips, per unit:
        docs/benchmarks.md, "The write lock held for work only"). A lone job's failure is the batch's, and so
        its own; a failure beside other jobs raises ``_Retry``."""
        if len(live) == 1:
            with _collecting() as pending:
                ran.results.append((live[0], live[0].job(conn)))
            ran.actions += pending
            return
        for unit in _units(live):
            try:
                with _collecting() as pending:
                    outcomes = [unit[0].job(conn)] if len(unit) == 1 else _merged(conn, unit)
            except Exception:
                if conn.invalidated:
                    raise  # the connection is gone (an outage): the whole batch fails with this error
                raise _Retry(unit) from None
            ran.results.extend(zip(unit, outcomes, strict=True))
            for item, outcome in zip(unit, outcomes, strict=True):
                _here.so_far[item.future] = (True, outcome)
            ran.actions += pending

    def _run_guarded(
        self, conn: Connection, live: list[_Queued[Any]], ran: _Ran, failed: list[_Queued[Any]]
    ) -> None:
        """The batch's jobs, each unit in a savepoint: a merged unit that raises runs again part by part,
        then job by job within a part that raises (``failed``, the unit that raised before, at once), and
        a job that raises is rolled back to its savepoint and answered with its exception."""
        for unit in _units(live):
            merged = len(unit) > 1 and unit[0] is not failed[0]
            if merged and self._together(conn, unit, ran.results, ran.actions):
                continue
            for part in _parts(unit):
                if len(part) > 1 and self._together(conn, part, ran.results, ran.actions):
                    continue
                for item in part:
                    self._alone(conn, item, ran.results, ran.failed, ran.actions)

    @staticmethod
    def _together(
        conn: Connection,
        unit: list[_Queued[Any]],
        results: list[tuple[_Queued[Any], Any]],
        actions: list[Callable[[], None]],
    ) -> bool:
        """Run a unit of mergeable jobs as one; False (nothing kept) if it raised."""
        savepoint = conn.begin_nested()
        try:
            with _collecting() as pending:
                outcomes = _merged(conn, unit)
        except Exception:
            if conn.invalidated:
                raise  # the connection is gone (an outage): the whole batch fails with this error
            savepoint.rollback()
            return False
        savepoint.commit()
        results.extend(zip(unit, outcomes, strict=True))
        for item, outcome in zip(unit, outcomes, strict=True):
            _here.so_far[item.future] = (True, outcome)
        actions += pending
        return True

    @staticmethod
    def _alone(
        conn: Connection,
        item: _Queued[Any],
        results: list[tuple[_Queued[Any], Any]],
        failed: list[tuple[_Queued[Any], BaseException]],
        actions: list[Callable[[], None]],
    ) -> None:
        savepoint = conn.begin_nested()
        try:
            with _collecting() as pending:
                result = item.job(conn)
        except Exception as exc:
            if conn.invalidated:
                # The connection is gone (an outage): nothing of the batch can commit, and every job
                # fails with this error, which says what happened (not a later "invalid transaction").
                raise
            # Rolled back to its savepoint: only this job's writes are undone. If even that fails, the
            # transaction is lost and the whole batch fails.
            savepoint.rollback()
            failed.append((item, exc))
            _here.so_far[item.future] = (False, exc)
            return
        savepoint.commit()
        results.append((item, result))
        _here.so_far[item.future] = (True, result)
        actions += pending


class _Intake:
    """The writer thread's queue, taken from up to the batch limits without waiting. Remembers that
    ``close`` asked to stop (its ``None``) even when the batch that took it fails."""

    def __init__(self, jobs: queue.SimpleQueue[_Queued[Any] | None], max_jobs: int, max_rows: int) -> None:
        self._jobs = jobs
        self._max_jobs = max_jobs
        self._max_rows = max_rows
        self.stopping = False

    def take(self, batch: list[_Queued[Any]]) -> None:
        rows = sum(item.rows for item in batch)
        while not self.stopping and len(batch) < self._max_jobs and rows < self._max_rows:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self.stopping = True
                return
            batch.append(item)
            rows += item.rows


def _fail(batch: list[_Queued[Any]], exc: BaseException) -> None:
    """Answer every job of ``batch`` not yet answered with ``exc``; one cancelled before it ran is only
    told it was cancelled (a future is started first, so a cancel cannot slip in between)."""
    for item in batch:
        future = item.future
        if future.running() or (not future.done() and future.set_running_or_notify_cancel()):
            future.set_exception(exc)


_here = threading.local()


def _merged(conn: Connection, unit: list[_Queued[Any]]) -> list[Any]:
    """A unit of mergeable jobs run as one: an answer per job."""
    first = unit[0].together
    assert first is not None
    outcomes = first.run(conn, [item.together.payload for item in unit if item.together is not None])
    if len(outcomes) != len(unit):
        raise RuntimeError("a merged write answered the wrong number of results")
    return outcomes


class _Retry(Exception):
    """A job of a batch run without savepoints failed beside others: the batch runs again, guarded.
    ``unit``: the jobs that raised (one, or a merged unit)."""

    def __init__(self, unit: list[_Queued[Any]]) -> None:
        super().__init__()
        self.unit = unit


class _Ran:
    """What one attempt at a batch ran: answers, failures, and the ``after_commit`` actions of the jobs
    that succeeded. Making one starts the transaction's record of answers (``answered_before``)."""

    def __init__(self) -> None:
        self.results: list[tuple[_Queued[Any], Any]] = []
        self.failed: list[tuple[_Queued[Any], BaseException]] = []
        self.actions: list[Callable[[], None]] = []
        _here.so_far = {}


@contextlib.contextmanager
def _collecting() -> Iterator[list[Callable[[], None]]]:
    pending: list[Callable[[], None]] = []
    _here.pending = pending
    try:
        yield pending
    finally:
        _here.pending = None


def after_commit(action: Callable[[], None]) -> None:
    """Run ``action`` once the write job now running is committed, and never if it is rolled back (for
    what a process remembers about what it wrote: caches). Outside a writer job, at once."""
    pending: list[Callable[[], None]] | None = getattr(_here, "pending", None)
    if pending is None:
        action()
    else:
        pending.append(action)


def answered_before(future: Future[T]) -> T:
    """Inside a write job: the answer of a job queued to this writer before it (``future`` is that job's).
    It ran in an earlier batch (its future is answered) or earlier in this transaction, whose commit its
    writes share (jobs run in ``order`` and in queue order within one; merged units where their first
    job is). Raises what that job raised; ``LookupError`` if it has not run.

    This lets a write depend on a decision queued just before it, in one transaction when both are in
    one batch: a quota reservation and the row it admits (docs/benchmarks.md, "A write that depends on
    the decision queued before it")."""
    so_far: dict[Future[Any], tuple[bool, Any]] | None = getattr(_here, "so_far", None)
    if so_far is not None and future in so_far:
        ok, answer = so_far[future]
        if not ok:
            raise answer
        return cast(T, answer)
    if future.done():
        return future.result()
    raise LookupError("the job this write depends on has not run before it")


def wait(future: Future[T]) -> T:
    """The answer of a queued write, waited for. Refused on a writer thread (a job, or a future's
    callback, that waited for another job would wait forever: the writer runs one batch at a time)."""
    if getattr(_here, "writer", False):
        raise RuntimeError("a write job cannot queue another one and wait for it: it would wait forever")
    return future.result()


def _parts(unit: list[_Queued[Any]]) -> list[list[_Queued[Any]]]:
    """A merged unit's jobs by their ``Together.part`` (each job alone without one), in order."""
    first = unit[0].together
    if len(unit) == 1 or first is None or first.part is None:
        return [[item] for item in unit]
    part = first.part
    parts: dict[Hashable, list[_Queued[Any]]] = {}
    for item in unit:
        assert item.together is not None
        parts.setdefault(part(item.together.payload), []).append(item)
    return list(parts.values())


def _units(items: list[_Queued[Any]]) -> list[list[_Queued[Any]]]:
    """Jobs grouped into what runs as one: mergeable jobs by key, every other job alone; in the order
    of each unit's first job."""
    units: list[list[_Queued[Any]]] = []
    by_key: dict[Hashable, list[_Queued[Any]]] = {}
    for item in items:
        if item.together is None:
            units.append([item])
            continue
        unit = by_key.get(item.together.key)
        if unit is None:
            unit = by_key[item.together.key] = []
            units.append(unit)
        unit.append(item)
    return units


__all__ = ["Job", "Together", "Writer", "after_commit", "answered_before", "wait"]
