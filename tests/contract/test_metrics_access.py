"""``GET /metrics`` is the deployment's traffic: loopback scrapers only, unless ``metrics_token`` is set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import ADMIN_KEY, assert_envelope
from meterline.api.app import create_app
from meterline.config import load_settings
from meterline.services import build_services

TOKEN = "metrics-token-0123456789abcdef"
REMOTE = ("203.0.113.7", 40_000)
LOOPBACK = ("127.0.0.1", 40_000)


def _client(
    database_url: str, tmp_path: Path, address: tuple[str, int], **settings: str
) -> Iterator[TestClient]:
    loaded = load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        **settings,
    )
    services = build_services(loaded, migrate=False)
    try:
        with TestClient(create_app(loaded, services=services), client=address) as client:
            yield client
    finally:
        services.close()


@pytest.fixture
def remote(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(database_url, tmp_path, REMOTE)


@pytest.fixture
def loopback(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(database_url, tmp_path, LOOPBACK)


@pytest.fixture
def remote_with_token(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(database_url, tmp_path, REMOTE, metrics_token=TOKEN)


def test_without_a_token_only_loopback_is_answered(remote: TestClient, loopback: TestClient) -> None:
    assert loopback.get("/metrics").status_code == 200
    assert "meterline_" in loopback.get("/metrics").text
    refused = assert_envelope(remote.get("/metrics"), 403, "forbidden")
    assert "metrics_token" in refused["message"]
    assert remote.get("/healthz").status_code == 200  # only /metrics is closed


def test_with_a_token_anyone_holding_it_is_answered(remote_with_token: TestClient) -> None:
    answered = remote_with_token.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answered.status_code == 200
    assert "meterline_" in answered.text
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        error = assert_envelope(remote_with_token.get("/metrics", headers=headers), 401, "unauthorized")
        assert TOKEN not in error["message"]
