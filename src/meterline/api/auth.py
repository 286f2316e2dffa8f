"""Bearer authentication as FastAPI dependencies: API keys and identifier access tokens for usage, the
admin key for the admin API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from meterline.errors import Forbidden, NotFound, Unauthorized
from meterline.metering.reading import Scope
from meterline.services import Services
from meterline.tenancy import Principal
from meterline.tenancy.keys import same_secret
from meterline.tenancy.tokens import TokenService, looks_like_jwt


# The dependencies are coroutines where they need no I/O: FastAPI runs a plain function dependency in a
# worker thread, a hop there and back for every request (docs/benchmarks.md, "Dependencies on the loop").
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_tokens(request: Request) -> TokenService:
    tokens: TokenService = request.app.state.tokens
    return tokens


TokensDep = Annotated[TokenService, Depends(get_tokens)]


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        # Anthropic's SDKs send their key as ``x-api-key``; accepted so they work unmodified.
        api_key = request.headers.get("x-api-key", "").strip()
        if api_key:
            return api_key
        raise Unauthorized("missing Authorization header: send 'Authorization: Bearer <your Meterline key>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization header must be 'Bearer <key>'")
    return token


def get_principal(request: Request, services: ServicesDep, tokens: TokensDep) -> Principal:
    credential = bearer_token(request)
    # API keys never contain a dot, so a three-part JWT shape is an access token and nothing else.
    if looks_like_jwt(credential):
        principal = tokens.authenticate(credential)
    else:
        principal = services.tenancy.authenticate(credential)
    workspace = request.headers.get("x-workspace-id")
    if workspace is not None and workspace != principal.workspace_id:
        if principal.scope != "organization":
            what = "access token" if principal.scope == "identifier" else "key"
            raise Forbidden(f"X-Workspace-Id does not match this {what}'s workspace", param="X-Workspace-Id")
        # An organization key may narrow its view to one of its organization's workspaces.
        try:
            ws_org = services.tenancy.get_workspace(workspace).organization_id
        except NotFound:
            ws_org = None
        if ws_org != principal.organization_id:
            raise Forbidden(
                "X-Workspace-Id is not a workspace of this key's organization", param="X-Workspace-Id"
            )
    return _remember(request, principal)


def cached_principal(request: Request, services: Services) -> Principal | None:
    """``get_principal`` when it needs no I/O (a cached API key, no ``X-Workspace-Id`` to check), so an
    event loop may call it; None otherwise, and ``get_principal`` (in a thread) does the rest."""
    credential = bearer_token(request)
    if looks_like_jwt(credential) or "x-workspace-id" in request.headers:
        return None
    principal = services.tenancy.cached_principal(credential)
    return None if principal is None else _remember(request, principal)


def _remember(request: Request, principal: Principal) -> Principal:
    # Whose request this is, for what renders its errors (quota refusals count toward an alert) and for
    # the access log.
    request.state.organization_id = principal.organization_id
    request.state.principal = principal
    return principal


async def principal_of(request: Request, services: ServicesDep, tokens: TokensDep) -> Principal:
    """``get_principal`` as a dependency: on the event loop for a cached API key, else in a thread."""
    principal = cached_principal(request, services)
    if principal is not None:
        return principal
    return await run_in_threadpool(get_principal, request, services, tokens)


PrincipalDep = Annotated[Principal, Depends(principal_of)]


def scope_of(principal: Principal, request: Request) -> Scope:
    """What the caller may read: its workspace, or its whole organization for organization keys."""
    if principal.scope == "organization":
        narrowed = request.headers.get("x-workspace-id")
        return Scope(principal.organization_id, workspace_id=narrowed or None)
    return Scope(principal.organization_id, principal.workspace_id, principal.identifier_id)


async def require_admin(request: Request, services: ServicesDep) -> None:
    configured = services.settings.admin_key
    if configured is None:
        raise Forbidden("the admin API is disabled: start the server with METERLINE_ADMIN_KEY set")
    if not same_secret(bearer_token(request), configured.get_secret_value()):
        raise Unauthorized("invalid admin key")


AdminDep = Depends(require_admin)
