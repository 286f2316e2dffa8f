"""Durable reservations written together: every gateway request writes one before it calls the upstream,
and the reservations queued while the writer works share its next commit. What a restart reads back is
each one exactly as it was held, whatever its text holds; on PostgreSQL a batch's reservations are one
statement (``unnest``), not one a row."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from sqlalchemy.exc import IntegrityError

from meterline.metering import UsageRecord
from meterline.metering.reservations import HeldReservation, InFlight
from meterline.storage.database import Database
from meterline.storage.reservation_store import SqlReservationStore
from pg_trace import traced

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
# Text that a PostgreSQL array literal has to quote or escape, and text it could mistake for its own.
AWKWARD = ["plain", 'a "quoted" word', "back\\slash \\\\ twice", "{braces}, commas", "NULL", "", "é ☃ 𝄞"]


def held_reservations() -> list[HeldReservation]:
    return [
        HeldReservation(
            id=f"rsv_{n}",
            organization_id=f"org_{n % 2}",
            estimate=UsageRecord(
                f"org_{n % 2}",
                "ws_1",
                START,
                model="gpt-4o-mini",
                prompt_tokens=100 + n,
                completion_tokens=16,
                user_id=text,
                metadata={"note": text, text: [n, True, None]},
                idempotency_key=f"rsv_{n}",
            ),
            meters=("daily_calls", text),
            created_at=START + timedelta(microseconds=n),
            expires_at=START + timedelta(minutes=10, microseconds=n),
        )
        for n, text in enumerate(AWKWARD)
    ]


def in_one_batch(db: Database, writes: list[Callable[[], Future[None]]]) -> list[Future[None]]:
    """The writes queued while the writer is held, then committed together: each one's answer."""
    started = threading.Event()

    def hold(_conn: object) -> None:
        started.set()
        deadline = time.monotonic() + 30
        while db.writer.pending < len(writes) and time.monotonic() < deadline:
            time.sleep(0.01)

    batches = db.writer.batches
    holder = db.writer.submit(hold)
    assert started.wait(30)
    queued = [write() for write in writes]
    holder.result(30)
    wait(queued, timeout=30)
    assert db.writer.batches - batches == 2  # the holder, then every write in one commit
    return queued


@contextmanager
def reservations_of(url: str) -> Iterator[tuple[Database, SqlReservationStore]]:
    """A reservation store on ``url`` with no reservations yet; the database closed afterwards."""
    db = Database(url)
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM reservations")
        yield db, SqlReservationStore(db)
    finally:
        db.dispose()


def added(store: SqlReservationStore, held: list[HeldReservation]) -> list[Callable[[], Future[None]]]:
    return [partial(store.add_soon, reservation) for reservation in held]


def test_reservations_written_together_read_back_as_held(database_url: str) -> None:
    with reservations_of(database_url) as (db, store):
        held = held_reservations()
        for answer in in_one_batch(db, added(store, held)):
            answer.result()
        assert [store.get(reservation.id) for reservation in held] == held
        # One more alone (the one-row statement).
        alone = HeldReservation("rsv_alone", "org_0", held[0].estimate, (), START, START)
        store.add(alone)
        assert store.get("rsv_alone") == alone


def test_a_batch_of_reservations_is_one_statement_on_postgresql(pg_url: str) -> None:
    with reservations_of(pg_url) as (db, store):
        held = held_reservations()
        with traced(db.engine) as lines:
            for answer in in_one_batch(db, added(store, held)):
                answer.result()
        inserts = [line for line in lines if "\tParse\t" in line and "INSERT INTO reservations" in line]
        executed = [line for line in lines if "\tExecute\t" in line]
        assert len(inserts) == 1, inserts
        assert "unnest" in inserts[0]
        # The holder's transaction, then one for the batch: BEGIN, the insert, COMMIT (each executed once).
        assert len(executed) <= 6, executed
        assert [store.get(reservation.id) for reservation in held] == held


def test_a_reservation_whose_id_is_taken_fails_and_its_neighbours_are_written(pg_url: str) -> None:
    """The database refuses one reservation of a batch (its id exists): only that one fails, and the
    others of the batch are written."""
    with reservations_of(pg_url) as (db, store):
        held = held_reservations()[:3]
        store.add(held[0])
        first, *others = in_one_batch(db, added(store, held))
        with pytest.raises(IntegrityError, match="duplicate key"):
            first.result()
        for answer in others:
            answer.result()
        assert [store.get(reservation.id) for reservation in held] == held


def test_streams_progress_written_together_keeps_each_streams_latest(database_url: str) -> None:
    """Streams publish what they have consumed every 250 ms; the progress queued in one batch is written
    together, a stream's latest winning, and an organization's in-flight consumption is its streams' sum."""
    with reservations_of(database_url) as (db, store):
        held = held_reservations()[:3]  # rsv_0 and rsv_2 of org_0, rsv_1 of org_1
        for reservation in held:
            store.add(reservation)
        published = [("rsv_0", 10, 1), ("rsv_1", 20, 2), ("rsv_0", 30, 3), ("rsv_2", 5, 5), ("gone", 7, 7)]
        writes = [partial(store.progress, rid, credits, cost) for rid, credits, cost in published]
        for answer in in_one_batch(db, writes):
            answer.result()
        assert store.in_flight("org_0") == InFlight(credits_nanos=35, cost_nanos=8)
        assert store.in_flight("org_1") == InFlight(credits_nanos=20, cost_nanos=2)


def test_streams_progress_of_a_batch_is_one_statement_on_postgresql(pg_url: str) -> None:
    with reservations_of(pg_url) as (db, store):
        for reservation in held_reservations()[:3]:
            store.add(reservation)
        writes = [partial(store.progress, f"rsv_{n % 3}", n, n) for n in range(7)]
        with traced(db.engine) as lines:
            for answer in in_one_batch(db, writes):
                answer.result()
        updates = [line for line in lines if "\tParse\t" in line and "UPDATE reservations" in line]
        assert len(updates) == 1, updates
        assert "unnest" in updates[0]
        assert store.in_flight("org_0") == InFlight(credits_nanos=6 + 5, cost_nanos=6 + 5)  # rsv_0, rsv_2
