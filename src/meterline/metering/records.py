"""What gets settled (``UsageRecord``) and what the ledger keeps (``LedgerRow``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict

LLM_REQUEST = "llm.request"


class PricedParts(TypedDict, total=False):
    cache_write_1h_tokens: int
    input_audio_tokens: int
    cache_audio_read_tokens: int
    output_audio_tokens: int
    reasoning_tokens: int
    web_searches: int


@dataclass(frozen=True, slots=True)
class UsageVector:
    """The detail of a row's usage beyond its four token counts, in genai-prices' words where it has them.

    Token counts here are parts of the row's own, never added to them: ``cache_write_1h_tokens`` of
    ``cache_write_tokens`` (the rest are 5-minute writes); ``input_audio_tokens`` of ``prompt_tokens``;
    ``cache_audio_read_tokens`` of both ``cache_read_tokens`` and ``input_audio_tokens``;
    ``output_audio_tokens``, ``reasoning_tokens`` and the prediction tokens of ``completion_tokens``.
    ``web_searches`` and ``web_fetches`` are server-side tool calls. ``service_tier`` is the tier the
    provider says it served (``flex``, ``priority``, ...); ``batch`` marks usage of a batch API.
    """

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

    def priced(self) -> PricedParts:
        """The parts a price applies to apart, by their ``pricing.MeteredUsage`` names (empty for none)."""
        if self is NO_DETAIL:
            return {}
        return {
            "cache_write_1h_tokens": self.cache_write_1h_tokens,
            "input_audio_tokens": self.input_audio_tokens,
            "cache_audio_read_tokens": self.cache_audio_read_tokens,
            "output_audio_tokens": self.output_audio_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "web_searches": self.web_searches,
        }

    def parts(self) -> dict[str, Any]:
        """The non-zero parts by name (``service_tier`` when known, ``batch`` when true)."""
        found: dict[str, Any] = {name: getattr(self, name) for name in VECTOR_COUNTS if getattr(self, name)}
        if self.service_tier is not None:
            found["service_tier"] = self.service_tier
        if self.batch:
            found["batch"] = True
        return found


NO_DETAIL = UsageVector()
# The vector's counts, in storage order.
VECTOR_COUNTS = (
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "cache_audio_read_tokens",
    "output_audio_tokens",
    "reasoning_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
    "web_searches",
    "web_fetches",
)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One billable event as measured, before pricing. Written by the gateway and the events API alike.

    ``prompt_tokens`` counts every input token, cache reads and cache writes included (the OpenAI
    convention); ``cache_read_tokens`` and ``cache_write_tokens`` say how many of them were cached.
    ``completion_tokens`` counts every output token, reasoning and audio included. The rest of the usage
    vector (``UsageVector``) says what those tokens were and counts per-call work (web searches).
    """

    organization_id: str
    workspace_id: str
    created_at: datetime
    event: str = LLM_REQUEST
    units: int = 1
    model: str | None = None
    provider: str | None = None
    region: str | None = None
    modality: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    audio_seconds: Decimal | None = None
    key_id: str | None = None
    key_prefix: str | None = None
    key_name: str | None = None
    identifier_id: str | None = None
    user_id: str | None = None
    source: str = "api"
    endpoint: str | None = None
    run_id: str | None = None
    metadata: dict[str, Any] | None = None
    failover: bool = False
    overage: bool = False
    # The row's receipt: ``receipt_id`` names it in advance (the gateway sends it as a header before the
    # stream ends); otherwise one is made when ``receipt`` is true (``X-Meterline-Receipt: false`` opts out).
    receipt_id: str | None = None
    receipt: bool = True
    idempotency_key: str | None = None
    request_hash: str | None = None
    usage: UsageVector = NO_DETAIL


@dataclass(slots=True)
class LedgerRow:
    """A settled, priced ledger row. Append-only: nothing ever changes one after it is written.

    Not ``frozen``: a frozen dataclass pays an ``object.__setattr__`` per field, and one is built per
    billable event on the hot path. Treat it as immutable all the same.
    """

    id: str
    organization_id: str
    workspace_id: str
    key_id: str | None
    key_prefix: str | None
    key_name: str | None
    identifier_id: str | None
    user_id: str | None
    source: str
    endpoint: str | None
    event: str
    units: int
    run_id: str | None
    metadata: dict[str, Any] | None
    model: str | None
    modality: str
    provider: str | None
    region: str | None
    billing_unit: str
    audio_ms: int | None
    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    total_tokens: int
    currency: str
    list_cost_nanos: int
    discount_applied_pct: int
    cost_nanos: int
    credits_nanos: int
    priced: bool
    overage: bool
    failover: bool
    receipt_id: str | None
    idempotency_key: str | None
    request_hash: str | None
    created_at: datetime
    recorded_at: datetime = field(compare=False)
    # Decided at settle (see meterline.credits): the credits drawn from each bucket.
    credits_monthly_nanos: int = 0
    credits_bonus_nanos: int = 0
    usage: UsageVector = NO_DETAIL

    @property
    def audio_seconds(self) -> Decimal | None:
        return None if self.audio_ms is None else Decimal(self.audio_ms) / 1000
