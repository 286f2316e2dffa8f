"""Decisions awaited on an event loop with the counters in the database (``QuotaEngine.reserve_queued``):
read as ``reserve_many`` reads them, and never leave a hold behind that nobody will settle: not when a
counter was missing (the decision is made again where the ledger can be read), not when the caller gave
up while the decision was queued."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection

from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.errors import LimitExceeded, ServiceUnavailable
from meterline.metering.records import UsageRecord
from meterline.metering.settle import Account
from meterline.quotas import DEFAULT_PLANS
from meterline.quotas.engine import QuotaEngine, Reservation, Subject, amounts_of
from meterline.services import Services, build_services

NOW = datetime(2026, 3, 14, 10, 30, tzinfo=UTC)
ONE_CALL = amounts_of(tokens=10, credits_nanos=0, cost_nanos=0, event="llm.request", units=1)


BIG = 10**12
TIGHT = {"daily_calls": 2, "rpm": BIG, "tpm": BIG, "daily_tokens": BIG, "monthly_tokens": BIG}
TIGHT |= {"monthly_calls": BIG, "monthly_credits": BIG, "overage": "block"}


@pytest.fixture
def services(tmp_path: Path, sqlite_template: Path) -> Iterator[Services]:
    shutil.copyfile(sqlite_template, tmp_path / "m.db")
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'm.db'}",
        signing_key_file=str(tmp_path / "key.json"),
        counters="database",
        plans={"tight": TIGHT},
    )
    built = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    yield built
    built.close()


@pytest.fixture
def engine(services: Services) -> QuotaEngine:
    return services.quotas  # counters in the database, as `serve --workers N` on SQLite has them


def subject(org: str = "org_1", daily_calls: int = 3) -> Subject:
    big = {"daily_tokens": BIG, "monthly_tokens": BIG, "monthly_calls": BIG, "rpm": BIG, "tpm": BIG}
    plan = replace(DEFAULT_PLANS["free"], name="test", daily_calls=daily_calls, monthly_credits=-1, **big)
    return Subject(org, plan, billing_anchor_day=1, workspace_id="ws_1", key_id="key_1")


def busy_writer(services: Services) -> tuple[Future[None], threading.Event]:
    """The database's writer kept busy until the returned event is set: what is queued meanwhile waits."""
    started, gate = threading.Event(), threading.Event()

    def occupy(_conn: Connection) -> None:
        started.set()
        gate.wait(5)

    busy = services.db.writer.submit(occupy)
    assert started.wait(5)
    return busy, gate


def calls_held(engine: QuotaEngine, who: Subject) -> int:
    """The organization's calls today as the counters say (what is used plus what is held)."""
    return next(s.consumed for s in engine.status(who) if s.limit.name == "daily_calls")


def test_a_queued_decision_reads_as_a_waited_one(engine: QuotaEngine) -> None:
    who = subject(daily_calls=2)
    engine.reserve(who, ONE_CALL)  # the counters are loaded: the queued decision needs no ledger
    queued = engine.reserve_queued([(who, ONE_CALL, None)])
    admitted = queued.outcomes(queued.verdicts.result(5))
    assert admitted is not None
    assert isinstance(admitted[0], Reservation)
    assert calls_held(engine, who) == 2
    queued = engine.reserve_queued([(who, ONE_CALL, None)])
    refused = queued.outcomes(queued.verdicts.result(5))
    assert refused is not None
    assert isinstance(refused[0], LimitExceeded)
    assert "daily_calls" in str(refused[0].details)
    assert calls_held(engine, who) == 2


def test_a_decision_that_needs_a_counter_loaded_holds_nothing(engine: QuotaEngine) -> None:
    loaded, new = subject("org_loaded"), subject("org_new")
    engine.reserve(loaded, ONE_CALL)
    queued = engine.reserve_queued([(loaded, ONE_CALL, None), (new, ONE_CALL, None)])
    verdicts = queued.verdicts.result(5)
    assert verdicts[0].admitted
    assert verdicts[1].missing
    assert queued.outcomes(verdicts) is None  # decided again where the ledger can be read
    assert calls_held(engine, loaded) == 1  # the admitted one beside it was given back
    assert calls_held(engine, new) == 0


def test_a_decision_given_up_while_queued_is_given_back_once_made(
    engine: QuotaEngine, services: Services
) -> None:
    who = subject()
    engine.reserve(who, ONE_CALL)
    busy, gate = busy_writer(services)
    queued = engine.reserve_queued([(who, ONE_CALL, None)])
    queued.abandon()  # the caller went away before the answer came
    gate.set()
    busy.result(5)
    assert queued.verdicts.result(5)[0].admitted
    assert calls_held(engine, who) == 1  # the abandoned hold is released, not left to its lease


