"""Alerts and their webhook endpoints (seeds 001, 002). Reading alerts takes any key of the
organization; registering or deleting an endpoint takes an organization-scope key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from meterline.alerts import check_url, new_secret
from meterline.api.auth import PrincipalDep, ServicesDep
from meterline.api.responses import JSON
from meterline.clock import to_micros
from meterline.errors import Forbidden
from meterline.tenancy import Principal

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])

Limit = Annotated[int, Query(ge=1, le=1000, description="Page size, 1-1000.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2000)
    description: str | None = Field(default=None, max_length=200)


def _organization_key(principal: Principal) -> str:
    if principal.scope != "organization":
        raise Forbidden("webhook endpoints are managed with an organization-scope key")
    return principal.organization_id


@router.get("")
def list_alerts(
    principal: PrincipalDep, services: ServicesDep, limit: Limit = 50, offset: Offset = 0
) -> JSON:
    """The organization's alerts, newest first."""
    if principal.scope == "identifier":
        # Alerts are about the whole organization's consumption: not for one end user's token.
        raise Forbidden("alerts are read with an API key, not an access token")
    data, total = services.alerts.list_alerts(principal.organization_id, limit=limit, offset=offset)
    return JSON({"object": "list", "data": data, "total_count": total, "limit": limit, "offset": offset})


@router.post("/webhooks", status_code=201)
async def create_webhook(body: WebhookIn, principal: PrincipalDep, services: ServicesDep) -> JSON:
    org_id = _organization_key(principal)
    allow = services.settings.webhook_allow_private
    # Resolving the host may take a while: not on the event loop.
    url = await run_in_threadpool(lambda: check_url(body.url, allow_private=allow))
    secret = new_secret()
    now_us = to_micros(services.clock.now())
    created = services.webhooks.create_endpoint(org_id, url, body.description, secret, now_us)
    # The only time the secret is ever shown.
    return JSON({**created, "secret": secret}, status_code=201)


@router.get("/webhooks")
def list_webhooks(principal: PrincipalDep, services: ServicesDep) -> JSON:
    if principal.scope == "identifier":
        raise Forbidden("webhook endpoints are read with an API key, not an access token")
    data = services.webhooks.list_endpoints(principal.organization_id)
    return JSON({"object": "list", "data": data})


@router.delete("/webhooks/{endpoint_id}")
def delete_webhook(endpoint_id: str, principal: PrincipalDep, services: ServicesDep) -> JSON:
    org_id = _organization_key(principal)
    services.webhooks.disable_endpoint(org_id, endpoint_id)
    return JSON({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True})
