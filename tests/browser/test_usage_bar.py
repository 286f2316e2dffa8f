"""The in-editor usage bar in a real Chromium: it follows a stream through the gateway as it consumes
credits, and shows the referral and upgrade buttons at their thresholds (seed 002)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import httpx
from playwright.sync_api import Page, expect

from browser.conftest import COSTLY_MODEL, World, sign_in


def _stream(world: World, key: str, tokens: int, done: threading.Event) -> None:
    body = {
        "model": COSTLY_MODEL,
        "messages": [{"role": "user", "content": "Count slowly."}],
        "max_tokens": tokens,
        "stream": True,
    }
    try:
        with httpx.stream(
            "POST",
            f"{world.base}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}", "X-Meterline-Source": "web"},
            timeout=60,
        ) as response:
            assert response.status_code == 200, response.read()
            for _ in response.iter_bytes():
                pass
    finally:
        done.set()


def test_usage_bar_moves_while_a_stream_consumes_credits(page: Page, world: World) -> None:
    tenant = world.tenant(plan="free", name="Aviato", group="Apps")
    sign_in(page, tenant.key, then="/widget/usage-bar?poll_ms=200")
    bar = page.get_by_test_id("usage-bar")
    expect(bar).to_have_attribute("data-used", "0")
    # Free tier: the upgrade button always; no referral button below half the allocation.
    expect(bar.get_by_role("link", name="Upgrade")).to_be_visible()
    expect(bar.get_by_role("link", name="Invite a friend, earn credits")).to_be_hidden()

    # 60 tokens at 5 credits each, one token every 60 ms: 300 of 500 credits over about 3.6 s.
    world.upstream.script("drip", pieces=60, chunk_delay_ms=60)
    done = threading.Event()
    streamer = threading.Thread(target=_stream, args=(world, tenant.key, 60, done), daemon=True)
    streamer.start()
    seen: list[Decimal] = []
    labels: set[str] = set()
    deadline = time.monotonic() + 30
    while not done.is_set() and time.monotonic() < deadline:
        used = Decimal(bar.get_attribute("data-used") or "0")
        if not seen or used != seen[-1]:
            seen.append(used)
            labels.add(bar.locator("[data-field=label]").inner_text())
        page.wait_for_timeout(100)
    streamer.join(timeout=30)
    moving = [u for u in seen if 0 < u < 300]
    assert len(moving) >= 2, f"the bar did not follow the stream while it ran: {seen}"
    assert seen == sorted(seen)
    assert any("streaming" in label for label in labels), labels

    # Settled: the bar shows exactly what the API says, now past half: the referral button appears.
    usage = world.api("/v1/usage", tenant.key)
    assert usage["credits"]["in_flight"] == 0
    final = Decimal(str(usage["credits"]["used"]))
    assert final == 300
    assert seen == sorted([*seen, final])[: len(seen)], "the settle moved the bar back"
    expect(bar).to_have_attribute("data-used", "300")
    expect(bar.locator("[data-field=label]")).to_have_text("300.00 credits of 500.00 credits used")
    expect(bar.get_by_role("link", name="Invite a friend, earn credits")).to_be_visible()
    expect(bar.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "60")


def test_upgrade_button_shows_from_three_quarters_on_a_paid_plan(page: Page, world: World) -> None:
    tenant = world.tenant(plan="pro", name="Raviga", group="Funds")
    # A smaller allowance would take config; 50,000 pro credits are reached with bonus-free usage here.
    sign_in(page, tenant.key, then="/widget/usage-bar?poll_ms=200")
    bar = page.get_by_test_id("usage-bar")
    expect(bar.get_by_role("link", name="Upgrade")).to_be_hidden()
    world.spend_credits(tenant.key, 26_000, prefix="half")
    expect(bar.get_by_role("link", name="Invite a friend, earn credits")).to_be_visible()
    expect(bar.get_by_role("link", name="Upgrade")).to_be_hidden()
    world.spend_credits(tenant.key, 12_000, prefix="three-quarters")
    expect(bar.get_by_role("link", name="Upgrade")).to_be_visible()