# -- Reservations.hold_soon, on the services a `serve --workers N` on SQLite builds ----------------------


def a_call(services: Services, org_id: str) -> tuple[Subject, UsageRecord, Account]:
    org = services.tenancy.get_organization(org_id)
    who = Subject(org.id, services.plan_of(org), billing_anchor_day=1, workspace_id="ws_1", key_id="key_1")
    estimate = UsageRecord(org.id, "ws_1", NOW, model="gpt-4o-mini", prompt_tokens=10, completion_tokens=5)
    return who, estimate, services.account_of(org)


@pytest.fixture
def org(services: Services) -> str:
    return services.tenancy.create_organization("Queued", "tight").id


def test_hold_soon_decides_on_the_loop_once_the_counters_are_loaded(services: Services, org: str) -> None:
    who, estimate, account = a_call(services, org)
    assert asyncio.run(services.reservations.hold_soon(who, estimate, account)) is None  # to be loaded
    services.reservations.hold(who, estimate, account)  # in a thread: loads them from the ledger
    held = asyncio.run(services.reservations.hold_soon(who, estimate, account))
    assert held is not None
    assert services.reservations.get(org, held.held.id).id == held.held.id  # the durable half too
    with pytest.raises(LimitExceeded, match="daily_calls"):
        asyncio.run(services.reservations.hold_soon(who, estimate, account))
    assert calls_held(services.quotas, who) == 2


def test_hold_soon_cancelled_while_its_decision_is_queued_holds_nothing(services: Services, org: str) -> None:
    who, estimate, account = a_call(services, org)
    services.reservations.abandon(services.reservations.hold(who, estimate, account).held)

    async def cancelled() -> None:
        busy, gate = busy_writer(services)
        task = asyncio.create_task(services.reservations.hold_soon(who, estimate, account))
        await asyncio.sleep(0.05)  # queued behind the busy job
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wrap_future(busy)

    asyncio.run(cancelled())
    services.db.writer.run(lambda _conn: None)  # what the cancel gave back is applied
    assert calls_held(services.quotas, who) == 0


def test_hold_soon_queues_its_decision_and_its_durable_half_together(services: Services, org: str) -> None:
    """One turn of the writer for both (one commit when they share a batch): the durable half's job
    writes the row the decision admitted, and nothing for a refusal."""
    who, estimate, account = a_call(services, org)
    services.reservations.abandon(services.reservations.hold(who, estimate, account).held)  # loaded

    async def held_while_the_writer_is_busy() -> tuple[int, object]:
        busy, gate = busy_writer(services)
        task = asyncio.create_task(services.reservations.hold_soon(who, estimate, account))
        await asyncio.sleep(0.05)  # both queued behind the busy job
        queued = services.db.writer.pending
        gate.set()
        await asyncio.wrap_future(busy)
        try:
            return queued, await task
        except LimitExceeded as refusal:
            return queued, refusal

    services.db.writer.run(lambda _conn: None)  # what the setup queued (the release) is written
    batches = services.db.writer.batches
    queued, first = asyncio.run(held_while_the_writer_is_busy())
    assert queued == 2  # the decision and the reservation's row, side by side
    assert services.db.writer.batches == batches + 2  # the busy job's, then one for both
    assert first is not None
    assert not isinstance(first, LimitExceeded)
    stored = services.reservations.get(org, first.held.id)
    assert (stored.id, stored.meters) == (first.held.id, first.held.meters)
    asyncio.run(held_while_the_writer_is_busy())  # the second call of the day

    def reservation_rows() -> int:
        count = services.db.writer.run(lambda c: c.exec_driver_sql("SELECT count(*) FROM reservations").one())
        return int(count[0])

    rows = reservation_rows()
    _, refused = asyncio.run(held_while_the_writer_is_busy())
    assert isinstance(refused, LimitExceeded)  # daily_calls is 2
    assert reservation_rows() == rows  # nothing written for the refusal
    assert calls_held(services.quotas, who) == 2


def test_an_append_run_again_writes_its_rows_as_they_were_given(services: Services, org: str) -> None:
    """The writer runs a batch again when a job beside an append failed: the append's second run starts
    from the rows as the caller gave them, never from marks (overage, the credit split) that the rolled
    back run left on them."""
    account = services.account_of(services.tenancy.get_organization(org))
    record = UsageRecord(org, "ws_1", NOW, model="gpt-4o-mini", prompt_tokens=10, completion_tokens=5)
    row = services.settler.price(replace(record, idempotency_key="given"), account)
    assert not row.overage
    busy, gate = busy_writer(services)
    written = services.settler.submit([row], account)
    row.overage = True  # as a run rolled back with its batch may leave it
    gate.set()
    busy.result(5)
    assert [r.overage for r in written.result(5).written] == [False]
    stored = services.settler.stored(account, ["given"])["given"]
    assert not stored.overage


