"""Settings → Usage in a real Chromium, with the demo's sample data: what a person signed in with an
organization key sees, checked against the JSON API the page is drawn from."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from playwright.sync_api import Page, expect

from browser.conftest import DEMO_ORG, PHONE, World, sign_in
from meterline.dashboard.formatting import amount, days, short_amount


def test_sign_in_shows_cards_progress_and_chart(page: Page, world: World) -> None:
    key = world.key(DEMO_ORG)
    page.goto("/dashboard")
    expect(page).to_have_url(f"{world.base}/dashboard/sign-in?next=/dashboard/usage")
    sign_in(page, key)
    usage = world.api("/v1/usage", key)
    period = usage["billing_period"]

    expect(page.get_by_role("heading", name="Usage", exact=True)).to_be_visible()
    expect(page.get_by_test_id("days-remaining")).to_have_text(str(period["days_remaining"]))
    expect(page.get_by_test_id("days-elapsed")).to_have_text(str(period["days_elapsed"]))
    avg = Decimal(str(usage["forecast"]["avg_per_day"]))
    expect(page.get_by_test_id("avg-per-day")).to_have_text(amount(avg, "credits"))
    run_out = usage["forecast"]["run_out_in_days"]
    run_out_text = days(None if run_out is None else Decimal(str(run_out)))
    expect(page.get_by_test_id("run-out-in")).to_have_text(run_out_text)
    expect(page.get_by_role("progressbar", name="Credits used this period")).to_be_visible()

    chart = page.get_by_test_id("usage-chart")
    expect(chart.locator("svg[role=img]").first).to_be_visible()
    # pygal drew the Web and CLI lines: one point per bucket on each.
    assert chart.locator(".wide-only svg .series").count() >= 2
    expect(page.get_by_role("link", name="Export CSV")).to_be_visible()
    # The demo's usage is in the tables, and the breakdown API ranks them the same way.
    top = world.api("/v1/usage/breakdown", key, by="workspace", limit=5)
    rows = page.get_by_test_id("table-workspace").locator("tbody tr")
    expect(rows).to_have_count(len(top["data"]))
    expect(rows.first.locator("th")).to_have_text(top["data"][0]["name"])
    expect(page.get_by_test_id("run-out-banner")).to_have_count(0)


def test_range_toggle_changes_the_buckets(page: Page, world: World) -> None:
    key = world.key(DEMO_ORG)
    sign_in(page, key)
    chart = page.get_by_test_id("usage-chart")
    toggle = page.get_by_role("group", name="Chart range")
    for label, range_, buckets in (("24 hours", "24h", 24), ("30 days", "30d", 5), ("7 days", "7d", 7)):
        toggle.get_by_role("link", name=label).click()
        expect(chart).to_have_attribute("data-range", range_)
        expect(chart).to_have_attribute("data-buckets", str(buckets))
        expect(toggle.get_by_role("link", name=label)).to_have_attribute("aria-current", "true")
        series = world.api("/v1/usage/timeseries", key, range=range_)
        assert len(series["data"]) == buckets
        table_rows = page.get_by_test_id("chart-table").locator("tbody tr")
        expect(table_rows).to_have_count(buckets)
        # The table's total column is the API's bucket total, bucket by bucket.
        page.get_by_text("Chart data").click()
        totals = table_rows.locator("td:last-child").all_inner_texts()
        assert totals == [short_amount(Decimal(b["total"]), series["unit"]) for b in series["data"]]


def test_show_more_adds_the_next_page_of_rows(page: Page, world: World) -> None:
    key = world.key(DEMO_ORG)
    sign_in(page, key)
    users = page.get_by_test_id("table-user").locator("tbody tr")
    expect(users).to_have_count(5)
    first = world.api("/v1/usage/breakdown", key, by="user", limit=5)
    second = world.api("/v1/usage/breakdown", key, by="user", limit=5, offset=5)
    assert first["total"] > 10, "the demo has more than two pages of users"
    page.get_by_role("button", name="Show more top users").click()
    expect(users).to_have_count(10)
    names = users.locator("th").all_inner_texts()
    assert names == [r["name"] for r in first["data"] + second["data"]]
    # Until the last page, after which the button goes away.
    button = page.get_by_role("button", name="Show more top users")
    while button.count():
        shown = users.count()
        button.click()
        expect(users).not_to_have_count(shown)
    expect(users).to_have_count(first["total"])


def test_export_csv_downloads_the_periods_rows_summing_to_the_api(page: Page, world: World) -> None:
    key = world.key(DEMO_ORG)
    sign_in(page, key)
    with page.expect_download() as info:
        page.get_by_role("link", name="Export CSV").click()
    download = info.value
    assert download.suggested_filename.endswith(".csv")
    path = download.path()
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    monthly = world.api("/v1/usage", key)["monthly"]
    assert len(rows) == monthly["calls"]["usage"]
    assert sum(Decimal(r["credits"]) for r in rows) == Decimal(monthly["credits"])
    assert sum(Decimal(r["cost"]) for r in rows) == Decimal(monthly["cost"])
    assert sum(int(r["total_tokens"]) for r in rows) == monthly["tokens"]["usage"]


def test_banner_appears_when_projected_to_run_out(page: Page, world: World) -> None:
    tenant = world.tenant(plan="free", name="Pied Piper", group="Compression")
    sign_in(page, tenant.key)
    expect(page.get_by_test_id("run-out-banner")).to_have_count(0)
    expect(page.get_by_test_id("run-out-in")).to_have_text("—")

    # 150 of 500 credits on the first day of a 30-day period: gone in about two more days.
    world.spend_credits(tenant.key, 150, prefix="banner")
    assert world.api("/v1/usage", tenant.key)["forecast"]["will_run_out_before_period_end"] is True
    page.reload()
    banner = page.get_by_test_id("run-out-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("run out of credits")
    banner.get_by_role("link", name="Upgrade plan").click()
    expect(page).to_have_url(f"{world.base}/dashboard/billing#plan")
    expect(page.get_by_test_id("plan")).to_have_text("Free")


def test_phone_width_long_names_and_zero_data_keep_the_layout(page: Page, world: World) -> None:
    long_name = "Research & Development / " + "Extremely-Long-Organization-Name-" * 4 + "<b>not bold</b>"
    tenant = world.tenant(plan="pro", name=long_name[:200], group="G" * 120)
    page.set_viewport_size(PHONE)
    sign_in(page, tenant.key)
    for path in ("/dashboard/usage", "/dashboard/usage?range=24h", "/dashboard/billing"):
        page.goto(path)
        # Nothing wider than the screen: the page never scrolls sideways.
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than the phone"
        assert page.locator("b", has_text="not bold").count() == 0, "names are escaped, never markup"
    page.goto("/dashboard/usage")
    expect(page.get_by_test_id("table-workspace")).to_contain_text("No usage this period yet")
    expect(page.get_by_test_id("alerts")).to_contain_text("No alerts")
    expect(page.get_by_test_id("days-elapsed")).to_have_text("1")
    # Every control has an accessible name.
    for role in ("button", "link"):
        for control in page.get_by_role(role).all():
            name = control.get_attribute("aria-label") or control.inner_text().strip()
            assert name, f"a {role} without an accessible name: {control}"


def test_cost_breakdown_says_what_the_tokens_were_and_counts_unpriced_usage(page: Page, world: World) -> None:
    tenant = world.tenant(plan="pro", name="Hooli", group="Search")
    sign_in(page, tenant.key)
    expect(page.get_by_test_id("unpriced")).to_have_count(0)
    world.report(
        tenant.key,
        {
            "id": "detail-1",
            "model": "claude-sonnet-4-5",
            "provider": "anthropic",
            "prompt_tokens": 5_000,
            "completion_tokens": 400,
            "cache_read_tokens": 3_000,
            "cache_write_tokens": 1_500,
            "cache_write_1h_tokens": 1_000,
            "web_searches": 2,
        },
        {"id": "detail-2", "model": "no-such-model-7", "prompt_tokens": 10, "completion_tokens": 5},
        {"id": "detail-3", "model": "no-such-model-7", "prompt_tokens": 10, "completion_tokens": 5},
    )
    page.reload()
    table = page.get_by_test_id("cost-table")
    claude = table.locator("tbody tr", has_text="claude-sonnet-4-5")
    expect(claude.get_by_test_id("cost-detail")).to_have_text(
        "cache reads 3,000 · cache writes 1,500 · of which 1-hour 1,000 · web searches 2"
    )
    unknown = table.locator("tbody tr", has_text="no-such-model-7")
    expect(unknown).to_contain_text("no price: 2 requests at cost 0")
    expect(page.get_by_test_id("unpriced")).to_have_text(
        "2 requests to models without a price were recorded at cost 0 this period."
    )
    # The page shows what its JSON twin says.
    body = world.api("/v1/usage/breakdown", tenant.key, by="model")
    assert body["totals"]["unpriced_requests"] == 2
