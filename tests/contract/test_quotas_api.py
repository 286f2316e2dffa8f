"""The quota contract, seen over HTTP: limits, 429s and their headers, credits, spend caps, overage and
two-phase reservations. Runs on every storage backend and every counter store (memory, Redis)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import ADMIN, ADMIN_KEY, Tenant, assert_envelope, make_tenant
from meterline.clock import FrozenClock
from meterline.config import Settings, load_settings
from meterline.services import Services, build_services

OPEN = {
    "daily_tokens": -1,
    "monthly_tokens": -1,
    "daily_calls": -1,
    "monthly_calls": -1,
    "rpm": -1,
    "tpm": -1,
    "monthly_credits": -1,
}


def plan(**limits: Any) -> dict[str, Any]:
    return {**OPEN, "overage": "block", **limits}


PLANS = {
    "calls5": plan(daily_calls=5),
    "rpm3": plan(rpm=3, tpm=250),
    "credits30": plan(monthly_credits=30),
    "paid": plan(daily_tokens=100, overage="overage"),
    "cases": plan(limits=[{"meter": "units:case.execute", "window": "period", "max": 3}]),
    "open": plan(),
    "tokens": plan(daily_tokens=1000, monthly_tokens=1500),
    "monthly2": plan(monthly_calls=2),
    "priced_only": plan(unpriced="block"),
    "tokens1500": plan(monthly_tokens=1500),
    # Sold by cases, unlimited: the plan names its primary meter, as no limit says what it is.
    "cases_open": plan(primary_meter="units:case.execute"),
}
# Ten credits a call (credit_value 0.01): credit arithmetic in tests is then whole numbers.
PRICES = {"flat-model": {"per_request": "0.10"}}


@pytest.fixture(params=["memory", "redis"])
def counter_store(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("redis_url_clean")
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path, counter_store: str | None) -> Settings:
    return load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        redis_url=counter_store,
        plans=PLANS,
        prices=PRICES,
    )


@pytest.fixture
def services(settings: Settings, clock: FrozenClock) -> Iterator[Services]:
    built = build_services(settings, clock=clock, migrate=False)
    yield built
    built.close()


def send(client: TestClient, tenant: Tenant, **fields: Any) -> Any:
    event = {"id": str(uuid.uuid4()), "model": "flat-model", **fields}
    return client.post("/v1/events", json={"events": [event]}, headers=tenant.headers)


def usage(client: TestClient, tenant: Tenant, **params: str) -> dict[str, Any]:
    response = client.get("/v1/usage", headers=tenant.headers, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def limit_named(body: dict[str, Any], name: str) -> dict[str, Any]:
    found = [limit for limit in body["limits"] if limit["name"] == name]
    assert found, [limit["name"] for limit in body["limits"]]
    return found[0]


def test_daily_calls_block_at_the_limit_with_429_retry_after_and_headers(client: TestClient) -> None:
    tenant = make_tenant(client, plan="calls5")
    for _ in range(5):
        ok = send(client, tenant)
        assert ok.status_code == 200, ok.text
        assert {"x-ratelimit-limit-rpm", "x-ratelimit-remaining-tpm", "x-ratelimit-reset-rpm"} <= set(
            ok.headers
        )
    refused = send(client, tenant)
    error = assert_envelope(refused, 429, "quota_exceeded")
    # 10:30 UTC: the daily window ends at midnight, 13.5 hours later.
    assert refused.headers["retry-after"] == str(13 * 3600 + 1800)
    assert error["limit"]["name"] == "daily_calls"
    assert error["limit"]["window"] == "day"
    assert "daily_calls" in error["message"]
    assert refused.headers["x-ratelimit-limit-rpm"] == "-1"
    # Nothing of the refused event was written.
    body = usage(client, tenant)
    assert body["daily"]["calls"]["usage"] == 5
    assert limit_named(body, "daily_calls") | {"resets_at": None} == {
        "name": "daily_calls",
        "meter": "calls",
        "window": "day",
        "scope": "organization",
        "policy": "block",
        "max": 5,
        "used": 5,
        "remaining": 0,
        "resets_at": None,
    }


def test_the_daily_window_opens_again_at_utc_midnight(client: TestClient, clock: FrozenClock) -> None:
    tenant = make_tenant(client, plan="calls5")
    clock.set(clock.now().replace(hour=23, minute=59, second=59))
    for _ in range(5):
        assert send(client, tenant).status_code == 200
    assert send(client, tenant).status_code == 429
    clock.advance(seconds=1)  # 00:00:00 UTC
    assert send(client, tenant).status_code == 200
    assert usage(client, tenant)["daily"]["calls"]["usage"] == 1


def test_resending_an_accepted_event_gets_its_answer_even_when_the_limit_is_full(client: TestClient) -> None:
    tenant = make_tenant(client, plan="calls5")
    first = {"id": "evt-keep", "model": "flat-model"}
    assert client.post("/v1/events", json={"events": [first]}, headers=tenant.headers).status_code == 200
    for _ in range(4):
        send(client, tenant)
    again = client.post("/v1/events", json={"events": [first]}, headers=tenant.headers)
    assert again.status_code == 200, again.text
    assert again.json()["data"][0]["duplicate"] is True


def test_a_batch_keeps_what_fits_and_refuses_the_rest_per_event(client: TestClient) -> None:
    tenant = make_tenant(client, plan="calls5")
    events = [{"id": f"b-{i}", "model": "flat-model"} for i in range(8)]
    response = client.post("/v1/events", json={"events": events}, headers=tenant.headers)
    assert response.status_code == 200
    body = response.json()
    assert [r["status"] for r in body["data"]] == ["accepted"] * 5 + ["rejected"] * 3
    assert {r["error"]["code"] for r in body["data"][5:]} == {"quota_exceeded"}
    assert body["accepted"] == 5
    assert usage(client, tenant)["daily"]["calls"]["usage"] == 5


def test_rpm_and_tpm_are_rolling_minutes(client: TestClient, clock: FrozenClock) -> None:
    tenant = make_tenant(client, plan="rpm3")
    for _ in range(3):
        assert send(client, tenant, prompt_tokens=10).status_code == 200
        clock.advance(seconds=10)
    refused = send(client, tenant, prompt_tokens=10)
    assert_envelope(refused, 429, "rate_limit_exceeded")
    # The first call was at :00 and leaves the window at :60; it is now :30.
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["x-ratelimit-limit-rpm"] == "3"
    assert refused.headers["x-ratelimit-remaining-rpm"] == "0"
    reset = int(refused.headers["x-ratelimit-reset-rpm"])
    assert reset == int(clock.now().timestamp()) + 30
    clock.advance(seconds=30)
    ok = send(client, tenant, prompt_tokens=10)
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-remaining-rpm"] == "0"  # calls at :10, :20 and now
    assert ok.headers["x-ratelimit-limit-tpm"] == "250"
    assert ok.headers["x-ratelimit-remaining-tpm"] == "220"
    clock.advance(seconds=61)
    # A request bigger than the TPM limit can never pass: said so, not "wait".
    too_big = send(client, tenant, prompt_tokens=300)
    error = assert_envelope(too_big, 429, "rate_limit_exceeded")
    assert "more than" in error["message"]


def test_credits_monthly_first_then_bonus_then_exhausted(client: TestClient, clock: FrozenClock) -> None:
    tenant = make_tenant(client, plan="credits30")  # 30 monthly credits; 10 credits a call
    for _ in range(3):
        assert send(client, tenant).status_code == 200
    refused = send(client, tenant)
    error = assert_envelope(refused, 429, "credits_exhausted")
    assert error["limit"]["meter"] == "credits"
    grant = client.post(
        "/v1/admin/credits",
        json={"organization_id": tenant.org["id"], "amount": "15", "reason": "referral"},
        headers=ADMIN,
    )
    assert grant.status_code == 201, grant.text
    assert send(client, tenant).status_code == 200  # drawn from bonus
    credits = usage(client, tenant)["credits"]
    assert credits["monthly"] == {"allowance": 30, "used": 30, "remaining": 0}
    assert credits["bonus"]["granted"] == 15
    assert credits["bonus"]["used"] == 10
    assert credits["bonus"]["remaining"] == 5
    assert credits["remaining"] == 5
    assert_envelope(send(client, tenant), 429, "credits_exhausted")
    # The ledger says where each row's credits came from.
    rows = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"]
    assert [(r["credits_monthly"], r["credits_bonus"]) for r in rows] == [("0", "10")] + [("10", "0")] * 3
    # Next billing period: the monthly bucket is full again, bonus stays what is left of it.
    clock.advance(days=32)  # the period anchored on the 14th turned on April 14
    assert send(client, tenant).status_code == 200
    credits = usage(client, tenant)["credits"]
    assert credits["monthly"]["used"] == 10
    assert credits["bonus"]["remaining"] == 5


def test_spend_cap_blocks_byom_organizations(client: TestClient) -> None:
    tenant = make_tenant(client, plan="open", spend_cap="0.25")
    assert send(client, tenant).status_code == 200
    assert send(client, tenant).status_code == 200
    refused = send(client, tenant)  # 0.20 spent; 0.10 more would pass the 0.25 cap
    error = assert_envelope(refused, 429, "spend_cap_reached")
    assert error["limit"]["meter"] == "spend"
    spend = usage(client, tenant)["spend"]
    assert spend == {"amount": 0.2, "in_flight": 0, "cap": 0.25, "remaining": 0.05, "currency": "USD"}
    assert limit_named(usage(client, tenant), "spend_cap")["remaining"] == 0.05


def test_a_key_spend_cap_in_money_blocks_that_key_only(client: TestClient) -> None:
    tenant = make_tenant(client, plan="open")
    created = client.post(
        "/v1/admin/keys",
        json={"workspace_id": tenant.workspace["id"], "name": "Capped", "limits": {"spend_cap": "0.25"}},
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    assert created.json()["limits"] == {"spend_cap": "0.25"}
    capped = Tenant(tenant.org, tenant.workspace, created.json()["key"], created.json())
    assert send(client, capped).status_code == 200
    assert send(client, capped).status_code == 200
    error = assert_envelope(send(client, capped), 429, "spend_cap_reached")  # 0.20 + 0.10 > 0.25
    assert error["limit"]["meter"] == "spend"
    assert error["limit"]["scope"] == "key"
    assert send(client, tenant).status_code == 200  # the workspace's other key is not held by it
    assert limit_named(usage(client, capped), "key.spend_cap")["remaining"] == 0.05


def test_a_used_up_credits_or_spend_meter_refuses_unpriced_models_too(client: TestClient) -> None:
    # A model missing from the price book costs 0: it used to pass a wall that was already reached
    # (four in a row went through under a reached spend cap). A used-up money meter refuses everything.
    credits = make_tenant(client, plan="credits30")  # 30 monthly credits; 10 credits a call
    for _ in range(3):
        assert send(client, credits).status_code == 200
    for _ in range(2):
        assert_envelope(send(client, credits, model="no-such-model"), 429, "credits_exhausted")
    capped = make_tenant(client, plan="open", spend_cap="0.20")
    assert send(client, capped).status_code == 200
    assert send(client, capped, model="no-such-model").status_code == 200  # 0.10 of 0.20 left: passes
    assert send(client, capped).status_code == 200  # the cap is reached exactly
    for _ in range(4):
        assert_envelope(send(client, capped, model="no-such-model"), 429, "spend_cap_reached")
    rows = client.get("/v1/usage/ledger", headers=capped.headers).json()["data"]
    assert [r["priced"] for r in rows] == [True, False, True]


def test_a_plan_that_refuses_unpriced_models_says_so_and_records_nothing_of_them(client: TestClient) -> None:
    tenant = make_tenant(client, plan="priced_only")
    mixed = client.post(
        "/v1/events",
        json={"events": [{"id": "a", "model": "flat-model"}, {"id": "b", "model": "no-such-model"}]},
        headers=tenant.headers,
    )
    assert mixed.status_code == 200, mixed.text
    accepted, rejected = mixed.json()["data"]
    assert accepted["status"] == "accepted"
    assert (rejected["status"], rejected["error"]["code"]) == ("rejected", "forbidden")
    assert rejected["error"]["param"] == "events[1].model"
    assert "'no-such-model' has no price" in rejected["error"]["message"]
    only = send(client, tenant, model="no-such-model")
    assert_envelope(only, 403, "forbidden")
    held = client.post("/v1/reservations", json={"model": "no-such-model"}, headers=tenant.headers)
    assert assert_envelope(held, 403, "forbidden")["param"] == "model"
    # Nor can a reservation made without a model be settled as one without a price.
    plain = client.post("/v1/reservations", json={"prompt_tokens": 5}, headers=tenant.headers).json()
    renamed = client.post(
        f"/v1/reservations/{plain['id']}/settle", json={"model": "no-such-model"}, headers=tenant.headers
    )
    assert assert_envelope(renamed, 403, "forbidden")["param"] == "model"
    rows = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"]
    assert [r["model"] for r in rows] == ["flat-model"]
    # The default ("record") keeps them, at cost 0.
    recorded = make_tenant(client, plan="open", name="Recorder")
    assert send(client, recorded, model="no-such-model").status_code == 200


def test_overage_plans_keep_working_and_mark_rows(client: TestClient) -> None:
    tenant = make_tenant(client, plan="paid")  # 100 daily tokens, overage allowed
    assert send(client, tenant, prompt_tokens=80).status_code == 200
    over = send(client, tenant, prompt_tokens=80)
    assert over.status_code == 200, over.text
    rows = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"]
    assert [r["overage"] for r in rows] == [True, False]  # newest first
    assert limit_named(usage(client, tenant), "daily_tokens")["used"] == 160


def test_custom_event_meter_returns_quota_exceeded(client: TestClient) -> None:
    tenant = make_tenant(client, plan="cases")
    for _ in range(3):
        assert send(client, tenant, event="case.execute", model=None).status_code == 200
    assert send(client, tenant, event="other.thing", model=None).status_code == 200
    refused = send(client, tenant, event="case.execute", model=None)
    error = assert_envelope(refused, 429, "quota_exceeded")
    assert error["limit"]["meter"] == "units:case.execute"
    assert limit_named(usage(client, tenant), "period_units:case.execute")["remaining"] == 0


def headline(body: dict[str, Any]) -> tuple[Any, ...]:
    """``GET /v1/usage``'s top level (seed 003) and the limit it says it is measured against."""
    by = body.get("limited_by")
    named = None if by is None else (by["scope"], by["name"])
    return body["meter"], body["usage"], body["limit"], body["remaining"], named


