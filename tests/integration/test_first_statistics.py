"""A new PostgreSQL database: once its first usage is settled, an event's idempotency look-up goes
through both columns of the ledger's unique index, not through every row of its organization.

Without statistics PostgreSQL chose an index on the organization alone and filtered the key: each
look-up read the organization's whole ledger (1.1 ms at 1,500 rows, growing), until autovacuum's first
analyze a minute or more later (``storage/first_statistics.py``)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from fastapi.testclient import TestClient

from conftest import ADMIN_KEY, NOW, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.services import build_services
from meterline.storage.database import Database
from meterline.storage.ledger_store import _PG_SELECT_BY_KEYS
from meterline.storage.migrate import upgrade
from servers import PostgresServer


def test_a_new_database_looks_events_up_by_their_key(pg_server: PostgresServer, tmp_path: Path) -> None:
    name = f"first_statistics_{secrets.token_hex(3)}"
    url = pg_server.create_database(name)
    db = Database(url)
    upgrade(db)
    db.dispose()
    settings = load_settings(
        database_url=url, admin_key=ADMIN_KEY, signing_key_file=str(tmp_path / "signing-key.json")
    )
    services = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    try:
        with TestClient(create_app(settings, services=services), raise_server_exceptions=False) as client:
            tenant = make_tenant(client)
            for batch in range(3):
                usage = {"model": "gpt-4o-mini", "prompt_tokens": 10, "completion_tokens": 2}
                events = [{"id": f"e-{batch}-{n}", **usage} for n in range(50)]
                response = client.post("/v1/events", json={"events": events}, headers=tenant.headers)
                assert response.status_code == 200, response.text
            again = client.post("/v1/events", json={"events": [events[0]]}, headers=tenant.headers).json()
            assert again["duplicates"] == 1

            deadline = time.monotonic() + 10
            with services.db.engine.connect() as conn:
                while time.monotonic() < deadline:
                    # The statistics are taken after the commit that reached 100 rows, on a thread.
                    found = conn.exec_driver_sql(
                        "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'ledger'"
                    ).scalar()
                    conn.rollback()
                    if found is not None:
                        break
                    time.sleep(0.05)
                assert found is not None, "the ledger was not analyzed"
                plan = "\n".join(
                    row[0]
                    for row in conn.exec_driver_sql(
                        "EXPLAIN " + _PG_SELECT_BY_KEYS, (["e-9-9"], tenant.org["id"])
                    )
                )
        index_conditions = [line for line in plan.splitlines() if "Index Cond" in line]
        assert any("idempotency_key" in line for line in index_conditions), plan
        assert "Filter" not in plan, plan
    finally:
        services.close()
        pg_server.drop_database(name)
