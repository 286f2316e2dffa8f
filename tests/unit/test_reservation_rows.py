"""Durable reservations written together: every gateway request writes one before it calls the upstream,
and the reservations queued while the writer works share its next commit. What a restart reads back is
each one exactly as it was held, whatever its text holds; on PostgreSQL a batch's reservations are one
statement (``unnest``), not one a row."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, wait
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from meterline.metering import UsageRecord
from meterline.metering.reservations import HeldReservation
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


def in_one_batch(db: Database, store: SqlReservationStore, held: list[HeldReservation]) -> list[Future[None]]:
    """The reservations queued while the writer is held, then committed together: each one's answer."""
    started = threading.Event()

    def hold(_conn: object) -> None:
        started.set()
        deadline = time.monotonic() + 30
        while db.writer.pending < len(held) and time.monotonic() < deadline:
            time.sleep(0.01)

    batches = db.writer.batches
    holder = db.writer.submit(hold)
    assert started.wait(30)
    queued = [store.add_soon(reservation) for reservation in held]
    holder.result(30)
    wait(queued, timeout=30)
    assert db.writer.batches - batches == 2  # the holder, then every reservation in one commit
    return queued


def test_reservations_written_together_read_back_as_held(database_url: str) -> None:
    db = Database(database_url)
    try:
        store = SqlReservationStore(db)
        held = held_reservations()
        for answer in in_one_batch(db, store, held):
            answer.result()
        assert [store.get(reservation.id) for reservation in held] == held
        # One more alone (the one-row statement).
        alone = HeldReservation("rsv_alone", "org_0", held[0].estimate, (), START, START)
        store.add(alone)
        assert store.get("rsv_alone") == alone
    finally:
        db.dispose()


def test_a_batch_of_reservations_is_one_statement_on_postgresql(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM reservations")
        store = SqlReservationStore(db)
        held = held_reservations()
        with traced(db.engine) as lines:
            for answer in in_one_batch(db, store, held):
                answer.result()
        inserts = [line for line in lines if "\tParse\t" in line and "INSERT INTO reservations" in line]
        executed = [line for line in lines if "\tExecute\t" in line]
        assert len(inserts) == 1, inserts
        assert "unnest" in inserts[0]
        # The holder's transaction, then one for the batch: BEGIN, the insert, COMMIT (each executed once).
        assert len(executed) <= 6, executed
        assert [store.get(reservation.id) for reservation in held] == held
    finally:
        db.dispose()


def test_a_reservation_whose_id_is_taken_fails_and_its_neighbours_are_written(pg_url: str) -> None:
    """The database refuses one reservation of a batch (its id exists): only that one fails, and the
    others of the batch are written."""
    db = Database(pg_url)
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM reservations")
        store = SqlReservationStore(db)
        held = held_reservations()[:3]
        store.add(held[0])
        first, *others = in_one_batch(db, store, held)
        with pytest.raises(IntegrityError, match="duplicate key"):
            first.result()
        for answer in others:
            answer.result()
        assert [store.get(reservation.id) for reservation in held] == held
    finally:
        db.dispose()