def test_a_plan_sold_by_cases_reports_cases_at_the_top_level(client: TestClient) -> None:
    # Issue 17 item 9 (seed 003): a plan whose only limit is on cases reports cases, not tokens.
    tenant = make_tenant(client, plan="cases")
    assert send(client, tenant, prompt_tokens=10).status_code == 200
    assert headline(usage(client, tenant)) == (
        "units:case.execute",
        0,
        3,
        3,
        ("organization", "period_units:case.execute"),
    )
    for _ in range(3):
        assert send(client, tenant, event="case.execute", model=None).status_code == 200
    assert send(client, tenant, event="other.thing", model=None, units=5).status_code == 200
    body = usage(client, tenant)
    assert headline(body) == ("units:case.execute", 3, 3, 0, ("organization", "period_units:case.execute"))
    assert body["plan"] == "cases"


def test_a_plan_names_its_primary_meter_even_when_unlimited(client: TestClient) -> None:
    tenant = make_tenant(client, plan="cases_open")
    for units in (2, 2):
        assert send(client, tenant, event="case.execute", model=None, units=units).status_code == 200
    assert send(client, tenant, event="other.thing", model=None, units=5).status_code == 200
    assert send(client, tenant, prompt_tokens=10).status_code == 200
    # Only case.execute counts; nothing caps it, so the limit is -1 (seed 003) and no limit is named.
    assert headline(usage(client, tenant)) == ("units:case.execute", 4, -1, -1, None)


