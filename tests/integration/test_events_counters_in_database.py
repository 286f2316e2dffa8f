"""``POST /v1/events`` with the quota counters in the database (``serve --workers N`` on one SQLite file or
PostgreSQL without Redis): the events' reservations and their ledger rows are queued to the database's
writer together, and the append writes what the reservations admitted, in one commit when both share a
batch. What a user sees: limits cut a batch exactly where they are full, repeats are answered as before,
and a lone request costs one turn of the writer, not two."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection

from conftest import ADMIN_KEY, Tenant, make_tenant
from meterline.api.app import create_app
from meterline.config import load_settings
from meterline.services import Services, build_services

BIG = 10**12
THREE_CALLS = {"daily_calls": 3, "rpm": BIG, "tpm": BIG, "daily_tokens": BIG, "monthly_tokens": BIG}
THREE_CALLS |= {"monthly_calls": BIG, "monthly_credits": BIG, "overage": "block"}


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    settings = load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "key.json"),
        counters="database",
        plans={"three": THREE_CALLS},
    )
    built = build_services(settings, migrate=False)
    yield built
    built.close()


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    # Not entered as a context manager: the app's lifespan (the reaper's rounds, which queue writes of
    # their own) never runs, so what the writer holds is this test's requests only.
    app_client = TestClient(create_app(services.settings, services=services), raise_server_exceptions=False)
    yield app_client
    app_client.close()


@pytest.fixture
def tenant(client: TestClient) -> Tenant:
    return make_tenant(client, plan="three")


def event(n: int) -> dict[str, Any]:
    return {"id": f"evt-{n}", "model": "gpt-4o-mini", "prompt_tokens": 100, "completion_tokens": 20}


def test_a_batch_is_cut_exactly_where_a_block_limit_is_full(client: TestClient, tenant: Tenant) -> None:
    first = client.post("/v1/events", json={"events": [event(0)]}, headers=tenant.headers)
    assert first.status_code == 200, first.text
    response = client.post(
        "/v1/events", json={"events": [event(n) for n in range(1, 5)]}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["status"] for r in body["data"]] == ["accepted", "accepted", "rejected", "rejected"]
    assert {r["error"]["code"] for r in body["data"][2:]} == {"quota_exceeded"}
    assert (body["accepted"], body["rejected"]) == (2, 2)
    assert response.headers["x-ratelimit-remaining-rpm"]

    refused = client.post("/v1/events", json={"events": [event(9)]}, headers=tenant.headers)
    assert refused.status_code == 429, refused.text
    # A repeat of an event already counted is answered as its first time, never refused by the full limit.
    again = client.post("/v1/events", json={"events": [event(1)]}, headers=tenant.headers)
    assert again.status_code == 200, again.text
    assert again.json()["data"][0]["duplicate"] is True

    usage = client.get("/v1/usage", headers=tenant.headers).json()
    assert usage["daily"]["calls"] == {"usage": 3, "limit": 3, "remaining": 0}


def test_a_lone_event_and_its_reservation_commit_in_one_turn_of_the_writer(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    # The first event loads the organization's counters from the ledger (a decision made apart).
    assert client.post("/v1/events", json={"events": [event(0)]}, headers=tenant.headers).status_code == 200
    writer = services.db.writer
    writer.run(lambda _conn: None)  # what the first event left queued (its counters' settlement) is done
    started, release = threading.Event(), threading.Event()

    def occupy(_conn: Connection) -> None:
        started.set()
        release.wait(10)

    busy = writer.submit(occupy)
    assert started.wait(5)
    answers: list[Any] = []
    sender = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/events", json={"events": [event(1)]}, headers=tenant.headers)
        )
    )
    sender.start()
    deadline = time.monotonic() + 10
    while writer.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    # Both the reservation and the append are queued while the writer is busy: neither waits for the other.
    queued = writer.pending  # the writer takes all that is queued into its next transaction
    release.set()
    busy.result(5)
    sender.join(10)
    assert queued == 2
    assert len(answers) == 1
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["data"][0]["status"] == "accepted"
