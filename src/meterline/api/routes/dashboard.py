"""The dashboard (SPEC §6): sign-in, Settings → Usage, Settings → Billing, the CSV download and the
"Show More" rows. HTML pages signed in with a session cookie (``api.session``); each page has a JSON twin
(``/dashboard/usage.json``, ``/dashboard/billing.json``) holding the bodies it was drawn from.

Not part of the OpenAPI document: these routes speak HTML and cookies, not the bearer-key API.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Form, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from meterline.api import session as sessions
from meterline.api.auth import ServicesDep
from meterline.api.dashboard_pages import Twins, billing_twins, usage_context, usage_twins
from meterline.dashboard import views
from meterline.dashboard.templating import render
from meterline.errors import Forbidden, Unauthorized
from meterline.metering.analytics import RangeName
from meterline.services import Services
from meterline.tenancy import Principal

router = APIRouter(include_in_schema=False)

HOME = "/dashboard/usage"
SIGN_IN = "/dashboard/sign-in"
# Scripts and styles come from this server only; no page may be framed, except the usage bar which an
# editor embeds (``frame-ancestors`` of its own response).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors {frames}"
)
TableBy = Annotated[views.TableName, Query(description="Which table.")]


def _exact_number(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(format(value, "f").encode())
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def twin_json(bodies: dict[str, Any]) -> Response:
    """The bodies a page was drawn from, as JSON: exact decimals go back out as the same number text."""
    content = orjson.dumps(bodies, default=_exact_number)
    return Response(content, media_type="application/json", headers={"Cache-Control": "no-store"})


def html(body: str, *, status: int = 200, frames: str = "'none'") -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=page_headers(frames))


def page_headers(frames: str = "'none'") -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP.format(frames=frames),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard or widget path of this server, never another site."""
    if (
        not target
        or len(target) > 512
        or not target.startswith(("/dashboard", "/widget"))
        or "//" in target
        or "\\" in target
        or any(ord(c) < 32 for c in target)
    ):
        return HOME
    return target


