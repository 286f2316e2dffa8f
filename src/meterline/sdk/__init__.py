"""The Meterline Python SDK: a typed client for every public endpoint (results named as the API's JSON
names them), ``UsageTracker``, offline token and cost estimates, and ``instrument()`` for an ``openai``
or ``anthropic`` client.

Importing it never imports the server's web framework or storage: it is a client library (see README.md
in this folder for its invariants).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meterline.lazy import lazy_names
from meterline.sdk.access import Alert, AlertPage, ServedModel, TokenPair, WebhookEndpoint
from meterline.sdk.analytics import Breakdown, BreakdownRow, BreakdownTotals, Timeseries, TimeseriesPoint
from meterline.sdk.async_client import AsyncClient
from meterline.sdk.client import ChainVerification, Client
from meterline.sdk.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    ConflictError,
    InternalServerError,
    InvalidRequestError,
    MeterlineError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    VerificationError,
)
from meterline.sdk.ingest import Event, EventResult, EventsBatch, Reservation, ReservationEstimate, Settlement
from meterline.sdk.instrument import instrument
from meterline.sdk.ledger import (
    EventsPage,
    History,
    HistoryDay,
    LedgerEntry,
    LedgerPage,
    Pagination,
    UsageEvent,
)
from meterline.sdk.receipts import Receipt, ReceiptPage
from meterline.sdk.summary import BonusCredits, Credits, MonthlyCredits, UsageSummary
from meterline.sdk.transport import RetryPolicy

if TYPE_CHECKING:
    from meterline.sdk.estimate import RequestEstimate, estimate_request_cost, estimate_tokens
    from meterline.sdk.tracker import ModelUsage, TrackedCall, UsageReport, UsageTracker

# The offline estimates and the tracker load with the price book on first use (~0.15 s): a program that
# only calls a server does not pay for them.
_MODULES = {
    "RequestEstimate": "estimate",
    "estimate_request_cost": "estimate",
    "estimate_tokens": "estimate",
    "ModelUsage": "tracker",
    "TrackedCall": "tracker",
    "UsageReport": "tracker",
    "UsageTracker": "tracker",
}
if not TYPE_CHECKING:  # hidden from the type checker, which would take any name as a lazy one
    __getattr__, __dir__ = lazy_names(__name__, _MODULES)

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "Alert",
    "AlertPage",
    "AsyncClient",
    "AuthenticationError",
    "BonusCredits",
    "Breakdown",
    "BreakdownRow",
    "BreakdownTotals",
    "ChainVerification",
    "Client",
    "ConflictError",
    "Credits",
    "Event",
    "EventResult",
    "EventsBatch",
    "EventsPage",
    "History",
    "HistoryDay",
    "InternalServerError",
    "InvalidRequestError",
    "LedgerEntry",
    "LedgerPage",
    "MeterlineError",
    "ModelUsage",
    "MonthlyCredits",
    "NotFoundError",
    "Pagination",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "Receipt",
    "ReceiptPage",
    "RequestEstimate",
    "Reservation",
    "ReservationEstimate",
    "RetryPolicy",
    "ServedModel",
    "ServiceUnavailableError",
    "Settlement",
    "Timeseries",
    "TimeseriesPoint",
    "TokenPair",
    "TrackedCall",
    "UpstreamError",
    "UsageEvent",
    "UsageReport",
    "UsageSummary",
    "UsageTracker",
    "VerificationError",
    "WebhookEndpoint",
    "estimate_request_cost",
    "estimate_tokens",
    "instrument",
]
