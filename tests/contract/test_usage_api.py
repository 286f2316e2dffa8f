"""The usage read API (SPEC §5, seeds 000/003/004) on every backend: shapes, scoping, paging, bad input."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import ADMIN, Tenant, add_key, assert_envelope, make_tenant


def post(
    client: TestClient, tenant: Tenant, *events: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    response = client.post("/v1/events", json={"events": list(events)}, headers=headers or tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json()["rejected"] == 0, response.text


def ev(i: int | str, ts: str = "2026-03-14T10:00:00Z", **fields: Any) -> dict[str, Any]:
    return {
        "id": f"e{i}",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "timestamp": ts,
        **fields,
    }


def test_summary_has_the_seed_fields(client: TestClient, tenant: Tenant) -> None:
    post(client, tenant, ev(1), ev(2, ts="2026-03-13T23:59:59Z"), ev(3, ts="2026-03-01T00:00:00Z"))
    body = client.get("/v1/usage", headers=tenant.headers).json()
    # Seed 003: usage / limit / remaining / plan / request_id; the primary meter is period tokens.
    assert body["plan"] == "pro"
    assert body["limit"] == 50_000_000
    assert body["usage"] == 150  # anchor day 14: the period began today at 00:00 UTC
    assert body["remaining"] == 50_000_000 - 150
    assert body["request_id"].startswith("req_")
    # Seed 000: daily and monthly tokens and calls.
    assert body["daily"]["tokens"] == {"usage": 150, "limit": 5_000_000, "remaining": 4_999_850}
    assert body["daily"]["calls"]["usage"] == 1
    assert body["monthly"]["calls"] == {"usage": 1, "limit": 100_000, "remaining": 99_999}
    period = body["billing_period"]
    assert (period["start"], period["end"]) == ("2026-03-14T00:00:00Z", "2026-04-14T00:00:00Z")
    assert (period["days_elapsed"], period["days_remaining"], period["days"]) == (1, 30, 31)


def test_summary_period_follows_the_anchor(client: TestClient) -> None:
    tenant = make_tenant(client, plan="free", billing_anchor_day=1)
    post(
        client,
        tenant,
        ev(1),
        ev(2, ts="2026-03-13T23:59:59Z"),
        ev(3, ts="2026-03-01T00:00:00Z"),
        ev(4, ts="2026-02-28T23:59:59Z"),
    )
    body = client.get("/v1/usage", headers=tenant.headers).json()
    assert body["usage"] == 450
    assert body["limit"] == 500_000
    assert body["daily"]["tokens"]["usage"] == 150
    assert body["billing_period"]["days_elapsed"] == 14
    assert body["billing_period"]["days_remaining"] == 17


def test_unlimited_plan_reports_minus_one(client: TestClient) -> None:
    tenant = make_tenant(client, plan="enterprise")
    post(client, tenant, ev(1))
    body = client.get("/v1/usage", headers=tenant.headers).json()
    assert (body["usage"], body["limit"], body["remaining"]) == (150, -1, -1)


def test_history_is_daily_with_zero_days(client: TestClient, tenant: Tenant) -> None:
    post(
        client,
        tenant,
        ev(1),
        ev(2, ts="2026-03-12T05:00:00Z"),
        ev(3, ts="2026-03-12T06:00:00Z"),
        ev(4, ts="2026-01-01T00:00:00Z", identifier_id="user-123"),
    )
    body = client.get("/v1/usage/history", headers=tenant.headers).json()
    assert len(body["data"]) == 30
    assert body["data"][-1]["date"] == "2026-03-14"
    by_day = {d["date"]: d for d in body["data"]}
    assert by_day["2026-03-14"]["tokens"] == 150
    assert by_day["2026-03-13"]["tokens"] == 0
    assert by_day["2026-03-12"]["calls"] == 2
    longer = client.get("/v1/usage/history", params={"days": 366}, headers=tenant.headers).json()
    assert sum(d["tokens"] for d in longer["data"]) == 600
    only = client.get(
        "/v1/usage/history", params={"days": 100, "identifier_id": "user-123"}, headers=tenant.headers
    ).json()
    assert sum(d["tokens"] for d in only["data"]) == 150
    assert only["identifier_id"] == "user-123"
    for days in (0, 367, "x"):
        assert_envelope(
            client.get("/v1/usage/history", params={"days": days}, headers=tenant.headers),
            422,
            "invalid_request",
        )


def test_events_pagination(client: TestClient, tenant: Tenant) -> None:
    post(
        client,
        tenant,
        *[
            {
                "id": f"c{i}",
                "event": "case.execute",
                "units": 1,
                "run_id": f"prn_{i}",
                "timestamp": f"2026-03-14T09:{i:02d}:00Z",
            }
            for i in range(25)
        ],
    )
    first = client.get("/v1/usage/events", headers=tenant.headers).json()
    assert first["pagination"] == {"page": 1, "per_page": 20, "total": 25, "has_more": True}
    assert set(first["data"][0]) == {"id", "event", "units", "run_id", "metadata", "created_at"}
    assert first["data"][0]["run_id"] == "prn_24"  # newest first
    second = client.get("/v1/usage/events", params={"page": 2}, headers=tenant.headers).json()
    assert second["pagination"]["has_more"] is False
    assert len(second["data"]) == 5
    for params in ({"per_page": 0}, {"per_page": 101}, {"page": 0}, {"page": "one"}):
        error = assert_envelope(
            client.get("/v1/usage/events", params=params, headers=tenant.headers), 422, "invalid_request"
        )
        assert error["param"] == next(iter(params))


def test_ledger_filters_and_paging(client: TestClient, tenant: Tenant) -> None:
    second_key = add_key(client, tenant.workspace["id"], name="CI")
    post(client, tenant, ev(1, ts="2026-03-14T08:00:00Z"), ev(2, ts="2026-03-14T09:00:00Z", model="gpt-4o"))
    post(client, tenant, ev(3, ts="2026-03-14T10:00:00Z"), headers={"Authorization": f"Bearer {second_key}"})
    everything = client.get("/v1/usage/ledger", headers=tenant.headers).json()
    assert (everything["total_count"], everything["limit"], everything["offset"]) == (3, 100, 0)
    assert [r["created_at"] for r in everything["data"]] == [
        "2026-03-14T10:00:00Z",
        "2026-03-14T09:00:00Z",
        "2026-03-14T08:00:00Z",
    ]
    seed_fields = {
        "id",
        "model",
        "modality",
        "provider",
        "billing_unit",
        "audio_seconds",
        "prompt_tokens",
        "completion_tokens",
        "cost_eur",
        "discount_applied_pct",
        "receipt_id",
        "failover",
        "key_prefix",
        "key_name",
        "created_at",
    }
    assert seed_fields <= set(everything["data"][0])

    def ids(**params: Any) -> list[str]:
        body = client.get("/v1/usage/ledger", params=params, headers=tenant.headers).json()
        return [r["event_id"] for r in body["data"]]

    assert ids(model="gpt-4o") == ["e2"]
    assert ids(key_prefix=second_key[:16]) == ["e3"]
    assert ids(start="2026-03-14T09:00:00Z") == ["e3", "e2"]
    assert ids(end="2026-03-14T09:00:00Z") == ["e2", "e1"]
    assert ids(start="2026-03-14T10:00:00+01:00", end="2026-03-14T09:30:00.5Z") == ["e2"]
    assert ids(limit=1, offset=1) == ["e2"]
    assert ids(offset=5) == []


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 1001}, "limit"),
        ({"limit": 0}, "limit"),
        ({"offset": -1}, "offset"),
        ({"start": "yesterday"}, "start"),
        ({"start": "2026-03-14"}, "start"),
        ({"end": "2026-13-45T00:00:00Z"}, "end"),
        ({"end": "2026-03-14T10:00:00"}, "end"),
        ({"start": "2026-03-14T10:00:00Z", "end": "2026-03-14T09:00:00Z"}, "start"),
    ],
)
def test_ledger_bad_parameters(
    client: TestClient, tenant: Tenant, params: dict[str, Any], param: str
) -> None:
    response = client.get("/v1/usage/ledger", params=params, headers=tenant.headers)
    assert response.status_code in (400, 422)
    error = assert_envelope(response, response.status_code, "invalid_request")
    assert error["param"] == param


def test_cost_in_eur_with_discount(client: TestClient) -> None:
    tenant = make_tenant(client, currency="EUR", discount_pct=10)
    post(client, tenant, ev(1, prompt_tokens=1000, completion_tokens=500))
    row = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"][0]
    # $0.00045 list -> EUR at 0.92 = 0.000414 -> 10 % off = 0.0003726
    assert (row["list_cost"], row["cost"], row["currency"]) == ("0.000414", "0.0003726", "EUR")
    assert row["cost_eur"] == 0.0003726
    tiny = make_tenant(client, name="Tiny", currency="EUR")
    post(client, tiny, ev(9, model="text-embedding-3-small", prompt_tokens=504, completion_tokens=0))
    text = client.get("/v1/usage/ledger", headers=tiny.headers).text
    # 504 x $0.02/MTok x 0.92 = 0.0000092736, rounded once to the nano; a decimal, not 9.274e-06
    assert '"cost_eur":0.000009274,' in text
    assert row["discount_applied_pct"] == 10


def test_workspace_keys_see_their_workspace_and_org_keys_see_all(client: TestClient, tenant: Tenant) -> None:
    other_ws = client.post(
        "/v1/admin/workspaces", json={"organization_id": tenant.org["id"], "name": "Second"}, headers=ADMIN
    ).json()
    other_key = add_key(client, other_ws["id"])
    org_key = add_key(client, tenant.workspace["id"], name="Reader", scope="organization")
    post(client, tenant, ev(1))
    post(client, tenant, ev(2), ev(3), headers={"Authorization": f"Bearer {other_key}"})

    def total(key: str, **headers: str) -> int:
        body = client.get("/v1/usage/ledger", headers={"Authorization": f"Bearer {key}", **headers}).json()
        count: int = body["total_count"]
        return count

    assert total(tenant.key) == 1
    assert total(other_key) == 2
    assert total(org_key) == 3
    assert total(org_key, **{"X-Workspace-Id": other_ws["id"]}) == 2
    assert client.get("/v1/usage", headers={"Authorization": f"Bearer {org_key}"}).json()["usage"] == 450


def test_nothing_leaks_across_organizations(client: TestClient, tenant: Tenant) -> None:
    stranger = make_tenant(client, name="Stranger")
    post(client, tenant, ev(1))
    assert client.get("/v1/usage/ledger", headers=stranger.headers).json()["total_count"] == 0
    assert client.get("/v1/usage", headers=stranger.headers).json()["usage"] == 0
    assert client.get("/v1/usage/events", headers=stranger.headers).json()["pagination"]["total"] == 0
    # Naming the other organization's workspace is refused, not honoured.
    response = client.get(
        "/v1/usage/ledger", headers={**stranger.headers, "X-Workspace-Id": tenant.workspace["id"]}
    )
    assert_envelope(response, 403, "forbidden")
    org_key = add_key(client, stranger.workspace["id"], name="Reader", scope="organization")
    response = client.get(
        "/v1/usage", headers={"Authorization": f"Bearer {org_key}", "X-Workspace-Id": tenant.workspace["id"]}
    )
    assert_envelope(response, 403, "forbidden")


def test_errors_everywhere_use_the_envelope(client: TestClient, tenant: Tenant) -> None:
    assert_envelope(client.get("/v1/usage"), 401, "unauthorized")
    assert_envelope(client.get("/v1/usage", headers={"Authorization": "Bearer"}), 401, "unauthorized")
    assert_envelope(client.get("/v1/nothing-here", headers=tenant.headers), 404, "not_found")
    assert_envelope(client.delete("/v1/usage", headers=tenant.headers), 405, "method_not_allowed")
    assert_envelope(client.get("/v1/chat/completions", headers=tenant.headers), 405, "method_not_allowed")
    response = client.get("/v1/usage", headers={**tenant.headers, "X-Request-Id": "client-chosen-1"})
    assert response.headers["x-request-id"] == "client-chosen-1"
    assert response.json()["request_id"] == "client-chosen-1"


def test_openapi_is_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/events",
        "/v1/usage",
        "/v1/usage/history",
        "/v1/usage/events",
        "/v1/usage/ledger",
        "/v1/admin/organizations",
        "/v1/admin/keys",
    ):
        assert path in spec["paths"]


def test_openapi_documents_the_gateway_endpoints(client: TestClient) -> None:
    # The relay endpoints are served by plain ASGI routes; OpenAPI must still describe them.
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/audio/transcriptions",
        "/v1/messages",
        "/v1/messages/count_tokens",
    ):
        assert "post" in paths[path], path
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["required"] == ["model", "messages"]
    assert "/v1/models" in paths


def test_top_level_is_the_tightest_limit_for_each_kind_of_caller(client: TestClient, tenant: Tenant) -> None:
    # Issue 17 item 8: the top level is the tightest period limit on the primary meter that applies to
    # the caller, as its own ``limits`` entry says, not the plan's maximum against the caller's usage.
    other_ws = client.post(
        "/v1/admin/workspaces", json={"organization_id": tenant.org["id"], "name": "Second"}, headers=ADMIN
    ).json()
    other = {"Authorization": f"Bearer {add_key(client, other_ws['id'])}"}
    org = {"Authorization": f"Bearer {add_key(client, tenant.workspace['id'], 'Reader', 'organization')}"}
    post(client, tenant, ev(1, prompt_tokens=600, completion_tokens=400), headers=other)

    def top(headers: dict[str, str], **params: str) -> tuple[Any, ...]:
        body = client.get("/v1/usage", headers=headers, params=params).json()
        figures = (body["meter"], body["usage"], body["limit"], body["remaining"])
        # The top level is one of the caller's limits, figure for figure, and says which.
        by = body.get("limited_by") or {}
        named = [x for x in body["limits"] if (x["scope"], x["name"]) == (by.get("scope"), by.get("name"))]
        assert [(x["used"], x["max"], x["remaining"]) for x in named] == [figures[1:]], (by, body["limits"])
        assert by["window"] == "period"
        assert by["resets_at"] == named[0]["resets_at"] == "2026-04-14T00:00:00Z"
        return (*figures, by["scope"], by["name"])

    organization = ("tokens", 1000, 50_000_000, 49_999_000, "organization", "monthly_tokens")
    assert top(tenant.headers) == organization  # a workspace key whose workspace used nothing
    assert top(org) == organization

    token = client.post(
        "/v1/token",
        json={"identifier_id": "user-123", "limits": {"daily_tokens": 10_000, "monthly_tokens": 100_000}},
        headers=tenant.headers,
    ).json()["access_token"]
    post(client, tenant, ev(2, identifier_id="user-123"))
    own = ("tokens", 150, 100_000, 99_850, "identifier", "identifier.monthly_tokens")
    assert top({"Authorization": f"Bearer {token}"}) == own
    assert top(org, identifier_id="user-123") == own
    assert top(tenant.headers)[:4] == ("tokens", 1150, 50_000_000, 49_998_850)


def test_openapi_describes_the_summary_headline(client: TestClient) -> None:
    ok = client.get("/openapi.json").json()["paths"]["/v1/usage"]["get"]["responses"]["200"]
    schema = ok["content"]["application/json"]["schema"]
    assert {"usage", "limit", "remaining", "plan", "meter", "limited_by"} <= set(schema["required"])
    assert "primary_meter" in schema["properties"]["meter"]["description"]
    assert set(schema["properties"]["limited_by"]["properties"]) == {"name", "scope", "window", "resets_at"}
    example = ok["content"]["application/json"]["example"]
    assert example["remaining"] == example["limit"] - example["usage"]