def lose_the_next_commit_answer(
    services: Services, monkeypatch: pytest.MonkeyPatch, *, outage: bool = False
) -> list[bool]:
    """The database's next commit is made, and then fails as a connection lost before its answer came
    back would (the list says when it has); ``outage``: with an I/O error's code, which makes it an
    outage of the database (a 503), as a lost PostgreSQL connection is."""
    dialect = services.db.engine.dialect
    commit = dialect.do_commit
    lost: list[bool] = []

    def committed_then_lost(dbapi_connection: object) -> None:
        commit(dbapi_connection)
        if not lost:
            lost.append(True)
            error = sqlite3.OperationalError("the connection was lost before the commit's answer came back")
            if outage:
                error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]
            raise error

    monkeypatch.setattr(dialect, "do_commit", committed_then_lost)
    return lost


def lose_the_next_commit_answer_and_stay_down(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[bool], threading.Event]:
    """``lose_the_next_commit_answer`` in an outage that goes on: every commit after that one fails
    (nothing committed) until the event is set, as a database that is down answers."""
    lost = lose_the_next_commit_answer(services, monkeypatch, outage=True)
    dialect = services.db.engine.dialect
    commit = dialect.do_commit
    back = threading.Event()

    def down_until_back(dbapi_connection: object) -> None:
        if lost and not back.is_set():
            error = sqlite3.OperationalError("disk I/O error: the database is down")
            error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]
            raise error
        commit(dbapi_connection)

    monkeypatch.setattr(dialect, "do_commit", down_until_back)
    return lost, back


def assert_recovery_bills_nothing(services: Services, who: Subject) -> None:
    """Past every lease, recovery has given back every hold and billed no request."""
    services.clock.advance(seconds=16 * 60)  # type: ignore[attr-defined]
    services.reservations.recover()
    services.db.writer.run(lambda _conn: None)
    assert calls_held(services.quotas, who) == 0
    ledger_rows = services.db.writer.run(lambda c: c.exec_driver_sql("SELECT count(*) FROM ledger").one())
    assert ledger_rows[0] == 0


