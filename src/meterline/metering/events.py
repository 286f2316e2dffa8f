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
from typing import Any, Literal, Protocol

import orjson

from meterline.errors import LimitExceeded, MeterlineError, ServiceUnavailable, unpriced_refusal
from meterline.metering.records import LedgerRow, UsageRecord
from meterline.metering.settle import Account, Settler
from meterline.metering.store import AppendResult

Status = Literal["accepted", "conflict", "refused", "rejected"]


class Admission(Protocol):
    """Reservations queued to the database's writer just before the append of their rows, which writes
    what they admitted (in one transaction when both share a batch)."""

    def rows_now(self) -> list[LedgerRow]:
        """Asked in the append's own writer job: the rows to write (none when nothing was decided)."""
        ...

    def failed(self) -> bool:
        """Whether the reservations failed in a way admitting again may answer (then the caller admits
        again and meets their error); not an outage the append met as well."""
        ...

    def tickets(self) -> list[Any] | None:
        """Once the append is answered: a ticket or the refusal per row, as ``Gate.admit``; None when
        nothing was decided (nothing held, nothing written: admit again)."""
        ...

    def abandon(self) -> None:
        """The append failed: what was admitted is given back."""
        ...


class Gate(Protocol):
    """What ingestion needs from the quota engine: admit priced rows (a ticket each, or the refusal),
    then hear which admitted rows were written and which were not. ``admit_soon``: the reservations
    queued to the database's writer ahead of the append, or None where the counters live elsewhere."""

    def admit(self, rows: Sequence[LedgerRow]) -> list[Any]: ...
    def admit_soon(self, rows: Sequence[LedgerRow]) -> Admission | None: ...
    def settled(self, admitted: Sequence[tuple[Any, LedgerRow]]) -> None: ...
    def cancel(self, tickets: Sequence[Any]) -> None: ...


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
    refusal: LimitExceeded | None = None
    error: MeterlineError | None = None  # status "rejected": why (a plan that refuses unpriced models)


def ingest(
    settler: Settler,
    account: Account,
    records: Sequence[UsageRecord],
    gate: Gate | None = None,
    *,
    refuse_unpriced: bool = False,
) -> list[EventOutcome]:
    """Settle the new events of a batch; answer repeats from the ledger. One outcome per record, in order.

    Repeats are looked up before the limits are asked, so re-sending an event always gets its first
    answer, even once the limit it counted towards is full. ``refuse_unpriced``: events of a model with
    no price are rejected (the plan's ``unpriced = "block"``), not recorded at cost 0."""
    first_by_key: dict[str, UsageRecord] = {}
    fresh: list[UsageRecord] = []
    for record in records:
        key = _key(record)
        if key not in first_by_key:
            first_by_key[key] = record
            fresh.append(record)
    stored: dict[str, tuple[LedgerRow, bool]] = {
        key: (row, True) for key, row in settler.stored(account, [_key(r) for r in fresh]).items()
    }
    rows = settler.price_all([r for r in fresh if _key(r) not in stored], account)
    rejected: dict[str, MeterlineError] = {}
    if refuse_unpriced:
        for row in rows:
            if not row.priced and row.model is not None:
                rejected[_row_key(row)] = unpriced_refusal(row.model)
        rows = [row for row in rows if _row_key(row) not in rejected]
    refused: dict[str, LimitExceeded] = {}
    admitted: list[tuple[Any, LedgerRow]] = []
    decided = _append_as_admitted(settler, account, rows, gate) if gate is not None and rows else None
    if decided is not None:
        result: AppendResult | None
        result, tickets = decided
        for row, ticket in zip(rows, tickets, strict=True):
            if isinstance(ticket, LimitExceeded):
                refused[_row_key(row)] = ticket
            else:
                admitted.append((ticket, row))
    else:
        if gate is not None and rows:
            for row, ticket in zip(rows, gate.admit(rows), strict=True):
                if isinstance(ticket, LimitExceeded):
                    refused[_row_key(row)] = ticket
                else:
                    admitted.append((ticket, row))
            rows = [row for _, row in admitted]
        try:
            result = settler.append(rows, account) if rows else None
        except BaseException:
            if gate is not None:
                gate.cancel([ticket for ticket, _ in admitted])
            raise
    if result is not None:
        for row in result.written:
            stored[_row_key(row)] = (row, False)
        for key, row in result.existing.items():
            stored[key] = (row, True)
        if gate is not None:
            written = {row.id for row in result.written}
            gate.settled([(t, r) for t, r in admitted if r.id in written])
            gate.cancel([t for t, r in admitted if r.id not in written])

    outcomes: list[EventOutcome] = []
    for record in records:
        key = _key(record)
        if key in refused:
            outcomes.append(EventOutcome(key, "refused", False, None, refused[key]))
            continue
        if key in rejected:
            outcomes.append(EventOutcome(key, "rejected", False, None, error=rejected[key]))
            continue
        row, was_stored_before = stored[key]
        repeat_in_batch = first_by_key[key] is not record
        if row.request_hash != record.request_hash:
            outcomes.append(EventOutcome(key, "conflict", False, row))
        else:
            outcomes.append(EventOutcome(key, "accepted", was_stored_before or repeat_in_batch, row))
    return outcomes


def _append_as_admitted(
    settler: Settler, account: Account, rows: list[LedgerRow], gate: Gate
) -> tuple[AppendResult, list[Any]] | None:
    """The reservations and the append queued to the database's writer together: the append's job
    writes the rows the reservations admitted (one transaction, one turn of the writer, when both share a
    batch). The result and a ticket per row; None when nothing was written here and the caller is to
    admit, then append (counters elsewhere, a counter to load from the ledger, reservations that
    failed other than by an outage: admitting again meets their error as ever). An outage of the
    database is the append's error too, and is raised as it is (a 503)."""
    admission = gate.admit_soon(rows)
    if admission is None:
        return None
    # What the append's job and the credit split mark on the rows; put back if the rows are written
    # again (a batch that failed whole leaves them marked by a decision it rolled back).
    marks = [(row.overage, row.credits_monthly_nanos, row.credits_bonus_nanos) for row in rows]
    try:
        result = settler.append(rows, account, admitted=admission.rows_now)
    except LookupError:
        # The append ran before its reservations: the database's writer was restarted between them (the
        # services closing). Nothing was written; the reservations are given back once they are made.
        admission.abandon()
        raise ServiceUnavailable("the server is shutting down; send the events again") from None
    except BaseException:
        if not admission.failed():
            admission.abandon()
            raise
        result = None  # the reservations failed, so nothing was written: admitting again meets why
    tickets = admission.tickets() if result is not None else None
    if result is None or tickets is None:
        for row, (overage, monthly, bonus) in zip(rows, marks, strict=True):
            row.overage, row.credits_monthly_nanos, row.credits_bonus_nanos = overage, monthly, bonus
        return None
    return result, tickets


def _key(record: UsageRecord) -> str:
    if record.idempotency_key is None:
        raise ValueError("events need an idempotency key")
    return record.idempotency_key


def _row_key(row: LedgerRow) -> str:
    if row.idempotency_key is None:
        raise ValueError("event rows carry their idempotency key")
    return row.idempotency_key
