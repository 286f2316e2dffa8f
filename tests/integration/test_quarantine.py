"""Poisoned reservations never stop a real `meterline serve` from starting, on SQLite and PostgreSQL.

Planted in the database as a crashed process would leave them: a reservation whose stored usage cannot
be decoded, one whose model holds a NUL (the reported poison: PostgreSQL text cannot store it), one of a
plan the configuration no longer has, and a healthy one. At start-up the healthy one and the NUL one are
recorded (the NUL cleaned), the other two are quarantined — listed by the CLI and the admin API, counted
in /metrics, reported by `meterline reconcile`, alerted — and the operator settles or voids them."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import insert

from integration.test_serve import METERLINE, clean_env, process
from meterline.clock import to_micros
from meterline.config import load_settings
from meterline.metering.records import UsageRecord
from meterline.metering.reservations import encode_record
from meterline.services import build_services
from meterline.storage.database import Database
from meterline.storage.tables import reservations
from servers import free_port

ADMIN = "ml_admin_quarantine_0123456789"
TEAM_PLAN = """
[plans.team]
daily_tokens = -1
monthly_tokens = -1
daily_calls = -1
monthly_calls = -1
rpm = -1
tpm = -1
monthly_credits = -1
overage = "block"
"""


def _cli(
    args: list[str], env: dict[str, str], cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [METERLINE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _plant(url: str, rows: list[tuple[str, str, str]]) -> None:
    db = Database(url)
    now = datetime.now(UTC)
    with db.write() as conn:
        for rid, org, estimate in rows:
            conn.execute(
                insert(reservations).values(
                    id=rid,
                    organization_id=org,
                    estimate_json=estimate,
                    meters_json=orjson.dumps(["tokens", "calls", "credits"]).decode(),
                    created_at_us=to_micros(now - timedelta(minutes=2)),
                    expires_at_us=to_micros(now + timedelta(minutes=10)),
                )
            )
    db.dispose()


def _record(org: str, ws: str, **fields: Any) -> str:
    base: dict[str, Any] = {
        "organization_id": org,
        "workspace_id": ws,
        "created_at": datetime.now(UTC) - timedelta(minutes=2),
        "model": "gpt-4o-mini",
        "provider": "openai",
        "prompt_tokens": 100,
        "completion_tokens": 50,
    }
    return encode_record(UsageRecord(**{**base, **fields}))


def test_poisoned_reservations_are_quarantined_and_the_server_starts(
    database_url: str, tmp_path: Path
) -> None:
    with_team = tmp_path / "with-team.toml"
    with_team.write_text(TEAM_PLAN)
    without_team = tmp_path / "without-team.toml"
    without_team.write_text("")
    env = clean_env(
        METERLINE_DATABASE_URL=database_url,
        METERLINE_ADMIN_KEY=ADMIN,
        METERLINE_SIGNING_KEY_FILE=str(tmp_path / "keys.json"),
    )

    # Tenants are made in-process (set-up, not what is tested): each CLI call costs a second of start-up.
    services = build_services(
        load_settings(with_team, database_url=database_url, signing_key_file=str(tmp_path / "keys.json"))
    )

    def tenant(plan: str) -> tuple[str, str, str]:
        org = services.tenancy.create_organization(f"Org {plan}", plan)
        ws = services.tenancy.create_workspace(org.id, "Main", None)
        key = services.tenancy.create_key(ws.id, "K", scope="organization")
        return org.id, ws.id, key.secret

    pro_org, pro_ws, pro_key = tenant("pro")
    team_org, team_ws, team_key = tenant("team")
    services.close()
    _plant(
        database_url,
        [
            ("rsv_good", pro_org, _record(pro_org, pro_ws, idempotency_key="rsv_good")),
            (
                "rsv_nul",
                pro_org,
                _record(
                    pro_org,
                    pro_ws,
                    model="gpt-4o-mini\u0000x",
                    user_id="al\u0000ice",
                    idempotency_key="rsv_nul",
                ),
            ),
            ("rsv_garbled", pro_org, '{"organization_id": "' + pro_org + '", "model": "gpt'),
            ("rsv_team", team_org, _record(team_org, team_ws, idempotency_key="rsv_team")),
        ],
    )

    port = free_port()
    pro = {"Authorization": f"Bearer {pro_key}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with process(["serve", "--port", str(port), "--config", str(without_team)], env, tmp_path, port) as base:
        ledger = httpx.get(f"{base}/v1/usage/ledger", headers=pro, timeout=10).json()["data"]
        assert sorted(row["id"] for row in ledger) == ["rsv_good", "rsv_nul"]
        cleaned = next(row for row in ledger if row["id"] == "rsv_nul")
        assert cleaned["model"] == "gpt-4o-minix"
        assert cleaned["metadata"]["meterline.recovered"] is True

        listed = httpx.get(f"{base}/v1/admin/quarantine", headers=admin, timeout=10).json()
        assert listed["total_count"] == 2
        by_reservation = {e["reservation_id"]: e for e in listed["data"]}
        assert set(by_reservation) == {"rsv_garbled", "rsv_team"}
        assert by_reservation["rsv_garbled"]["usage"] is None
        assert by_reservation["rsv_garbled"]["raw"].startswith('{"organization_id"')
        assert "team" in by_reservation["rsv_team"]["error"]
        assert by_reservation["rsv_team"]["usage"]["prompt_tokens"] == 100

        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert "meterline_quarantined_entries 2.0" in metrics
        alerts = httpx.get(f"{base}/v1/alerts", headers=pro, timeout=10).json()["data"]
        by_kind = {a["kind"]: a for a in alerts}
        assert sorted(by_kind) == ["unpriced_usage", "usage_quarantined"]
        assert by_kind["usage_quarantined"]["details"]["reservation_id"] == "rsv_garbled"
        # The cleaned model name has no price: recorded at cost 0, and said so.
        assert by_kind["unpriced_usage"]["details"]["model"] == "gpt-4o-minix"
        # The server works on: a new reservation is settled as usual.
        made = httpx.post(f"{base}/v1/reservations", json={"prompt_tokens": 5}, headers=pro, timeout=10)
        assert made.status_code == 201, made.text
        done = httpx.post(
            f"{base}/v1/reservations/{made.json()['id']}/settle", json={}, headers=pro, timeout=10
        )
        assert done.status_code == 200, done.text
        remote = _cli(["reconcile", "--url", base, "--admin-key", ADMIN], env, tmp_path)
        assert "2 quarantined usage entries" in " ".join(remote.stdout.split())

    # The operator: list, void the unreadable one, fix the configuration and settle the other.
    cli = ["--config", str(with_team)]
    listed_cli = json.loads(_cli(["quarantine", "list", "--json", *cli], env, tmp_path).stdout)
    ids = {e["reservation_id"]: e["id"] for e in listed_cli}
    assert set(ids) == {"rsv_garbled", "rsv_team"}
    report = _cli(["reconcile", *cli], env, tmp_path)
    assert "0 drift" in report.stdout
    assert "2 quarantined usage entries" in " ".join(report.stdout.split())
    refused = _cli(["quarantine", "settle", ids["rsv_garbled"], *cli], env, tmp_path, check=False)
    assert refused.returncode == 1
    assert "void it" in refused.stdout + refused.stderr
    voided = json.loads(
        _cli(
            ["quarantine", "void", ids["rsv_garbled"], "--note", "truncated write", "--json", *cli],
            env,
            tmp_path,
        ).stdout
    )[0]
    assert voided["status"] == "voided"
    assert voided["note"] == "truncated write"
    settled = json.loads(
        _cli(["quarantine", "settle", ids["rsv_team"], "--json", *cli], env, tmp_path).stdout
    )[0]
    assert settled["status"] == "settled"
    assert settled["ledger_id"] == "rsv_team"
    again = _cli(["quarantine", "settle", ids["rsv_team"], *cli], env, tmp_path, check=False)
    assert again.returncode == 1
    assert "settled already" in again.stdout + again.stderr
    assert json.loads(_cli(["quarantine", "list", "--json", *cli], env, tmp_path).stdout) == []
    report = _cli(["reconcile", *cli], env, tmp_path)
    assert "0 drift" in report.stdout
    assert "quarantined" not in report.stdout

    port = free_port()
    with process(["serve", "--port", str(port), "--config", str(with_team)], env, tmp_path, port) as base:
        team = {"Authorization": f"Bearer {team_key}"}
        rows = httpx.get(f"{base}/v1/usage/ledger", headers=team, timeout=10).json()["data"]
        assert [(r["id"], r["prompt_tokens"], r["metadata"]["meterline.quarantined"]) for r in rows] == [
            ("rsv_team", 100, ids["rsv_team"])
        ]
        usage = httpx.get(f"{base}/v1/usage", headers=team, timeout=10).json()
        assert usage["monthly"]["tokens"]["usage"] == 150
        assert "meterline_quarantined_entries 0.0" in httpx.get(f"{base}/metrics", timeout=10).text
