"""The usage read side as typed values: daily history (seed 000), billable events (seed 003) and the
per-request ledger (seed 004). Fields are named as the API's JSON names them; old names warn."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from meterline.sdk._json import Json, dec, obj, opt_dec, opt_str, time
from meterline.sdk._renamed import renamed


@dataclass(frozen=True, slots=True)
class HistoryDay:
    """One UTC day of usage (days without usage are included, with zeros)."""

    date: date
    calls: int
    tokens: int
    prompt_tokens: int
    completion_tokens: int
    units: int
    cost: Decimal
    credits: Decimal

    @classmethod
    def from_json(cls, data: Json) -> HistoryDay:
        return cls(
            date=date.fromisoformat(str(data["date"])),
            calls=int(data["calls"]),
            tokens=int(data["tokens"]),
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            units=int(data["units"]),
            cost=dec(data["cost"]),
            credits=dec(data["credits"]),
        )


@dataclass(frozen=True, slots=True)
class History:
    """The days, oldest first. The API's ``days`` (how many were asked for) is ``len(data)``: ``days``
    is still the old name of ``data`` here, deprecated."""

    data: list[HistoryDay]
    identifier_id: str | None
    request_id: str | None

    days = renamed("days", "data")

    @classmethod
    def from_json(cls, data: Json) -> History:
        return cls(
            data=[HistoryDay.from_json(d) for d in data["data"]],
            identifier_id=opt_str(data.get("identifier_id")),
            request_id=opt_str(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """Seed 003's billable event."""

    id: str
    event: str
    units: int
    run_id: str | None
    metadata: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def from_json(cls, data: Json) -> UsageEvent:
        return cls(
            id=str(data["id"]),
            event=str(data["event"]),
            units=int(data["units"]),
            run_id=opt_str(data.get("run_id")),
            metadata=data.get("metadata"),
            created_at=time(data["created_at"]),
        )


@dataclass(frozen=True, slots=True)
class Pagination:
    page: int
    per_page: int
    total: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class EventsPage:
    data: list[UsageEvent]
    pagination: Pagination
    request_id: str | None = None

    page = renamed("page", "pagination.page")
    per_page = renamed("per_page", "pagination.per_page")
    total = renamed("total", "pagination.total")
    has_more = renamed("has_more", "pagination.has_more")

    @classmethod
    def from_json(cls, data: Json) -> EventsPage:
        paging = data["pagination"]
        return cls(
            data=[UsageEvent.from_json(e) for e in data["data"]],
            pagination=Pagination(
                page=int(paging["page"]),
                per_page=int(paging["per_page"]),
                total=int(paging["total"]),
                has_more=bool(paging["has_more"]),
            ),
            request_id=opt_str(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row (seed 004's fields, then Meterline's). ``raw`` holds every field as sent."""

    id: str
    created_at: datetime
    model: str | None
    modality: str | None
    provider: str | None
    region: str | None
    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    total_tokens: int
    cost: Decimal
    list_cost: Decimal
    cost_eur: Decimal | None
    currency: str
    credits: Decimal
    discount_applied_pct: int
    priced: bool
    overage: bool
    failover: bool
    receipt_id: str | None
    key_prefix: str | None
    key_name: str | None
    organization_id: str
    workspace_id: str
    identifier_id: str | None
    user_id: str | None
    source: str | None
    endpoint: str | None
    event: str
    units: int
    event_id: str | None
    raw: Json
    # The rest of the row as the API sends it: billing details, the credit buckets drawn from, and the
    # usage vector (docs/usage-vector.md), 0 / None when the row has none.
    billing_unit: str | None = None
    audio_seconds: Decimal | None = None
    credits_monthly: Decimal = Decimal(0)
    credits_bonus: Decimal = Decimal(0)
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    cache_audio_read_tokens: int = 0
    output_audio_tokens: int = 0
    reasoning_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    web_searches: int = 0
    web_fetches: int = 0
    service_tier: str | None = None
    batch: bool = False
    run_id: str | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Json) -> LedgerEntry:
        return cls(
            id=str(data["id"]),
            created_at=time(data["created_at"]),
            model=opt_str(data.get("model")),
            modality=opt_str(data.get("modality")),
            provider=opt_str(data.get("provider")),
            region=opt_str(data.get("region")),
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            cache_read_tokens=int(data.get("cache_read_tokens", 0)),
            cache_write_tokens=int(data.get("cache_write_tokens", 0)),
            total_tokens=int(data["total_tokens"]),
            cost=dec(data["cost"]),
            list_cost=dec(data.get("list_cost", data["cost"])),
            cost_eur=opt_dec(data.get("cost_eur")),
            currency=str(data["currency"]),
            credits=dec(data["credits"]),
            discount_applied_pct=int(data.get("discount_applied_pct") or 0),
            priced=bool(data.get("priced", True)),
            overage=bool(data.get("overage", False)),
            failover=bool(data.get("failover", False)),
            receipt_id=opt_str(data.get("receipt_id")),
            key_prefix=opt_str(data.get("key_prefix")),
            key_name=opt_str(data.get("key_name")),
            organization_id=str(data["organization_id"]),
            workspace_id=str(data["workspace_id"]),
            identifier_id=opt_str(data.get("identifier_id")),
            user_id=opt_str(data.get("user_id")),
            source=opt_str(data.get("source")),
            endpoint=opt_str(data.get("endpoint")),
            event=str(data.get("event", "llm.request")),
            units=int(data.get("units", 0)),
            event_id=opt_str(data.get("event_id")),
            raw=data,
            billing_unit=opt_str(data.get("billing_unit")),
            audio_seconds=opt_dec(data.get("audio_seconds")),
            credits_monthly=dec(data.get("credits_monthly", 0)),
            credits_bonus=dec(data.get("credits_bonus", 0)),
            cache_write_1h_tokens=int(data.get("cache_write_1h_tokens") or 0),
            input_audio_tokens=int(data.get("input_audio_tokens") or 0),
            cache_audio_read_tokens=int(data.get("cache_audio_read_tokens") or 0),
            output_audio_tokens=int(data.get("output_audio_tokens") or 0),
            reasoning_tokens=int(data.get("reasoning_tokens") or 0),
            accepted_prediction_tokens=int(data.get("accepted_prediction_tokens") or 0),
            rejected_prediction_tokens=int(data.get("rejected_prediction_tokens") or 0),
            web_searches=int(data.get("web_searches") or 0),
            web_fetches=int(data.get("web_fetches") or 0),
            service_tier=opt_str(data.get("service_tier")),
            batch=bool(data.get("batch")),
            run_id=opt_str(data.get("run_id")),
            metadata=obj(data["metadata"]) if data.get("metadata") is not None else None,
        )


@dataclass(frozen=True, slots=True)
class LedgerPage:
    """Rows newest first; ``total_count`` is the number of rows the filters match."""

    data: list[LedgerEntry]
    total_count: int
    limit: int
    offset: int
    request_id: str | None = None

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.data) < self.total_count

    @classmethod
    def from_json(cls, data: Json) -> LedgerPage:
        return cls(
            data=[LedgerEntry.from_json(r) for r in data["data"]],
            total_count=int(data["total_count"]),
            limit=int(data["limit"]),
            offset=int(data["offset"]),
            request_id=opt_str(data.get("request_id")),
        )
