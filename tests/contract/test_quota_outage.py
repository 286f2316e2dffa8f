"""When the shared counter store (Redis) cannot be reached: fail closed with 503 by default, fail open
when configured; either way nothing that was admitted is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import ADMIN_KEY, NOW, assert_envelope, make_tenant
from meterline.api.app import create_app
from meterline.api.errors import outages
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.services import build_services
from meterline.storage.outage import COUNTERS
from servers import free_port


@pytest.fixture(params=[False, True], ids=["fail-closed", "fail-open"])
def outage_client(request: pytest.FixtureRequest, sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = load_settings(
        database_url=sqlite_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "key.json"),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        quota_fail_open=request.param,
    )
    services = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    with TestClient(create_app(settings, services=services), raise_server_exceptions=False) as client:
        client.fail_open = request.param  # type: ignore[attr-defined]
        yield client
    services.close()


def test_unreachable_counter_store(outage_client: TestClient) -> None:
    tenant = make_tenant(outage_client, plan="free")
    event = {"events": [{"id": "e1", "model": "gpt-4o", "prompt_tokens": 10}]}
    response = outage_client.post("/v1/events", json=event, headers=tenant.headers)
    ledger = outage_client.get("/v1/usage/ledger", headers=tenant.headers).json()
    if outage_client.fail_open:  # type: ignore[attr-defined]
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == 1
        assert ledger["total_count"] == 1
        held = outage_client.post("/v1/reservations", json={"prompt_tokens": 5}, headers=tenant.headers)
        assert held.status_code == 201
        settled = outage_client.post(
            f"/v1/reservations/{held.json()['id']}/settle", json={}, headers=tenant.headers
        )
        assert settled.status_code == 200
        assert outage_client.get("/v1/usage/ledger", headers=tenant.headers).json()["total_count"] == 2
    else:
        error = assert_envelope(response, 503, "service_unavailable")
        assert "counter store" in error["message"]
        assert ledger["total_count"] == 0
        held = outage_client.post("/v1/reservations", json={"prompt_tokens": 5}, headers=tenant.headers)
        assert_envelope(held, 503, "service_unavailable")
    # Reads still answer: the limits, and the top level that is one of them, show what the ledger knows.
    summary = outage_client.get("/v1/usage", headers=tenant.headers)
    assert summary.status_code == 200, summary.text
    rows = outage_client.get("/v1/usage/ledger", headers=tenant.headers).json()["data"]
    tokens = sum(row["total_tokens"] for row in rows)
    assert tokens == (15 if outage_client.fail_open else 0)  # type: ignore[attr-defined]
    body = summary.json()
    assert (body["usage"], body["limit"], body["remaining"]) == (tokens, 500_000, 500_000 - tokens)
    daily = [limit for limit in body["limits"] if limit["name"] in ("daily_tokens", "daily_calls")]
    assert [limit["used"] for limit in daily] == [tokens, len(rows)]


def test_an_unreachable_counter_store_is_logged_once_not_per_request(
    outage_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Every request meets the outage: under load a line each would be thousands a second.
    outages.back(COUNTERS, float("inf"))  # an outage left open by an earlier test of this process
    tenant = make_tenant(outage_client, plan="free")
    caplog.clear()
    caplog.set_level("WARNING")
    for n in range(5):
        event = {"events": [{"id": f"e{n}", "model": "gpt-4o", "prompt_tokens": 10}]}
        outage_client.post("/v1/events", json=event, headers=tenant.headers)
    said = [r.getMessage() for r in caplog.records if "counter store" in r.getMessage()]
    if outage_client.fail_open:  # type: ignore[attr-defined]
        assert said == [
            "counter store unreachable: admitting requests unchecked (fail open) until it answers"
        ]
    else:
        assert len(said) == 1, said
        assert said[0].startswith("the counter store is unavailable (")
