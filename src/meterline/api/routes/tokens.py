"""Identifier tokens (seed 000): ``POST /v1/token`` mints an access + refresh token for an end user with
a workspace API key; ``POST /v1/token/refresh`` rotates the refresh token (no API key needed)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from meterline.api import render
from meterline.api.auth import PrincipalDep, TokensDep
from meterline.api.responses import JSON
from meterline.api.schemas import LIMITS_DESCRIPTION, LIMITS_EXAMPLE, NamedLimits
from meterline.errors import InvalidRequest
from meterline.tenancy import Principal
from meterline.tenancy.tokens import DEFAULT_ACCESS_TTL, MAX_ACCESS_TTL, MIN_ACCESS_TTL, TokenPair

router = APIRouter(prefix="/v1/token", tags=["tokens"])

# The answer carries secrets: no cache may keep it (RFC 6749 §5.1).
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

IdentifierId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    identifier_id: IdentifierId = Field(description="Your id for the end user or tenant (1-200 characters).")
    limits: NamedLimits = Field(
        default=None,
        description=LIMITS_DESCRIPTION + " Given: they replace the identifier's limits. Omitted: kept.",
        examples=[LIMITS_EXAMPLE],
    )
    expires_in: int = Field(
        default=DEFAULT_ACCESS_TTL,
        ge=MIN_ACCESS_TTL,
        le=MAX_ACCESS_TTL,
        description="Access token lifetime in seconds.",
    )

    @field_validator("identifier_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("identifier_id must not be blank")
        return value


class RefreshIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    refresh_token: str = Field(min_length=1, max_length=200)


def _pair(pair: TokenPair) -> JSON:
    body: dict[str, Any] = {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": "Bearer",
        "expires_in": pair.expires_in,
        "identifier_id": pair.identifier.identifier_id,
        "workspace_id": pair.identifier.workspace_id,
        "limits": render.named_limits(pair.identifier.limits),
    }
    return JSON(body, headers=_NO_STORE)


def _workspace_of(principal: Principal, request: Request) -> str:
    if principal.scope != "organization":
        return principal.workspace_id
    # get_principal has already checked that the header names a workspace of the key's organization.
    workspace = request.headers.get("x-workspace-id")
    if not workspace:
        raise InvalidRequest(
            "an organization key must name the identifier's workspace with the X-Workspace-Id header",
            param="X-Workspace-Id",
        )
    return workspace


@router.post("")
def issue_token(body: TokenIn, request: Request, principal: PrincipalDep, tokens: TokensDep) -> JSON:
    """Issue an access token (JWT, EdDSA) and a refresh token for ``identifier_id``, with its limits."""
    pair = tokens.issue(
        principal,
        _workspace_of(principal, request),
        body.identifier_id,
        limits=body.limits,
        expires_in=body.expires_in,
    )
    return _pair(pair)


@router.post("/refresh")
def refresh_token(body: RefreshIn, tokens: TokensDep) -> JSON:
    """Spend a refresh token for a new pair. A refresh token works once; presenting it again revokes
    every token of its family."""
    return _pair(tokens.refresh(body.refresh_token))