def test_the_top_level_is_the_limit_that_runs_out_first(client: TestClient) -> None:
    # Issue 17 item 8: the least remaining wins, whichever scope it is on.
    tenant = make_tenant(client, plan="tokens1500")
    issued = client.post(
        "/v1/token",
        json={"identifier_id": "user-a", "limits": {"monthly_tokens": 1000}},
        headers=tenant.headers,
    )
    assert issued.status_code == 200, issued.text
    user = Tenant(tenant.org, tenant.workspace, issued.json()["access_token"], {})
    assert send(client, user, prompt_tokens=100).status_code == 200
    # The identifier's own limit leaves it less than its organization's (900 < 1400).
    assert headline(usage(client, user)) == (
        "tokens",
        100,
        1000,
        900,
        ("identifier", "identifier.monthly_tokens"),
    )
    assert send(client, tenant, prompt_tokens=1200).status_code == 200
    # Now the organization's leaves less (200 < 900): that is what the end user can still use.
    assert headline(usage(client, user)) == ("tokens", 1300, 1500, 200, ("organization", "monthly_tokens"))
    limited = client.post(
        "/v1/admin/keys",
        json={"workspace_id": tenant.workspace["id"], "name": "tight", "limits": {"monthly_tokens": 150}},
        headers=ADMIN,
    ).json()["key"]
    tight = Tenant(tenant.org, tenant.workspace, limited, {})
    assert send(client, tight, prompt_tokens=100).status_code == 200
    assert headline(usage(client, tight)) == ("tokens", 100, 150, 50, ("key", "key.monthly_tokens"))
    assert headline(usage(client, tenant)) == ("tokens", 1400, 1500, 100, ("organization", "monthly_tokens"))


