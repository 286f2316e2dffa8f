"""``meterline verify`` through its real entry point: OK on an intact database, then the first broken link
(organization, seq, receipt id, reason) and a non-zero exit after the receipts or the ledger are
tampered with; and over HTTP against a running ``meterline serve``."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from conftest import ADMIN_KEY, Tenant, make_tenant
from meterline.config import Settings
from meterline.storage.database import Database
from servers import free_port

METERLINE = str(Path(sys.executable).with_name("meterline"))


def verify(settings: Settings, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATABASE_URL"] = settings.database_url
    env["METERLINE_SIGNING_KEY_FILE"] = settings.signing_key_file
    env["COLUMNS"] = "250"
    result = subprocess.run(
        [METERLINE, "verify", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def send(
    client: TestClient, tenant: Tenant, count: int, prefix: str = "ev", **headers: str
) -> list[dict[str, Any]]:
    events = [
        {"id": f"{prefix}-{i}", "model": "gpt-4o-mini", "prompt_tokens": 100 + i, "completion_tokens": 50}
        for i in range(count)
    ]
    response = client.post("/v1/events", json={"events": events}, headers={**tenant.headers, **headers})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def execute(settings: Settings, sql: str, **params: Any) -> None:
    db = Database(settings.database_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        db.dispose()


def scalar(settings: Settings, sql: str, **params: Any) -> Any:
    db = Database(settings.database_url)
    try:
        with db.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar_one()
    finally:
        db.dispose()


@pytest.fixture
def world(client: TestClient, tenant: Tenant) -> tuple[Tenant, Tenant, list[dict[str, Any]]]:
    other = make_tenant(client, name="Globex")
    sent = send(client, tenant, 4)
    send(client, tenant, 1, prefix="quiet", **{"X-Meterline-Receipt": "false"})
    send(client, other, 2)
    return tenant, other, sent


def test_verify_reports_ok_then_the_first_broken_link(
    settings: Settings, world: tuple[Tenant, Tenant, list[dict[str, Any]]]
) -> None:
    tenant, other, sent = world
    org = tenant.org["id"]
    ok = verify(settings)
    assert "OK: 6 receipts in 2 organization chain(s)" in ok.stdout
    report = json.loads(verify(settings, "--json").stdout)
    assert (report["ok"], report["organizations"], report["receipts"], report["broken"]) == (True, 2, 6, [])
    assert {c["organization_id"]: c["receipts"] for c in report["chains"]} == {org: 4, other.org["id"]: 2}

    # 1. A receipt's JWS edited in the database: its signature fails.
    original = scalar(settings, "SELECT jws FROM receipts WHERE organization_id = :o AND seq = 2", o=org)
    header, payload, signature = original.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["cost"] = "0.000000001"  # what a dishonest operator would like the customer to have paid
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{header}.{forged_payload}.{signature}"
    execute(settings, "UPDATE receipts SET jws = :j WHERE organization_id = :o AND seq = 2", j=forged, o=org)
    broken = verify(settings, ok=False)
    assert broken.returncode == 1
    assert f"BROKEN organization {org} at seq 2 (receipt {sent[1]['receipt_id']})" in broken.stdout
    assert "FAILED: 1 of 2" in broken.stdout
    as_json = json.loads(verify(settings, "--json", ok=False).stdout)
    assert as_json["ok"] is False
    assert as_json["broken"] == [
        {
            "organization_id": org,
            "seq": 2,
            "receipt_id": sent[1]["receipt_id"],
            "reason": as_json["broken"][0]["reason"],
        }
    ]
    # Only the organization asked about.
    assert "OK: 2 receipts in 1" in verify(settings, "--organization", other.org["id"]).stdout
    execute(
        settings, "UPDATE receipts SET jws = :j WHERE organization_id = :o AND seq = 2", j=original, o=org
    )
    verify(settings)

    # 2. A ledger row's cost edited: the receipt still says what was billed.
    execute(
        settings, "UPDATE ledger SET cost_nanos = cost_nanos + 1000 WHERE id = :i", i=sent[2]["ledger_id"]
    )
    edited = json.loads(verify(settings, "--json", ok=False).stdout)["broken"][0]
    assert (edited["seq"], edited["receipt_id"]) == (3, sent[2]["receipt_id"])
    assert edited["reason"].startswith("ledger row cost is ")
    execute(
        settings, "UPDATE ledger SET cost_nanos = cost_nanos - 1000 WHERE id = :i", i=sent[2]["ledger_id"]
    )
    verify(settings)

    # 3. A receipt removed from the middle, then from the end of the chain.
    execute(settings, "UPDATE receipts SET seq = seq + 100 WHERE organization_id = :o AND seq = 2", o=org)
    gap = json.loads(verify(settings, "--json", ok=False).stdout)["broken"][0]
    assert (gap["seq"], gap["receipt_id"]) == (2, sent[2]["receipt_id"])
    assert "expected seq 2, found seq 3" in gap["reason"]
    execute(settings, "UPDATE receipts SET seq = seq - 100 WHERE organization_id = :o AND seq = 102", o=org)
    execute(settings, "DELETE FROM receipts WHERE organization_id = :o AND seq = 4", o=org)
    cut = json.loads(verify(settings, "--json", ok=False).stdout)["broken"][0]
    assert cut["seq"] == 4
    assert "receipts were removed" in cut["reason"]


def test_a_ledger_row_whose_receipt_is_gone_is_reported(
    settings: Settings, world: tuple[Tenant, Tenant, list[dict[str, Any]]]
) -> None:
    tenant, _, sent = world
    # Remove the last receipt and wind the head back with it: the chain is whole, the ledger is not.
    prev = scalar(
        settings, "SELECT prev_hash FROM receipts WHERE organization_id = :o AND seq = 4", o=tenant.org["id"]
    )
    execute(settings, "DELETE FROM receipts WHERE organization_id = :o AND seq = 4", o=tenant.org["id"])
    execute(
        settings,
        "UPDATE receipt_chains SET seq = 3, head_hash = :h WHERE organization_id = :o",
        h=prev,
        o=tenant.org["id"],
    )
    broken = json.loads(verify(settings, "--json", ok=False).stdout)["broken"][0]
    assert broken["receipt_id"] == sent[3]["receipt_id"]
    assert f"ledger row {sent[3]['ledger_id']} names a receipt that does not exist" == broken["reason"]


def test_verify_errors_are_clear(
    settings: Settings, world: tuple[Tenant, Tenant, list[dict[str, Any]]]
) -> None:
    missing = verify(settings, "--organization", "org_missing", ok=False)
    assert "org_missing" in missing.stderr
    no_key = verify(settings, "--url", "http://127.0.0.1:9", ok=False)
    assert no_key.returncode == 2
    assert "--api-key" in no_key.stderr


@contextmanager
def serving(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``meterline serve`` as a real process on a fresh SQLite database; yields its URL and environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(
        METERLINE_ADMIN_KEY=ADMIN_KEY,
        METERLINE_DATABASE_URL=f"sqlite:///{tmp_path / 'live.db'}",
        METERLINE_SIGNING_KEY_FILE=str(tmp_path / "live-key.json"),
    )
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [METERLINE, "serve", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
            yield base, env
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_verify_over_http(tmp_path: Path) -> None:
    with serving(tmp_path) as (base, env):
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        org = httpx.post(
            f"{base}/v1/admin/organizations", json={"name": "Live", "plan": "pro"}, headers=admin
        )
        ws = httpx.post(
            f"{base}/v1/admin/workspaces",
            json={"organization_id": org.json()["id"], "name": "W"},
            headers=admin,
        ).json()

        def key(scope: str) -> str:
            made = httpx.post(
                f"{base}/v1/admin/keys",
                json={"workspace_id": ws["id"], "name": scope, "scope": scope},
                headers=admin,
            )
            secret: str = made.json()["key"]
            return secret

        workspace_key, organization_key = key("workspace"), key("organization")
        events = [
            {"id": f"e{i}", "model": "gpt-4o-mini", "prompt_tokens": 10, "completion_tokens": i}
            for i in range(5)
        ]
        sent = httpx.post(
            f"{base}/v1/events", json={"events": events}, headers={"Authorization": f"Bearer {workspace_key}"}
        )
        assert sent.json()["accepted"] == 5

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [METERLINE, "verify", "--url", base, *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )

        ok = run("--api-key", organization_key, "--json")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        report = json.loads(ok.stdout)
        assert (report["ok"], report["receipts"]) == (True, 5)
        assert report["chains"][0]["organization_id"] == org.json()["id"]
        refused = run("--api-key", workspace_key)
        assert refused.returncode == 1
        assert "organization-scoped key" in refused.stderr
        assert "Traceback" not in refused.stderr
