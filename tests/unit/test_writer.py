"""The group-commit writer on a real SQLite file: batches form under concurrency, each caller is answered
only after its batch committed, one job's failure is its own, and a failed commit fails every job of it."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection

from meterline.storage.database import Database
from meterline.storage.writer import Together, Writer, after_commit, answered_before


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'w.db'}")
    with database.write() as conn:
        conn.exec_driver_sql("CREATE TABLE items (name TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    yield database
    database.dispose()


def names(db: Database) -> set[str]:
    path = db.engine.url.database
    assert path is not None
    with sqlite3.connect(path) as conn:
        return {name for (name,) in conn.execute("SELECT name FROM items")}


def insert(name: str, n: int = 1) -> Callable[[Connection], str]:
    def job(conn: Connection) -> str:
        conn.exec_driver_sql("INSERT INTO items (name, n) VALUES (?, ?)", (name, n))
        return name

    return job


def hold(writer: Writer) -> threading.Event:
    """Occupy the writer with a job that waits for the returned event: jobs submitted meanwhile queue
    behind it and form the next batch together."""
    started, gate = threading.Event(), threading.Event()

    def job(_conn: Connection) -> None:
        started.set()
        gate.wait(5)

    writer.submit(job)
    assert started.wait(5)
    return gate


def test_a_lone_job_is_committed_before_its_caller_is_answered(db: Database) -> None:
    seen_by_other_connection: list[set[str]] = []

    def job(conn: Connection) -> str:
        conn.exec_driver_sql("INSERT INTO items (name, n) VALUES ('a', 1)")
        seen_by_other_connection.append(names(db))  # not committed yet: invisible to others
        return "done"

    assert db.writer.run(job) == "done"
    assert seen_by_other_connection == [set()]
    assert names(db) == {"a"}


def test_concurrent_callers_share_commits_and_all_land(db: Database) -> None:
    gate = hold(db.writer)
    first = db.writer.submit(insert("first"))
    futures = [db.writer.submit(insert(f"item-{i}")) for i in range(50)]
    gate.set()
    assert first.result(5) == "first"
    assert sorted(f.result(5) for f in futures) == sorted(f"item-{i}" for i in range(50))
    assert len(names(db)) == 51
    assert db.writer.jobs == 52
    assert db.writer.batches == 2  # the holder, then the 51 queued behind it in one commit


def test_a_failing_job_fails_only_its_own_caller(db: Database) -> None:
    gate = hold(db.writer)
    good = [db.writer.submit(insert(f"good-{i}")) for i in range(5)]
    # Two rows, the second refused by the primary key: the job's first row must not survive either.
    bad = db.writer.submit(lambda conn: [insert("partial")(conn), insert("good-0")(conn)])
    more = [db.writer.submit(insert(f"more-{i}")) for i in range(5)]
    gate.set()
    with pytest.raises(Exception, match="UNIQUE"):
        bad.result(5)
    assert [f.result(5) for f in good + more] == [f"good-{i}" for i in range(5)] + [
        f"more-{i}" for i in range(5)
    ]
    assert "partial" not in names(db)
    assert len(names(db)) == 10


def test_a_failed_commit_answers_every_job_of_the_batch_with_the_error(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    with db.write() as conn:
        conn.exec_driver_sql("CREATE TABLE items (name TEXT PRIMARY KEY, n INTEGER NOT NULL)")

    @contextmanager
    def failing_transaction() -> Iterator[Connection]:
        with db.write() as conn:
            yield conn
            raise OSError("disk full")  # after the jobs ran, before the commit

    writer = Writer(failing_transaction)
    gate = hold(writer)
    futures = [writer.submit(insert(f"x-{i}")) for i in range(5)]
    gate.set()
    for future in futures:
        with pytest.raises(OSError, match="disk full"):
            future.result(5)
    assert names(db) == set()
    writer.close()
    db.dispose()


@contextmanager
def waiting_for_another_process(db: Database) -> Iterator[Future[str]]:
    """A job ("first") whose batch waits for the write lock, held by another process meanwhile (a second
    Database on the file: its own descriptor of the lock file); released on leaving."""
    other = Database(str(db.engine.url))
    try:
        with other.write():
            first = db.writer.submit(insert("first"))
            while db.writer.pending:  # the writer took it, and now waits for the other's lock
                time.sleep(0.001)
            time.sleep(0.05)
            yield first
    finally:
        other.dispose()


def test_jobs_queued_while_the_writer_waits_for_another_process_share_its_commit(db: Database) -> None:
    with waiting_for_another_process(db) as first:
        later = [db.writer.submit(insert(f"later-{i}")) for i in range(20)]
    assert first.result(5) == "first"
    assert [f.result(5) for f in later] == [f"later-{i}" for i in range(20)]
    assert len(names(db)) == 21
    assert db.writer.batches == 1  # one commit, not "first" alone and the others after it


def test_every_job_waiting_for_a_transaction_that_cannot_open_gets_its_error(db: Database) -> None:
    opening, gate = threading.Event(), threading.Event()

    @contextmanager
    def unopenable() -> Iterator[Connection]:
        opening.set()
        gate.wait(5)
        raise TimeoutError("another process has held the database's write lock for over 30 s")
        yield  # a generator, as Database.write

    writer = Writer(unopenable)
    first = writer.submit(insert("first"))
    assert opening.wait(5)
    later = [writer.submit(insert(f"later-{i}")) for i in range(3)]
    gate.set()
    for future in [first, *later]:
        with pytest.raises(TimeoutError, match="write lock"):
            future.result(5)
    writer.close()


def test_close_while_the_writer_waits_for_another_process_commits_what_was_queued(db: Database) -> None:
    with waiting_for_another_process(db) as first:
        later = db.writer.submit(insert("later"))
        closing = threading.Thread(target=db.writer.close)
        closing.start()
    closing.join(5)
    assert not closing.is_alive()  # the writer stopped once what was queued committed
    assert (first.result(0), later.result(0)) == ("first", "later")
    assert names(db) == {"first", "later"}


class Abort(BaseException):
    """Not an ``Exception``: what a job meets when the process is being stopped."""


def test_a_batch_that_dies_of_a_base_exception_still_lets_close_stop_the_writer(db: Database) -> None:
    gate = hold(db.writer)

    def job(_conn: Connection) -> None:
        raise Abort

    aborted = db.writer.submit(job)
    closing = threading.Thread(target=db.writer.close)  # its stop request queues behind the job
    closing.start()
    while db.writer.pending < 2:
        time.sleep(0.001)
    gate.set()
    closing.join(5)
    assert not closing.is_alive()
    with pytest.raises(Abort):
        aborted.result(0)


def test_jobs_of_a_batch_run_in_key_order(db: Database) -> None:
    ran: list[str] = []
    gate = hold(db.writer)
    futures = [
        db.writer.submit(lambda _c, k=k: ran.append(k), order=k) for k in ["org_c", "org_a", "org_b", "org_a"]
    ]
    gate.set()
    for future in futures:
        future.result(5)
    assert ran == ["org_a", "org_a", "org_b", "org_c"]


def test_many_threads_waiting_on_the_writer(db: Database) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(lambda i: db.writer.run(insert(f"t-{i}", i)), range(200)))
    assert sorted(got) == sorted(f"t-{i}" for i in range(200))
    assert len(names(db)) == 200


def test_a_job_cannot_wait_on_the_writer_itself(db: Database) -> None:
    with pytest.raises(RuntimeError, match="wait forever"):
        db.writer.run(lambda _conn: db.writer.run(lambda _c: None))


def test_the_writer_restarts_after_dispose(db: Database) -> None:
    db.writer.run(insert("before"))
    db.dispose()
    db.writer.run(insert("after"))
    assert names(db) == {"before", "after"}


def test_transaction_factory_is_the_databases_write_rule(db: Database) -> None:
    # The writer holds the same process-wide write lock as every other write: they never interleave.
    factory: AbstractContextManager[Connection] = db.write()
    with factory:
        future = db.writer.submit(insert("queued"))
        with pytest.raises(TimeoutError):
            future.result(0.5)  # the writer waits for the lock this thread holds
    future.result(5)
    assert names(db) == {"queued"}


def test_jobs_of_one_kind_run_as_one_and_a_bad_one_still_fails_alone(db: Database) -> None:
    calls: list[list[str]] = []

    def insert_all(conn: Connection, names_: list[str]) -> list[str]:
        calls.append(list(names_))
        conn.exec_driver_sql("INSERT INTO items (name, n) VALUES (?, 1)", [(n,) for n in names_])
        return [n.upper() for n in names_]

    def queue_all(wanted: list[str]) -> list[Future[str]]:
        gate = hold(db.writer)
        futures = [db.writer.submit_together(Together("items", n, insert_all)) for n in wanted]
        gate.set()
        return futures

    assert [f.result(5) for f in queue_all(["a", "b", "c"])] == ["A", "B", "C"]
    assert calls == [["a", "b", "c"]]  # one run for the three

    calls.clear()
    futures = queue_all(["d", "a", "e"])  # "a" is taken: the merged run fails, then each alone
    assert futures[0].result(5) == "D"
    assert futures[2].result(5) == "E"
    with pytest.raises(Exception, match="UNIQUE"):
        futures[1].result(5)
    assert calls == [["d", "a", "e"], ["d"], ["a"], ["e"]]
    assert names(db) == {"a", "b", "c", "d", "e"}


def test_a_merged_run_that_fails_runs_again_by_part_before_job_by_job(db: Database) -> None:
    """A batch's settles of many organizations are one run: one bad request makes its organization's
    part run job by job, while every other part still runs as one."""
    calls: list[list[str]] = []

    def insert_all(conn: Connection, names_: list[str]) -> list[str]:
        calls.append(list(names_))
        conn.exec_driver_sql("INSERT INTO items (name, n) VALUES (?, 1)", [(n,) for n in names_])
        return [n.upper() for n in names_]

    assert db.writer.run(insert("x2")) == "x2"  # taken: "x2" will fail
    gate = hold(db.writer)
    wanted = ["x1", "y1", "x2", "y2", "z1", "x3"]
    futures = [
        db.writer.submit_together(Together("items", n, insert_all, part=lambda n: n[0])) for n in wanted
    ]
    gate.set()
    with pytest.raises(Exception, match="UNIQUE"):
        futures[2].result(5)
    assert [f.result(5) for i, f in enumerate(futures) if i != 2] == ["X1", "Y1", "Y2", "Z1", "X3"]
    # The whole run, then part x (fails), y, z (one job), then x's jobs one by one.
    assert calls == [wanted, ["x1", "x2", "x3"], ["x1"], ["x2"], ["x3"], ["y1", "y2"], ["z1"]]
    assert names(db) == {"x1", "x2", "x3", "y1", "y2", "z1"}


def test_a_lost_connection_fails_the_whole_batch_with_the_error_that_lost_it(db: Database) -> None:
    """An outage met by one job of a batch: nothing can commit, and every caller gets the outage's own
    error (which the API answers as a 503), never a later "invalid transaction" error."""

    def outage(conn: Connection) -> None:
        conn.invalidate()  # what SQLAlchemy does when the server drops the connection
        raise OSError("server closed the connection unexpectedly")

    gate = hold(db.writer)
    before = db.writer.submit(insert("before"))
    lost = db.writer.submit(outage)
    after = db.writer.submit(insert("after"))
    gate.set()
    for future in (before, lost, after):
        with pytest.raises(OSError, match="server closed"):
            future.result(5)
    assert names(db) == set()
    assert db.writer.run(insert("later")) == "later"  # the writer goes on with a new connection


def test_after_commit_actions_run_only_for_jobs_that_committed(db: Database) -> None:
    """What a process remembers about a write (a cache) follows the commit, never a rolled-back job."""
    remembered: list[str] = []

    def job(name: str, fail: bool) -> Callable[[Connection], str]:
        def run(conn: Connection) -> str:
            insert(name)(conn)
            after_commit(lambda: remembered.append(name))
            assert not remembered or name not in remembered  # not before the commit
            if fail:
                raise ValueError(f"{name} is refused")
            return name

        return run

    gate = hold(db.writer)
    futures = [db.writer.submit(job(n, n == "bad")) for n in ("one", "bad", "two")]
    gate.set()
    assert futures[0].result(5) == "one"
    assert futures[2].result(5) == "two"
    with pytest.raises(ValueError, match="refused"):
        futures[1].result(5)
    assert sorted(remembered) == ["one", "two"]
    after_commit(lambda: remembered.append("outside"))  # outside a writer job: at once
    assert remembered[-1] == "outside"


def test_a_write_reads_the_answer_of_a_decision_queued_before_it_in_the_same_commit(db: Database) -> None:
    """A decision (merged with its kind, run first: no order key) and a write that depends on it (queued
    after it, run later under its organization's key): one batch, one commit, and the write sees the
    decision's answer before either caller is told anything."""

    def decide(conn: Connection, names_asked: list[str]) -> list[str]:
        for name in names_asked:
            insert(f"decided-{name}")(conn)
        return [name.upper() for name in names_asked]

    gate = hold(db.writer)
    other = db.writer.submit(insert("queued-first"), order="org_a")  # a unit placed before the decision
    decided = [db.writer.submit_together(Together("decide", name, decide)) for name in ("a", "b")]
    seen: list[str] = []

    def depends(conn: Connection) -> str:
        answer = answered_before(decided[1])
        seen.append(answer)
        return insert(f"written-{answer}")(conn)

    written = db.writer.submit(depends, order="org_b")
    batches = db.writer.batches
    gate.set()
    assert written.result(5) == "written-B"
    assert [f.result(5) for f in decided] == ["A", "B"]
    assert other.result(5) == "queued-first"
    assert seen == ["B"]
    assert db.writer.batches == batches + 2  # the holder, then everything queued behind it in one commit
    assert {"decided-a", "decided-b", "written-B"} <= names(db)


def test_a_write_whose_decision_failed_gets_its_error_and_one_from_an_earlier_batch_its_answer(
    db: Database,
) -> None:
    earlier = db.writer.submit(lambda _conn: "from an earlier batch")
    assert earlier.result(5) == "from an earlier batch"
    gate = hold(db.writer)
    failing = db.writer.submit(lambda conn: [insert("dup")(conn), insert("dup")(conn)])
    after_failure = db.writer.submit(lambda _conn: answered_before(failing), order="org_a")
    after_earlier = db.writer.submit(lambda _conn: answered_before(earlier), order="org_a")
    not_yet: Future[str] = Future()
    never_queued = db.writer.submit(lambda _conn: answered_before(not_yet), order="org_a")
    gate.set()
    with pytest.raises(Exception, match="UNIQUE"):
        after_failure.result(5)
    assert after_earlier.result(5) == "from an earlier batch"
    with pytest.raises(LookupError):
        never_queued.result(5)


def test_a_batch_runs_without_savepoints_unless_a_job_fails_beside_others(db: Database) -> None:
    """Savepoints cost two statements per unit (on PostgreSQL, two round trips): a batch takes them only
    when it must run again because one of its jobs failed."""
    statements: list[str] = []
    tracing = [True]

    def trace(statement: str) -> None:
        if tracing[0]:
            statements.append(statement)

    def traced(conn: Connection) -> str:
        # First in its batch (and in a batch run again): what its connection runs from now on is seen.
        dbapi = conn.connection.dbapi_connection
        assert isinstance(dbapi, sqlite3.Connection)
        dbapi.set_trace_callback(trace)
        return "traced"

    def batch(*jobs: Callable[[Connection], object]) -> list[Future[object]]:
        gate = hold(db.writer)
        futures = [db.writer.submit(job) for job in (traced, *jobs)]
        gate.set()
        for future in futures:
            future.exception(5)
        return futures[1:]

    try:
        batch(insert("a"), insert("b"))
        assert [s for s in statements if "INSERT" in s]
        assert not [s for s in statements if "SAVEPOINT" in s.upper()]

        statements.clear()
        futures = batch(insert("c"), insert("a"), insert("d"))  # "a" is taken: it fails alone
        assert [futures[0].result(), futures[2].result()] == ["c", "d"]
        assert isinstance(futures[1].exception(), Exception)
        assert [s for s in statements if s.upper().startswith("SAVEPOINT")]
        assert names(db) == {"a", "b", "c", "d"}
    finally:
        tracing[0] = False
