"""Alert webhooks received on a real local HTTP server, verified with ``standardwebhooks``; a failing
receiver retried with backoff; deliveries surviving an app restart. Signing secrets sealed at rest:
absent from the SQLite files and from ``pg_dump``, still signing after a key rotation, and a lost data
key failing deliveries with a clear reason."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url
from standardwebhooks import Webhook

from conftest import ADMIN_KEY, add_key, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import Settings, load_settings
from meterline.key_file import load_or_create_keys, rotate_keys
from meterline.services import Services, build_services
from servers import _find_pg_bin

METERLINE = str(Path(sys.executable).with_name("meterline"))


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


# -- signing secrets at rest ---------------------------------------------------------------------


def _stored_secrets(services: Services) -> dict[str, str]:
    with services.db.read() as conn:
        return dict(conn.exec_driver_sql("SELECT id, secret FROM webhook_endpoints").all())


def _needles(secret: str) -> list[bytes]:
    """The secret as shown, its base64 body, and the key bytes themselves."""
    body = secret.removeprefix("whsec_")
    return [secret.encode(), body.encode(), base64.b64decode(body)]


def _sqlite_bytes(url: str) -> bytes:
    path = make_url(url).database
    assert path
    return b"".join(
        Path(path + suffix).read_bytes() for suffix in ("", "-wal", "-shm") if Path(path + suffix).exists()
    )


def _checkpoint(url: str) -> None:
    path = make_url(url).database
    assert path
    with contextlib.closing(sqlite3.connect(path)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0


def _pg_dump(url: str) -> bytes:
    parts = make_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [
            str(_find_pg_bin() / "pg_dump"),
            "--no-password",
            "-h",
            str(parts.host),
            "-p",
            str(parts.port),
            "-U",
            str(parts.username),
            str(parts.database),
        ],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def _assert_nowhere_at_rest(url: str, secret: str) -> None:
    """Not in the database file, its WAL or shared memory (before and after a checkpoint), nor in a
    ``pg_dump`` of the whole database."""
    if url.startswith("sqlite"):
        dumps = [_sqlite_bytes(url)]
        _checkpoint(url)
        dumps.append(_sqlite_bytes(url))
    else:
        dumps = [_pg_dump(url)]
    for dump in dumps:
        assert b"enc:v1:" in dump  # the row is there, sealed
        for needle in _needles(secret):
            assert needle not in dump


def _deliveries_verify(received: list[tuple[dict[str, str], bytes]], secret: str) -> list[dict[str, Any]]:
    assert received
    return [Webhook(secret).verify(body, headers) for headers, body in received]


def _send_events(client: TestClient, tenant: Any, numbers: range) -> None:
    events = [
        {"id": f"e{i}", "model": "flat", "prompt_tokens": 1, "timestamp": "2026-03-14T10:00:00Z"}
        for i in numbers
    ]
    assert client.post("/v1/events", json={"events": events}, headers=tenant.headers).status_code == 200


def test_the_secret_is_not_at_rest_in_the_database_and_deliveries_verify(
    settings: Settings, clock: FrozenClock, receiver: Receiver
) -> None:
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            tenant, secret = _register(client, receiver.url)
            (stored,) = _stored_secrets(services).values()
            assert stored.startswith("enc:v1:")
            assert len(stored) <= 100  # webhook_endpoints.secret is VARCHAR(100)
            _cross_50(client, tenant)
            assert client.app.state.webhook_sender.deliver_due() >= 1  # type: ignore[attr-defined]
            # The list never shows it either.
            listed = client.get("/v1/alerts/webhooks", headers=tenant.headers).json()["data"]
            assert "secret" not in listed[0]
    finally:
        services.close()
    kinds = {p["type"] for p in _deliveries_verify(receiver.received, secret)}
    assert "alert.usage_threshold" in kinds
    _assert_nowhere_at_rest(settings.database_url, secret)


def test_rotation_keeps_deliveries_verifying_and_reseals_with_the_new_key(
    settings: Settings, clock: FrozenClock, receiver: Receiver
) -> None:
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            tenant, secret = _register(client, receiver.url)
            first_kid = services.signing_keys.sealing_kid
            ring = rotate_keys(settings.signing_key_file)  # as another process would; nothing resealed yet
            assert services.signing_keys.sealing_kid == ring.data.sealing_kid != first_kid
            assert [key.kid for key in ring.data.older] == [first_kid]
            (stored,) = _stored_secrets(services).values()
            assert stored.startswith(f"enc:v1:{first_kid}:")  # the older key still opens it
            _cross_50(client, tenant)
            assert client.app.state.webhook_sender.deliver_due() == 2  # type: ignore[attr-defined]
            # The real CLI, while the server runs: rotates again and re-seals in the database.
            env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
            env["METERLINE_DATABASE_URL"] = settings.database_url
            env["METERLINE_SIGNING_KEY_FILE"] = settings.signing_key_file
            result = subprocess.run(
                [METERLINE, "keys", "rotate", "--json"], capture_output=True, text=True, env=env, timeout=60
            )
            assert result.returncode == 0, result.stdout + result.stderr
            answer = json.loads(result.stdout)
            assert answer["older_data_keys"] == [ring.data.sealing_kid, first_kid]
            assert answer["webhook_secrets_resealed"] is True
            (stored,) = _stored_secrets(services).values()
            assert stored.startswith(f"enc:v1:{answer['data_key']}:")
            _send_events(client, tenant, range(5, 8))  # 75 % and 80 %
            assert client.app.state.webhook_sender.deliver_due() == 2  # type: ignore[attr-defined]
    finally:
        services.close()
    thresholds = {p["data"].get("threshold") for p in _deliveries_verify(receiver.received, secret)}
    assert {50, 75, 80} <= thresholds
    _assert_nowhere_at_rest(settings.database_url, secret)


def test_secrets_stored_in_the_clear_before_are_sealed_at_start(
    settings: Settings, clock: FrozenClock, receiver: Receiver
) -> None:
    services = build_services(settings, clock=clock, migrate=False)
    with TestClient(create_app(settings, services=services)) as client:
        tenant, secret = _register(client, receiver.url)
        # What a database written before sealing existed holds.
        with services.db.write() as conn:
            p = "?" if services.db.is_sqlite else "%s"
            conn.exec_driver_sql(f"UPDATE webhook_endpoints SET secret = {p}", (secret,))
        _cross_50(client, tenant)
        # Read as it is until the next start seals it.
        assert client.app.state.webhook_sender.deliver_due() == 2  # type: ignore[attr-defined]
    services.close()
    _deliveries_verify(receiver.received, secret)
    again = build_services(settings, clock=clock, migrate=False)  # the start-up pass
    try:
        (stored,) = _stored_secrets(again).values()
        assert stored.startswith(f"enc:v1:{again.signing_keys.sealing_kid}:")
        assert again.webhooks.seal_stored_secrets() == 0  # idempotent
        with TestClient(create_app(settings, services=again)) as client:
            _send_events(client, tenant, range(5, 8))
            assert client.app.state.webhook_sender.deliver_due() == 2  # type: ignore[attr-defined]
    finally:
        again.close()
    assert len(_deliveries_verify(receiver.received, secret)) == 4
    _assert_nowhere_at_rest(settings.database_url, secret)


def test_a_lost_data_key_fails_deliveries_with_a_reason_until_it_is_back(
    settings: Settings,
    clock: FrozenClock,
    receiver: Receiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_file = Path(settings.signing_key_file)
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            tenant, secret = _register(client, receiver.url)
            kept = key_file.read_bytes()
            # An operator puts another deployment's key file in place: its data keys cannot open ours.
            stranger = tmp_path / "other-key.json"
            load_or_create_keys(stranger)
            os.replace(stranger, key_file)
            _cross_50(client, tenant)
            sender = client.app.state.webhook_sender  # type: ignore[attr-defined]
            with caplog.at_level(logging.ERROR, logger="meterline.webhooks"):
                assert sender.deliver_due() == 0  # nothing raised
            assert "signing secret cannot be decrypted" in caplog.text
            assert "no data key" in caplog.text
            alert = client.get("/v1/alerts", headers=tenant.headers).json()["data"][0]
            (row,) = services.webhooks.outbox(alert["id"])
            assert row["attempts"] == 1
            assert row["next_attempt_at_us"] is not None  # retried, in case the key comes back
            assert "no data key" in row["last_error"]
            assert services.webhooks.seal_stored_secrets() == 0  # left as it is, logged
            assert receiver.received == []
            # The right key file back: the retry goes out, signed with the secret shown at registration.
            key_file.write_bytes(kept)
            clock.advance(seconds=5)
            assert sender.deliver_due() == 2
    finally:
        services.close()
    _deliveries_verify(receiver.received, secret)


def test_a_sealed_secret_copied_to_another_endpoint_does_not_open(
    client: TestClient, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = make_tenant(client, plan="tiny", billing_anchor_day=14)
    org_key = {
        "Authorization": f"Bearer {add_key(client, tenant.workspace['id'], 'Org', scope='organization')}"
    }
    first = client.post("/v1/alerts/webhooks", json={"url": receiver.url}, headers=org_key).json()
    second = client.post("/v1/alerts/webhooks", json={"url": receiver.url + "/2"}, headers=org_key).json()
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    with services.db.write() as conn:
        p = "?" if services.db.is_sqlite else "%s"
        conn.exec_driver_sql(
            f"UPDATE webhook_endpoints SET secret = (SELECT secret FROM webhook_endpoints WHERE id = {p}) "
            f"WHERE id = {p}",
            (first["id"], second["id"]),
        )
    _cross_50(client, tenant)
    with caplog.at_level(logging.ERROR, logger="meterline.webhooks"):
        assert client.app.state.webhook_sender.deliver_due() == 2  # type: ignore[attr-defined]
    assert len(_deliveries_verify(receiver.received, first["secret"])) == 2  # the first endpoint's only
    assert f"to endpoint {second['id']} not sent" in caplog.text
    assert "sealed for another row" in caplog.text
