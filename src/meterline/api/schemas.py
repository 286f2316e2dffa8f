"""Request bodies. Unknown fields are refused (a typo must not silently do nothing), numbers are range
checked, and money is a decimal string or integer (never a float, which is already inexact)."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from meterline.metering.records import NO_DETAIL, UsageVector
from meterline.money import NANOS_PER_UNIT, parse_decimal, to_nanos
from meterline.pricing.usage import consistency
from meterline.quotas.limits import LIMIT_NAMES, MAX_LIMIT, NANOS_LIMITS, UNLIMITED, check_named_limits

MAX_TOKENS = 100_000_000  # per event: far above any model's context, far below overflow
MAX_UNITS = 1_000_000_000
MAX_CALLS = 1_000_000  # server-side tool calls (web searches) per event
MAX_AUDIO_SECONDS = Decimal(86_400)
MAX_METADATA_BYTES = 8 * 1024


def _money(value: object) -> Decimal:
    return parse_decimal(value, what="amount")


Money = Annotated[Decimal, BeforeValidator(_money)]

LIMITS_EXAMPLE = {"daily_tokens": 100_000, "rpm": 60, "spend_cap": "25.00"}


def _named_limits_in(value: object) -> object:
    """Named limits as the API takes them: an object of whole numbers (-1 = unlimited), and ``spend_cap``
    as an amount of money of the organization's currency (``"25.00"``), held in nanos from here on. The
    other values are left to the per-name checks, which name the limit that is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            'limits is an object of named limits, e.g. {"daily_tokens": 100000, "rpm": 60, "spend_cap": '
            f'"25.00"}}; known limits: {", ".join(LIMIT_NAMES)}'
        )
    converted = dict(value)
    for name in NANOS_LIMITS & converted.keys():
        raw = converted[name]
        if raw == UNLIMITED and not isinstance(raw, bool):
            continue
        money = (
            f'limit {name!r} is an amount of money in the organization\'s currency ("25.00") up to '
            f"{MAX_LIMIT // NANOS_PER_UNIT}, or -1"
        )
        try:
            amount = parse_decimal(raw, what=f"limit {name!r}")
        except ValueError as exc:
            raise ValueError(f"{exc}; {money}") from None
        if not 0 <= amount <= MAX_LIMIT // NANOS_PER_UNIT:
            raise ValueError(money)
        if _decimal_places(amount) > 9:
            raise ValueError(f"limit {name!r} has at most 9 decimal places (nanos of a currency unit)")
        converted[name] = to_nanos(amount)
    return converted


def _decimal_places(amount: Decimal) -> int:
    """Read from the digits, not by arithmetic (which rounds to the context's 28 digits)."""
    _, digits, exponent = amount.as_tuple()
    if not isinstance(exponent, int):
        return 0
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    return max(-(exponent + min(trailing, -exponent if exponent < 0 else 0)), 0)


def _known_limits(value: dict[str, int] | None) -> dict[str, int] | None:
    return None if value is None else check_named_limits(value)


NamedLimits = Annotated[
    dict[str, Annotated[int, Field(ge=UNLIMITED, le=MAX_LIMIT, strict=True)]] | None,
    BeforeValidator(_named_limits_in),
    AfterValidator(_known_limits),
]
LIMITS_DESCRIPTION = (
    "Named limits of their own, each refusing (429) what would pass it: daily_tokens, monthly_tokens, "
    "daily_calls, monthly_calls, rpm, tpm, daily_credits, monthly_credits (whole numbers; -1 = unlimited) "
    "and spend_cap (money of the organization's currency spent this billing period, a decimal string)."
)
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
EventName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]
Calls = Annotated[int, Field(ge=0, le=MAX_CALLS, strict=True)]
ServiceTier = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$")]


def plain_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        # Both encoders: stdlib refuses NaN/Infinity, orjson refuses integers beyond 64 bits; the
        # metadata is stored with one and rendered with the other.
        json.dumps(value, allow_nan=False)
        size = len(orjson.dumps(value))
    except (ValueError, TypeError):
        raise ValueError("metadata must be plain JSON: finite numbers, 64-bit integers") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


