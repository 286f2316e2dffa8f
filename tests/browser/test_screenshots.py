"""Screenshots of every page from the demo's data: in a temporary directory on every run (so a page that
fails to render fails here), and into ``docs/screenshots/`` for the README with ``make screenshots``
(``METERLINE_SCREENSHOTS=docs/screenshots``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from browser.conftest import DEMO_ORG, PHONE, World, sign_in


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("METERLINE_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def test_screenshots_of_every_page(page: Page, world: World, shots: Path) -> None:
    sign_in(page, world.key(DEMO_ORG))
    expect(page.get_by_role("heading", name="Usage", exact=True)).to_be_visible()
    page.screenshot(path=shots / "usage-desktop.png", full_page=True)

    page.goto("/dashboard/billing")
    expect(page.get_by_test_id("plan")).to_have_text("Pro")
    page.screenshot(path=shots / "billing.png", full_page=True)

    page.set_viewport_size(PHONE)
    page.goto("/dashboard/usage")
    page.screenshot(path=shots / "usage-phone.png", full_page=True)

    # The spend-cap (BYOM) organization: the same page in money.
    page.set_viewport_size({"width": 1360, "height": 900})
    page.context.clear_cookies()
    sign_in(page, world.key("Umbrella Health"))
    page.screenshot(path=shots / "usage-spend-cap.png", full_page=True)

    # A free-tier team that used 70 % of its credits on its first day: the run-out banner, and the usage
    # bar as an editor embeds it, with its referral and upgrade buttons.
    tenant = world.tenant(plan="free", name="Hooli XYZ", group="Moonshots")
    world.spend_credits(tenant.key, 210, source="web", prefix="shot-web")
    world.spend_credits(tenant.key, 140, source="cli", prefix="shot-cli")
    page.context.clear_cookies()
    sign_in(page, tenant.key, then="/dashboard/usage?range=24h")
    expect(page.get_by_test_id("run-out-banner")).to_be_visible()
    expect(page.get_by_test_id("alerts").locator("li.alert-item").first).to_be_visible()
    page.screenshot(path=shots / "usage-free-tier.png", full_page=True)
    page.set_viewport_size({"width": 720, "height": 90})
    page.goto("/widget/usage-bar")
    expect(page.get_by_role("link", name="Upgrade")).to_be_visible()
    page.get_by_test_id("usage-bar").screenshot(path=shots / "usage-bar.png")
    pages = ("usage-desktop", "usage-phone", "billing", "usage-spend-cap", "usage-free-tier", "usage-bar")
    for name in pages:
        assert (shots / f"{name}.png").stat().st_size > 1000
