"""Identifier tokens (seed 000), alerts and webhook endpoints (seeds 001, 002), and the models the
gateway serves."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from meterline.sdk._json import Json, dec, obj, opt_str, time

# A limit's value: a count (tokens, calls; -1 unlimited), or money (``spend_cap``) as an exact amount.
LimitValue = int | Decimal


@dataclass(frozen=True, slots=True)
class TokenPair:
    """An access token (short-lived JWT) and the refresh token that rotates it (works once)."""

    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int
    identifier_id: str
    workspace_id: str
    limits: dict[str, LimitValue] | None

    @classmethod
    def from_json(cls, data: Json) -> TokenPair:
        limits = data.get("limits")
        return cls(
            access_token=str(data["access_token"]),
            refresh_token=str(data["refresh_token"]),
            token_type=str(data.get("token_type", "Bearer")),
            expires_in=int(data["expires_in"]),
            identifier_id=str(data["identifier_id"]),
            workspace_id=str(data["workspace_id"]),
            limits={str(k): _limit(v) for k, v in limits.items()} if isinstance(limits, dict) else None,
        )


def _limit(value: object) -> LimitValue:
    # Counts are JSON integers; money limits are decimal text ("1.50").
    return value if isinstance(value, int) and not isinstance(value, bool) else dec(value)


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    organization_id: str
    kind: str
    threshold: int | None
    message: str
    period_start: datetime
    created_at: datetime
    details: dict[str, Any]

    @classmethod
    def from_json(cls, data: Json) -> Alert:
        threshold = data.get("threshold")
        return cls(
            id=str(data["id"]),
            organization_id=str(data["organization_id"]),
            kind=str(data["kind"]),
            threshold=None if threshold is None else int(threshold),
            message=str(data["message"]),
            period_start=time(data["period_start"]),
            created_at=time(data["created_at"]),
            details=obj(data.get("details")),
        )


@dataclass(frozen=True, slots=True)
class AlertPage:
    data: list[Alert]
    total_count: int
    limit: int
    offset: int

    @classmethod
    def from_json(cls, data: Json) -> AlertPage:
        return cls(
            data=[Alert.from_json(a) for a in data["data"]],
            total_count=int(data["total_count"]),
            limit=int(data["limit"]),
            offset=int(data["offset"]),
        )


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """A webhook endpoint; ``secret`` (for verifying Standard Webhooks signatures) only at creation."""

    id: str
    url: str
    description: str | None
    created_at: datetime
    secret: str | None = None

    @classmethod
    def from_json(cls, data: Json) -> WebhookEndpoint:
        return cls(
            id=str(data["id"]),
            url=str(data["url"]),
            description=opt_str(data.get("description")),
            created_at=time(data["created_at"]),
            secret=opt_str(data.get("secret")),
        )


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model the gateway serves (``GET /v1/models``), and the provider of its first route."""

    id: str
    owned_by: str
    created: int = 0

    @classmethod
    def from_json(cls, data: Json) -> ServedModel:
        return cls(id=str(data["id"]), owned_by=str(data["owned_by"]), created=int(data.get("created") or 0))
