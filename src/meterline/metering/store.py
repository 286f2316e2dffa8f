"""What metering needs from storage. ``meterline.storage.ledger_store`` implements it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from meterline.credits import CreditTerms
from meterline.metering.records import LedgerRow


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Rows written, and for each idempotency key that was already present, the row kept earlier."""

    written: Sequence[LedgerRow]
    existing: Mapping[str, LedgerRow]


class LedgerStore(Protocol):
    def append(
        self,
        rows: Sequence[LedgerRow],
        credits: CreditTerms | None = None,
        *,
        settles: Sequence[str] = (),
        admitted: Callable[[], Sequence[LedgerRow]] | None = None,
    ) -> AppendResult:
        """Write rows, their rollups and (with ``credits``) their credit split in one transaction, and
        end the durable reservations ``settles``. A row whose (organization, idempotency key) is already
        in the ledger is not written; the stored row is returned in ``existing`` instead.

        ``admitted``: asked in the write's own job, answers which of ``rows`` to write (those that quota
        reservations queued just before to the same writer admitted: ``quotas.gate.Admission``)."""
        ...

    def submit(
        self, rows: Sequence[LedgerRow], credits: CreditTerms | None = None, *, settles: Sequence[str] = ()
    ) -> Future[AppendResult]:
        """``append``, queued to the database's writer: answered once committed (an event loop awaits
        it instead of blocking a thread)."""
        ...

    def lookup(self, organization_id: str, keys: Sequence[str]) -> Mapping[str, LedgerRow]:
        """Stored rows by idempotency key."""
        ...
