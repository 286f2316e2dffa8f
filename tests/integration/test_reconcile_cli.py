"""``meterline reconcile`` through its real entry point: 0 drift after real traffic through the API, every
tampered rollup and credit-usage entry listed (key, stored, ledger) with exit 1, and ``--rebuild`` putting
both projections back to what the ledger says, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from conftest import ADMIN, Tenant, add_key, make_tenant
from meterline.config import Settings
from meterline.storage.database import Database
from meterline.storage.reconcile import EXPECTED_ROLLUPS_SQL, expected_credit_usage
from meterline.storage.tables import ROLLUP_DIMENSIONS

METERLINE = str(Path(sys.executable).with_name("meterline"))
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-20241022", "text-embedding-3-small"]
# Two billing periods (NOW is 2026-03-14), several hours and days.
TIMES = ["2026-02-03T08:15:00Z", "2026-02-28T23:59:59Z", "2026-03-01T00:00:00Z", "2026-03-14T09:05:00Z"]


def reconcile(settings: Settings, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATABASE_URL"] = settings.database_url
    env["METERLINE_SIGNING_KEY_FILE"] = settings.signing_key_file
    env["COLUMNS"] = "250"
    result = subprocess.run(
        [METERLINE, "reconcile", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def rows(settings: Settings, sql: str, **params: Any) -> list[Any]:
    db = Database(settings.database_url)
    try:
        with db.engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return list(result) if result.returns_rows else []
    finally:
        db.dispose()


def workload(client: TestClient, tenant: Tenant) -> Tenant:
    """Events through the API: two organizations, several workspaces, keys, users, models, sources,
    endpoints and two billing periods; one organization draws on bonus credits."""
    other = make_tenant(client, name="Globex", plan="free", billing_anchor_day=31)
    grant = client.post(
        "/v1/admin/credits",
        json={"organization_id": other.org["id"], "amount": "5", "reason": "Referral"},
        headers=ADMIN,
    )
    assert grant.status_code == 201, grant.text
    ws2 = client.post(
        "/v1/admin/workspaces",
        json={"organization_id": tenant.org["id"], "name": "Research", "group": "R&D"},
        headers=ADMIN,
    )
    assert ws2.status_code == 201, ws2.text
    keys = [tenant.key, add_key(client, tenant.workspace["id"]), add_key(client, ws2.json()["id"]), other.key]
    for k, key in enumerate(keys):
        events = [
            {
                "id": f"k{k}-e{i}",
                "model": MODELS[(i + k) % len(MODELS)],
                "prompt_tokens": 1000 * (i + 1) + k,
                "completion_tokens": 300 * (i % 3),
                "user_id": f"user-{i % 3}",
                "source": ["web", "cli", "api"][i % 3],
                "endpoint": ["/chat", "/search"][i % 2],
                "timestamp": TIMES[i % len(TIMES)],
            }
            for i in range(12)
        ]
        response = client.post(
            "/v1/events", json={"events": events}, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
    return other


def test_reconcile_finds_tampering_and_rebuild_repairs_it(
    settings: Settings, client: TestClient, tenant: Tenant
) -> None:
    other = workload(client, tenant)
    ledger_rows = rows(settings, "SELECT COUNT(*) FROM ledger")[0][0]
    assert ledger_rows == 48
    assert rows(settings, "SELECT COUNT(DISTINCT period_start_us) FROM credit_usage")[0][0] >= 2
    clean = reconcile(settings)
    assert "0 drift" in clean.stdout
    assert json.loads(reconcile(settings, "--json").stdout) == {
        "ok": True,
        "ledger_rows": 48,
        "drift": 0,
        "entries": [],
        "quarantined": 0,
    }

    # One rollup's cost edited, one rollup deleted, one invented; one credit-usage period edited.
    columns = ", ".join(("hour", *ROLLUP_DIMENSIONS))
    first, second = rows(settings, f"SELECT {columns} FROM usage_hourly ORDER BY {columns} LIMIT 2")
    match = " AND ".join(f"{c} = :{c}" for c in ("hour", *ROLLUP_DIMENSIONS))
    rows(settings, f"UPDATE usage_hourly SET cost_nanos = cost_nanos + 7 WHERE {match}", **first._asdict())
    rows(settings, f"DELETE FROM usage_hourly WHERE {match}", **second._asdict())
    rows(
        settings,
        "INSERT INTO usage_hourly SELECT hour + 1000, organization_id, workspace_id, key_id, identifier_id, "
        "user_id, model, provider, endpoint, source, event, requests, units, prompt_tokens, "
        "completion_tokens, cache_read_tokens, cache_write_tokens, total_tokens, audio_ms, cost_nanos, "
        f"credits_nanos FROM usage_hourly WHERE {match}",
        **first._asdict(),
    )
    period = rows(
        settings,
        "SELECT period_start_us, bonus_nanos FROM credit_usage WHERE organization_id = :o "
        "ORDER BY period_start_us DESC LIMIT 1",
        o=other.org["id"],
    )[0]
    rows(
        settings,
        "UPDATE credit_usage SET bonus_nanos = bonus_nanos + 5 WHERE organization_id = :o "
        "AND period_start_us = :p",
        o=other.org["id"],
        p=period.period_start_us,
    )

    # The narrow rollups: a day entry's tokens edited, a billing-period entry deleted.
    day = rows(
        settings,
        "SELECT organization_id, workspace_id, dimension, bucket, value FROM usage_rollups "
        "WHERE grain = 'd' AND dimension = 'user' ORDER BY bucket, value LIMIT 1",
    )[0]
    rows(
        settings,
        "UPDATE usage_rollups SET total_tokens = total_tokens + 3 WHERE organization_id = :o AND "
        "workspace_id = :w AND dimension = :d AND grain = 'd' AND bucket = :b AND value = :v",
        o=day.organization_id,
        w=day.workspace_id,
        d=day.dimension,
        b=day.bucket,
        v=day.value,
    )
    rows(
        settings,
        "DELETE FROM usage_rollups WHERE organization_id = :o AND grain = 'p' AND dimension = 'model'",
        o=other.org["id"],
    )

    # The usage details: an entry invented (web searches no ledger row made).
    rows(
        settings,
        "INSERT INTO usage_details SELECT organization_id, '', '', hour, 'ghost-model', 0, 0, 0, 0, 0, 0, 0, "
        f"0, 0, 3, 0, 0 FROM usage_hourly WHERE {match}",
        **first._asdict(),
    )

    drifted = reconcile(settings, code=1)
    narrow = [line for line in drifted.stdout.splitlines() if "DRIFT usage_rollups" in line]
    assert (
        f"{5 + len(narrow)} drift (3 usage_hourly, {len(narrow)} usage_rollups, 1 usage_details, "
        "1 credit_usage)"
    ) in drifted.stdout
    assert "DRIFT usage_details [" in drifted.stdout
    assert "model='ghost-model'" in drifted.stdout
    assert any("grain='d'" in line and "total_tokens=" in line for line in narrow)
    assert any("grain='p'" in line and "stored missing" in line for line in narrow)
    assert f"bonus_nanos={period.bonus_nanos + 5}; ledger bonus_nanos={period.bonus_nanos}" in drifted.stdout
    report = json.loads(reconcile(settings, "--json", code=1).stdout)
    assert (report["ok"], report["drift"]) == (False, 5 + len(narrow))
    by_kind = {(e["table"], e["stored"] is None, e["ledger"] is None): e for e in report["entries"]}
    edited = next(
        e for e in report["entries"]
        if e["table"] == "usage_hourly" and e["stored"] and e["ledger"]
    )  # fmt: skip
    assert edited["key"] == dict(first._asdict())
    assert edited["stored"]["cost_nanos"] == edited["ledger"]["cost_nanos"] + 7
    assert by_kind[("usage_hourly", True, False)]["key"] == dict(second._asdict())  # deleted
    assert by_kind[("usage_hourly", False, True)]["key"]["hour"] == first.hour + 1000  # invented
    credit = by_kind[("credit_usage", False, False)]
    assert credit["key"] == {"organization_id": other.org["id"], "period_start_us": period.period_start_us}
    assert credit["stored"]["bonus_nanos"] - credit["ledger"]["bonus_nanos"] == 5

    rebuilt = reconcile(settings, "--rebuild")
    assert "rebuilt" in rebuilt.stdout
    assert "0 drift" in rebuilt.stdout
    reconcile(settings)

    # The projections now hold exactly the ledger's sums.
    stored = rows(settings, f"SELECT * FROM usage_hourly ORDER BY {columns}")
    assert [tuple(r) for r in stored] == sorted(
        (tuple(r) for r in rows(settings, EXPECTED_ROLLUPS_SQL)), key=lambda r: r[:11]
    )
    assert sum(r.requests for r in stored) == 48
    db = Database(settings.database_url)
    try:
        with db.engine.connect() as conn:
            expected = expected_credit_usage(conn)
    finally:
        db.dispose()
    assert rows(settings, "SELECT * FROM usage_details WHERE model = 'ghost-model'") == []
    credit_rows = rows(settings, "SELECT * FROM credit_usage")
    assert {(r[0], r[1]): (r[2], r[3], r[4]) for r in credit_rows} == expected
    assert expected[(other.org["id"], period.period_start_us)][1] == period.bonus_nanos
