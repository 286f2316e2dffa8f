"""Receipts over HTTP on every backend (seed 004): made in the settle transaction, verifiable against
``/.well-known/jwks.json``, opt-out, scoping, the chain listing, and key rotation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from conftest import ADMIN, Tenant, add_key, assert_envelope, make_tenant
from meterline.config import Settings
from meterline.receipts import GENESIS_HASH, RECEIPT_TYPE, mismatch, verify_chain
from meterline.services import Services
from meterline.signing import VerifyingKeys

METERLINE = str(Path(sys.executable).with_name("meterline"))


def event(i: int | str, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"ev-{i}",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        **fields,
    }


def send(client: TestClient, tenant: Tenant, *events: dict[str, Any], **headers: str) -> list[dict[str, Any]]:
    response = client.post("/v1/events", json={"events": list(events)}, headers={**tenant.headers, **headers})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def org_key(client: TestClient, tenant: Tenant) -> dict[str, str]:
    key = add_key(client, tenant.workspace["id"], "Org reader", scope="organization")
    return {"Authorization": f"Bearer {key}"}


def chain(client: TestClient, headers: dict[str, str], limit: int = 1000) -> tuple[list[dict[str, Any]], Any]:
    """Every receipt of the caller's organization, page by page, and the chain head."""
    receipts: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get("/v1/receipts", params={"after_seq": after, "limit": limit}, headers=headers)
        assert page.status_code == 200, page.text
        body = page.json()
        receipts.extend(body["data"])
        if not body["has_more"]:
            return receipts, body["head"]
        after = body["next_after_seq"]