def test_key_limits_apply_to_that_key_only(client: TestClient) -> None:
    tenant = make_tenant(client, plan="open")
    limited = client.post(
        "/v1/admin/keys",
        json={"workspace_id": tenant.workspace["id"], "name": "tight", "limits": {"daily_calls": 2}},
        headers=ADMIN,
    ).json()["key"]
    tight = Tenant(tenant.org, tenant.workspace, limited, {})
    assert send(client, tight).status_code == 200
    assert send(client, tight).status_code == 200
    error = assert_envelope(send(client, tight), 429, "quota_exceeded")
    assert error["limit"]["scope"] == "key"
    assert send(client, tenant).status_code == 200


def test_identifier_limits_from_tokens_are_enforced(client: TestClient) -> None:
    tenant = make_tenant(client, plan="open")
    issued = client.post(
        "/v1/token",
        json={"identifier_id": "user-123", "limits": {"daily_tokens": 100}},
        headers={**tenant.headers, "X-Workspace-Id": tenant.workspace["id"]},
    )
    assert issued.status_code == 200, issued.text
    user = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    first = {"id": "u1", "model": "flat-model", "prompt_tokens": 90}
    assert client.post("/v1/events", json={"events": [first]}, headers=user).status_code == 200
    second = {"id": "u2", "model": "flat-model", "prompt_tokens": 20}
    refused = client.post("/v1/events", json={"events": [second]}, headers=user)
    error = assert_envelope(refused, 429, "quota_exceeded")
    assert error["limit"]["scope"] == "identifier"
    # The workspace key reporting for another identifier is not limited by user-123's limits.
    other = {"id": "u3", "model": "flat-model", "prompt_tokens": 20, "identifier_id": "user-456"}
    assert client.post("/v1/events", json={"events": [other]}, headers=tenant.headers).status_code == 200
    # ...but reporting for user-123 is.
    again = {"id": "u4", "model": "flat-model", "prompt_tokens": 20, "identifier_id": "user-123"}
    assert client.post("/v1/events", json={"events": [again]}, headers=tenant.headers).status_code == 429
    mine = usage(client, Tenant(tenant.org, tenant.workspace, issued.json()["access_token"], {}))
    assert limit_named(mine, "identifier.daily_tokens")["used"] == 90


