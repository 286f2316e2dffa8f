"""A real Meterline server on loopback (uvicorn in a thread, on SQLite and on PostgreSQL, a frozen clock
the tests move) in front of the fake upstream, with one organization: a workspace key and an
organization key. The SDK under test talks to it over HTTP like any client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN, ADMIN_KEY, NOW, Tenant, add_key, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.sdk import Client
from meterline.services import Services, build_services
from meterline.testing.fake_upstream import FakeUpstream
from servers import ThreadServer

UPSTREAM_KEY = "sk-upstream-sdk-0123456789abcdef"


@dataclass
class Server:
    base: str
    services: Services
    clock: FrozenClock
    tenant: Tenant
    org_key: str
    http: httpx.Client
    signing_key_file: Path
    database_url: str

    def client(self, key: str | None = None, **options: Any) -> Client:
        return Client(self.base, key or self.tenant.key, **options)

    def key_with_limits(self, limits: dict[str, int]) -> str:
        response = self.http.post(
            "/v1/admin/keys",
            json={"workspace_id": self.tenant.workspace["id"], "name": "Limited", "limits": limits},
            headers=ADMIN,
        )
        assert response.status_code == 201, response.text
        key: str = response.json()["key"]
        return key


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
def server(database_url: str, tmp_path: Path, upstream: FakeUpstream) -> Iterator[Server]:
    """A running server on each backend (SQLite and PostgreSQL)."""
    upstream.reset()
    key_file = tmp_path / "signing-key.json"
    settings = load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(key_file),
        # Webhook endpoints on loopback are accepted, so the tests register them without the network.
        webhook_allow_private=True,
        # Seed 003's plan sold by cases (the README's example): no token limit, 5,000 cases a period.
        plans={
            "cases": {
                **dict.fromkeys(("daily_tokens", "monthly_tokens", "daily_calls", "monthly_calls"), -1),
                **{"rpm": 600, "tpm": -1, "monthly_credits": -1, "overage": "block"},
                "limits": [{"meter": "units:case.execute", "window": "period", "max": 5000}],
            }
        },
        upstreams=[
            {
                "name": "fake",
                "provider": "openai",
                "base_url": upstream.url,
                "api_key": UPSTREAM_KEY,
                "models": ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "gpt-3.5-turbo-instruct"],
            },
            {
                "name": "claude",
                "provider": "anthropic",
                "base_url": upstream.url,
                "api_key": UPSTREAM_KEY,
                "models": ["claude-*"],
            },
        ],
    )
    clock = FrozenClock(NOW)
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with (
            ThreadServer(create_app(settings, services=services)) as running,
            httpx.Client(base_url=running.base, timeout=30) as http,
        ):
            tenant = make_tenant(http, plan="pro")  # type: ignore[arg-type]
            org_key = add_key(http, tenant.workspace["id"], "Org reader", scope="organization")  # type: ignore[arg-type]
            yield Server(running.base, services, clock, tenant, org_key, http, key_file, database_url)
    finally:
        services.close()