def test_events_get_receipts_that_verify_against_the_published_keys(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    sent = send(client, tenant, event(1), event(2, user_id="bob"), {"id": "case-1", "event": "case.execute"})
    receipt_ids = [e["receipt_id"] for e in sent]
    assert all(receipt_ids)
    assert len(set(receipt_ids)) == 3
    jwks = client.get("/.well-known/jwks.json").json()
    receipts, head = chain(client, org_key(client, tenant))
    assert [r["id"] for r in receipts] == receipt_ids
    assert [r["seq"] for r in receipts] == [1, 2, 3]
    assert receipts[0]["prev_hash"] == GENESIS_HASH
    assert head["seq"] == 3
    report = verify_chain([r["jws"] for r in receipts], jwks)
    assert report.ok, report.broken
    assert report.head.hash == head["hash"]
    # Each receipt is the ledger row it names, and the ledger API names it back.
    ledger = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"]
    by_receipt = {r["receipt_id"]: r for r in ledger}
    keys = VerifyingKeys.from_jwks(jwks)
    for sent_event, receipt in zip(sent, receipts, strict=True):
        one = client.get(f"/v1/receipts/{receipt['id']}", headers=tenant.headers)
        assert one.status_code == 200, one.text
        body = one.json()
        assert {k: body[k] for k in ("id", "object", "ledger_id", "seq", "prev_hash", "jws", "kid")} == {
            "id": receipt["id"],
            "object": "receipt",
            "ledger_id": sent_event["ledger_id"],
            "seq": receipt["seq"],
            "prev_hash": receipt["prev_hash"],
            "jws": receipt["jws"],
            "kid": jwks["keys"][0]["kid"],
        }
        claims = keys.verify(body["jws"], typ=RECEIPT_TYPE)
        row = by_receipt[receipt["id"]]
        assert (claims["ledger_id"], claims["cost"], claims["failover"]) == (
            row["id"],
            row["cost"],
            row["failover"],
        )
        stored = services.reservation_store.ledger_row(tenant.org["id"], row["id"])
        assert stored is not None
        assert mismatch(claims, stored) is None


def test_repeated_events_keep_their_receipt_and_make_no_new_one(client: TestClient, tenant: Tenant) -> None:
    first = send(client, tenant, event(1), event(2))
    again = send(client, tenant, event(1), event(2), event(3))
    assert [e["receipt_id"] for e in again[:2]] == [e["receipt_id"] for e in first]
    assert [e["duplicate"] for e in again] == [True, True, False]
    receipts, head = chain(client, org_key(client, tenant))
    assert [r["seq"] for r in receipts] == [1, 2, 3]
    assert head["seq"] == 3


def test_opting_out_gives_no_receipt(client: TestClient, tenant: Tenant) -> None:
    send(client, tenant, event(1))
    (opted_out,) = send(client, tenant, event(2), **{"X-Meterline-Receipt": "false"})
    assert opted_out["receipt_id"] is None
    (again,) = send(client, tenant, event(3), **{"X-Meterline-Receipt": "true"})
    ledger = client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"]
    assert {r["event_id"]: r["receipt_id"] for r in ledger}["ev-2"] is None
    receipts, _ = chain(client, org_key(client, tenant))
    assert [r["seq"] for r in receipts] == [1, 2]
    assert receipts[1]["id"] == again["receipt_id"]
    assert opted_out["ledger_id"] not in {r["ledger_id"] for r in receipts}
    bad = client.post(
        "/v1/events", json={"events": [event(4)]}, headers={**tenant.headers, "X-Meterline-Receipt": "maybe"}
    )
    error = assert_envelope(bad, 400, "invalid_request")
    assert error["param"] == "X-Meterline-Receipt"


def test_reservations_settle_with_a_receipt_or_without(client: TestClient, tenant: Tenant) -> None:
    def reserve_and_settle(**headers: str) -> dict[str, Any]:
        held = client.post(
            "/v1/reservations",
            json={"model": "gpt-4o-mini", "prompt_tokens": 100, "completion_tokens": 100},
            headers={**tenant.headers, **headers},
        )
        assert held.status_code == 201, held.text
        settled = client.post(
            f"/v1/reservations/{held.json()['id']}/settle",
            json={"completion_tokens": 40},
            headers={**tenant.headers, **headers},
        )
        assert settled.status_code == 200, settled.text
        body: dict[str, Any] = settled.json()
        return body

    with_receipt = reserve_and_settle()
    assert with_receipt["receipt_id"]
    receipt = client.get(f"/v1/receipts/{with_receipt['receipt_id']}", headers=tenant.headers).json()
    assert receipt["ledger_id"] == with_receipt["ledger_id"]
    assert reserve_and_settle(**{"X-Meterline-Receipt": "false"})["receipt_id"] is None
    receipts, _ = chain(client, org_key(client, tenant))
    assert [r["id"] for r in receipts] == [with_receipt["receipt_id"]]


def test_receipts_are_scoped_like_the_ledger(client: TestClient, tenant: Tenant) -> None:
    ws2 = client.post(
        "/v1/admin/workspaces", json={"organization_id": tenant.org["id"], "name": "Second"}, headers=ADMIN
    ).json()
    ws2_key = {"Authorization": f"Bearer {add_key(client, ws2['id'], 'W2')}"}
    other_org = make_tenant(client, name="Globex")
    (mine,) = send(client, tenant, event(1))
    theirs = client.post("/v1/events", json={"events": [event("ws2")]}, headers=ws2_key).json()["data"][0]
    (foreign,) = send(client, other_org, event(1))
    org_headers = org_key(client, tenant)

    def status(receipt_id: str, headers: dict[str, str]) -> int:
        return client.get(f"/v1/receipts/{receipt_id}", headers=headers).status_code

    assert status(mine["receipt_id"], tenant.headers) == 200
    assert status(theirs["receipt_id"], tenant.headers) == 404  # another workspace of the organization
    assert status(theirs["receipt_id"], ws2_key) == 200
    assert status(mine["receipt_id"], org_headers) == 200
    assert status(theirs["receipt_id"], org_headers) == 200
    assert status(foreign["receipt_id"], org_headers) == 404  # another organization
    assert status(mine["receipt_id"], other_org.headers) == 404
    narrowed = client.get(
        f"/v1/receipts/{theirs['receipt_id']}",
        headers={**org_headers, "X-Workspace-Id": tenant.workspace["id"]},
    )
    assert narrowed.status_code == 404
    error = assert_envelope(client.get("/v1/receipts/nope", headers=tenant.headers), 404, "not_found")
    assert "nope" in error["message"]
    assert_envelope(client.get(f"/v1/receipts/{'x' * 5000}", headers=tenant.headers), 404, "not_found")
    assert_envelope(client.get(f"/v1/receipts/{mine['receipt_id']}"), 401, "unauthorized")
    # The chain spans workspaces: listing it takes an organization key; each organization has its own.
    assert_envelope(client.get("/v1/receipts", headers=tenant.headers), 403, "forbidden")
    receipts, _ = chain(client, org_headers)
    assert [r["id"] for r in receipts] == [mine["receipt_id"], theirs["receipt_id"]]
    foreign_chain, _ = chain(client, org_key(client, other_org))
    assert [(r["id"], r["seq"]) for r in foreign_chain] == [(foreign["receipt_id"], 1)]


def test_the_chain_is_listed_in_pages(client: TestClient, tenant: Tenant) -> None:
    send(client, tenant, *(event(i) for i in range(7)))
    headers = org_key(client, tenant)
    paged, head = chain(client, headers, limit=3)
    assert [r["seq"] for r in paged] == list(range(1, 8))
    assert head["seq"] == 7
    first = client.get("/v1/receipts", params={"limit": 3}, headers=headers).json()
    assert (first["has_more"], first["next_after_seq"]) == (True, 3)
    last = client.get("/v1/receipts", params={"after_seq": 6, "limit": 3}, headers=headers).json()
    assert ([r["seq"] for r in last["data"]], last["has_more"], last["next_after_seq"]) == ([7], False, None)
    for params in ({"limit": 0}, {"limit": 1001}, {"after_seq": -1}, {"after_seq": "x"}):
        assert client.get("/v1/receipts", params=params, headers=headers).status_code in (400, 422)


def test_concurrent_settles_make_one_unbroken_chain(client: TestClient, tenant: Tenant) -> None:
    def post(batch: int) -> None:
        send(client, tenant, *(event(f"{batch}-{i}") for i in range(5)))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, range(16)))
    receipts, head = chain(client, org_key(client, tenant))
    assert [r["seq"] for r in receipts] == list(range(1, 81))
    assert head["seq"] == 80
    assert verify_chain([r["jws"] for r in receipts], client.get("/.well-known/jwks.json").json()).ok