# Percentages of the period allowance or spend cap, 1-1000 (past 100: overage alerts), up to 20 of them.
AlertThresholds = Annotated[
    list[Annotated[int, Field(ge=1, le=1000, strict=True)]], Field(min_length=1, max_length=20)
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrganizationIn(_Body):
    name: Name
    plan: str = "free"
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    spend_cap: Money | None = None
    billing_anchor_day: int | None = Field(default=None, ge=1, le=31, strict=True)
    discount_pct: int = Field(default=0, ge=0, le=100, strict=True)
    alert_thresholds: AlertThresholds | None = None


class OrganizationPatch(_Body):
    """Fields to change. Only ``spend_cap`` (removing the cap) and ``alert_thresholds`` (back to the
    deployment's defaults) may be set to null."""

    name: Name | None = None
    plan: str | None = None
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    spend_cap: Money | None = None
    billing_anchor_day: int | None = Field(default=None, ge=1, le=31, strict=True)
    discount_pct: int | None = Field(default=None, ge=0, le=100, strict=True)
    alert_thresholds: AlertThresholds | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> OrganizationPatch:
        for field in self.model_fields_set - {"spend_cap", "alert_thresholds"}:
            if getattr(self, field) is None:
                raise ValueError(f"{field} cannot be null")
        return self


class OrganizationSettingsIn(_Body):
    """What an organization key may change of its own organization: its alert thresholds (null: back
    to the deployment's defaults) and, for a spend-cap organization, the cap."""

    alert_thresholds: AlertThresholds | None = None
    spend_cap: Money | None = None  # a decimal string, in the organization's currency

    @model_validator(mode="after")
    def _cap_not_null(self) -> OrganizationSettingsIn:
        if "spend_cap" in self.model_fields_set and self.spend_cap is None:
            raise ValueError("spend_cap cannot be null: whether there is a cap is the operator's decision")
        return self


class WorkspaceIn(_Body):
    organization_id: str = Field(min_length=1, max_length=40)
    name: Name
    group: Name | None = None


class KeyIn(_Body):
    workspace_id: str = Field(min_length=1, max_length=40)
    name: Name
    scope: Literal["workspace", "organization"] = "workspace"
    default_source: Label | None = None
    limits: NamedLimits = Field(default=None, description=LIMITS_DESCRIPTION, examples=[LIMITS_EXAMPLE])


class CreditsIn(_Body):
    organization_id: str = Field(min_length=1, max_length=40)
    amount: Money
    reason: Name


class UsageVectorIn(_Body):
    """The usage vector (parts of the token counts, and per-call counts): see docs/usage-vector.md."""

    cache_write_1h_tokens: Tokens = 0
    input_audio_tokens: Tokens = 0
    cache_audio_read_tokens: Tokens = 0
    output_audio_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    accepted_prediction_tokens: Tokens = 0
    rejected_prediction_tokens: Tokens = 0
    web_searches: Calls = 0
    web_fetches: Calls = 0
    service_tier: ServiceTier | None = None
    batch: bool = Field(default=False, strict=True)

    @property
    def prediction_tokens(self) -> int:
        return self.accepted_prediction_tokens + self.rejected_prediction_tokens

    def nesting_problem(
        self, prompt_tokens: int, completion_tokens: int, cache_read_tokens: int, cache_write_tokens: int
    ) -> tuple[str, str] | None:
        """(field, what to fix) when these counts and the vector break the nesting, else None."""
        if self.prediction_tokens > completion_tokens:
            return (
                "completion_tokens",
                "accepted_prediction_tokens + rejected_prediction_tokens must not exceed completion_tokens "
                "(which includes them)",
            )
        return consistency(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cache_read_tokens=cache_read_tokens,
            cache_write_tokens=cache_write_tokens,
            cache_write_1h_tokens=self.cache_write_1h_tokens,
            input_audio_tokens=self.input_audio_tokens,
            cache_audio_read_tokens=self.cache_audio_read_tokens,
            output_audio_tokens=self.output_audio_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )

    def usage_vector(self) -> UsageVector:
        if not (
            self.cache_write_1h_tokens
            or self.input_audio_tokens
            or self.cache_audio_read_tokens
            or self.output_audio_tokens
            or self.reasoning_tokens
            or self.prediction_tokens
            or self.web_searches
            or self.web_fetches
            or self.service_tier is not None
            or self.batch
        ):
            return NO_DETAIL
        return UsageVector(
            cache_write_1h_tokens=self.cache_write_1h_tokens,
            input_audio_tokens=self.input_audio_tokens,
            cache_audio_read_tokens=self.cache_audio_read_tokens,
            output_audio_tokens=self.output_audio_tokens,
            reasoning_tokens=self.reasoning_tokens,
            accepted_prediction_tokens=self.accepted_prediction_tokens,
            rejected_prediction_tokens=self.rejected_prediction_tokens,
            web_searches=self.web_searches,
            web_fetches=self.web_fetches,
            service_tier=self.service_tier,
            batch=self.batch,
        )


class EventIn(UsageVectorIn):
    """One usage event reported by a client (SPEC §4)."""

    id: Label
    event: EventName = "llm.request"
    units: int = Field(default=1, ge=0, le=MAX_UNITS, strict=True)
    model: Label | None = None
    provider: Label | None = None
    region: Label | None = None
    modality: Literal["chat", "completion", "embedding", "transcription", "responses", "event"] | None = None
    prompt_tokens: Tokens = 0
    completion_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    audio_seconds: Decimal | None = Field(default=None, ge=0, le=MAX_AUDIO_SECONDS)
    identifier_id: Label | None = None
    user_id: Label | None = None
    source: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$")] = "api"
    endpoint: Label | None = None
    run_id: Label | None = None
    metadata: dict[str, Any] | None = None
    timestamp: datetime | None = None

    @field_validator("audio_seconds", mode="before")
    @classmethod
    def _audio(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, float):
            # Durations come as JSON numbers; their decimal text is what the client meant.
            return Decimal(repr(value))
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return plain_metadata(value)

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("timestamp must be RFC 3339 with a time zone, e.g. 2026-03-14T10:30:59Z")
        return value

    def check_tokens(self) -> tuple[str, str] | None:
        """(field, what to fix) when the counts break the usage vector's nesting."""
        return self.nesting_problem(
            self.prompt_tokens, self.completion_tokens, self.cache_read_tokens, self.cache_write_tokens
        )


class EventsBatchIn(_Body):
    events: list[dict[str, Any]] = Field(
        description="Up to 1000 events; each is validated on its own (see EventIn)."
    )


class UsageIn(_Body):
    """Usage of one request, as a reservation's estimate or its actual figures."""

    model: Label | None = None
    provider: Label | None = None
    prompt_tokens: Tokens = 0
    completion_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    units: int = Field(default=1, ge=0, le=MAX_UNITS, strict=True)

    def check_tokens(self) -> str | None:
        if self.cache_read_tokens + self.cache_write_tokens > self.prompt_tokens:
            return (
                "cache_read_tokens + cache_write_tokens must not exceed prompt_tokens (which includes them)"
            )
        return None


class ReservationIn(UsageIn):
    """``POST /v1/reservations``: hold an estimate (e.g. prompt tokens + max_tokens) before the work."""

    event: EventName = "llm.request"
    identifier_id: Label | None = None
    user_id: Label | None = None
    source: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$")] = "api"
    endpoint: Label | None = None
    ttl_seconds: int | None = Field(default=None, ge=1, le=86_400, strict=True)


class SettleIn(UsageVectorIn):
    """``POST /v1/reservations/{id}/settle``: the actual usage; fields left out keep the estimate's."""

    model: Label | None = None
    provider: Label | None = None
    prompt_tokens: Tokens | None = None
    completion_tokens: Tokens | None = None
    cache_read_tokens: Tokens | None = None
    cache_write_tokens: Tokens | None = None
    units: int | None = Field(default=None, ge=0, le=MAX_UNITS, strict=True)
    run_id: Label | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return plain_metadata(value)


class ResolutionIn(_Body):
    """``POST /v1/admin/quarantine/{id}/settle`` or ``/void``: why (kept with the entry)."""

    note: Annotated[str, StringConstraints(min_length=1, max_length=1000)] | None = None
