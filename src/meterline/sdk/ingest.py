"""Writing usage: ``POST /v1/events`` (SPEC §4) and two-phase reservations. Answers are named as the API's
JSON names them (old names warn)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from meterline.sdk._json import Json, dec, obj, opt_dec, opt_str, time
from meterline.sdk._renamed import renamed


@dataclass(frozen=True, slots=True)
class Event:
    """One usage event. ``id`` is chosen by the client: sending it again is counted once (the same id
    with a different body is a conflict), so a batch may be retried safely as long as it is unchanged."""

    id: str
    event: str = "llm.request"
    units: int = 1
    model: str | None = None
    provider: str | None = None
    modality: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    audio_seconds: Decimal | None = None
    identifier_id: str | None = None
    user_id: str | None = None
    source: str = "api"
    endpoint: str | None = None
    run_id: str | None = None
    metadata: dict[str, Any] | None = None
    timestamp: datetime | None = None
    # The usage vector (docs/usage-vector.md): parts of the token counts above, and per-call counts.
    # None leaves a field out of the body (the server's 0), so an event's body is the same as before it.
    cache_write_1h_tokens: int | None = None
    input_audio_tokens: int | None = None
    cache_audio_read_tokens: int | None = None
    output_audio_tokens: int | None = None
    reasoning_tokens: int | None = None
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    web_searches: int | None = None
    web_fetches: int | None = None
    service_tier: str | None = None
    batch: bool | None = None

    def to_json(self) -> Json:
        """The wire form: fields left at None are left out (the server's defaults apply)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True)
class EventError:
    code: str
    message: str
    param: str | None


@dataclass(frozen=True, slots=True)
class EventResult:
    """What happened to one event: ``accepted`` (maybe as a ``duplicate`` of an earlier send) or
    ``rejected`` with an ``error``."""

    id: str | None
    status: str
    duplicate: bool
    ledger_id: str | None = None
    receipt_id: str | None = None
    cost: Decimal | None = None
    credits: Decimal | None = None
    priced: bool | None = None
    error: EventError | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    @classmethod
    def from_json(cls, data: Json) -> EventResult:
        error = obj(data.get("error"))
        return cls(
            id=opt_str(data.get("id")),
            status=str(data["status"]),
            duplicate=bool(data.get("duplicate")),
            ledger_id=opt_str(data.get("ledger_id")),
            receipt_id=opt_str(data.get("receipt_id")),
            cost=opt_dec(data.get("cost")),
            credits=opt_dec(data.get("credits")),
            priced=data.get("priced"),
            error=EventError(str(error["code"]), str(error["message"]), opt_str(error.get("param")))
            if error
            else None,
        )


@dataclass(frozen=True, slots=True)
class EventsBatch:
    """The answer to one batch: a result per event, in the order sent."""

    data: list[EventResult]
    accepted: int
    duplicates: int
    rejected: int
    currency: str | None
    request_id: str | None

    results = renamed("results", "data")

    @classmethod
    def from_json(cls, data: Json) -> EventsBatch:
        return cls(
            data=[EventResult.from_json(r) for r in data["data"]],
            accepted=int(data["accepted"]),
            duplicates=int(data["duplicates"]),
            rejected=int(data["rejected"]),
            currency=opt_str(data.get("currency")),
            request_id=opt_str(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class ReservationEstimate:
    """What a reservation holds: its tokens, and their cost and credits."""

    total_tokens: int
    cost: Decimal
    credits: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """A held estimate (``status`` reserved), or the answer to releasing one (``status`` released, no
    ``estimate``)."""

    id: str
    status: str
    expires_at: datetime | None = None
    overage: bool = False
    estimate: ReservationEstimate | None = None
    request_id: str | None = None

    estimate_tokens = renamed("estimate_tokens", "estimate.total_tokens")
    estimate_cost = renamed("estimate_cost", "estimate.cost")
    estimate_credits = renamed("estimate_credits", "estimate.credits")
    currency = renamed("currency", "estimate.currency")

    @classmethod
    def from_json(cls, data: Json) -> Reservation:
        estimate = obj(data.get("estimate"))
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            expires_at=time(data["expires_at"]) if data.get("expires_at") else None,
            overage=bool(data.get("overage")),
            estimate=ReservationEstimate(
                total_tokens=int(estimate["total_tokens"]),
                cost=dec(estimate["cost"]),
                credits=dec(estimate["credits"]),
                currency=str(estimate["currency"]),
            )
            if estimate
            else None,
            request_id=opt_str(data.get("request_id")),
        )


@dataclass(frozen=True, slots=True)
class Settlement:
    """A settled reservation's ledger row. Settling again answers the same row (``duplicate``)."""

    id: str
    duplicate: bool
    recovered: bool
    ledger_id: str
    receipt_id: str | None
    total_tokens: int
    cost: Decimal
    credits: Decimal
    currency: str
    overage: bool
    status: str = "settled"
    request_id: str | None = None

    @classmethod
    def from_json(cls, data: Json) -> Settlement:
        return cls(
            status=str(data.get("status", "settled")),
            request_id=opt_str(data.get("request_id")),
            id=str(data["id"]),
            duplicate=bool(data.get("duplicate")),
            recovered=bool(data.get("recovered")),
            ledger_id=str(data["ledger_id"]),
            receipt_id=opt_str(data.get("receipt_id")),
            total_tokens=int(data["total_tokens"]),
            cost=Decimal(str(data["cost"])),
            credits=Decimal(str(data["credits"])),
            currency=str(data["currency"]),
            overage=bool(data.get("overage")),
        )
