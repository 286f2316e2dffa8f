"""The read side of the ledger: scopes, totals and pages. ``storage.usage_reader`` implements it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from meterline.metering.records import LedgerRow


@dataclass(frozen=True, slots=True)
class Scope:
    """What a caller may see: an organization, optionally narrowed to a workspace and an identifier."""

    organization_id: str
    workspace_id: str | None = None
    identifier_id: str | None = None


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    units: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_nanos: int = 0
    credits_nanos: int = 0


@dataclass(frozen=True, slots=True)
class DailyTotals:
    day: date
    totals: Totals


@dataclass(frozen=True, slots=True)
class LedgerFilter:
    start: datetime | None = None
    end: datetime | None = None
    model: str | None = None
    key_prefix: str | None = None
    modality: str | None = None
    provider: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    rows: Sequence[LedgerRow]
    total: int


class UsageReader(Protocol):
    def totals(self, scope: Scope, start: datetime, end: datetime) -> Totals:
        """Sum over [start, end), both on whole hours (rollups are hourly)."""
        ...

    def daily(self, scope: Scope, first_day: date, days: int) -> Sequence[DailyTotals]:
        """One entry per UTC day from ``first_day``, zeros included."""
        ...

    def ledger_page(self, scope: Scope, where: LedgerFilter, *, limit: int, offset: int) -> Page: ...