def test_plan_change_mid_period_applies_the_new_limits_to_usage_so_far(client: TestClient) -> None:
    tenant = make_tenant(client, plan="open")
    for _ in range(4):
        assert send(client, tenant).status_code == 200
    changed = client.patch(
        f"/v1/admin/organizations/{tenant.org['id']}", json={"plan": "calls5"}, headers=ADMIN
    )
    assert changed.status_code == 200
    assert send(client, tenant).status_code == 200
    assert_envelope(send(client, tenant), 429, "quota_exceeded")
    assert usage(client, tenant)["plan"] == "calls5"


def test_reservation_settle_and_release(client: TestClient) -> None:
    tenant = make_tenant(client, plan="tokens")  # 1000 daily tokens
    held = client.post(
        "/v1/reservations", json={"model": "flat-model", "prompt_tokens": 100, "completion_tokens": 700},
        headers=tenant.headers,
    )  # fmt: skip
    assert held.status_code == 201, held.text
    reservation = held.json()
    assert reservation["status"] == "reserved"
    assert reservation["estimate"]["total_tokens"] == 800
    # While held, the estimate counts: 300 more tokens do not fit.
    assert_envelope(
        client.post("/v1/reservations", json={"prompt_tokens": 300}, headers=tenant.headers),
        429,
        "quota_exceeded",
    )
    settled = client.post(
        f"/v1/reservations/{reservation['id']}/settle",
        json={"completion_tokens": 150},
        headers=tenant.headers,
    )
    assert settled.status_code == 200, settled.text
    assert settled.json()["total_tokens"] == 250
    assert settled.json()["duplicate"] is False
    again = client.post(
        f"/v1/reservations/{reservation['id']}/settle",
        json={"completion_tokens": 999},
        headers=tenant.headers,
    )
    assert again.json()["duplicate"] is True
    assert again.json()["total_tokens"] == 250
    assert limit_named(usage(client, tenant), "daily_tokens")["used"] == 250
    released = client.post("/v1/reservations", json={"prompt_tokens": 700}, headers=tenant.headers).json()
    assert limit_named(usage(client, tenant), "daily_tokens")["used"] == 950
    gone = client.post(f"/v1/reservations/{released['id']}/release", headers=tenant.headers)
    assert gone.status_code == 200
    assert gone.json()["status"] == "released"
    assert limit_named(usage(client, tenant), "daily_tokens")["used"] == 250
    assert_envelope(
        client.post(f"/v1/reservations/{released['id']}/settle", json={}, headers=tenant.headers),
        404,
        "not_found",
    )
    ledger = client.get("/v1/usage/ledger", headers=tenant.headers).json()
    assert ledger["total_count"] == 1


