"""The caller's own organization (seed 001, "set up alerts in your dashboard"): any API key reads it; an
organization-scope key changes its alert thresholds and, for a spend-cap organization, its spend cap.
Everything else about an organization (plan, currency, billing day) is the operator's, through the admin
API; both go through the same ``TenancyService.update_organization``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from meterline.api import render
from meterline.api.auth import PrincipalDep, ServicesDep
from meterline.api.responses import JSON
from meterline.api.schemas import OrganizationSettingsIn
from meterline.errors import Forbidden
from meterline.services import Services
from meterline.tenancy import Organization, Principal

router = APIRouter(prefix="/v1/organization", tags=["organization"])


def _body(org: Organization, services: Services) -> dict[str, Any]:
    # ``alert_thresholds`` is null while the organization uses the deployment's, which are given beside.
    return {**render.organization(org), "default_alert_thresholds": list(services.settings.alert_thresholds)}


def _readable(principal: Principal) -> str:
    if principal.scope == "identifier":
        raise Forbidden("the organization is read with an API key, not an access token")
    return principal.organization_id


@router.get("")
def get_organization(principal: PrincipalDep, services: ServicesDep) -> JSON:
    """The caller's organization: plan, currency, spend cap, alert thresholds."""
    return JSON(_body(services.tenancy.get_organization(_readable(principal)), services))


@router.patch("")
def update_organization(body: OrganizationSettingsIn, principal: PrincipalDep, services: ServicesDep) -> JSON:
    """Change the alert thresholds (``null``: the deployment's defaults) or, for a spend-cap organization,
    the spend cap. Needs an organization-scope key."""
    org_id = _readable(principal)
    if principal.scope != "organization":
        raise Forbidden("the organization's settings are changed with an organization-scope key")
    changes = body.model_dump(exclude_unset=True)
    if "spend_cap" in changes and services.tenancy.get_organization(org_id).spend_cap_nanos is None:
        raise Forbidden(
            "this organization has no spend cap: its plan and credits are changed by the operator",
            param="spend_cap",
        )
    org = services.tenancy.update_organization(org_id, changes) if changes else None
    return JSON(_body(org or services.tenancy.get_organization(org_id), services))
