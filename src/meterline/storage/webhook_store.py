"""Webhook endpoints and the outbox in SQL. A delivery attempt is claimed by moving the row's
``next_attempt_at_us`` forward with a conditional UPDATE (compare-and-set on the value read), so two
senders — threads or processes — never make the same attempt; a sender that dies mid-attempt leaves
the row due again when its lease ends.

Signing secrets are sealed at rest (``meterline.encryption``, a data key from the key file), bound to
their endpoint's id: ``webhook_endpoints.secret`` holds ``enc:v1:<kid>:…``, never the ``whsec_`` secret.
Rows from before sealing existed still hold ``whsec_`` secrets; ``seal_stored_secrets`` (run when
``meterline serve`` starts and by ``meterline keys rotate``, never by other commands) seals them and
re-seals rows of older data keys with the active one. Until then they are read as they are."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from meterline import ids
from meterline.alerts.delivery import SECRET_PREFIX, secret_bytes, secret_from_bytes
from meterline.clock import from_micros, rfc3339
from meterline.encryption import PREFIX, SecretBox
from meterline.errors import NotFound
from meterline.storage.database import Database
from meterline.storage.outage import is_outage

log = logging.getLogger("meterline.webhooks")


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    endpoint_id: str
    url: str
    stored_secret: str  # as in the row: sealed (``SqlWebhookStore.secret_of`` opens it)
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


@dataclass(frozen=True, slots=True)
class SealResult:
    """What a ``seal_stored_secrets`` pass did: rows sealed with the active data key, rows left as they
    were (unreadable, failed, or not sealed on purpose; each logged)."""

    sealed: int = 0
    skipped: int = 0


def _describe(exc: BaseException, *hidden: str) -> str:
    """The error in one line, its type and first line, without any of ``hidden`` (SQL parameters are
    not in it either: the engines hide them)."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    line = f"{type(orig).__name__}: {lines[0]}" if lines else type(orig).__name__
    texts = {text for value in hidden for text in (value, value.removeprefix(SECRET_PREFIX)) if text}
    for text in sorted(texts, key=len, reverse=True):  # a whole value before its body
        line = line.replace(text, "[secret]")
    return line[:300]


def _context(endpoint_id: str) -> str:
    # Sealed for this row only: a value copied to another endpoint does not open there.
    return f"webhook_endpoints.secret:{endpoint_id}"