def test_a_reservation_settles_with_the_usage_vector(client: TestClient) -> None:
    # The two-phase API reports what the events API and the gateway do: 1-hour cache writes priced at
    # their own price, web searches per call (claude-sonnet-4-5: $3, $3.75 5m, $6 1h, $15, $10/1,000).
    tenant = make_tenant(client, plan="open")
    estimate = {"model": "claude-sonnet-4-5", "provider": "anthropic", "prompt_tokens": 5000}
    held = client.post("/v1/reservations", json=estimate, headers=tenant.headers).json()
    bad = client.post(
        f"/v1/reservations/{held['id']}/settle",
        json={"completion_tokens": 100, "cache_write_tokens": 10, "cache_write_1h_tokens": 20},
        headers=tenant.headers,
    )
    assert assert_envelope(bad, 400, "invalid_request")["param"] == "cache_write_1h_tokens"
    settled = client.post(
        f"/v1/reservations/{held['id']}/settle",
        json={
            "completion_tokens": 100,
            "cache_write_tokens": 3000,
            "cache_write_1h_tokens": 2000,
            "web_searches": 3,
        },
        headers=tenant.headers,
    )
    assert settled.status_code == 200, settled.text
    # 2,000 x 3 + 1,000 x 3.75 + 2,000 x 6 + 100 x 15 per million, plus 3 x $0.01.
    assert settled.json()["cost"] == "0.05325"
    row = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"][0]
    assert (row["cache_write_1h_tokens"], row["web_searches"]) == (2000, 3)


