"""SQL implementation of ``meterline.metering.reservations.ReservationStore``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, func, select

from meterline.clock import from_micros, to_micros
from meterline.metering.quarantine import describe_error
from meterline.metering.records import LedgerRow
from meterline.metering.reservations import (
    HeldReservation,
    InFlight,
    Unreadable,
    decode_record,
    encode_record,
)
from meterline.storage.database import Database
from meterline.storage.driver_sql import run_in, run_rows
from meterline.storage.ledger_store import row_from_db
from meterline.storage.tables import ledger, reservations
from meterline.storage.writer import Together, wait


def _held(row: Any) -> HeldReservation:
    return HeldReservation(
        id=row.id,
        organization_id=row.organization_id,
        estimate=decode_record(row.estimate_json),
        meters=tuple(orjson.loads(row.meters_json)),
        created_at=from_micros(row.created_at_us),
        expires_at=from_micros(row.expires_at_us),
    )


def _held_or_unreadable(row: Any) -> HeldReservation | Unreadable:
    try:
        return _held(row)
    except Exception as exc:  # whatever a stored row holds, it must not stop the rows behind it
        try:
            meters = tuple(str(m) for m in orjson.loads(row.meters_json))
        except Exception:
            meters = ()
        return Unreadable(row.id, row.organization_id, row.estimate_json, meters, describe_error(exc))


_ADD = "reservations.add"
_ADD_ADMITTED = "reservations.add-admitted"
_PROGRESS = "reservations.progress"
_Admitted = tuple[HeldReservation, Callable[[], "bool | None"], tuple[Any, ...]]
_COLUMNS = "id, organization_id, estimate_json, meters_json, created_at_us, expires_at_us"
# PostgreSQL: a batch's reservations in one statement, ``unnest`` over one array per column (as text:
# ``pg_array``), where ``executemany`` ran it once a row. PostgreSQL's time per row is about the same; the
# writer's CPU for a batch of 8 fell by a quarter (docs/benchmarks.md, "Reservations of a batch in one
# statement"; an earlier try passed Python lists, whose adapter cost what the statement saved).
_PG_INSERT_MANY = (
    f"INSERT INTO reservations ({_COLUMNS}) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[])"
)
_PG_PROGRESS_MANY = (
    "UPDATE reservations AS r SET progress_credits_nanos = u.credits, progress_cost_nanos = u.cost "
    "FROM unnest(%s::bigint[], %s::bigint[], %s::text[]) AS u(credits, cost, id) WHERE r.id = u.id"
)


def _values(held: HeldReservation) -> tuple[Any, ...]:
    return (
        held.id,
        held.organization_id,
        encode_record(held.estimate),
        orjson.dumps(list(held.meters)).decode(),
        to_micros(held.created_at),
        to_micros(held.expires_at),
    )


class SqlReservationStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        marker = "?" if db.is_sqlite else "%s"
        self._insert = f"INSERT INTO reservations ({_COLUMNS}) VALUES ({', '.join([marker] * 6)})"
        self._progress_sql = (
            f"UPDATE reservations SET progress_credits_nanos = {marker}, progress_cost_nanos = {marker} "
            f"WHERE id = {marker}"
        )

    def add(self, held: HeldReservation) -> None:
        wait(self.add_soon(held))

    def add_soon(self, held: HeldReservation) -> Future[None]:
        # Plain SQL: every gateway request writes one, and compiling the statement cost more than the insert.
        # Through the writer: the reservations queued in a batch are inserted together (``run_rows``).
        together = Together(_ADD, _values(held), self._add_together)
        return self._db.writer.submit_together(together, order=held.organization_id)

    def _add_together(self, conn: Connection, values: list[tuple[Any, ...]]) -> list[None]:
        run_rows(conn, self._insert, _PG_INSERT_MANY, values)
        return [None] * len(values)

    def add_when_admitted(self, held: HeldReservation, admitted: Callable[[], bool | None]) -> Future[bool]:
        # Encoded now, as admitted without overage (nearly every one): encoded again in the job otherwise.
        plain = held
        if held.estimate.overage:
            plain = replace(held, estimate=replace(held.estimate, overage=False))
        payload = (held, admitted, _values(plain))
        together = Together(_ADD_ADMITTED, payload, self._add_admitted_together)
        return self._db.writer.submit_together(together, order=held.organization_id)

    def _add_admitted_together(self, conn: Connection, payloads: list[_Admitted]) -> list[bool]:
        rows: list[tuple[Any, ...]] = []
        written: list[bool] = []
        for held, admitted, values in payloads:
            overage = admitted()
            if overage is None:
                written.append(False)
                continue
            if overage:
                values = _values(replace(held, estimate=replace(held.estimate, overage=True)))
            rows.append(values)
            written.append(True)
        run_rows(conn, self._insert, _PG_INSERT_MANY, rows)
        return written

    def progress(self, reservation_id: str, credits_nanos: int, cost_nanos: int) -> Future[None]:
        # Through the writer, not waited for by streams: the progress of every stream queued in a batch
        # is written together (on PostgreSQL one statement).
        together = Together(_PROGRESS, (credits_nanos, cost_nanos, reservation_id), self._progress_together)
        return self._db.writer.submit_together(together)

    def _progress_together(self, conn: Connection, values: list[tuple[Any, ...]]) -> list[None]:
        # A stream's latest progress in the batch is what it has consumed, as executemany in queue order
        # left it; one row a stream (an UPDATE ... FROM meeting a row twice would keep either).
        latest: dict[str, tuple[Any, ...]] = {}
        for row in values:
            latest[row[2]] = row
        run_rows(conn, self._progress_sql, _PG_PROGRESS_MANY, list(latest.values()))
        return [None] * len(values)

    def in_flight(self, organization_id: str) -> InFlight:
        query = select(
            func.coalesce(func.sum(reservations.c.progress_credits_nanos), 0),
            func.coalesce(func.sum(reservations.c.progress_cost_nanos), 0),
        ).where(reservations.c.organization_id == organization_id)
        with self._db.read() as conn:
            credits_nanos, cost_nanos = conn.execute(query).one()
        return InFlight(int(credits_nanos), int(cost_nanos))

    def get(self, reservation_id: str) -> HeldReservation | None:
        with self._db.read() as conn:
            row = conn.execute(select(reservations).where(reservations.c.id == reservation_id)).first()
        return None if row is None else _held(row)

    def remove(self, reservation_id: str) -> bool:
        return wait(self.remove_soon(reservation_id))

    def remove_all(self, reservation_ids: Sequence[str]) -> int:
        """Delete these reservations (those that exist), in one transaction; how many there were."""
        ids = list(reservation_ids)
        return wait(
            self._db.writer.submit(lambda conn: run_in(conn, "DELETE FROM reservations WHERE id", ids))
        )

    def remove_soon(self, reservation_id: str) -> Future[bool]:
        marker = "?" if self._db.is_sqlite else "%s"
        sql = f"DELETE FROM reservations WHERE id = {marker}"
        return self._db.writer.submit(
            lambda conn: bool(conn.exec_driver_sql(sql, (reservation_id,)).rowcount)
        )

    def due(self, before: datetime, limit: int) -> list[HeldReservation | Unreadable]:
        query = (
            select(reservations)
            .where(reservations.c.expires_at_us < min(to_micros(before), 2**62))
            .order_by(reservations.c.expires_at_us)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [_held_or_unreadable(row) for row in conn.execute(query)]

    def ledger_row(self, organization_id: str | None, row_id: str) -> LedgerRow | None:
        query = select(ledger).where(ledger.c.id == row_id)
        if organization_id is not None:
            query = query.where(ledger.c.organization_id == organization_id)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else row_from_db(row)

    def count(self) -> int:
        with self._db.read() as conn:
            return len(conn.execute(select(reservations.c.id)).all())
