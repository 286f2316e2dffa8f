"""SQL implementation of ``meterline.metering.quarantine.QuarantineStore``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import func, select

from meterline.alerts.rules import quarantined_usage
from meterline.clock import from_micros, to_micros
from meterline.metering.quarantine import QuarantineEntry, Resolution
from meterline.storage.alert_store import fire
from meterline.storage.database import Database
from meterline.storage.tables import quarantine, reservations


def _entry(row: Any) -> QuarantineEntry:
    return QuarantineEntry(
        id=row.id,
        organization_id=row.organization_id,
        reservation_id=row.reservation_id,
        record_json=row.record_json,
        meters=tuple(orjson.loads(row.meters_json)),
        error=row.error,
        created_at=from_micros(row.created_at_us),
        resolution=row.resolution,
        resolved_at=None if row.resolved_at_us is None else from_micros(row.resolved_at_us),
        ledger_id=row.ledger_id,
        note=row.note,
    )


class SqlQuarantineStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def quarantine(self, entry: QuarantineEntry) -> bool:
        with self._db.write() as conn:
            gone = conn.execute(reservations.delete().where(reservations.c.id == entry.reservation_id))
            if not gone.rowcount:
                return False
            conn.execute(
                quarantine.insert().values(
                    id=entry.id,
                    organization_id=entry.organization_id,
                    reservation_id=entry.reservation_id,
                    record_json=entry.record_json,
                    meters_json=orjson.dumps(list(entry.meters)).decode(),
                    error=entry.error,
                    created_at_us=to_micros(entry.created_at),
                )
            )
            fire(
                conn,
                entry.organization_id,
                quarantined_usage(entry.reservation_id, entry.created_at),
                entry.created_at,
            )
        return True

    def get(self, entry_id: str) -> QuarantineEntry | None:
        with self._db.read() as conn:
            row = conn.execute(select(quarantine).where(quarantine.c.id == entry_id)).first()
        return None if row is None else _entry(row)

    def for_reservation(self, reservation_id: str) -> QuarantineEntry | None:
        query = select(quarantine).where(quarantine.c.reservation_id == reservation_id)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else _entry(row)

    def list(self, *, unresolved_only: bool, limit: int, offset: int) -> tuple[list[QuarantineEntry], int]:
        where = quarantine.c.resolution.is_(None) if unresolved_only else quarantine.c.id.is_not(None)
        query = (
            select(quarantine)
            .where(where)
            .order_by(quarantine.c.created_at_us, quarantine.c.id)
            .limit(limit)
            .offset(offset)
        )
        with self._db.read() as conn:
            rows = [_entry(row) for row in conn.execute(query)]
            total = conn.execute(select(func.count()).select_from(quarantine).where(where)).scalar_one()
        return rows, int(total)

    def unresolved(self) -> int:
        query = select(func.count()).select_from(quarantine).where(quarantine.c.resolution.is_(None))
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def resolve(
        self, entry_id: str, resolution: Resolution, at: datetime, *, ledger_id: str | None, note: str | None
    ) -> bool:
        with self._db.write() as conn:
            result = conn.execute(
                quarantine.update()
                .where(quarantine.c.id == entry_id, quarantine.c.resolution.is_(None))
                .values(resolution=resolution, resolved_at_us=to_micros(at), ledger_id=ledger_id, note=note)
            )
            return bool(result.rowcount)

    def reopen(self, entry_id: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                quarantine.update()
                .where(quarantine.c.id == entry_id, quarantine.c.resolution == "settled")
                .values(resolution=None, resolved_at_us=None, ledger_id=None, note=None)
            )
