"""The dashboard (SPEC §6): sign-in, Settings → Usage, Settings → Billing (with the forms that set up
alerts), the CSV download and the "Show More" rows. HTML pages signed in with a session cookie
(``api.session``); each page has a JSON twin (``/dashboard/usage.json``, ``/dashboard/billing.json``)
holding the bodies it was drawn from, and each form changes settings through the JSON API's own route
function.

Not part of the OpenAPI document: these routes speak HTML and cookies, not the bearer-key API.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote

import anyio.from_thread
import orjson
from fastapi import APIRouter, Form, Path, Query, Request
from pydantic import ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from meterline.api import session as sessions
from meterline.api.auth import ServicesDep
from meterline.api.dashboard_pages import Twins, billing_twins, body_of, usage_context, usage_twins
from meterline.api.errors import STATUS, first_problem
from meterline.api.routes import alerts as alerts_api
from meterline.api.routes import organization as organization_api
from meterline.api.routes.alerts import WebhookIn
from meterline.api.schemas import OrganizationSettingsIn
from meterline.dashboard import views
from meterline.dashboard.templating import render
from meterline.errors import Forbidden, InvalidRequest, MeterlineError, Unauthorized
from meterline.metering.analytics import RangeName
from meterline.services import Services
from meterline.tenancy import Principal

# A number with commas as thousands separators: 1,250 or 12,500.75.
_GROUPED = re.compile(r"\d{1,3}(,\d{3})+(\.\d+)?")

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
        "links": views.links(services.settings.upgrade_url, services.settings.referral_url),
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
BILLING = "/dashboard/billing"
# What a form's success says, by the ``saved`` parameter of the page it redirects to.
SAVED = {
    "thresholds": "Alert thresholds saved.",
    "spend_cap": "Spend cap saved.",
    "webhook_deleted": "Webhook endpoint deleted.",
}


@dataclass(frozen=True, slots=True)
class FormProblem:
    """What went wrong with one of the Billing page's forms, shown beside it with what was typed."""

    form: str
    message: str
    values: dict[str, str]


def _billing(
    request: Request,
    services: Services,
    session: sessions.Session,
    *,
    status: int = 200,
    saved: str | None = None,
    problem: FormProblem | None = None,
    created: dict[str, Any] | None = None,
) -> HTMLResponse:
    bodies = billing_twins(Twins(request, session.principal, services))
    context = views.billing_page(bodies["usage"], bodies["credit_grants"])
    context["grants"] = [{**g, "created": _time(g["created_at"])} for g in context["grants"]]
    page = render(
        "billing.html",
        **chrome(services, session, "billing"),
        **context,
        alerts=views.alert_settings(bodies["organization"], bodies["webhooks"]),
        can_edit=session.principal.scope == "organization",
        saved=SAVED.get(saved or ""),
        problem=problem,
        created=created,
    )
    return html(page, status=status)


@router.get(BILLING)
def billing_page(
    request: Request,
    services: ServicesDep,
    saved: Annotated[str | None, Query(max_length=32, description="The form just saved.")] = None,
) -> Response:
    session = sessions.read_session(request, services)
    if session is None:
        return to_sign_in(request)
    return _billing(request, services, session, saved=saved)


def _billing_form(
    request: Request,
    services: Services,
    csrf: str,
    form: str,
    values: dict[str, str],
    change: Callable[[Principal], dict[str, Any] | None],
    *,
    saved: str,
) -> Response:
    """A Billing page form's POST (``form``, with what was typed in ``values``): the session's CSRF
    token, then ``change``, which calls the JSON API's route function. Success redirects to the page
    (or, for a new webhook, shows its secret once); a refusal shows the page again with the API's
    message beside the form and what was typed, with the API's status."""
    sessions.check_origin(request)
    session = sessions.read_session(request, services)
    if session is None:
        return RedirectResponse(f"{SIGN_IN}?next={BILLING}", status_code=303)

    def again(status: int, message: str) -> HTMLResponse:
        problem = FormProblem(form, message, values)
        return _billing(request, services, session, status=status, problem=problem)

    if not csrf or not sessions.same_token(csrf, session.csrf):
        return again(403, "This form has expired. Please try again.")
    try:
        created = change(session.principal)
    except ValidationError as exc:
        return again(422, first_problem(exc.errors())[0])
    except MeterlineError as exc:
        return again(STATUS.get(exc.code, 400), exc.message)
    if created is not None:
        return _billing(request, services, session, status=201, created=created)
    return RedirectResponse(f"{BILLING}?saved={saved}#alerts", status_code=303)