def test_a_reservation_whose_commit_answer_was_lost_leaves_nothing_to_bill(
    services: Services, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database committed the decision and the reservation's row, and the connection failed before
    its answer came back (a server restart, a dropped connection). The request is not sent on, and is
    decided again: the first reservation's row must not stay behind, or recovery bills a request that
    never went out beside the one that did."""
    who, estimate, account = a_call(services, org)
    services.reservations.abandon(services.reservations.hold(who, estimate, account).held)  # loaded
    services.db.writer.run(lambda _conn: None)  # the release above is written
    lost = lose_the_next_commit_answer(services, monkeypatch)
    first = asyncio.run(services.reservations.hold_soon(who, estimate, account))
    assert lost  # the commit that lost its answer was this reservation's
    assert first is None  # decided again where it may read: in a thread
    again = services.reservations.hold(who, estimate, account)
    services.db.writer.run(lambda _conn: None)  # what the failure queued is written
    rows = services.db.writer.run(lambda c: c.exec_driver_sql("SELECT id FROM reservations").all())
    assert [r[0] for r in rows] == [again.held.id]  # only the reservation the request went on with
    # The lost decision's hold is the reaper's (as any hold whose answer was lost): held until its lease
    # ends, then given back; and recovery bills nothing for the request that never went out.
    services.reservations.abandon(again.held)  # the request that went on, ended (its answer failed)
    assert calls_held(services.quotas, who) == 1
    assert_recovery_bills_nothing(services, who)


def test_a_reservation_whose_commit_answer_was_lost_in_an_outage_is_a_503_and_leaves_nothing_to_bill(
    services: Services, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    who, estimate, account = a_call(services, org)
    services.reservations.abandon(services.reservations.hold(who, estimate, account).held)  # loaded
    services.db.writer.run(lambda _conn: None)
    lost = lose_the_next_commit_answer(services, monkeypatch, outage=True)
    with pytest.raises(ServiceUnavailable):
        asyncio.run(services.reservations.hold_soon(who, estimate, account))
    assert lost
    services.db.writer.run(lambda _conn: None)  # what the failure queued is written
    rows = services.db.writer.run(lambda c: c.exec_driver_sql("SELECT count(*) FROM reservations").one())
    assert rows[0] == 0
    assert_recovery_bills_nothing(services, who)


def unsent_in_a_lasting_outage(
    services: Services, org: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Subject, threading.Event]:
    """A reservation whose commit's answer is lost as the database goes down: the request is a 503, never
    sent, and the delete of its row fails too (the outage goes on until the event is set)."""
    who, estimate, account = a_call(services, org)
    services.reservations.abandon(services.reservations.hold(who, estimate, account).held)  # loaded
    services.db.writer.run(lambda _conn: None)
    lost, back = lose_the_next_commit_answer_and_stay_down(services, monkeypatch)
    with pytest.raises(ServiceUnavailable):
        asyncio.run(services.reservations.hold_soon(who, estimate, account))
    assert lost
    with pytest.raises(Exception, match="the database is down"):
        services.db.writer.run(lambda _conn: None)  # still down: the delete the failure queued fails too
    return who, back


def test_a_reservation_whose_commit_answer_was_lost_is_not_billed_when_the_outage_goes_on(
    services: Services, org: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The commit's answer is lost in an outage that lasts: the row cannot be deleted at once either.
    It stays until the database is back, and recovery (the lease long past) still bills nothing for a
    request that never went out."""
    who, back = unsent_in_a_lasting_outage(services, org, monkeypatch)
    with contextlib.closing(sqlite3.connect(tmp_path / "m.db")) as file:  # what is on disk
        assert file.execute("SELECT count(*) FROM reservations").fetchone()[0] == 1  # it committed
    back.set()
    assert_recovery_bills_nothing(services, who)
    rows = services.db.writer.run(lambda c: c.exec_driver_sql("SELECT count(*) FROM reservations").one())
    assert rows[0] == 0


def test_an_unsent_reservation_whose_delete_fails_for_another_reason_is_still_not_billed(
    services: Services, org: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The delete of an unsent reservation's row fails, and not because the database is down (here a
    trigger refuses it): the sweep says so and goes on, and past the lease still does not bill the row;
    once the delete can be made, it is."""
    who, back = unsent_in_a_lasting_outage(services, org, monkeypatch)
    back.set()
    refuse = "CREATE TRIGGER refuse BEFORE DELETE ON reservations BEGIN SELECT RAISE(ABORT, 'refused'); END"
    services.db.writer.run(lambda c: c.exec_driver_sql(refuse))
    services.clock.advance(seconds=16 * 60)  # type: ignore[attr-defined]
    services.reservations.recover()  # does not raise: the rest of the sweep goes on
    assert "could not be deleted" in caplog.text
    count = "SELECT (SELECT count(*) FROM reservations), (SELECT count(*) FROM ledger)"
    assert tuple(services.db.writer.run(lambda c: c.exec_driver_sql(count).one())) == (1, 0)  # not billed
    services.db.writer.run(lambda c: c.exec_driver_sql("DROP TRIGGER refuse"))
    assert_recovery_bills_nothing(services, who)
    assert tuple(services.db.writer.run(lambda c: c.exec_driver_sql(count).one())) == (0, 0)


def test_a_reservation_row_whose_commit_answer_was_lost_goes_with_counters_in_redis(
    tmp_path: Path, sqlite_template: Path, redis_url_clean: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the counters in Redis: the decision is Redis', the row the database's writer's; the
    row's commit loses its answer, the request fails, its hold is given back and its row must go too."""
    shutil.copyfile(sqlite_template, tmp_path / "m.db")
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'm.db'}",
        signing_key_file=str(tmp_path / "key.json"),
        redis_url=redis_url_clean,
        plans={"tight": TIGHT},
    )
    services = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    try:
        org = services.tenancy.create_organization("Redis", "tight").id
        who, estimate, account = a_call(services, org)
        services.reservations.abandon(services.reservations.hold(who, estimate, account).held)  # loaded
        services.db.writer.run(lambda _conn: None)  # what the setup queued is written first
        lost = lose_the_next_commit_answer(services, monkeypatch)
        with pytest.raises(Exception, match="commit's answer"):
            asyncio.run(services.reservations.hold_soon(who, estimate, account))
        assert lost
        services.db.writer.run(lambda _conn: None)  # what the failure queued is written
        rows = services.db.writer.run(lambda c: c.exec_driver_sql("SELECT count(*) FROM reservations").one())
        assert rows[0] == 0  # nothing left for recovery to bill
        services.quotas.store.flush()  # type: ignore[attr-defined]
        assert calls_held(services.quotas, who) == 0
    finally:
        services.close()
