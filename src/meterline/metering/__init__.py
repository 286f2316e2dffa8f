"""Metering: usage records, the single settle path, the ledger and idempotent event ingestion."""

from meterline.metering.events import EventOutcome, fingerprint, ingest
from meterline.metering.records import LLM_REQUEST, LedgerRow, UsageRecord
from meterline.metering.settle import Account, Settler
from meterline.metering.store import AppendResult, LedgerStore

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