CsrfField = Annotated[str, Form(max_length=128)]


@router.post(f"{BILLING}/thresholds")
def save_thresholds(
    request: Request,
    services: ServicesDep,
    csrf: CsrfField = "",
    thresholds: Annotated[str, Form(max_length=400)] = "",
    reset: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """The alert thresholds (``PATCH /v1/organization``), or back to the deployment's defaults."""

    def change(principal: Principal) -> None:
        if reset:
            body = OrganizationSettingsIn(alert_thresholds=None)
        else:
            try:
                typed = views.parse_thresholds(thresholds)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="alert_thresholds") from None
            try:
                body = OrganizationSettingsIn.model_validate({"alert_thresholds": typed})
            except ValidationError:
                # The schema's message names list positions; a person typed one line.
                raise InvalidRequest(f"Enter {views.THRESHOLDS_HELP}.", param="alert_thresholds") from None
        organization_api.update_organization(body, principal, services)

    values = {"thresholds": thresholds}
    return _billing_form(request, services, csrf, "thresholds", values, change, saved="thresholds")


@router.post(f"{BILLING}/spend-cap")
def save_spend_cap(
    request: Request,
    services: ServicesDep,
    csrf: CsrfField = "",
    spend_cap: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """A spend-cap organization's cap (``PATCH /v1/organization``)."""

    def change(principal: Principal) -> None:
        amount = spend_cap.strip()
        if not amount:
            raise InvalidRequest("Enter the monthly spend cap, for example 250.00.", param="spend_cap")
        if "," in amount:
            # Only as thousands separators (1,250.00); "250,50" is a decimal comma, which must not
            # silently become 25050.
            if _GROUPED.fullmatch(amount) is None:
                raise InvalidRequest(
                    "Write the spend cap with a decimal point, for example 250.50.", param="spend_cap"
                )
            amount = amount.replace(",", "")
        organization_api.update_organization(
            OrganizationSettingsIn.model_validate({"spend_cap": amount}), principal, services
        )

    values = {"spend_cap": spend_cap}
    return _billing_form(request, services, csrf, "spend_cap", values, change, saved="spend_cap")


@router.post(f"{BILLING}/webhooks")
def add_webhook(
    request: Request,
    services: ServicesDep,
    csrf: CsrfField = "",
    url: Annotated[str, Form(max_length=2000)] = "",
    description: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """A webhook endpoint (``POST /v1/alerts/webhooks``); the page shows its signing secret once."""

    def change(principal: Principal) -> dict[str, Any]:
        if not url.strip():
            raise InvalidRequest("Enter the address alerts are sent to, starting with https://.", param="url")
        body = WebhookIn.model_validate({"url": url.strip(), "description": description.strip() or None})
        # The JSON route is a coroutine (it resolves the host off the event loop); this form's handler
        # runs in a worker thread, which hands it to the loop.
        response = anyio.from_thread.run(alerts_api.create_webhook, body, principal, services)
        return body_of(response)

    values = {"url": url, "description": description}
    return _billing_form(request, services, csrf, "webhook", values, change, saved="webhook")


@router.post(f"{BILLING}/webhooks/{{endpoint_id}}/delete")
def delete_webhook(
    request: Request,
    services: ServicesDep,
    endpoint_id: Annotated[str, Path(max_length=64)],
    csrf: CsrfField = "",
) -> Response:
    """Stop sending alerts to an endpoint (``DELETE /v1/alerts/webhooks/{id}``)."""

    def change(principal: Principal) -> None:
        alerts_api.delete_webhook(endpoint_id, principal, services)

    values = {"id": endpoint_id}
    return _billing_form(request, services, csrf, "webhook_delete", values, change, saved="webhook_deleted")


@router.get("/dashboard/billing.json")
def billing_twin(request: Request, services: ServicesDep) -> Response:
    session = signed_in(request, services)
    return twin_json(billing_twins(Twins(request, session.principal, services)))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
