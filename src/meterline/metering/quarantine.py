"""Quarantine: work that cannot be settled never blocks the rest, and is never lost.

Rule (docs/architecture.md): when settling a reservation fails for a reason that retrying cannot fix (the
failure is not an outage of the database or the counter store), the reservation is moved, in one
transaction, to the quarantine with its usage and the error, its counter hold is given back, an alert
fires, and recovery goes on with the next one. A quarantined entry is in no total until an operator
resolves it: **settle** (through the one settle path, its text cleaned, exactly once: the ledger row
carries the reservation's id) or **void** (nothing billed; the entry stays, with who decided and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from meterline import text
from meterline.metering.records import UsageRecord

Resolution = Literal["settled", "voided"]
# Errors are kept short: enough for an operator to see what went wrong, never a whole traceback.
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    id: str
    organization_id: str
    reservation_id: str
    record_json: str  # the usage as held (decoded on settle: it may be what failed to decode)
    meters: tuple[str, ...]
    error: str
    created_at: datetime
    resolution: Resolution | None = None
    resolved_at: datetime | None = None
    ledger_id: str | None = None
    note: str | None = None


class QuarantineStore(Protocol):
    def quarantine(self, entry: QuarantineEntry) -> bool:
        """Insert ``entry`` and delete its durable reservation, in one transaction. False when the
        reservation is gone already (settled or quarantined by another process)."""
        ...

    def get(self, entry_id: str) -> QuarantineEntry | None: ...

    def for_reservation(self, reservation_id: str) -> QuarantineEntry | None: ...

    def list(
        self, *, unresolved_only: bool, limit: int, offset: int
    ) -> tuple[list[QuarantineEntry], int]: ...

    def unresolved(self) -> int: ...

    def resolve(
        self, entry_id: str, resolution: Resolution, at: datetime, *, ledger_id: str | None, note: str | None
    ) -> bool:
        """Mark resolved if it was not (compare-and-set: two operators cannot both resolve one)."""
        ...

    def reopen(self, entry_id: str) -> None:
        """Undo a ``settled`` claim whose row could not be written."""
        ...


def describe_error(exc: BaseException) -> str:
    """The error as one short line: its type and first line, no SQL parameters or trace."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    line = f"{type(orig).__name__}: {first}" if first else type(orig).__name__
    return text.clean(line)[:MAX_ERROR_CHARS]  # it may quote the very text that failed


__all__ = ["QuarantineEntry", "QuarantineStore", "Resolution", "UsageRecord", "describe_error"]
