"""Alert webhooks received on a real local HTTP server, verified with ``standardwebhooks``; a failing
receiver retried with backoff; deliveries surviving an app restart. Signing secrets sealed at rest:
absent from the SQLite files and from ``pg_dump``, still signing after a key rotation, sealed only by
the server at start (never by other commands, never with a key file just created), a lost data key
postponing deliveries with a clear reason, and no secret in error text."""

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
from sqlalchemy.exc import DBAPIError, IntegrityError
from standardwebhooks import Webhook

from conftest import ADMIN_KEY, add_key, make_tenant
from meterline.alerts import retry_delay
from meterline.api.app import create_app
from meterline.clock import FrozenClock, to_micros
from meterline.config import Settings, load_settings
from meterline.key_file import load_or_create_keys, rotate_keys
from meterline.services import Services, build_services
from meterline.signing import SigningKey
from meterline.storage.database import Database
from meterline.storage.webhook_store import SealResult, SqlWebhookStore
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
        plans={
            "tiny": {"monthly_credits": 100, "overage": "overage"},
            # One credit a period, blocked when used; "almost" costs 0.9997 of it a request.
            "one": {"monthly_credits": 1, "overage": "block", **dict.fromkeys(_PLAN_LIMITS, -1)},
        },
        prices={"flat": {"per_request": "0.10"}, "almost": {"per_request": "0.009997"}},
        webhook_allow_private=True,
        webhook_poll_seconds=3600,
    )


_PLAN_LIMITS = ("rpm", "tpm", "daily_tokens", "monthly_tokens", "daily_calls", "monthly_calls")


def _register(client: TestClient, url: str, plan: str = "tiny") -> tuple[Any, str]:
    tenant = make_tenant(client, plan=plan, billing_anchor_day=14)
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


def test_the_100_threshold_of_a_refusal_arrives_once(client: TestClient, receiver: Receiver) -> None:
    # Blocked at 99.97 % of the allowance: the refusals, not a settle, say 100 %; the receiver hears it once.
    tenant, secret = _register(client, receiver.url, plan="one")
    event = {"model": "almost", "prompt_tokens": 1, "timestamp": "2026-03-14T10:00:00Z"}
    for i in range(3):
        response = client.post(
            "/v1/events", json={"events": [{"id": f"a{i}", **event}]}, headers=tenant.headers
        )
        assert response.status_code == (200 if i == 0 else 429), response.text
    client.app.state.webhook_sender.deliver_due()  # type: ignore[attr-defined]
    payloads = [Webhook(secret).verify(body, headers) for headers, body in receiver.received]
    full = [
        p["data"] for p in payloads if (p["type"], p["data"]["threshold"]) == ("alert.usage_threshold", 100)
    ]
    assert len(full) == 1
    assert full[0]["details"]["refused"] is True
    assert full[0]["details"]["used_pct"] == "99.97"


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
            assert (answer["webhook_secrets_resealed"], answer["webhook_secrets_skipped"]) == (1, 0)
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
        (endpoint_id,) = _stored_secrets(services)
        # What a database written before sealing existed holds.
        with services.db.write() as conn:
            p = "?" if services.db.is_sqlite else "%s"
            conn.exec_driver_sql(f"UPDATE webhook_endpoints SET secret = {p}", (secret,))
        _cross_50(client, tenant)
        # Read as it is until the next start seals it.
        assert client.app.state.webhook_sender.deliver_due() == 2  # type: ignore[attr-defined]
    services.close()
    _deliveries_verify(receiver.received, secret)
    again = build_services(settings, clock=clock, migrate=False)
    try:
        assert _stored_secrets(again) == {endpoint_id: secret}  # opening the services seals nothing
        with TestClient(create_app(settings, services=again)) as client:  # the server's start-up pass
            (stored,) = _stored_secrets(again).values()
            assert stored.startswith(f"enc:v1:{again.signing_keys.sealing_kid}:")
            assert again.webhooks.seal_stored_secrets() == SealResult(0, 0)  # idempotent
            _send_events(client, tenant, range(5, 8))
            assert client.app.state.webhook_sender.deliver_due() == 2  # type: ignore[attr-defined]
    finally:
        again.close()
    assert len(_deliveries_verify(receiver.received, secret)) == 4
    _assert_nowhere_at_rest(settings.database_url, secret)


