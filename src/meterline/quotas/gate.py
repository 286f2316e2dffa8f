"""The quota engine as the gate of ingestion (``meterline.metering.events.Gate``): one reservation per
priced row, named after the row, settled with the row's own amounts once it is written.

With counters in the database (a store ``in_writer``), the reservations and the append are queued to its
writer together (``admit_soon``): the append's job writes the rows the reservations admitted, in the
same transaction when both share a batch, instead of waiting for one turn of the writer to decide and
another to write."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from meterline.errors import LimitExceeded
from meterline.metering.records import LedgerRow
from meterline.quotas.counters import CounterStoreUnavailable
from meterline.quotas.engine import Queued, QuotaEngine, Reservation, Subject, amounts_of


def row_amounts(row: LedgerRow) -> dict[str, int]:
    return amounts_of(
        tokens=row.total_tokens,
        credits_nanos=row.credits_nanos,
        cost_nanos=row.cost_nanos,
        event=row.event,
        units=row.units,
    )


class QuotaGate:
    def __init__(self, engine: QuotaEngine, subject_of: Callable[[LedgerRow], Subject]) -> None:
        self._engine = engine
        self._subject_of = subject_of
        self.last: list[Reservation] = []

    def admit(self, rows: Sequence[LedgerRow]) -> list[Any]:
        outcomes = self._engine.reserve_many(
            [(self._subject_of(row), row_amounts(row), row.created_at) for row in rows],
            hold_ids=[row.id for row in rows],
        )
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, Reservation):
                row.overage = row.overage or outcome.overage
                self.last.append(outcome)
        return list(outcomes)

    def admit_soon(self, rows: Sequence[LedgerRow]) -> Admission | None:
        """The reservations of ``rows`` queued to the database's writer, for the append queued next to
        read (``Admission``); None when the counters are elsewhere (then ``admit``, then append)."""
        if not self._engine.store.in_writer:
            return None
        queued = self._engine.reserve_queued(
            [(self._subject_of(row), row_amounts(row), row.created_at) for row in rows],
            hold_ids=[row.id for row in rows],
        )
        return Admission(self, rows, queued)

    def settled(self, admitted: Sequence[tuple[Any, LedgerRow]]) -> None:
        self._engine.settle([(ticket, row_amounts(row)) for ticket, row in admitted])

    def cancel(self, tickets: Sequence[Any]) -> None:
        self._engine.release([t for t in tickets if not isinstance(t, LimitExceeded)])


class Admission:
    """Reservations queued to the database's writer ahead of the append of their rows
    (``meterline.metering.events.Admission``)."""

    def __init__(self, gate: QuotaGate, rows: Sequence[LedgerRow], queued: Queued) -> None:
        self._gate = gate
        self._rows = rows
        self._queued = queued

    def rows_now(self) -> list[LedgerRow]:
        """In the append's writer job: the rows admitted, overage marked; none when a counter was missing."""
        decided = self._queued.admitted_now()
        admitted: list[LedgerRow] = []
        for row in self._rows:
            overage = decided.get(row.id)
            if overage is not None:
                row.overage = row.overage or overage
                admitted.append(row)
        return admitted

    def failed(self) -> bool:
        """Whether the reservations themselves failed in a way admitting again may answer (asked once the
        append is answered, which is never before them). Not when the database holding the counters was
        unreachable: the append failed with it, and admitting again would only wait for it once more."""
        verdicts = self._queued.verdicts
        if not verdicts.done():
            return False
        error = verdicts.exception()
        return error is not None and not isinstance(error, CounterStoreUnavailable)

    def tickets(self) -> list[Any] | None:
        """Once the append is answered: a reservation or a refusal per row, as ``admit`` answers; None
        when a counter was missing (nothing is held, nothing was written: admit again)."""
        outcomes = self._queued.outcomes(self._queued.verdicts.result())
        if outcomes is None:
            return None
        for row, outcome in zip(self._rows, outcomes, strict=True):
            if isinstance(outcome, Reservation):
                row.overage = row.overage or outcome.overage
                self._gate.last.append(outcome)
        return list(outcomes)

    def abandon(self) -> None:
        """The append failed: what the reservations admitted is given back once they are answered."""
        self._queued.abandon()
