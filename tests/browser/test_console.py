"""Every dashboard page in a real Chromium, signed in with an organization key and with a workspace key:
no console error and no uncaught script error on any of them. A blocked inline script (the page's
Content-Security-Policy allows scripts from this server only), a failed request or a broken script all
show up in the console, which is what a person opening the developer tools would see."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browser.conftest import DEMO_ORG, World, sign_in

# Every page a signed-in person can reach, with each chart range and the usage bar's polling.
PAGES = (
    "/dashboard/usage",
    "/dashboard/usage?range=24h",
    "/dashboard/usage?range=30d",
    "/dashboard/billing",
    "/widget/usage-bar?poll_ms=200",
)


def _visit_every_page(page: Page, problems: list[str]) -> None:
    for path in PAGES:
        if path.startswith("/widget/"):
            # The bar polls its JSON twin: one round trip through its script, then the page is checked.
            with page.expect_response(lambda r: "/widget/usage-bar.json" in r.url and r.ok):
                page.goto(path)
        else:
            page.goto(path)
            expect(page.get_by_role("navigation", name="Settings")).to_be_visible()
    assert problems == []


@pytest.mark.parametrize(
    ("organization", "scope"),
    [(DEMO_ORG, "organization"), (DEMO_ORG, "workspace"), ("Umbrella Health", "organization")],
)
def test_no_page_logs_a_console_or_script_error(
    page: Page, world: World, problems: list[str], organization: str, scope: str
) -> None:
    page.goto("/dashboard/sign-in")
    assert problems == []
    sign_in(page, world.key(organization, scope))
    # The charts are drawn, without their script, and each point still has hover text.
    chart = page.get_by_test_id("usage-chart")
    expect(chart.locator(".wide-only svg .dots title").first).to_have_text(re.compile(r"^Web, .+: .+\d"))
    assert chart.locator("svg script").count() == 0
    _visit_every_page(page, problems)
