"""Idempotent ingestion of client-reported usage events (SPEC §4).

An event's client-chosen id is its idempotency key within the organization, and the SHA-256 of its
canonical body is its fingerprint: the same id with the same body is the same event (answered again,
counted once); the same id with another body is a conflict. This holds within one batch, across
batches, and across concurrent requests (the ledger's unique index is the final arbiter).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from meterline.metering.records import LedgerRow, UsageRecord
from meterline.metering.settle import Account, Settler

Status = Literal["accepted", "conflict"]


def fingerprint(body: Mapping[str, Any]) -> str:
    """Stable hash of an event body: key order and insignificant whitespace do not matter."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class EventOutcome:
    event_id: str
    status: Status
    duplicate: bool
    row: LedgerRow | None


def ingest(settler: Settler, account: Account, records: Sequence[UsageRecord]) -> list[EventOutcome]:
    """Settle the new events of a batch; answer repeats from the ledger. One outcome per record, in order."""
    first_by_key: dict[str, UsageRecord] = {}
    fresh: list[UsageRecord] = []
    for record in records:
        key = _key(record)
        if key not in first_by_key:
            first_by_key[key] = record
            fresh.append(record)
    result = settler.settle(fresh, account) if fresh else None
    stored: dict[str, tuple[LedgerRow, bool]] = {}
    if result is not None:
        for row in result.written:
            stored[_row_key(row)] = (row, False)
        for key, row in result.existing.items():
            stored[key] = (row, True)

    outcomes: list[EventOutcome] = []
    for record in records:
        key = _key(record)
        row, was_stored_before = stored[key]
        repeat_in_batch = first_by_key[key] is not record
        if row.request_hash != record.request_hash:
            outcomes.append(EventOutcome(key, "conflict", False, row))
        else:
            outcomes.append(EventOutcome(key, "accepted", was_stored_before or repeat_in_batch, row))
    return outcomes


def _key(record: UsageRecord) -> str:
    if record.idempotency_key is None:
        raise ValueError("events need an idempotency key")
    return record.idempotency_key


def _row_key(row: LedgerRow) -> str:
    if row.idempotency_key is None:
        raise ValueError("event rows carry their idempotency key")
    return row.idempotency_key
