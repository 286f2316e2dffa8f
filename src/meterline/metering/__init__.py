"""Metering: usage records, the single settle path, the ledger and idempotent event ingestion."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meterline.lazy import lazy_names

if TYPE_CHECKING:
    from meterline.metering.events import EventOutcome, fingerprint, ingest
    from meterline.metering.records import LLM_REQUEST, LedgerRow, UsageRecord
    from meterline.metering.settle import Account, Settler
    from meterline.metering.store import AppendResult, LedgerStore

# Each name loads with its module on first use: what needs only the records (the SDK verifying receipts,
# the CLI asking a server) does not load the settle path and its price book (~0.25 s).
_MODULES = {
    "EventOutcome": "events",
    "fingerprint": "events",
    "ingest": "events",
    "LLM_REQUEST": "records",
    "LedgerRow": "records",
    "UsageRecord": "records",
    "Account": "settle",
    "Settler": "settle",
    "AppendResult": "store",
    "LedgerStore": "store",
}
if not TYPE_CHECKING:  # hidden from the type checker, which would take any name as a lazy one
    __getattr__, __dir__ = lazy_names(__name__, _MODULES)

__all__ = [
    "LLM_REQUEST",
    "Account",
    "AppendResult",
    "EventOutcome",
    "LedgerRow",
    "LedgerStore",
    "Settler",
    "UsageRecord",
    "fingerprint",
    "ingest",
]
