"""Identifier tokens (seed 000) over HTTP on every backend: issue, use, rotate, reuse detection, forgery,
expiry, revocation, scoping of reads and writes, and bad input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi.testclient import TestClient
from joserfc.jwk import OKPKey

from conftest import ADMIN, Tenant, add_key, assert_envelope, make_tenant
from meterline.clock import FrozenClock
from meterline.services import Services


def issue(client: TestClient, tenant: Tenant, identifier_id: str = "user-123", **body: Any) -> dict[str, Any]:
    response = client.post("/v1/token", json={"identifier_id": identifier_id, **body}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refresh(client: TestClient, refresh_token: str) -> Any:
    return client.post("/v1/token/refresh", json={"refresh_token": refresh_token})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return json.loads(unb64(header)), json.loads(unb64(payload)), signature


def encode_part(data: dict[str, Any]) -> str:
    return b64(json.dumps(data, separators=(",", ":")).encode())


def assert_refused(client: TestClient, token: str, path: str = "/v1/usage") -> dict[str, Any]:
    error = assert_envelope(client.get(path, headers=bearer(token)), 401, "unauthorized")
    assert token not in error["message"]
    return error


# -- issue and use -----------------------------------------------------------------------------------
def test_issue_and_use(client: TestClient, tenant: Tenant) -> None:
    response = client.post(
        "/v1/token",
        json={"identifier_id": "user-123", "limits": {"daily_tokens": 10000, "monthly_tokens": 100000}},
        headers={**tenant.headers, "X-Workspace-Id": tenant.workspace["id"]},
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {
        "access_token",
        "refresh_token",
        "token_type",
        "expires_in",
        "identifier_id",
        "workspace_id",
        "limits",
    }
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert body["identifier_id"] == "user-123"
    assert body["workspace_id"] == tenant.workspace["id"]
    assert body["limits"] == {"daily_tokens": 10000, "monthly_tokens": 100000}
    assert body["refresh_token"].startswith("mlr_")
    assert len(body["refresh_token"]) == 52

    header, claims, _ = parts(body["access_token"])
    assert header["alg"] == "EdDSA"
    assert header["typ"] == "at+jwt"
    assert claims["iss"] == "meterline"
    assert claims["sub"] == "user-123"
    assert claims["org"] == tenant.org["id"]
    assert claims["ws"] == tenant.workspace["id"]
    assert claims["key"] == tenant.key_info["id"]
    assert claims["exp"] - claims["iat"] == 900
    assert claims["fam"]
    assert claims["jti"]

    usage = client.get("/v1/usage", headers=bearer(body["access_token"]))
    assert usage.status_code == 200, usage.text
    assert usage.json()["scope"] == {
        "organization_id": tenant.org["id"],
        "workspace_id": tenant.workspace["id"],
        "identifier_id": "user-123",
    }
    # With its own workspace named, the token still works; another workspace is refused.
    named = {**bearer(body["access_token"]), "X-Workspace-Id": tenant.workspace["id"]}
    assert client.get("/v1/usage", headers=named).status_code == 200
    other = {**bearer(body["access_token"]), "X-Workspace-Id": "ws_elsewhere"}
    assert_envelope(client.get("/v1/usage", headers=other), 403, "forbidden")


def test_access_token_verifies_against_the_published_key_set(client: TestClient, tenant: Tenant) -> None:
    token = issue(client, tenant)["access_token"]
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    jwks = response.json()
    assert len(jwks["keys"]) == 1
    key = jwks["keys"][0]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in key  # never the private part
    assert key["kid"] == parts(token)[0]["kid"]
    assert key["kid"] == OKPKey.import_key(key).thumbprint()  # RFC 7638
    # Anyone can check a token offline with the published key and a plain Ed25519 library.
    signing_input, _, signature = token.rpartition(".")
    Ed25519PublicKey.from_public_bytes(unb64(key["x"])).verify(unb64(signature), signing_input.encode())


def test_expires_in_is_honoured_and_kept_across_refresh(
    client: TestClient, tenant: Tenant, clock: FrozenClock
) -> None:
    body = issue(client, tenant, expires_in=60)
    assert body["expires_in"] == 60
    clock.advance(seconds=59)
    assert client.get("/v1/usage", headers=bearer(body["access_token"])).status_code == 200
    renewed = refresh(client, body["refresh_token"]).json()
    assert renewed["expires_in"] == 60
    _, claims, _ = parts(renewed["access_token"])
    assert claims["exp"] - claims["iat"] == 60


# -- limits ------------------------------------------------------------------------------------------
def test_limits_are_stored_server_side(client: TestClient, tenant: Tenant, services: Services) -> None:
    ws = tenant.workspace["id"]
    issue(client, tenant, limits={"daily_tokens": 10000, "monthly_calls": -1})
    stored = services.tenancy.get_identifier(ws, "user-123")
    assert stored is not None
    assert stored.limits == {"daily_tokens": 10000, "monthly_calls": -1}
    assert stored.organization_id == tenant.org["id"]
    # Without limits the identifier keeps what it has; with limits they replace the old ones.
    assert issue(client, tenant)["limits"] == {"daily_tokens": 10000, "monthly_calls": -1}
    assert issue(client, tenant, limits={"rpm": 5})["limits"] == {"rpm": 5}
    stored = services.tenancy.get_identifier(ws, "user-123")
    assert stored is not None
    assert stored.limits == {"rpm": 5}
    # An identifier with no limits of its own is still registered.
    assert issue(client, tenant, "user-456")["limits"] is None
    plain = services.tenancy.get_identifier(ws, "user-456")
    assert plain is not None
    assert plain.limits is None
    assert services.tenancy.get_identifier(ws, "never-seen") is None
    # Refreshing answers the identifier's current limits.
    first = issue(client, tenant, "user-789", limits={"daily_calls": 3})
    assert refresh(client, first["refresh_token"]).json()["limits"] == {"daily_calls": 3}


# -- refresh rotation and reuse ----------------------------------------------------------------------
def test_refresh_rotates(client: TestClient, tenant: Tenant) -> None:
    first = issue(client, tenant, limits={"daily_tokens": 5})
    response = refresh(client, first["refresh_token"])
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert parts(second["access_token"])[1]["fam"] == parts(first["access_token"])[1]["fam"]
    assert (second["identifier_id"], second["workspace_id"]) == ("user-123", tenant.workspace["id"])
    assert client.get("/v1/usage", headers=bearer(second["access_token"])).status_code == 200
    # The new refresh token rotates again.
    third = refresh(client, second["refresh_token"])
    assert third.status_code == 200, third.text


def test_reusing_a_spent_refresh_token_revokes_the_family(client: TestClient, tenant: Tenant) -> None:
    first = issue(client, tenant)
    second = refresh(client, first["refresh_token"]).json()
    unrelated = issue(client, tenant, "user-other")

    error = assert_envelope(refresh(client, first["refresh_token"]), 401, "unauthorized")
    assert "already used" in error["message"]
    assert first["refresh_token"] not in error["message"]

    # Everything of the family is dead: the newer refresh token and every access token.
    error = assert_envelope(refresh(client, second["refresh_token"]), 401, "unauthorized")
    assert "revoked" in error["message"]
    assert "revoked" in assert_refused(client, second["access_token"])["message"]
    assert_refused(client, first["access_token"])
    # Another family is untouched.
    assert client.get("/v1/usage", headers=bearer(unrelated["access_token"])).status_code == 200
    assert refresh(client, unrelated["refresh_token"]).status_code == 200


def test_concurrent_refreshes_of_one_token_have_one_winner(client: TestClient, tenant: Tenant) -> None:
    first = issue(client, tenant)
    start = threading.Barrier(4)

    def attempt(_: int) -> Any:
        start.wait()
        return refresh(client, first["refresh_token"])

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(attempt, range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 401, 401, 401], [r.text for r in responses]
    for response in responses:
        if response.status_code == 401:
            assert_envelope(response, 401, "unauthorized")


def test_expired_refresh_token(client: TestClient, tenant: Tenant, clock: FrozenClock) -> None:
    body = issue(client, tenant)
    clock.advance(days=30, seconds=1)
    error = assert_envelope(refresh(client, body["refresh_token"]), 401, "unauthorized")
    assert "expired" in error["message"]


@pytest.mark.parametrize(
    "secret",
    ["", "mlr_", "mlr_" + "0" * 48, "mlr_" + "g" * 48, "ml_live_" + "0" * 48, "x" * 200],
)
def test_unknown_or_malformed_refresh_tokens(client: TestClient, tenant: Tenant, secret: str) -> None:
    issue(client, tenant)
    response = refresh(client, secret)
    if secret == "":
        assert_envelope(response, 422, "invalid_request")
        return
    error = assert_envelope(response, 401, "unauthorized")
    assert secret not in error["message"]


# -- access token validation -------------------------------------------------------------------------
def test_expired_access_token(client: TestClient, tenant: Tenant, clock: FrozenClock) -> None:
    body = issue(client, tenant)
    clock.advance(seconds=899)
    assert client.get("/v1/usage", headers=bearer(body["access_token"])).status_code == 200
    clock.advance(seconds=1)
    assert "expired" in assert_refused(client, body["access_token"])["message"]
    # The refresh token still gets a fresh access token.
    renewed = refresh(client, body["refresh_token"]).json()
    assert client.get("/v1/usage", headers=bearer(renewed["access_token"])).status_code == 200


@pytest.mark.parametrize(
    "change",
    [
        {"sub": "someone-else"},
        {"exp": 4102444800},
        {"ws": "ws_elsewhere"},
        {"org": "org_elsewhere"},
        {"fam": "tfam_elsewhere"},
    ],
)
def test_tampered_payload_is_refused(client: TestClient, tenant: Tenant, change: dict[str, Any]) -> None:
    token = issue(client, tenant)["access_token"]
    header, _, signature = token.split(".")
    forged = ".".join([header, encode_part({**parts(token)[1], **change}), signature])
    assert_refused(client, forged)


def test_alg_none_is_refused(client: TestClient, tenant: Tenant) -> None:
    token = issue(client, tenant)["access_token"]
    header, claims, _ = parts(token)
    for alg in ("none", "None", "NONE"):
        unsigned = f"{encode_part({**header, 'alg': alg})}.{encode_part(claims)}."
        assert "EdDSA" in assert_refused(client, unsigned)["message"]


def test_hmac_signed_with_the_public_key_is_refused(client: TestClient, tenant: Tenant) -> None:
    """Algorithm confusion: an HS256 token whose HMAC secret is the (public) verification key."""
    token = issue(client, tenant)["access_token"]
    header, claims, _ = parts(token)
    public = client.get("/.well-known/jwks.json").json()["keys"][0]
    secrets_to_try = [
        unb64(public["x"]),
        public["x"].encode(),
        json.dumps(public).encode(),
        OKPKey.import_key(public).as_pem(private=False),
    ]
    for secret in secrets_to_try:
        signing_input = f"{encode_part({**header, 'alg': 'HS256'})}.{encode_part(claims)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert_refused(client, f"{signing_input}.{b64(mac)}")


def test_token_signed_by_another_key_is_refused(client: TestClient, tenant: Tenant) -> None:
    token = issue(client, tenant)["access_token"]
    header, claims, _ = parts(token)
    stranger = Ed25519PrivateKey.generate()
    for kid in (header["kid"], "someone-elses-kid"):
        signing_input = f"{encode_part({**header, 'kid': kid})}.{encode_part(claims)}"
        assert_refused(client, f"{signing_input}.{b64(stranger.sign(signing_input.encode()))}")


@pytest.mark.parametrize(
    "credential",
    [
        "garbage",
        "a.b",
        "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0",
        "a.b.c",
        "a.b.c.d",
        "eyJ.eyJ.eyJ",
        "...",
        "x" * 5000 + ".y.z",
    ],
)
def test_garbage_credentials_are_refused(client: TestClient, tenant: Tenant, credential: str) -> None:
    assert_refused(client, credential)


def test_revoking_the_issuing_key_ends_its_tokens(client: TestClient, tenant: Tenant) -> None:
    second_key = add_key(client, tenant.workspace["id"], name="Mobile app")
    minted = Tenant(tenant.org, tenant.workspace, second_key, {})
    body = issue(client, minted)
    kept = issue(client, tenant, "user-kept")
    keys = client.get("/v1/admin/keys", params={"workspace_id": tenant.workspace["id"]}, headers=ADMIN)
    key_id = next(k["id"] for k in keys.json()["data"] if k["name"] == "Mobile app")
    assert client.delete(f"/v1/admin/keys/{key_id}", headers=ADMIN).status_code == 200

    assert "revoked" in assert_refused(client, body["access_token"])["message"]
    assert_envelope(refresh(client, body["refresh_token"]), 401, "unauthorized")
    # Tokens of other keys live on.
    assert client.get("/v1/usage", headers=bearer(kept["access_token"])).status_code == 200


def test_access_token_cannot_mint_tokens(client: TestClient, tenant: Tenant) -> None:
    token = issue(client, tenant)["access_token"]
    response = client.post("/v1/token", json={"identifier_id": "user-999"}, headers=bearer(token))
    error = assert_envelope(response, 403, "forbidden")
    assert "access token" in error["message"]


def test_token_endpoint_needs_a_key(client: TestClient, tenant: Tenant) -> None:
    assert_envelope(client.post("/v1/token", json={"identifier_id": "u"}), 401, "unauthorized")
    bad = {"Authorization": "Bearer ml_live_" + "0" * 48}
    assert_envelope(client.post("/v1/token", json={"identifier_id": "u"}, headers=bad), 401, "unauthorized")
    # A key of another organization may not name this workspace.
    other = make_tenant(client, name="Other")
    crossing = {**other.headers, "X-Workspace-Id": tenant.workspace["id"]}
    assert_envelope(client.post("/v1/token", json={"identifier_id": "u"}, headers=crossing), 403, "forbidden")


def test_organization_key_issues_for_a_named_workspace(client: TestClient, tenant: Tenant) -> None:
    org_key = add_key(client, tenant.workspace["id"], name="Org", scope="organization")
    second = client.post(
        "/v1/admin/workspaces",
        json={"organization_id": tenant.org["id"], "name": "Second"},
        headers=ADMIN,
    ).json()
    headers = {**bearer(org_key), "X-Workspace-Id": second["id"]}
    response = client.post("/v1/token", json={"identifier_id": "user-1"}, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["workspace_id"] == second["id"]
    assert parts(body["access_token"])[1]["ws"] == second["id"]
    usage = client.get("/v1/usage", headers=bearer(body["access_token"])).json()
    assert usage["scope"]["workspace_id"] == second["id"]
    # Without naming the workspace an organization key cannot tell which one is meant.
    error = assert_envelope(
        client.post("/v1/token", json={"identifier_id": "user-1"}, headers=bearer(org_key)),
        400,
        "invalid_request",
    )
    assert error["param"] == "X-Workspace-Id"


# -- reads and writes with an access token -----------------------------------------------------------
def ev(i: str, identifier_id: str | None = None, tokens: int = 100) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": i,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "prompt_tokens": tokens,
        "completion_tokens": 0,
        "timestamp": "2026-03-14T10:00:00Z",
    }
    if identifier_id is not None:
        event["identifier_id"] = identifier_id
    return event


def test_reads_with_an_access_token_see_only_its_identifier(client: TestClient, tenant: Tenant) -> None:
    events = [ev("a1", "user-a", 100), ev("a2", "user-a", 20), ev("b1", "user-b", 7), ev("w1", None, 3)]
    response = client.post("/v1/events", json={"events": events}, headers=tenant.headers)
    assert response.json()["accepted"] == 4, response.text
    token = bearer(issue(client, tenant, "user-a")["access_token"])

    summary = client.get("/v1/usage", headers=token).json()
    # The identifier's own consumption...
    assert summary["daily"]["tokens"]["usage"] == summary["monthly"]["tokens"]["usage"] == 120
    # ...while the top level is the quota it draws on: with no limit of its own, its organization's.
    assert (summary["usage"], summary["remaining"]) == (130, 50_000_000 - 130)
    assert summary["limited_by"]["scope"] == "organization"
    assert summary["daily"]["calls"]["usage"] == 2
    assert client.get("/v1/usage", headers=tenant.headers).json()["usage"] == 130

    history = client.get("/v1/usage/history", headers=token).json()
    assert history["identifier_id"] == "user-a"
    assert sum(day["tokens"] for day in history["data"]) == 120

    ledger = client.get("/v1/usage/ledger", headers=token).json()
    assert ledger["total_count"] == 2
    assert {row["identifier_id"] for row in ledger["data"]} == {"user-a"}
    assert sorted(row["total_tokens"] for row in ledger["data"]) == [20, 100]
    # Filters and pages narrow the identifier's rows; they never widen them to the workspace's.
    prefix = tenant.key_info["key_prefix"]
    narrowed = client.get(
        "/v1/usage/ledger", params={"key_prefix": prefix, "limit": 1, "offset": 1}, headers=token
    ).json()
    assert narrowed["total_count"] == 2
    assert [row["identifier_id"] for row in narrowed["data"]] == ["user-a"]
    assert client.get("/v1/usage/ledger", headers=tenant.headers).json()["total_count"] == 4

    events_page = client.get("/v1/usage/events", headers=token).json()
    assert events_page["pagination"]["total"] == 2
    assert len(events_page["data"]) == 2

    # Asking for another identifier is refused, not silently widened.
    for path in ("/v1/usage", "/v1/usage/history", "/v1/usage/ledger"):
        assert_envelope(
            client.get(path, params={"identifier_id": "user-b"}, headers=token), 400, "invalid_request"
        )
        assert client.get(path, params={"identifier_id": "user-a"}, headers=token).status_code == 200


def test_events_with_an_access_token_belong_to_its_identifier(client: TestClient, tenant: Tenant) -> None:
    token = bearer(issue(client, tenant, "user-a")["access_token"])
    response = client.post("/v1/events", json={"events": [ev("t1", tokens=42)]}, headers=token)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 1
    rows = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"]
    assert len(rows) == 1
    row = rows[0]
    assert row["identifier_id"] == "user-a"
    assert row["key_prefix"] == tenant.key_info["key_prefix"]  # attributed to the issuing key
    assert client.get("/v1/usage", headers=token).json()["usage"] == 42


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"identifier_id": "u", "limits": {"daily_tokenz": 5}}, "limits"),
        ({"identifier_id": "u", "limits": {"daily_tokens": -2}}, "limits.daily_tokens"),
        ({"identifier_id": "u", "limits": {"daily_tokens": 10**16}}, "limits.daily_tokens"),
        ({"identifier_id": "u", "limits": {"daily_tokens": "5"}}, "limits.daily_tokens"),
        ({"identifier_id": "u", "limits": {"daily_tokens": 5.0}}, "limits.daily_tokens"),
        ({"identifier_id": "u", "limits": {"daily_tokens": True}}, "limits.daily_tokens"),
        ({"identifier_id": "u", "limits": [1]}, "limits"),
        ({"identifier_id": 123}, "identifier_id"),
        ({"identifier_id": ""}, "identifier_id"),
        ({"identifier_id": "   "}, "identifier_id"),
        ({"identifier_id": "x" * 201}, "identifier_id"),
        ({"identifier_id": "a\nb"}, "identifier_id"),
        ({"identifier_id": "a\x00b"}, "identifier_id"),
        ({"identifier_id": None}, "identifier_id"),
        ({}, "identifier_id"),
        ({"identifier_id": "u", "expires_in": 59}, "expires_in"),
        ({"identifier_id": "u", "expires_in": 86401}, "expires_in"),
        ({"identifier_id": "u", "expires_in": "900"}, "expires_in"),
        ({"identifier_id": "u", "scope": "admin"}, "scope"),
    ],
)
def test_bad_token_bodies(client: TestClient, tenant: Tenant, body: dict[str, Any], param: str) -> None:
    # Text no database can store is refused at the edge (400), before the schema is looked at (422).
    status = 400 if "\x00" in str(body.get("identifier_id")) else 422
    error = assert_envelope(
        client.post("/v1/token", json=body, headers=tenant.headers), status, "invalid_request"
    )
    assert error["param"] == param
    if "daily_tokenz" in str(body):
        assert "daily_tokenz" in error["message"]


@pytest.mark.parametrize(
    "body", [{}, {"refresh_token": 5}, {"refresh_token": None}, {"refresh_token": "x", "extra": 1}, []]
)
def test_bad_refresh_bodies(client: TestClient, body: Any) -> None:
    assert_envelope(client.post("/v1/token/refresh", json=body), 422, "invalid_request")


def test_malformed_json_body(client: TestClient, tenant: Tenant) -> None:
    response = client.post(
        "/v1/token", content=b"{not json", headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert_envelope(response, 400, "invalid_request")
