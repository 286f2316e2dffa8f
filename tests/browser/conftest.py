"""One Meterline server with the demo's sample data, one fake upstream and one headless Chromium for the
whole browser session (starting them is what takes time; each test gets a fresh browser context).

The browser is Debian's Chromium (``/usr/bin/chromium``, installed by ``make test``): Playwright's own
browser download does not work offline. Flags keep it from reaching the network.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    Page,
    Playwright,
    sync_playwright,
)

from conftest import ADMIN, ADMIN_KEY, NOW, Tenant, add_key, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.demo import DemoData, seed_demo
from meterline.services import Services, build_services
from meterline.testing.fake_upstream import FakeUpstream
from servers import ThreadServer

CHROMIUM = os.environ.get("METERLINE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
UPSTREAM_KEY = "sk-upstream-browser-0123456789abcdef"
# A price that makes a short stream move the usage bar visibly: 0.05 (USD) per output token is
# 5 credits a token at the default credit value of 0.01.
COSTLY_MODEL = "costly-stream"
DESKTOP = {"width": 1360, "height": 900}
PHONE = {"width": 390, "height": 844}
DEMO_ORG = "Northwind AI"


@dataclass
class World:
    base: str
    services: Services
    http: httpx.Client
    demo: DemoData
    upstream: FakeUpstream

    def key(self, organization: str, scope: str = "organization", name: str | None = None) -> str:
        for key in self.demo.keys:
            if key.organization == organization and key.scope == scope and (name is None or key.name == name):
                return key.secret
        raise LookupError(f"no demo key for {organization} ({scope})")

    def api(self, path: str, key: str, **params: Any) -> dict[str, Any]:
        response = self.http.get(path, params=params, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def tenant(self, **fields: Any) -> Tenant:
        return make_tenant(self.http, **fields)  # type: ignore[arg-type]  # httpx.Client quacks alike

    def organization_key(self, tenant: Tenant) -> str:
        """A new organization-scope key of ``tenant``'s organization."""
        return add_key(self.http, tenant.workspace["id"], "Org key", scope="organization")  # type: ignore[arg-type]

    def report(self, key: str, *events: dict[str, Any]) -> None:
        """Report usage through the events API (the same settle path as the gateway)."""
        response = self.http.post(
            "/v1/events", json={"events": list(events)}, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["rejected"] == 0, response.text

    def spend_credits(self, key: str, credits: int, *, source: str = "web", prefix: str = "spend") -> None:
        """Consume about ``credits`` credits (5 per output token of the costly model)."""
        tokens = credits // 5
        self.report(
            key,
            *(
                {
                    "id": f"{prefix}-{i}",
                    "model": COSTLY_MODEL,
                    "provider": "openai",
                    "prompt_tokens": 0,
                    "completion_tokens": tokens // 4 + (1 if i < tokens % 4 else 0),
                    "user_id": f"user-{i}",
                    "source": source,
                }
                for i in range(4)
            ),
        )


@pytest.fixture(scope="package")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[World]:
    root = tmp_path_factory.mktemp("dashboard")
    settings = load_settings(
        database_url=f"sqlite:///{root / 'meterline.db'}",
        admin_key=ADMIN_KEY,
        signing_key_file=str(root / "signing-key.json"),
        stream_progress_interval_ms=50,
        upstreams=[
            {
                "name": "fake",
                "provider": "openai",
                "base_url": upstream.url,
                "api_key": UPSTREAM_KEY,
                "models": ["gpt-4o-mini", COSTLY_MODEL],
            }
        ],
        prices={COSTLY_MODEL: {"input": "0", "output": "50000"}},
    )
    services = build_services(settings, clock=FrozenClock(NOW))
    try:
        demo = seed_demo(services, days=45, rows_per_day=160)
        with (
            ThreadServer(create_app(settings, services=services)) as server,
            httpx.Client(base_url=server.base, timeout=30) as http,
        ):
            yield World(server.base, services, http, demo, upstream)
    finally:
        services.close()


# Package scope, not session: sync Playwright keeps an event loop running in the main thread while it
# is open, and later tests that call asyncio.run() must not find one.
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run scripts/ensure-services.sh (make test)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield browser
    browser.close()


@pytest.fixture
def context(browser: Browser, world: World) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=world.base, viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(10_000)
    # Anything that is not this server is a bug: the dashboard must load nothing from the network.
    context.route(lambda url: not url.startswith(world.base), lambda route: route.abort())
    yield context
    context.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture
def problems(page: Page) -> list[str]:
    """Console errors and uncaught script errors of ``page``, as they happen (a test asserts none)."""
    found: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            found.append(f"{page.url}: console error: {message.text}")

    def page_error(error: Error) -> None:
        found.append(f"{page.url}: page error: {error.message}")

    page.on("console", console)
    page.on("pageerror", page_error)
    return found


def sign_in(page: Page, key: str, then: str = "/dashboard/usage") -> None:
    page.goto(then)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{then}")


__all__ = ["ADMIN", "COSTLY_MODEL", "DEMO_ORG", "PHONE", "World", "sign_in"]