def test_a_lost_data_key_postpones_deliveries_until_it_is_back(
    settings: Settings,
    clock: FrozenClock,
    receiver: Receiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong key file in place is not the receiver's failure: no attempt is used up, however long it
    lasts, and the delivery goes out at the backoff's longest interval once the right file is back."""
    key_file = Path(settings.signing_key_file)
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            tenant, secret = _register(client, receiver.url)
            kid = services.signing_keys.sealing_kid
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
            assert f"no data key '{kid}'" in caplog.text  # which key is missing
            assert "not counted as an attempt" in caplog.text
            alert = client.get("/v1/alerts", headers=tenant.headers).json()["data"][0]
            (row,) = services.webhooks.outbox(alert["id"])
            assert row["attempts"] == 0
            longest = retry_delay(settings.webhook_max_attempts - 1)
            assert row["next_attempt_at_us"] == to_micros(clock.now()) + longest * 1_000_000
            assert f"no data key '{kid}'" in row["last_error"]
            # Left as it is, logged (the stranger's file is no new file of this process).
            assert services.webhooks.seal_stored_secrets() == SealResult(sealed=0, skipped=1)
            # Longer than every attempt together: still waiting, not given up.
            for _ in range(settings.webhook_max_attempts + 2):
                clock.advance(seconds=longest)
                assert sender.deliver_due() == 0
            (row,) = services.webhooks.outbox(alert["id"])
            assert (row["attempts"], row["delivered_at_us"]) == (0, None)
            assert row["next_attempt_at_us"] is not None
            assert receiver.received == []
            # The right key file back: the retry goes out, signed with the secret shown at registration.
            key_file.write_bytes(kept)
            clock.advance(seconds=longest)
            assert sender.deliver_due() == 2
            (row,) = services.webhooks.outbox(alert["id"])
            assert row["attempts"] == 1
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


# -- who seals, and with which key file ------------------------------------------------------------


def _cli(
    *args: str, settings: Settings, cwd: Path, key_file: bool = True
) -> subprocess.CompletedProcess[str]:
    """The real ``meterline`` command, run from ``cwd``; ``key_file`` False: the default (relative) path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATABASE_URL"] = settings.database_url
    env["COLUMNS"] = "500"  # messages unwrapped
    if key_file:
        env["METERLINE_SIGNING_KEY_FILE"] = settings.signing_key_file
    return subprocess.run(
        [METERLINE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60, check=False
    )


def _set_secret(services: Services, endpoint_id: str, value: str) -> None:
    p = "?" if services.db.is_sqlite else "%s"
    with services.db.write() as conn:
        conn.exec_driver_sql(
            f"UPDATE webhook_endpoints SET secret = {p} WHERE id = {p}", (value, endpoint_id)
        )


def _register_more(client: TestClient, tenant: Any, url: str) -> tuple[str, str]:
    org_key = add_key(client, tenant.workspace["id"], "Another org key", scope="organization")
    hook = client.post(
        "/v1/alerts/webhooks", json={"url": url}, headers={"Authorization": f"Bearer {org_key}"}
    ).json()
    return hook["id"], hook["secret"]


def test_other_commands_neither_touch_the_key_file_nor_seal(
    settings: Settings, clock: FrozenClock, receiver: Receiver, tmp_path: Path
) -> None:
    """A key file from before data keys (copied to every host) and a secret stored in the clear by an
    older version: management commands, from the servers' directory or from anywhere else, leave both
    as they are; the server's start seals with the key derived from the file, without writing it."""
    key_file = Path(settings.signing_key_file)
    key_file.write_text(json.dumps(SigningKey.generate().private_jwk()))
    key_file.chmod(0o600)
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            _, secret = _register(client, receiver.url)
        ((endpoint_id, _),) = _stored_secrets(services).items()
        _set_secret(services, endpoint_id, secret)  # as stored before sealing existed
    finally:
        services.close()
    written, stamp = key_file.read_bytes(), key_file.stat().st_mtime_ns
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    for use_key_file in (True, False):
        result = _cli("orgs", "list", "--json", settings=settings, cwd=elsewhere, key_file=use_key_file)
        assert result.returncode == 0, result.stdout + result.stderr
    assert list(elsewhere.iterdir()) == []  # no key file created where the command ran
    assert (key_file.read_bytes(), key_file.stat().st_mtime_ns) == (written, stamp)
    assert [p.name for p in key_file.parent.iterdir() if key_file.name in p.name] == [
        key_file.name
    ]  # no lock

    again = build_services(settings, clock=clock, migrate=False)
    try:
        assert _stored_secrets(again) == {endpoint_id: secret}  # nothing sealed yet
        with TestClient(create_app(settings, services=again)):
            kid = again.signing_keys.sealing_kid
            assert _stored_secrets(again)[endpoint_id].startswith(f"enc:v1:{kid}:")
    finally:
        again.close()
    assert (key_file.read_bytes(), key_file.stat().st_mtime_ns) == (written, stamp)  # derived, not written


def test_keys_rotate_refuses_a_key_file_that_is_not_there(
    settings: Settings, clock: FrozenClock, receiver: Receiver, tmp_path: Path
) -> None:
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            _register(client, receiver.url)
        before = _stored_secrets(services)
    finally:
        services.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _cli("keys", "rotate", "--json", settings=settings, cwd=elsewhere, key_file=False)
    assert result.returncode == 1
    assert "no key file at" in result.stderr
    assert str(elsewhere / "meterline-signing-key.json") in result.stderr
    assert list(elsewhere.iterdir()) == []
    again = build_services(settings, clock=clock, migrate=False)
    try:
        assert _stored_secrets(again) == before
    finally:
        again.close()


def test_a_key_file_just_created_by_the_server_seals_nothing(
    settings: Settings,
    clock: FrozenClock,
    receiver: Receiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Started with a key file that is not the deployment's (a wrong path, a missing mount): it is
    created, but the stored secrets are left as they are, with a warning naming the missing keys."""
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            tenant, _ = _register(client, receiver.url)
            clear_id, clear_secret = _register_more(client, tenant, receiver.url + "/2")
        _set_secret(services, clear_id, clear_secret)  # one row from before sealing
        deployment_kid = services.signing_keys.sealing_kid
        before = _stored_secrets(services)
    finally:
        services.close()
    wrong = settings.model_copy(update={"signing_key_file": str(tmp_path / "elsewhere" / "key.json")})
    (tmp_path / "elsewhere").mkdir()
    fresh = build_services(wrong, clock=clock, migrate=False)
    try:
        assert fresh.signing_keys.created
        with caplog.at_level(logging.WARNING), TestClient(create_app(wrong, services=fresh)):
            assert _stored_secrets(fresh) == before
        assert "was just created by this process" in caplog.text
        assert deployment_kid in caplog.text
        assert "1 webhook signing secrets are still stored in the clear" in caplog.text
        assert clear_secret not in caplog.text
    finally:
        fresh.close()
    # The next start finds the file there (not created by it): the row in the clear is sealed now, the
    # one sealed with a data key this file lacks is left as it is, and logged.
    later = build_services(wrong, clock=clock, migrate=False)
    try:
        assert not later.signing_keys.created
        assert later.seal_webhook_secrets() == SealResult(sealed=1, skipped=1)
    finally:
        later.close()


def test_a_row_that_cannot_be_sealed_is_skipped_and_logged_without_its_secret(
    settings: Settings,
    clock: FrozenClock,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            tenant, first_secret = _register(client, receiver.url)
            second_id, second_secret = _register_more(client, tenant, receiver.url + "/2")
        (first_id,) = set(_stored_secrets(services)) - {second_id}
        _set_secret(services, first_id, first_secret)  # both as stored before sealing existed
        _set_secret(services, second_id, second_secret)
    finally:
        services.close()
    original = SqlWebhookStore._replace_secret

    def failing(store: SqlWebhookStore, conn: Any, endpoint_id: str, stored: str, sealed: str) -> int:
        if endpoint_id == second_id:  # a driver error quoting the very value it was given
            raise IntegrityError("UPDATE", (sealed, endpoint_id, stored), ValueError(f"bad: {stored}"))
        return original(store, conn, endpoint_id, stored, sealed)

    monkeypatch.setattr(SqlWebhookStore, "_replace_secret", failing)
    again = build_services(settings, clock=clock, migrate=False)  # the key file is there: not new
    try:
        with caplog.at_level(logging.ERROR, logger="meterline.webhooks"):
            assert again.seal_webhook_secrets() == SealResult(sealed=1, skipped=1)
        (line,) = [r.getMessage() for r in caplog.records if second_id in r.getMessage()]
        assert "\n" not in line
        assert line.endswith("left as it is: ValueError: bad: [secret]")
        for needle in (second_secret, second_secret.removeprefix("whsec_")):
            assert needle not in caplog.text
        stored = _stored_secrets(again)
        assert stored[first_id].startswith("enc:v1:")
        assert stored[second_id] == second_secret  # left as it was, still readable
    finally:
        again.close()


def test_a_failing_seal_pass_never_stops_the_server_from_starting(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: Services) -> SealResult:
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(Services, "seal_webhook_secrets", broken)
    with caplog.at_level(logging.ERROR), TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
    assert "sealing stored webhook secrets at start-up failed" in caplog.text


def test_database_errors_never_quote_bound_values(database_url: str) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    db = Database(database_url)
    p = "?" if db.is_sqlite else "%s"
    try:
        with pytest.raises(DBAPIError) as failed, db.write() as conn:
            conn.exec_driver_sql(f"INSERT INTO no_such_table (secret) VALUES ({p})", (secret,))
    finally:
        db.dispose()
    text = str(failed.value)
    assert "no_such_table" in text  # the statement is still shown
    assert "parameters hidden" in text
    assert secret not in text
    assert secret.removeprefix("whsec_") not in text
