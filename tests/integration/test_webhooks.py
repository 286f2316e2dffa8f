"""Alert webhooks received on a real local HTTP server, verified with ``standardwebhooks``; a failing
receiver retried with backoff; deliveries surviving an app restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from conftest import ADMIN_KEY, add_key, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import Settings, load_settings
from meterline.services import build_services


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if len(receiver.received) <= receiver.fail_first else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        plans={"tiny": {"monthly_credits": 100, "overage": "overage"}},
        prices={"flat": {"per_request": "0.10"}},
        webhook_allow_private=True,
        webhook_poll_seconds=3600,
    )


def _register(client: TestClient, url: str) -> tuple[Any, str]:
    tenant = make_tenant(client, plan="tiny", billing_anchor_day=14)
    org_key = add_key(client, tenant.workspace["id"], "Org key", scope="organization")
    hook = client.post(
        "/v1/alerts/webhooks", json={"url": url}, headers={"Authorization": f"Bearer {org_key}"}
    )
    assert hook.status_code == 201, hook.text
    return tenant, hook.json()["secret"]


def _cross_50(client: TestClient, tenant: Any) -> None:
    events = [
        {"id": f"e{i}", "model": "flat", "prompt_tokens": 1, "timestamp": "2026-03-14T10:00:00Z"}
        for i in range(5)
    ]
    assert client.post("/v1/events", json={"events": events}, headers=tenant.headers).status_code == 200


def test_alerts_arrive_signed(client: TestClient, receiver: Receiver) -> None:
    tenant, secret = _register(client, receiver.url)
    _cross_50(client, tenant)
    sent = client.app.state.webhook_sender.deliver_due()  # type: ignore[attr-defined]
    assert sent >= 1
    payloads = [Webhook(secret).verify(body, headers) for headers, body in receiver.received]
    kinds = {(p["type"], p["data"]["threshold"]) for p in payloads}
    assert ("alert.usage_threshold", 50) in kinds
    assert client.app.state.webhook_sender.deliver_due() == 0  # type: ignore[attr-defined]
    with pytest.raises(Exception):  # noqa: PT011 - any verification failure
        Webhook(secret).verify(receiver.received[0][1] + b" ", receiver.received[0][0])


def test_a_failing_receiver_is_retried_with_backoff(client: TestClient, clock: FrozenClock) -> None:
    failing = Receiver(fail_first=3)
    try:
        tenant, secret = _register(client, failing.url)
        _cross_50(client, tenant)  # two alerts: 50 % and the run-out projection
        assert len(client.get("/v1/alerts", headers=tenant.headers).json()["data"]) == 2
        sender = client.app.state.webhook_sender  # type: ignore[attr-defined]
        assert sender.deliver_due() == 0  # both first attempts fail
        assert sender.deliver_due() == 0  # not due again for 5 s
        clock.advance(seconds=5)
        assert sender.deliver_due() == 1  # one fails again (next in 30 s), the other arrives
        clock.advance(seconds=29)
        assert sender.deliver_due() == 0
        clock.advance(seconds=1)
        assert sender.deliver_due() == 1
        ids = [h["webhook-id"] for h, _ in failing.received]
        assert len(ids) == 5
        assert ids[0] == ids[2] == ids[4]
        assert ids[1] == ids[3]
        for headers, body in failing.received:
            Webhook(secret).verify(body, headers)
    finally:
        failing.close()


def test_deliveries_survive_a_restart(settings: Settings, clock: FrozenClock, receiver: Receiver) -> None:
    services = build_services(settings, clock=clock, migrate=False)
    with TestClient(create_app(settings, services=services)) as client:
        tenant, secret = _register(client, receiver.url)
        _cross_50(client, tenant)
    services.close()
    assert receiver.received == []
    again = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=again)) as client:
            assert client.app.state.webhook_sender.deliver_due() >= 1  # type: ignore[attr-defined]
    finally:
        again.close()
    assert any(Webhook(secret).verify(b, h)["data"]["threshold"] == 50 for h, b in receiver.received)


def test_the_background_sender_delivers(
    database_url: str, tmp_path: Path, clock: FrozenClock, receiver: Receiver
) -> None:
    fast = load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        plans={"tiny": {"monthly_credits": 100, "overage": "overage"}},
        prices={"flat": {"per_request": "0.10"}},
        webhook_allow_private=True,
        webhook_poll_seconds=0.05,
    )
    services = build_services(fast, clock=clock, migrate=False)
    try:
        with TestClient(create_app(fast, services=services)) as client:
            tenant, secret = _register(client, receiver.url)
            _cross_50(client, tenant)
            deadline = time.monotonic() + 10
            while len(receiver.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        services.close()
    assert len(receiver.received) == 2
    for headers, body in receiver.received:
        Webhook(secret).verify(body, headers)


def test_delivery_refuses_a_private_address_unless_allowed(
    settings: Settings, clock: FrozenClock, receiver: Receiver
) -> None:
    """Registered while allowed, then the operator forbids private addresses: the sender checks again."""
    services = build_services(settings, clock=clock, migrate=False)
    with TestClient(create_app(settings, services=services)) as client:
        tenant, _ = _register(client, receiver.url)
        _cross_50(client, tenant)
    services.close()
    strict = settings.model_copy(update={"webhook_allow_private": False})
    again = build_services(strict, clock=clock, migrate=False)
    try:
        with TestClient(create_app(strict, services=again)) as client:
            assert client.app.state.webhook_sender.deliver_due() == 0  # type: ignore[attr-defined]
            alert = client.get("/v1/alerts", headers=tenant.headers).json()["data"][0]
            (row,) = again.webhooks.outbox(alert["id"])
            assert "127.0.0.1" in row["last_error"]
            assert row["attempts"] == 1
    finally:
        again.close()
    assert receiver.received == []
