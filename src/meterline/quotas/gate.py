"""The quota engine as the gate of ingestion (``meterline.metering.events.Gate``): one reservation per
priced row, named after the row, settled with the row's own amounts once it is written."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from meterline.errors import LimitExceeded
from meterline.metering.records import LedgerRow
from meterline.quotas.engine import QuotaEngine, Reservation, Subject, amounts_of


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

    def settled(self, admitted: Sequence[tuple[Any, LedgerRow]]) -> None:
        self._engine.settle([(ticket, row_amounts(row)) for ticket, row in admitted])

    def cancel(self, tickets: Sequence[Any]) -> None:
        self._engine.release([t for t in tickets if not isinstance(t, LimitExceeded)])