def test_reservations_of_another_organization_are_not_found(client: TestClient) -> None:
    mine = make_tenant(client, plan="open", name="Mine")
    theirs = make_tenant(client, plan="open", name="Theirs")
    held = client.post("/v1/reservations", json={"prompt_tokens": 5}, headers=mine.headers).json()
    for action in ("settle", "release"):
        response = client.post(f"/v1/reservations/{held['id']}/{action}", json={}, headers=theirs.headers)
        assert_envelope(response, 404, "not_found")


def test_expired_reservations_are_settled_at_their_estimate(
    client: TestClient, clock: FrozenClock, services: Services
) -> None:
    tenant = make_tenant(client, plan="tokens")
    held = client.post(
        "/v1/reservations", json={"prompt_tokens": 40, "ttl_seconds": 60}, headers=tenant.headers
    ).json()
    clock.advance(seconds=61)
    assert services.reservations.recover() == 1
    settled = client.post(f"/v1/reservations/{held['id']}/settle", json={}, headers=tenant.headers).json()
    assert settled["duplicate"] is True
    assert settled["recovered"] is True
    assert limit_named(usage(client, tenant), "daily_tokens")["used"] == 40
    assert services.reservation_store.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        {"prompt_tokens": -1},
        {"prompt_tokens": "10"},
        {"ttl_seconds": 0},
        {"unknown": 1},
        {"prompt_tokens": 5, "cache_read_tokens": 9},
    ],
)
def test_bad_reservations_are_rejected(client: TestClient, body: dict[str, Any]) -> None:
    tenant = make_tenant(client, plan="open")
    response = client.post("/v1/reservations", json=body, headers=tenant.headers)
    assert response.status_code in (400, 422)
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("start", "anchor", "last_second_of_period"),
    [
        # Anchored on the 31st: Jan 31 -> Feb 28 (a short month) -> Mar 31.
        ("2027-01-31T00:00:00+00:00", 31, "2027-02-27T23:59:59+00:00"),
        ("2027-02-28T00:00:00+00:00", 31, "2027-03-30T23:59:59+00:00"),
        # Leap year: the period anchored on the 29th starts on Feb 29.
        ("2028-01-29T00:00:00+00:00", 29, "2028-02-28T23:59:59+00:00"),
        ("2028-02-29T00:00:00+00:00", 30, "2028-03-29T23:59:59+00:00"),
    ],
)
def test_monthly_limits_reset_on_the_anchor_day_across_month_lengths(
    client: TestClient, clock: FrozenClock, start: str, anchor: int, last_second_of_period: str
) -> None:
    clock.set(datetime.fromisoformat(start))
    tenant = make_tenant(client, plan="open", billing_anchor_day=anchor)
    client.patch(f"/v1/admin/organizations/{tenant.org['id']}", json={"plan": "monthly2"}, headers=ADMIN)
    assert send(client, tenant).status_code == 200
    clock.set(datetime.fromisoformat(last_second_of_period))
    assert send(client, tenant).status_code == 200
    refused = send(client, tenant)
    assert_envelope(refused, 429, "quota_exceeded")
    assert refused.headers["retry-after"] == "1"  # the next period starts in one second
    clock.advance(seconds=1)
    assert send(client, tenant).status_code == 200
    body = usage(client, tenant)
    assert body["billing_period"]["start"] == clock.now().isoformat().replace("+00:00", "Z")
    assert limit_named(body, "monthly_calls")["used"] == 1


def test_an_access_token_cannot_report_for_another_identifier(client: TestClient) -> None:
    tenant = make_tenant(client, plan="open")
    issued = client.post(
        "/v1/token",
        json={"identifier_id": "user-a", "limits": {"daily_calls": 1}},
        headers={**tenant.headers, "X-Workspace-Id": tenant.workspace["id"]},
    ).json()
    user = {"Authorization": f"Bearer {issued['access_token']}"}
    other = {"id": "x1", "model": "flat-model", "identifier_id": "user-b"}
    response = client.post("/v1/events", json={"events": [other]}, headers=user)
    error = assert_envelope(response, 422, "invalid_request")
    assert "own identifier" in error["message"]
    assert client.get("/v1/usage/ledger", headers=tenant.headers).json()["total_count"] == 0
