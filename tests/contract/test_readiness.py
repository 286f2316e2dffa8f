"""`/healthz` (the process answers) and `/readyz` (it can serve: database reachable and current, counter
store reachable), as a load balancer asks them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import text

from conftest import ADMIN_KEY
from meterline.api.app import create_app
from meterline.config import load_settings
from meterline.services import Services
from meterline.storage import migrate
from servers import free_port


def test_a_current_database_and_counters_are_ready(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "migrations": "ok", "counters": "ok"},
    }


def test_a_database_behind_the_code_is_not_ready(client: TestClient, services: Services) -> None:
    with services.db.read() as conn:
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    with services.db.write() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0010_usage_vector'"))
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["migrations"] == "behind the code: run `meterline migrate`"
        assert client.get("/healthz").status_code == 200  # alive all the same
    finally:  # the PostgreSQL database is the session's: it must stay current for the next tests
        with services.db.write() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": current})


def test_readiness_probes_never_read_the_migration_scripts(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A load balancer asks every few seconds, on every worker: Alembic's reading of the scripts cost
    # each probe ~10 ms of the worker's CPU. A probe reads the database's revision only.
    reads: list[object] = []
    from_config = ScriptDirectory.from_config

    def counted(config: Any) -> ScriptDirectory:
        reads.append(config)
        return from_config(config)

    migrate.head_revision.cache_clear()
    monkeypatch.setattr(ScriptDirectory, "from_config", counted)
    try:
        for _ in range(5):
            assert client.get("/readyz").json()["checks"]["migrations"] == "ok"
    finally:
        migrate.head_revision.cache_clear()
    assert reads == []


def test_an_unreachable_counter_store_is_not_ready_and_its_address_is_not_told(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'meterline.db'}",
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        redis_url=f"redis://:s3cret-pass@127.0.0.1:{port}/0",
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"database": "ok", "migrations": "ok", "counters": "unreachable"}
    assert str(port) not in ready.text
    assert "s3cret" not in ready.text


def test_with_quota_fail_open_an_unreachable_counter_store_leaves_the_process_ready(tmp_path: Path) -> None:
    # quota_fail_open admits requests unchecked while the counters cannot be reached, so that a Redis
    # outage is not an outage of the API; a load balancer that took every process out of rotation on
    # /readyz would make it one. Ready, saying what is degraded.
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'meterline.db'}",
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        quota_fail_open=True,
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {
            "database": "ok",
            "migrations": "ok",
            "counters": "unreachable: requests are admitted unchecked (quota_fail_open)",
        },
    }