def to_sign_in(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{SIGN_IN}?next={quote(here, safe='/')}", status_code=303)


def signed_in(request: Request, services: Services) -> sessions.Session:
    """The session, for routes that answer JSON, CSV or fragments (401 envelope without one)."""
    session = sessions.read_session(request, services)
    if session is None:
        raise Unauthorized(f"sign in to the dashboard first: {SIGN_IN}")
    return session


def chrome(services: Services, session: sessions.Session, page: str) -> dict[str, Any]:
    """What every signed-in page's header shows: who is signed in, and the sign-out form's token."""
    principal: Principal = session.principal
    org = services.tenancy.get_organization(principal.organization_id)
    workspace = None
    if principal.scope != "organization":
        workspace = services.tenancy.get_workspace(principal.workspace_id).name
    return {
        "page": page,
        "organization": org.name,
        "workspace": workspace,
        "key_name": principal.key_name,
        "key_prefix": principal.key_prefix,
        "csrf": session.csrf,
    }


# -- signing in and out -----------------------------------------------------------------------------
def _sign_in_page(request: Request, *, next_: str, error: str | None, status: int) -> HTMLResponse:
    token = sessions.sign_in_csrf(request)
    response = html(render("sign_in.html", csrf=token, next=next_, error=error), status=status)
    sessions.set_sign_in_csrf_cookie(response, request, token)
    return response


@router.get("/dashboard")
def dashboard_root() -> RedirectResponse:
    return RedirectResponse(HOME, status_code=303)


@router.get(SIGN_IN)
def sign_in_form(
    request: Request, next_: Annotated[str | None, Query(alias="next", max_length=512)] = None
) -> HTMLResponse:
    return _sign_in_page(request, next_=safe_next(next_), error=None, status=200)


@router.post(SIGN_IN)
def sign_in(
    request: Request,
    services: ServicesDep,
    key: Annotated[str, Form(max_length=512)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    next_: Annotated[str, Form(alias="next", max_length=512)] = HOME,
) -> Response:
    target = safe_next(next_)
    sessions.check_origin(request)
    if not sessions.same_token(request.cookies.get(sessions.SIGN_IN_CSRF_COOKIE), csrf) or not csrf:
        return _sign_in_page(
            request, next_=target, error="This form has expired. Please sign in again.", status=403
        )
    if not key.strip():
        return _sign_in_page(request, next_=target, error="Enter an API key.", status=400)
    try:
        token, _ = sessions.sign_in(services, key)
    except Unauthorized as exc:
        return _sign_in_page(request, next_=target, error=exc.message, status=401)
    response = RedirectResponse(target, status_code=303)
    sessions.set_session_cookie(response, request, token)
    response.delete_cookie(sessions.SIGN_IN_CSRF_COOKIE, path="/dashboard")
    return response


@router.post("/dashboard/sign-out")
def sign_out(
    request: Request, services: ServicesDep, csrf: Annotated[str, Form(max_length=128)] = ""
) -> Response:
    sessions.check_origin(request)
    session = sessions.read_session(request, services)
    if session is not None and not sessions.same_token(csrf, session.csrf):
        raise Forbidden("the sign-out form's CSRF token does not match this session", param="csrf")
    response = RedirectResponse(SIGN_IN, status_code=303)
    sessions.clear_session_cookie(response, request)
    return response


# -- Settings → Usage -------------------------------------------------------------------------------
RangeParam = Annotated[RangeName, Query(alias="range", description="24h, 7d or 30d.")]


@router.get("/dashboard/usage")
def usage_page(request: Request, services: ServicesDep, range_: RangeParam = "7d") -> Response:
    session = sessions.read_session(request, services)
    if session is None:
        return to_sign_in(request)
    bodies = usage_twins(Twins(request, session.principal, services), range_)
    context = usage_context(bodies)
    return html(render("usage.html", **chrome(services, session, "usage"), **context))


@router.get("/dashboard/usage.json")
def usage_twin(request: Request, services: ServicesDep, range_: RangeParam = "7d") -> Response:
    session = signed_in(request, services)
    return twin_json(usage_twins(Twins(request, session.principal, services), range_))


@router.get("/dashboard/usage/rows")
def more_rows(
    request: Request,
    services: ServicesDep,
    by: TableBy,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> HTMLResponse:
    """One more page of a top table, as table rows ("Show More"); whether there are more in a header."""
    session = signed_in(request, services)
    body = Twins(request, session.principal, services).breakdown(by, limit=views.TABLE_PAGE, offset=offset)
    title, column = views.table_titles(by)
    table = views.table(by, title, column, body)
    response = html(render("rows.html", table=table))
    response.headers["X-Has-More"] = "true" if table["has_more"] else "false"
    response.headers["X-Next-Offset"] = str(table["next_offset"])
    return response


@router.get("/dashboard/export.csv")
def export_csv(request: Request, services: ServicesDep) -> Response:
    """This billing period's ledger rows as CSV: ``/v1/usage/export.csv`` for the session's key."""
    session = signed_in(request, services)
    twins = Twins(request, session.principal, services)
    start = twins.summary()["billing_period"]["start"]
    return twins.export(start)


# -- Settings → Billing -----------------------------------------------------------------------------
@router.get("/dashboard/billing")
def billing_page(request: Request, services: ServicesDep) -> Response:
    session = sessions.read_session(request, services)
    if session is None:
        return to_sign_in(request)
    bodies = billing_twins(Twins(request, session.principal, services))
    context = views.billing_page(bodies["usage"], bodies["credit_grants"])
    context["grants"] = [{**g, "created": _time(g["created_at"])} for g in context["grants"]]
    return html(render("billing.html", **chrome(services, session, "billing"), **context))


@router.get("/dashboard/billing.json")
def billing_twin(request: Request, services: ServicesDep) -> Response:
    session = signed_in(request, services)
    return twin_json(billing_twins(Twins(request, session.principal, services)))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
