"""Admin API (SPEC §9) on every backend: tenants, keys, credits, and the admin key's gate."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from conftest import ADMIN, Tenant, assert_envelope, make_tenant


def test_key_is_shown_once_and_stored_hashed(client: TestClient, tenant: Tenant, services) -> None:
    assert tenant.key.startswith("ml_live_")
    assert tenant.key_info["key_prefix"] == tenant.key[:16]
    listed = client.get(
        "/v1/admin/keys", params={"workspace_id": tenant.workspace["id"]}, headers=ADMIN
    ).json()
    assert listed["total_count"] == 1
    assert "key" not in listed["data"][0]
    assert listed["data"][0]["key_prefix"] == tenant.key[:16]
    # The secret is nowhere in the database.
    with services.db.read() as conn:
        dump = " ".join(str(v) for row in conn.exec_driver_sql("SELECT * FROM api_keys") for v in row)
    assert tenant.key not in dump


def test_revoked_key_stops_working_at_once(client: TestClient, tenant: Tenant) -> None:
    assert client.get("/v1/usage", headers=tenant.headers).status_code == 200
    revoked = client.delete(f"/v1/admin/keys/{tenant.key_info['id']}", headers=ADMIN)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    error = assert_envelope(client.get("/v1/usage", headers=tenant.headers), 401, "unauthorized")
    assert "revoked" in error["message"]
    assert tenant.key not in error["message"]


def test_last_used_time_is_recorded(client: TestClient, tenant: Tenant) -> None:
    client.get("/v1/usage", headers=tenant.headers)
    keys = client.get("/v1/admin/keys", params={"workspace_id": tenant.workspace["id"]}, headers=ADMIN).json()
    assert keys["data"][0]["last_used_at"] == "2026-03-14T10:30:00Z"


def test_organization_defaults_and_update(client: TestClient) -> None:
    created = client.post("/v1/admin/organizations", json={"name": "Globex", "plan": "free"}, headers=ADMIN)
    assert created.status_code == 201
    org = created.json()
    assert org["currency"] == "USD"
    assert org["billing_anchor_day"] == 14  # the day it was created
    patched = client.patch(
        f"/v1/admin/organizations/{org['id']}",
        json={"plan": "pro", "spend_cap": "250.50", "discount_pct": 15, "currency": "EUR"},
        headers=ADMIN,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json() == org | {
        "plan": "pro",
        "spend_cap": "250.5",
        "discount_pct": 15,
        "currency": "EUR",
    }
    listed = client.get("/v1/admin/organizations", headers=ADMIN).json()
    assert [o["name"] for o in listed["data"]] == ["Globex"]
    for field in ("name", "plan", "billing_anchor_day", "discount_pct", "currency"):
        error = assert_envelope(
            client.patch(f"/v1/admin/organizations/{org['id']}", json={field: None}, headers=ADMIN),
            422,
            "invalid_request",
        )
        assert field in error["message"]
    uncapped = client.patch(f"/v1/admin/organizations/{org['id']}", json={"spend_cap": None}, headers=ADMIN)
    assert uncapped.json()["spend_cap"] is None
    assert_envelope(client.get("/v1/admin/organizations/org_" + "x" * 5000, headers=ADMIN), 404, "not_found")


def test_bad_organization_input(client: TestClient) -> None:
    cases = [
        ({"name": "X", "plan": "platinum"}, 400, "plan"),
        ({"name": "X", "currency": "JPY"}, 400, "currency"),
        ({"name": "X", "currency": "usd"}, 422, "currency"),
        ({"name": "", "plan": "free"}, 422, "name"),
        ({"name": "X", "billing_anchor_day": 32}, 422, "billing_anchor_day"),
        ({"name": "X", "discount_pct": 101}, 422, "discount_pct"),
        ({"name": "X", "spend_cap": 10.5}, 422, "spend_cap"),
        ({"name": "X", "spend_cap": "lots"}, 422, "spend_cap"),
        ({"name": "X", "colour": "red"}, 422, "colour"),
        ({"name": 7}, 422, "name"),
    ]
    for body, status, param in cases:
        error = assert_envelope(
            client.post("/v1/admin/organizations", json=body, headers=ADMIN), status, "invalid_request"
        )
        assert error["param"] == param, (body, error)
    assert client.get("/v1/admin/organizations", headers=ADMIN).json()["total_count"] == 0


def test_workspace_and_key_need_existing_parents(client: TestClient) -> None:
    error = assert_envelope(
        client.post("/v1/admin/workspaces", json={"organization_id": "org_nope", "name": "W"}, headers=ADMIN),
        404,
        "not_found",
    )
    assert "org_nope" in error["message"]
    assert_envelope(
        client.post("/v1/admin/keys", json={"workspace_id": "ws_nope", "name": "K"}, headers=ADMIN),
        404,
        "not_found",
    )
    assert_envelope(client.delete("/v1/admin/keys/key_nope", headers=ADMIN), 404, "not_found")


def test_key_limits_are_validated(client: TestClient, tenant: Tenant) -> None:
    ok = client.post(
        "/v1/admin/keys",
        json={"workspace_id": tenant.workspace["id"], "name": "Limited", "limits": {"daily_tokens": 1000}},
        headers=ADMIN,
    )
    assert ok.status_code == 201
    assert ok.json()["limits"] == {"daily_tokens": 1000}
    bad = client.post(
        "/v1/admin/keys",
        json={"workspace_id": tenant.workspace["id"], "name": "L", "limits": {"daily_tokenz": 1}},
        headers=ADMIN,
    )
    assert "daily_tokenz" in assert_envelope(bad, 422, "invalid_request")["message"]


def test_key_limits_say_their_shape(client: TestClient, tenant: Tenant) -> None:
    """A list, a float spend cap or an unknown name each get a message that shows what to send."""

    def create(limits: object) -> Any:
        body = {"workspace_id": tenant.workspace["id"], "name": "L", "limits": limits}
        return client.post("/v1/admin/keys", json=body, headers=ADMIN)

    as_list = assert_envelope(create([{"daily_tokens": 1000}]), 422, "invalid_request")["message"]
    assert "limits is an object of named limits" in as_list
    assert '"spend_cap": "25.00"' in as_list
    floated = assert_envelope(create({"spend_cap": 1.5}), 422, "invalid_request")["message"]
    assert "decimal string" in floated
    assert "organization's currency" in floated
    assert "spend_cap" in assert_envelope(create({"spend_cap": "-2"}), 422, "invalid_request")["message"]
    tiny = assert_envelope(create({"spend_cap": "0.0000000001"}), 422, "invalid_request")["message"]
    assert "9 decimal places" in tiny  # not rounded to a cap of 0 that would block everything
    long = create({"spend_cap": "1.0000000000000000000000000000000001"})
    assert "9 decimal places" in assert_envelope(long, 422, "invalid_request")["message"]
    unknown = assert_envelope(create({"daily_tokenz": 1}), 422, "invalid_request")["message"]
    assert "spend_cap" in unknown  # the list of known names has it
    assert create({"spend_cap": "1.00", "rpm": 60}).json()["limits"] == {"spend_cap": "1", "rpm": 60}
    assert create({"spend_cap": -1}).json()["limits"] == {"spend_cap": -1}

    schema = client.get("/openapi.json").json()["components"]["schemas"]["KeyIn"]["properties"]["limits"]
    assert {"daily_tokens": 100000, "rpm": 60, "spend_cap": "25.00"} in schema["examples"]
    assert "spend_cap" in schema["description"]


def test_bonus_credits(client: TestClient, tenant: Tenant) -> None:
    org_id = tenant.org["id"]
    granted = client.post(
        "/v1/admin/credits",
        json={"organization_id": org_id, "amount": "125.5", "reason": "Referral"},
        headers=ADMIN,
    )
    assert granted.status_code == 201
    assert granted.json()["amount"] == "125.5"
    assert granted.json()["bucket"] == "bonus"
    for amount in ("0", "-5", "1e12", "NaN"):
        assert_envelope(
            client.post(
                "/v1/admin/credits",
                json={"organization_id": org_id, "amount": amount, "reason": "x"},
                headers=ADMIN,
            ),
            400 if amount != "NaN" else 422,
            "invalid_request",
        )
    listed = client.get("/v1/admin/credits", params={"organization_id": org_id}, headers=ADMIN).json()
    assert [g["amount"] for g in listed["data"]] == ["125.5"]


def test_admin_api_needs_the_admin_key(client: TestClient, tenant: Tenant) -> None:
    assert_envelope(client.get("/v1/admin/organizations"), 401, "unauthorized")
    assert_envelope(
        client.get("/v1/admin/organizations", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"
    )
    # A tenant's key is not an admin key.
    assert_envelope(client.get("/v1/admin/organizations", headers=tenant.headers), 401, "unauthorized")
    assert_envelope(
        client.get("/v1/admin/organizations", headers={"Authorization": "Basic abc"}), 401, "unauthorized"
    )


def test_two_tenants_are_separate(client: TestClient) -> None:
    a = make_tenant(client, name="A")
    b = make_tenant(client, name="B")
    assert a.org["id"] != b.org["id"]
    keys = client.get("/v1/admin/keys", params={"organization_id": a.org["id"]}, headers=ADMIN).json()
    assert [k["id"] for k in keys["data"]] == [a.key_info["id"]]
