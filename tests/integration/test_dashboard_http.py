"""The dashboard's HTTP rules, without a browser: sign-in, the session cookie's flags, CSRF tokens on
every form, redirects to sign-in, and bad input answered with the error envelope (never a 500)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import ADMIN, ADMIN_KEY, Tenant, add_key, assert_envelope, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.services import build_services

SESSION = "meterline_session"


@contextmanager
def _web(sqlite_url: str, tmp_path: Path, clock: FrozenClock, **extra: Any) -> Iterator[TestClient]:
    settings = load_settings(
        database_url=sqlite_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        **extra,
    )
    services = build_services(settings, clock=clock, migrate=False)
    try:
        app = create_app(settings, services=services)
        with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as client:
            yield client
    finally:
        services.close()


@pytest.fixture
def web(sqlite_url: str, tmp_path: Path, clock: FrozenClock) -> Iterator[TestClient]:
    with _web(sqlite_url, tmp_path, clock) as client:
        yield client


@pytest.fixture
def acme(web: TestClient) -> Tenant:
    return make_tenant(web, name="Acme <script>alert(1)</script>")


def _csrf(web: TestClient, next_: str = "/dashboard/usage") -> str:
    page = web.get("/dashboard/sign-in", params={"next": next_})
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found
    return found.group(1)


def sign_in(web: TestClient, key: str, next_: str = "/dashboard/usage") -> Any:
    token = _csrf(web, next_)
    return web.post("/dashboard/sign-in", data={"key": key, "csrf": token, "next": next_})


def _set_cookie(response: Any, name: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return str(header)
    raise AssertionError(f"no Set-Cookie for {name}: {response.headers}")


# -- signed out -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/dashboard/usage?range=24h", "/dashboard/billing", "/widget/usage-bar"])
def test_pages_send_a_signed_out_browser_to_sign_in(web: TestClient, path: str) -> None:
    response = web.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/dashboard/sign-in?next=/")
    assert web.get("/dashboard").headers["location"] == "/dashboard/usage"


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/usage.json",
        "/dashboard/billing.json",
        "/dashboard/usage/rows?by=user",
        "/dashboard/export.csv",
        "/widget/usage-bar.json",
    ],
)
def test_twins_and_downloads_answer_401_envelopes_when_signed_out(web: TestClient, path: str) -> None:
    assert_envelope(web.get(path), 401, "unauthorized")


# -- signing in ---------------------------------------------------------------------------------------
def test_sign_in_sets_an_httponly_samesite_session_cookie(web: TestClient, acme: Tenant) -> None:
    form = web.get("/dashboard/sign-in")
    csrf_cookie = _set_cookie(form, "meterline_csrf").lower()
    assert "httponly" in csrf_cookie
    assert "samesite=strict" in csrf_cookie
    assert form.headers["content-security-policy"].startswith("default-src 'self'")
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]

    response = sign_in(web, acme.key, "/dashboard/billing")
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/billing"
    cookie = _set_cookie(response, SESSION)
    flags = cookie.lower()
    assert "httponly" in flags
    assert "samesite=lax" in flags
    assert "path=/" in flags
    assert "max-age=28800" in flags
    assert acme.key not in cookie, "the key itself never goes into the cookie"
    page = web.get("/dashboard/billing")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"


def test_sign_in_without_the_forms_csrf_token_is_refused(web: TestClient, acme: Tenant) -> None:
    _csrf(web)
    response = web.post("/dashboard/sign-in", data={"key": acme.key, "csrf": "forged-token-0123456789"})
    assert response.status_code == 403
    assert "expired" in response.text
    assert SESSION not in response.headers.get("set-cookie", "")
    # No CSRF cookie at all (a cross-site form has none: the cookie is SameSite=Strict).
    web.cookies.clear()
    response = web.post("/dashboard/sign-in", data={"key": acme.key, "csrf": "x" * 32})
    assert response.status_code == 403


def test_sign_in_from_another_origin_is_refused(web: TestClient, acme: Tenant) -> None:
    token = _csrf(web)
    response = web.post(
        "/dashboard/sign-in",
        data={"key": acme.key, "csrf": token},
        headers={"Origin": "https://evil.example"},
    )
    assert_envelope(response, 403, "forbidden")


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        ("ml_live_" + "0" * 48, 401, "invalid API key"),
        ("not a key", 401, "not a Meterline API key"),
        ("eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln", 401, "not an access token"),
        ("   ", 400, "Enter an API key"),
    ],
)
def test_sign_in_with_a_bad_key_shows_why(web: TestClient, key: str, status: int, message: str) -> None:
    response = sign_in(web, key)
    assert response.status_code == status
    assert message in response.text
    assert 'role="alert"' in response.text
    assert SESSION not in response.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example/dashboard", "/dashboard/../../x\\y", "javascript:alert(1)"],
)
def test_sign_in_never_redirects_off_site(web: TestClient, acme: Tenant, target: str) -> None:
    response = sign_in(web, acme.key, target)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/usage"


# -- a session ----------------------------------------------------------------------------------------
def test_sign_out_needs_the_sessions_csrf_token(web: TestClient, acme: Tenant) -> None:
    sign_in(web, acme.key)
    page = web.get("/dashboard/usage")
    assert page.status_code == 200
    token = re.search(r'action="/dashboard/sign-out".*?name="csrf" value="([^"]+)"', page.text, re.S)
    assert token
    assert_envelope(web.post("/dashboard/sign-out", data={"csrf": "forged"}), 403, "forbidden")
    assert web.get("/dashboard/usage").status_code == 200, "a forged sign-out changes nothing"

    response = web.post("/dashboard/sign-out", data={"csrf": token.group(1)})
    assert response.status_code == 303
    assert 'meterline_session=""' in _set_cookie(response, SESSION)
    web.cookies.delete(SESSION)
    assert web.get("/dashboard/usage").status_code == 303


def test_a_tampered_or_foreign_cookie_is_no_session(web: TestClient, acme: Tenant) -> None:
    sign_in(web, acme.key)
    good = web.cookies[SESSION]
    head, payload, signature = good.split(".")
    for forged in (
        f"{head}.{payload}.{signature[::-1]}",
        "garbage",
        "x" * 5000,
        # An identifier access token, signed by the same key set but of another type.
        web.post(
            "/v1/token", json={"identifier_id": "u1"}, headers={"Authorization": f"Bearer {acme.key}"}
        ).json()["access_token"],
    ):
        web.cookies.clear()
        web.cookies.set(SESSION, forged)
        assert web.get("/dashboard/usage").status_code == 303
        assert_envelope(web.get("/dashboard/usage.json"), 401, "unauthorized")


def test_revoking_the_key_ends_its_sessions(web: TestClient, acme: Tenant) -> None:
    sign_in(web, acme.key)
    assert web.get("/dashboard/usage.json").status_code == 200
    assert web.delete(f"/v1/admin/keys/{acme.key_info['id']}", headers=ADMIN).status_code == 200
    assert web.get("/dashboard/usage").status_code == 303
    assert_envelope(web.get("/widget/usage-bar.json"), 401, "unauthorized")


def test_a_session_takes_no_workspace_header(web: TestClient, acme: Tenant) -> None:
    sign_in(web, acme.key)
    response = web.get("/dashboard/usage.json", headers={"X-Workspace-Id": "ws_other"})
    assert_envelope(response, 403, "forbidden")


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/usage?range=1y",
        "/dashboard/usage.json?range=%00",
        "/dashboard/usage/rows?by=model",
        "/dashboard/usage/rows?by=user&offset=-1",
        "/dashboard/usage/rows?by=user&offset=abc",
        "/dashboard/usage/rows",
        "/widget/usage-bar?poll_ms=5",
        f"/dashboard/sign-in?next={'x' * 600}",
    ],
)
def test_bad_input_is_an_envelope_never_a_500(web: TestClient, acme: Tenant, path: str) -> None:
    sign_in(web, acme.key)
    # A NUL is refused at the edge (400) before the parameter's own check (422).
    assert_envelope(web.get(path), 400 if "%00" in path else 422, "invalid_request")


def test_pages_are_escaped_and_load_nothing_from_elsewhere(web: TestClient, acme: Tenant) -> None:
    sign_in(web, acme.key)
    for path in ("/dashboard/usage", "/dashboard/billing", "/widget/usage-bar"):
        page = web.get(path)
        assert page.status_code == 200, page.text
        assert "<script>alert(1)</script>" not in page.text
        assert re.search(r"(src|href)=\"(https?:)?//", page.text) is None, "nothing from the network"
    assert "Acme &lt;script&gt;" in web.get("/dashboard/usage").text
    widget = web.get("/widget/usage-bar")
    assert "frame-ancestors 'self'" in widget.headers["content-security-policy"]
    for asset in ("dashboard.css", "dashboard.js", "usage-bar.js"):
        response = web.get(f"/dashboard/static/{asset}")
        assert response.status_code == 200
        assert "http://" not in response.text
        assert "https://" not in response.text
    assert web.get("/dashboard/static/favicon.svg").status_code == 200


def test_the_json_twins_are_the_apis_bodies(web: TestClient, acme: Tenant) -> None:
    web.post(
        "/v1/events",
        json={
            "events": [
                {
                    "id": "e1",
                    "model": "gpt-4o-mini",
                    "prompt_tokens": 1000,
                    "completion_tokens": 50,
                    "source": "cli",
                    "user_id": "ann",
                },
            ]
        },
        headers={"Authorization": f"Bearer {acme.key}"},
    )
    sign_in(web, acme.key)
    twin = web.get("/dashboard/usage.json", params={"range": "24h"}).json()
    bearer = {"Authorization": f"Bearer {acme.key}"}

    def without_request_id(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != "request_id"}

    usage = web.get("/v1/usage", headers=bearer).json()
    assert without_request_id(twin["usage"]) == without_request_id(usage)
    series = web.get("/v1/usage/timeseries", params={"range": "24h"}, headers=bearer).json()
    assert without_request_id(twin["timeseries"]) == without_request_id(series)
    users = web.get("/v1/usage/breakdown", params={"by": "user", "limit": 5}, headers=bearer).json()
    assert without_request_id(twin["tables"]["user"]) == without_request_id(users)
    assert twin["tables"]["user"]["data"][0]["name"] == "ann"
    bar = web.get("/widget/usage-bar.json").json()
    assert Decimal(bar["used"]) == Decimal(str(twin["usage"]["credits"]["used"])) > 0
    billing = web.get("/dashboard/billing.json").json()
    assert billing["usage"]["plan"] == "pro"
    assert billing["credit_grants"] == []


def test_the_usage_bar_of_an_unlimited_plan_has_no_percentage_and_no_buttons(web: TestClient) -> None:
    tenant = make_tenant(web, plan="enterprise", name="Initrode")
    sign_in(web, tenant.key, "/widget/usage-bar")
    bar = web.get("/widget/usage-bar.json").json()
    shown = (bar["total"], bar["used_pct"], bar["show_upgrade"], bar["show_referral"])
    assert shown == (None, None, False, False)
    assert bar["label"] == "0.00 credits used · unlimited"
    page = web.get("/widget/usage-bar").text
    assert re.search(r'role="progressbar"[^>]*hidden', page, re.S)
    assert re.search(r'data-field="upgrade"[^>]*hidden', page)


# -- Billing: alert settings and where the buttons lead (seed 001, "set up alerts in your dashboard") --
FORMS = (
    ("/dashboard/billing/thresholds", {"thresholds": "30, 90"}),
    ("/dashboard/billing/spend-cap", {"spend_cap": "9"}),
    ("/dashboard/billing/webhooks", {"url": "https://93.184.216.34/h"}),
)


def _page_csrf(web: TestClient, path: str = "/dashboard/billing") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', web.get(path).text)
    assert found
    return found.group(1)


def _organization(web: TestClient, key: str) -> dict[str, Any]:
    response = web.get("/v1/organization", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def capped(web: TestClient) -> tuple[Tenant, str]:
    """A spend-cap organization and its organization-scope key."""
    tenant = make_tenant(web, name="Umbrella", spend_cap="250")
    return tenant, add_key(web, tenant.workspace["id"], "Org key", scope="organization")


def test_the_billing_forms_need_the_sessions_csrf_token(web: TestClient, capped: tuple[Tenant, str]) -> None:
    tenant, org_key = capped
    for path, data in FORMS:
        # Signed out: to sign-in, nothing changed.
        response = web.post(path, data={**data, "csrf": "x" * 32})
        assert (response.status_code, response.headers["location"]) == (
            303,
            "/dashboard/sign-in?next=/dashboard/billing",
        )
    sign_in(web, org_key, "/dashboard/billing")
    token = _page_csrf(web)
    for path, data in FORMS:
        for forged in ({}, {"csrf": "forged-token-0123456789"}):
            response = web.post(path, data={**data, **forged})
            assert response.status_code == 403
            assert "This form has expired" in response.text
        assert_envelope(
            web.post(path, data={**data, "csrf": token}, headers={"Origin": "https://evil.example"}),
            403,
            "forbidden",
        )
    assert _organization(web, org_key)["alert_thresholds"] is None
    assert _organization(web, org_key)["spend_cap"] == "250"
    assert web.get("/v1/alerts/webhooks", headers=tenant.headers).json()["data"] == []


def test_an_organization_key_sets_up_alerts_on_the_billing_page(
    web: TestClient, capped: tuple[Tenant, str]
) -> None:
    tenant, org_key = capped
    sign_in(web, org_key, "/dashboard/billing")
    page = web.get("/dashboard/billing")
    assert page.status_code == 200
    assert "50 %, 75 %, 80 %, 100 %" in page.text
    token = _page_csrf(web)

    saved = web.post("/dashboard/billing/thresholds", data={"csrf": token, "thresholds": "90, 30 %"})
    assert (saved.status_code, saved.headers["location"]) == (
        303,
        "/dashboard/billing?saved=thresholds#alerts",
    )
    assert "Alert thresholds saved." in web.get(saved.headers["location"]).text
    # The JSON API says what the form did: it went through the same route.
    assert _organization(web, org_key)["alert_thresholds"] == [30, 90]
    for typed, message in (
        ("50, abc", "“abc” is not a whole percentage"),
        ("0, 50", "Enter 1 to 20 whole percentages between 1 and 1000"),
        ("", "Enter 1 to 20 whole percentages"),
    ):
        refused = web.post("/dashboard/billing/thresholds", data={"csrf": token, "thresholds": typed})
        assert refused.status_code == 400, typed
        assert message in refused.text
        assert f'value="{typed}"' in refused.text, "what was typed stays in the field"
    assert _organization(web, org_key)["alert_thresholds"] == [30, 90]
    reset = web.post("/dashboard/billing/thresholds", data={"csrf": token, "reset": "1"})
    assert reset.status_code == 303
    assert _organization(web, org_key)["alert_thresholds"] is None

    capped_at = web.post("/dashboard/billing/spend-cap", data={"csrf": token, "spend_cap": "1,000.50"})
    assert capped_at.status_code == 303
    assert _organization(web, org_key)["spend_cap"] == "1000.5"
    for typed, status, message in (
        ("-5", 400, "spend_cap must be between 0 and 1000000000"),
        ("1e400", 400, "spend_cap must be between 0 and 1000000000"),
        ("lots", 422, "amount must be a decimal number"),
        ("250,50", 400, "with a decimal point"),  # a decimal comma is not read as 25050
    ):
        refused = web.post("/dashboard/billing/spend-cap", data={"csrf": token, "spend_cap": typed})
        assert refused.status_code == status, (typed, refused.text)
        assert message in refused.text
    assert _organization(web, org_key)["spend_cap"] == "1000.5"

    created = web.post(
        "/dashboard/billing/webhooks",
        data={"csrf": token, "url": "https://93.184.216.34/h", "description": "ops"},
    )
    assert created.status_code == 201
    secret = re.search(r'data-testid="webhook-secret">(whsec_[^<]+)<', created.text)
    assert secret, "the signing secret is shown once, on the page that added the endpoint"
    (endpoint,) = web.get("/v1/alerts/webhooks", headers=tenant.headers).json()["data"]
    assert (endpoint["url"], endpoint["description"]) == ("https://93.184.216.34/h", "ops")
    assert secret.group(1) not in web.get("/dashboard/billing").text, "and never again"
    private = web.post("/dashboard/billing/webhooks", data={"csrf": token, "url": "http://127.0.0.1:9/hook"})
    assert private.status_code == 400
    assert "127.0.0.1" in private.text
    assert 'aria-invalid="true"' in private.text

    deleted = web.post(f"/dashboard/billing/webhooks/{endpoint['id']}/delete", data={"csrf": token})
    assert (deleted.status_code, deleted.headers["location"]) == (
        303,
        "/dashboard/billing?saved=webhook_deleted#alerts",
    )
    assert web.get("/v1/alerts/webhooks", headers=tenant.headers).json()["data"] == []
    again = web.post(f"/dashboard/billing/webhooks/{endpoint['id']}/delete", data={"csrf": token})
    assert again.status_code == 404
    assert "no webhook endpoint" in again.text


def test_a_workspace_key_sees_the_alert_settings_read_only(
    web: TestClient, capped: tuple[Tenant, str]
) -> None:
    tenant, org_key = capped
    assert (
        web.post(
            "/v1/alerts/webhooks",
            json={"url": "https://93.184.216.34/h"},
            headers={"Authorization": f"Bearer {org_key}"},
        ).status_code
        == 201
    )
    sign_in(web, tenant.key, "/dashboard/billing")
    page = web.get("/dashboard/billing")
    assert page.status_code == 200
    assert "https://93.184.216.34/h" in page.text
    assert "changed when signed in with an organization key" in page.text
    assert re.search(r'action="/dashboard/billing/', page.text) is None, "no form for a workspace key"
    token = _page_csrf(web)
    for path, data in FORMS:
        refused = web.post(path, data={**data, "csrf": token})
        assert refused.status_code == 403
        assert "organization-scope key" in refused.text
    assert _organization(web, tenant.key)["alert_thresholds"] is None
    assert len(web.get("/v1/alerts/webhooks", headers=tenant.headers).json()["data"]) == 1


def test_a_credits_organization_has_no_spend_cap_form(web: TestClient, acme: Tenant) -> None:
    org_key = add_key(web, acme.workspace["id"], "Org key", scope="organization")
    sign_in(web, org_key, "/dashboard/billing")
    page = web.get("/dashboard/billing").text
    assert 'action="/dashboard/billing/thresholds"' in page
    assert 'action="/dashboard/billing/spend-cap"' not in page
    refused = web.post("/dashboard/billing/spend-cap", data={"csrf": _page_csrf(web), "spend_cap": "10"})
    assert refused.status_code == 403
    assert "has no spend cap" in refused.text


def _hrefs(text: str, field: str) -> str:
    found = re.search(rf'data-field="{field}" href="([^"]+)"', text)
    assert found, field
    return found.group(1)


def test_upgrade_and_referral_buttons_land_on_the_billing_pages_sections(web: TestClient) -> None:
    tenant = make_tenant(web, plan="free", name="Aviato")
    sign_in(web, tenant.key, "/widget/usage-bar")
    bar = web.get("/widget/usage-bar").text
    assert _hrefs(bar, "upgrade") == "/dashboard/billing#plan"
    assert _hrefs(bar, "referral") == "/dashboard/billing#referral"
    billing = web.get("/dashboard/billing").text
    # The sections exist and say something: the plan with its limits, and how bonus credits are earned.
    assert re.search(
        r'<section class="card" id="plan"[^>]*>\s*<div class="section-head">\s*<h2[^>]*>Plan and limits',
        billing,
    )
    assert 'data-testid="limits"' in billing
    assert re.search(
        r'id="referral"[^>]*>\s*<div class="section-head">\s*<h2[^>]*>Bonus credits and referrals', billing
    )
    assert "granted by the operator of this Meterline deployment" in billing


def test_upgrade_and_referral_buttons_follow_the_operators_urls(
    sqlite_url: str, tmp_path: Path, clock: FrozenClock
) -> None:
    upgrade, referral = "https://billing.example.com/plans?from=meterline&x=1", "/pages/referrals"
    prices = {"flat": {"per_request": "1.50"}}  # 150 credits a request
    with _web(sqlite_url, tmp_path, clock, upgrade_url=upgrade, referral_url=referral, prices=prices) as web:
        tenant = make_tenant(web, plan="free", name="Aviato")
        sign_in(web, tenant.key, "/widget/usage-bar")
        bar = web.get("/widget/usage-bar").text
        assert _hrefs(bar, "upgrade") == upgrade.replace("&", "&amp;")
        assert _hrefs(bar, "referral") == referral
        billing = web.get("/dashboard/billing").text
        assert f'href="{upgrade.replace("&", "&amp;")}" rel="noopener">Upgrade plan</a>' in billing
        assert f'href="{referral}" rel="noopener">Invite a friend, earn credits</a>' in billing
        # 150 of 500 credits on the first day: the run-out banner's button goes there too.
        reported = web.post(
            "/v1/events",
            json={"events": [{"id": "e1", "model": "flat", "prompt_tokens": 1}]},
            headers=tenant.headers,
        )
        assert reported.status_code == 200, reported.text
        usage = web.get("/dashboard/usage").text
        assert 'data-testid="run-out-banner"' in usage
        assert (
            f'href="{upgrade.replace("&", "&amp;")}" class="button primary small">Upgrade plan</a>' in usage
        )