def rotate(settings: Settings) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATABASE_URL"] = settings.database_url
    env["METERLINE_SIGNING_KEY_FILE"] = settings.signing_key_file
    result = subprocess.run(
        [METERLINE, "keys", "rotate", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_key_rotation_keeps_old_receipts_and_tokens_verifiable(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    (before,) = send(client, tenant, event(1))
    old_kid = client.get("/.well-known/jwks.json").json()["keys"][0]["kid"]
    token = client.post("/v1/token", json={"identifier_id": "user-1"}, headers=tenant.headers)
    assert token.status_code in (200, 201), token.text
    access = {"Authorization": f"Bearer {token.json()['access_token']}"}

    rotated = rotate(settings)  # the real CLI, while the server runs
    assert rotated["retired"] == [old_kid]
    new_kid = rotated["active"]

    (after,) = send(client, tenant, event(2))
    jwks = client.get("/.well-known/jwks.json").json()
    assert [k["kid"] for k in jwks["keys"]] == [new_kid, old_kid]
    assert all("d" not in k for k in jwks["keys"])
    old_receipt = client.get(f"/v1/receipts/{before['receipt_id']}", headers=tenant.headers).json()
    new_receipt = client.get(f"/v1/receipts/{after['receipt_id']}", headers=tenant.headers).json()
    assert (old_receipt["kid"], new_receipt["kid"]) == (old_kid, new_kid)
    receipts, _ = chain(client, org_key(client, tenant))
    assert verify_chain([r["jws"] for r in receipts], jwks).ok
    # Without the retired key, the old receipt no longer verifies: it really was the old key's.
    only_new = {"keys": [k for k in jwks["keys"] if k["kid"] == new_kid]}
    broken = verify_chain([r["jws"] for r in receipts], only_new).broken
    assert broken is not None
    assert broken.seq == 1
    # An access token from before the rotation still works; new ones are signed by the new key.
    assert client.get("/v1/usage", headers=access).status_code == 200
    fresh = client.post("/v1/token", json={"identifier_id": "user-2"}, headers=tenant.headers).json()
    assert VerifyingKeys.from_jwks(only_new).verify(fresh["access_token"], typ="at+jwt")["sub"] == "user-2"