class SqlWebhookStore:
    def __init__(self, db: Database, box: SecretBox) -> None:
        self._db = db
        self._box = box
        self._p = "?" if db.is_sqlite else "%s"

    def create_endpoint(
        self, organization_id: str, url: str, description: str | None, secret: str, now_us: int
    ) -> dict[str, Any]:
        p = self._p
        endpoint_id = ids.prefixed("we")
        sealed = self._box.seal(secret_bytes(secret), context=_context(endpoint_id))
        with self._db.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO webhook_endpoints (id, organization_id, url, description, secret, "
                f"created_at_us, disabled) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})",
                (endpoint_id, organization_id, url, description, sealed, now_us, False),
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

    def secret_of(self, delivery: Delivery) -> str:
        """The ``whsec_`` secret to sign ``delivery`` with; SealError if it cannot be opened (its data
        key is not in the key file, or the row was altered)."""
        return self._open(delivery.endpoint_id, delivery.stored_secret)

    def _open(self, endpoint_id: str, stored: str) -> str:
        if stored.startswith(SECRET_PREFIX):
            return stored  # a row from before sealing, not sealed yet
        return secret_from_bytes(self._box.unseal(stored, context=_context(endpoint_id)))

    def seal_stored_secrets(self, *, new_key_file: str | None = None) -> SealResult:
        """Seal every secret not sealed with the active data key (``whsec_`` rows from before sealing,
        rows of older data keys). Idempotent, and safe with several processes at once: each row is
        replaced only if it still holds what was read. A row that cannot be opened or written is logged
        (one line, never the secret) and left as it is; only a database outage stops the pass (raised).

        ``new_key_file``: the key file was created by this process (its path). Nothing is sealed with a
        key the deployment may not share (a command run from another directory, a missing mount); a
        warning says what is left, and rows sealed with data keys the file lacks point at a wrong file.
        """
        p = self._p
        current = f"{PREFIX}{self._box.sealing_kid}:%"
        with self._db.read() as conn:
            rows = conn.exec_driver_sql(
                f"SELECT id, secret FROM webhook_endpoints WHERE secret NOT LIKE {p} ORDER BY id",
                (current,),
            ).all()
        if new_key_file is not None:
            self._warn_new_key_file(new_key_file, [stored for _, stored in rows])
            return SealResult(skipped=len(rows))
        sealed = skipped = 0
        for endpoint_id, stored in rows:
            secret = ""
            try:
                secret = self._open(endpoint_id, stored)
                replacement = self._box.seal(secret_bytes(secret), context=_context(endpoint_id))
                with self._db.write() as conn:
                    sealed += self._replace_secret(conn, endpoint_id, stored, replacement)
            except Exception as exc:
                if is_outage(exc):
                    raise
                log.error(
                    "webhook endpoint %s: signing secret not sealed with data key %s, left as it is: %s",
                    endpoint_id,
                    self._box.sealing_kid,
                    _describe(exc, stored, secret),
                )
                skipped += 1
        if sealed:
            log.info("sealed %d webhook signing secrets with data key %s", sealed, self._box.sealing_kid)
        return SealResult(sealed, skipped)

    def _warn_new_key_file(self, path: str, stored: list[str]) -> None:
        in_clear = sum(1 for value in stored if not value.startswith(PREFIX))
        kids = sorted(
            {value.removeprefix(PREFIX).partition(":")[0] for value in stored if value.startswith(PREFIX)}
        )
        if kids:
            log.warning(
                "the key file %s was just created by this process, but %d webhook signing secrets are "
                "sealed with data keys it does not hold (%s): this is not the deployment's key file "
                "(signing_key_file is relative to the working directory unless absolute). Nothing was "
                "sealed with it; those webhooks cannot be sent until the right key file is in place.",
                path,
                len(stored) - in_clear,
                ", ".join(kids),
            )
        if in_clear:
            log.warning(
                "%d webhook signing secrets are still stored in the clear: not sealed with the key file "
                "%s, which this process has just created; they are sealed at the next start of "
                "`meterline serve` (or by `meterline keys rotate`) with that file in place.",
                in_clear,
                path,
            )

    def _replace_secret(self, conn: Connection, endpoint_id: str, stored: str, sealed: str) -> int:
        p = self._p
        update = f"UPDATE webhook_endpoints SET secret = {p} WHERE id = {p} AND secret = {p}"
        if not self._db.is_sqlite:
            # The old row version stays in the table file until VACUUM; a dump never shows it.
            return conn.exec_driver_sql(update, (sealed, endpoint_id, stored)).rowcount
        # A SQLite build without SECURE_DELETE only unlinks the old value from its page: its bytes would
        # stay in the file (some builds, Debian's among them, zero them already).
        previous = int(conn.exec_driver_sql("PRAGMA secure_delete").scalar_one())
        conn.exec_driver_sql("PRAGMA secure_delete = 1")
        try:
            return conn.exec_driver_sql(update, (sealed, endpoint_id, stored)).rowcount
        finally:
            conn.exec_driver_sql(f"PRAGMA secure_delete = {previous}")

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

    def postponed(self, delivery: Delivery, error: str, next_attempt_at_us: int) -> None:
        """Give back the attempt just claimed (its count as before the claim) and try again at
        ``next_attempt_at_us``: for a failure of ours that the receiver has no part in."""
        p = self._p
        with self._db.write() as conn:
            conn.exec_driver_sql(
                f"UPDATE webhook_outbox SET attempts = {p}, next_attempt_at_us = {p}, last_error = {p} "
                f"WHERE id = {p} AND delivered_at_us IS NULL",
                (delivery.attempts, next_attempt_at_us, error[:500], delivery.id),
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
