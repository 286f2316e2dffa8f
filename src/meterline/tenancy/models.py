"""Organizations, workspaces, API keys, identifiers, token families and the authenticated principal."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

KeyScope = Literal["workspace", "organization"]
PrincipalScope = Literal["workspace", "organization", "identifier"]


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    name: str
    plan: str
    currency: str
    spend_cap_nanos: int | None
    billing_anchor_day: int
    discount_pct: int
    created_at: datetime
    # Percentages of the period allowance (or spend cap) at which usage alerts fire; None: the defaults.
    alert_thresholds: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    organization_id: str
    name: str
    group: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    organization_id: str
    workspace_id: str
    name: str
    key_prefix: str
    scope: KeyScope
    default_source: str | None
    limits: dict[str, int] | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class NewKey:
    """The one moment a key's secret exists outside the caller's hands: the answer to its creation."""

    key: ApiKey
    secret: str


@dataclass(frozen=True, slots=True)
class CreditGrant:
    id: str
    organization_id: str
    credits_nanos: int
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, resolved from a bearer credential. Reads are confined to ``scope``.

    For an access token: ``scope == "identifier"``, ``identifier_id`` is the token's subject, and the
    ``key_*`` fields describe the API key that issued it (usage is attributed to that key too)."""

    organization_id: str
    workspace_id: str
    scope: PrincipalScope
    key_id: str | None = None
    key_prefix: str | None = None
    key_name: str | None = None
    identifier_id: str | None = None
    default_source: str | None = None
    # The calling key's own limits (enforced by the quota engine).
    key_limits: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Identifier:
    """An end user or tenant of a workspace (seed 000). ``limits`` are its own named limits, if any."""

    workspace_id: str
    identifier_id: str
    organization_id: str
    limits: dict[str, int] | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenFamily:
    """The chain of refresh tokens (and their access tokens) that grew from one ``POST /v1/token``.
    Revoking it ends every token of the chain at once."""

    id: str
    organization_id: str
    workspace_id: str
    identifier_id: str
    key_id: str
    access_ttl_s: int
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """A stored refresh token: only the SHA-256 of its secret is kept."""

    token_hash: str
    family_id: str
    organization_id: str
    workspace_id: str
    identifier_id: str
    key_id: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
