"""Admin API (SPEC §9): organizations, workspaces, keys and bonus credits. Needs the admin key."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from meterline.api import render
from meterline.api.auth import AdminDep, ServicesDep
from meterline.api.responses import JSON
from meterline.api.schemas import (
    CreditsIn,
    KeyIn,
    OrganizationIn,
    OrganizationPatch,
    ResolutionIn,
    WorkspaceIn,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])

Limit = Annotated[int, Query(ge=1, le=1000, description="Page size, 1-1000.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")]


def _page(data: list[dict[str, Any]], total: int, limit: int, offset: int) -> dict[str, Any]:
    return {"object": "list", "data": data, "total_count": total, "limit": limit, "offset": offset}


@router.post("/organizations", status_code=201)
def create_organization(body: OrganizationIn, services: ServicesDep) -> JSON:
    org = services.tenancy.create_organization(
        body.name,
        body.plan,
        currency=body.currency,
        spend_cap=body.spend_cap,
        billing_anchor_day=body.billing_anchor_day,
        discount_pct=body.discount_pct,
        alert_thresholds=body.alert_thresholds,
    )
    return JSON(render.organization(org), status_code=201)


@router.get("/organizations")
def list_organizations(services: ServicesDep, limit: Limit = 100, offset: Offset = 0) -> JSON:
    orgs, total = services.tenancy.list_organizations(limit=limit, offset=offset)
    return JSON(_page([render.organization(o) for o in orgs], total, limit, offset))


@router.get("/organizations/{org_id}")
def get_organization(org_id: str, services: ServicesDep) -> JSON:
    return JSON(render.organization(services.tenancy.get_organization(org_id)))


@router.patch("/organizations/{org_id}")
def update_organization(org_id: str, body: OrganizationPatch, services: ServicesDep) -> JSON:
    changes = body.model_dump(exclude_unset=True)
    org = services.tenancy.update_organization(org_id, changes)
    return JSON(render.organization(org))


@router.post("/workspaces", status_code=201)
def create_workspace(body: WorkspaceIn, services: ServicesDep) -> JSON:
    ws = services.tenancy.create_workspace(body.organization_id, body.name, body.group)
    return JSON(render.workspace(ws), status_code=201)


@router.get("/workspaces")
def list_workspaces(
    services: ServicesDep,
    organization_id: Annotated[str | None, Query(max_length=40)] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSON:
    items, total = services.tenancy.list_workspaces(organization_id, limit=limit, offset=offset)
    return JSON(_page([render.workspace(w) for w in items], total, limit, offset))


@router.post("/keys", status_code=201)
def create_key(body: KeyIn, services: ServicesDep) -> JSON:
    new = services.tenancy.create_key(
        body.workspace_id, body.name, scope=body.scope, limits=body.limits, default_source=body.default_source
    )
    # The only time the key is ever shown.
    return JSON({**render.api_key(new.key), "key": new.secret}, status_code=201)


@router.get("/keys")
def list_keys(
    services: ServicesDep,
    workspace_id: Annotated[str | None, Query(max_length=40)] = None,
    organization_id: Annotated[str | None, Query(max_length=40)] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSON:
    items, total = services.tenancy.list_keys(
        workspace_id=workspace_id, organization_id=organization_id, limit=limit, offset=offset
    )
    return JSON(_page([render.api_key(k) for k in items], total, limit, offset))


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, services: ServicesDep) -> JSON:
    return JSON(render.api_key(services.tenancy.revoke_key(key_id)))


@router.post("/credits", status_code=201)
def grant_credits(body: CreditsIn, services: ServicesDep) -> JSON:
    grant = services.grant_credits(body.organization_id, body.amount, body.reason)
    return JSON(render.credit_grant(grant), status_code=201)


@router.get("/credits")
def list_credit_grants(
    services: ServicesDep, organization_id: Annotated[str, Query(min_length=1, max_length=40)]
) -> JSON:
    grants = services.tenancy.list_credit_grants(organization_id)
    data = [render.credit_grant(g) for g in grants]
    return JSON(_page(data, len(data), len(data), 0))


@router.get("/reconcile")
def reconcile(services: ServicesDep) -> JSON:
    """The projections (hourly rollups, credit usage) checked against the ledger: every entry that
    differs, or none. Read-only; rebuilding them is ``meterline reconcile --rebuild`` on the database."""
    from meterline.storage import reconcile as projections

    result = projections.reconcile(services.db)
    return JSON({"object": "reconciliation", **result.as_json()})


@router.get("/quarantine")
def list_quarantine(
    services: ServicesDep,
    status: Annotated[Literal["open", "all"], Query(description="open (default) or all.")] = "open",
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSON:
    """Usage that could not be settled, set aside with its error until an operator settles or voids it."""
    entries, total = services.quarantine.list(unresolved_only=status == "open", limit=limit, offset=offset)
    return JSON(_page([render.quarantine_entry(e) for e in entries], total, limit, offset))


@router.get("/quarantine/{entry_id}")
def get_quarantine_entry(entry_id: str, services: ServicesDep) -> JSON:
    return JSON(render.quarantine_entry(services.reservations.quarantined(entry_id)))


@router.post("/quarantine/{entry_id}/settle")
def settle_quarantine_entry(entry_id: str, services: ServicesDep, body: ResolutionIn | None = None) -> JSON:
    """Record the entry's usage through the settle path (its text cleaned), exactly once."""
    services.reservations.settle_quarantined(entry_id, body.note if body else None)
    return JSON(render.quarantine_entry(services.reservations.quarantined(entry_id)))


@router.post("/quarantine/{entry_id}/void")
def void_quarantine_entry(entry_id: str, services: ServicesDep, body: ResolutionIn | None = None) -> JSON:
    """Close the entry without billing it; the entry stays, with the note."""
    return JSON(
        render.quarantine_entry(services.reservations.void_quarantined(entry_id, body.note if body else None))
    )
