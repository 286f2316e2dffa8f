"""Webhook endpoints and the outbox in SQL. A delivery attempt is claimed by moving the row's
``next_attempt_at_us`` forward with a conditional UPDATE (compare-and-set on the value read), so two
senders — threads or processes — never make the same attempt; a sender that dies mid-attempt leaves
the row due again when its lease ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meterline import ids
from meterline.clock import from_micros, rfc3339
from meterline.errors import NotFound
from meterline.storage.database import Database


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    endpoint_id: str
    url: str
    secret: str
    payload_json: str
    attempts: int
    next_attempt_at_us: int


def endpoint_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "webhook_endpoint",
        "url": row.url,
        "description": row.description,
        "created_at": rfc3339(from_micros(row.created_at_us)),
    }


class SqlWebhookStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._p = "?" if db.is_sqlite else "%s"

    def create_endpoint(
        self, organization_id: str, url: str, description: str | None, secret: str, now_us: int
    ) -> dict[str, Any]:
        p = self._p
        endpoint_id = ids.prefixed("we")
        with self._db.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO webhook_endpoints (id, organization_id, url, description, secret, "
                f"created_at_us, disabled) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})",
                (endpoint_id, organization_id, url, description, secret, now_us, False),
            )
        return {
            "id": endpoint_id,
            "object": "webhook_endpoint",
            "url": url,
            "description": description,
            "created_at": rfc3339(from_micros(now_us)),
        }

    def list_endpoints(self, organization_id: str) -> list[dict[str, Any]]:
        p = self._p
        with self._db.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT id, url, description, created_at_us FROM webhook_endpoints "
                f"WHERE organization_id = {p} AND disabled = {p} ORDER BY created_at_us, id",
                (organization_id, False),
            )
            return [endpoint_json(r) for r in rows]

    def disable_endpoint(self, organization_id: str, endpoint_id: str) -> None:
        """Deleting keeps the row (its outbox rows refer to it) but stops every delivery to it."""
        p = self._p
        with self._db.write() as conn:
            changed = conn.exec_driver_sql(
                f"UPDATE webhook_endpoints SET disabled = {p} WHERE id = {p} AND organization_id = {p} "
                f"AND disabled = {p}",
                (True, endpoint_id, organization_id, False),
            ).rowcount
        if changed != 1:
            raise NotFound(f"no webhook endpoint {endpoint_id!r} in this organization", param="id")

    def due(self, now_us: int, max_attempts: int, limit: int = 50) -> list[Delivery]:
        p = self._p
        with self._db.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT o.id, o.endpoint_id, e.url, e.secret, o.payload_json, o.attempts, "
                "o.next_attempt_at_us "
                "FROM webhook_outbox o JOIN webhook_endpoints e ON e.id = o.endpoint_id "
                f"WHERE o.delivered_at_us IS NULL AND o.next_attempt_at_us <= {p} AND o.attempts < {p} "
                f"AND e.disabled = {p} ORDER BY o.next_attempt_at_us, o.id LIMIT {p}",
                (now_us, max_attempts, False, limit),
            )
            return [Delivery(*r) for r in rows]

    def claim(self, delivery: Delivery, lease_until_us: int) -> bool:
        """Take this attempt: true for exactly one caller among those that read the same row."""
        p = self._p
        with self._db.write() as conn:
            claimed = conn.exec_driver_sql(
                f"UPDATE webhook_outbox SET next_attempt_at_us = {p}, attempts = attempts + 1 "
                f"WHERE id = {p} AND next_attempt_at_us = {p} AND delivered_at_us IS NULL",
                (lease_until_us, delivery.id, delivery.next_attempt_at_us),
            ).rowcount
        return claimed == 1

    def delivered(self, delivery_id: str, now_us: int) -> None:
        p = self._p
        with self._db.write() as conn:
            conn.exec_driver_sql(
                f"UPDATE webhook_outbox SET delivered_at_us = {p}, next_attempt_at_us = NULL, "
                f"last_error = NULL WHERE id = {p}",
                (now_us, delivery_id),
            )

    def failed(self, delivery_id: str, error: str, next_attempt_at_us: int | None) -> None:
        """``next_attempt_at_us`` None: given up (kept, with its last error, for the operator)."""
        p = self._p
        with self._db.write() as conn:
            conn.exec_driver_sql(
                f"UPDATE webhook_outbox SET next_attempt_at_us = {p}, last_error = {p} WHERE id = {p}",
                (next_attempt_at_us, error[:500], delivery_id),
            )

    def outbox(self, alert_id: str) -> list[dict[str, Any]]:
        """Delivery state of one alert's rows (operators and tests)."""
        p = self._p
        with self._db.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT id, endpoint_id, attempts, next_attempt_at_us, delivered_at_us, last_error "
                f"FROM webhook_outbox WHERE alert_id = {p} ORDER BY id",
                (alert_id,),
            )
            return [dict(r._mapping) for r in rows]
