"""Settings → Billing in a real Chromium (seed 001, "set up alerts in your dashboard"): an organization
key sets the alert thresholds, the spend cap and the webhook endpoints with the page's forms, sees why
when the API refuses what was typed, and a workspace key sees the same settings read-only. The usage
bar's Upgrade and referral buttons land on the page's plan and referral sections."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from browser.conftest import DEMO_ORG, PHONE, World, sign_in


def test_an_organization_key_sets_up_alerts_with_the_billing_pages_forms(
    page: Page, world: World, problems: list[str]
) -> None:
    tenant = world.tenant(plan="pro", name="Massive Dynamic", group="Labs", spend_cap="250")
    sign_in(page, world.organization_key(tenant), then="/dashboard/billing")
    alerts = page.get_by_test_id("alert-settings")
    expect(alerts.get_by_test_id("thresholds")).to_have_text("50 %, 75 %, 80 %, 100 %")

    # Thresholds: saved through PATCH /v1/organization, and the page says so.
    field = alerts.get_by_label("Percentages, separated by commas")
    field.fill("40, 90 %")
    alerts.get_by_role("button", name="Save thresholds").click()
    expect(page.get_by_test_id("saved")).to_have_text("Alert thresholds saved.")
    expect(alerts.get_by_test_id("thresholds")).to_have_text("40 %, 90 %")
    assert world.api("/v1/organization", tenant.key)["alert_thresholds"] == [40, 90]
    # Something the API refuses: the reason beside the field, what was typed still in it, no change.
    field.fill("40, lots")
    alerts.get_by_role("button", name="Save thresholds").click()
    expect(alerts.get_by_role("alert")).to_contain_text("“lots” is not a whole percentage")
    expect(field).to_have_value("40, lots")
    expect(field).to_have_attribute("aria-invalid", "true")
    assert world.api("/v1/organization", tenant.key)["alert_thresholds"] == [40, 90]
    alerts.get_by_role("button", name=re.compile(r"^Use the defaults")).click()
    expect(alerts.get_by_test_id("thresholds")).to_have_text("50 %, 75 %, 80 %, 100 %")

    # The spend cap of a spend-cap organization.
    cap = alerts.get_by_label("Monthly spend cap (USD)")
    expect(cap).to_have_value("250")
    cap.fill("-3")
    alerts.get_by_role("button", name="Save spend cap").click()
    expect(alerts.get_by_role("alert")).to_contain_text("spend_cap must be between 0 and 1000000000")
    cap.fill("123.45")
    alerts.get_by_role("button", name="Save spend cap").click()
    expect(page.get_by_test_id("saved")).to_have_text("Spend cap saved.")
    expect(alerts.get_by_test_id("spend-cap")).to_have_text("$123.45")
    assert world.api("/v1/usage", tenant.key)["spend"]["cap"] == 123.45

    # A webhook endpoint: its signing secret shown once; a private address refused; then deleted.
    alerts.get_by_label("Endpoint URL").fill("http://10.0.0.5/hook")
    alerts.get_by_role("button", name="Add endpoint").click()
    expect(alerts.get_by_role("alert")).to_contain_text("10.0.0.5")
    expect(alerts.get_by_label("Endpoint URL")).to_have_value("http://10.0.0.5/hook")
    alerts.get_by_label("Endpoint URL").fill("https://93.184.216.34/meterline")
    alerts.get_by_label("Description (optional)").fill("On-call")
    alerts.get_by_role("button", name="Add endpoint").click()
    expect(page.get_by_test_id("webhook-secret")).to_have_text(re.compile(r"^whsec_"))
    rows = alerts.get_by_test_id("webhooks").locator("tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("https://93.184.216.34/meterline")
    expect(rows.first).to_contain_text("On-call")
    (endpoint,) = world.api("/v1/alerts/webhooks", tenant.key)["data"]
    assert endpoint["url"] == "https://93.184.216.34/meterline"
    rows.first.get_by_role(
        "button", name="Delete the webhook endpoint https://93.184.216.34/meterline"
    ).click()
    expect(page.get_by_test_id("saved")).to_have_text("Webhook endpoint deleted.")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("No webhook endpoints yet")
    expect(page.get_by_test_id("webhook-secret")).to_have_count(0)
    assert world.api("/v1/alerts/webhooks", tenant.key)["data"] == []

    # The forms fit a phone.
    page.set_viewport_size(PHONE)
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    # The refusals answered 400 (Chromium logs each such page load); nothing else was logged.
    refused = (
        "console error: Failed to load resource: the server responded with a status of 400 (Bad Request)"
    )
    assert problems == [
        f"{world.base}/dashboard/billing/{form}: {refused}"
        for form in ("thresholds", "spend-cap", "webhooks")
    ]


def test_a_workspace_key_sees_the_alert_settings_read_only(
    page: Page, world: World, problems: list[str]
) -> None:
    sign_in(page, world.key(DEMO_ORG, "workspace"), then="/dashboard/billing")
    alerts = page.get_by_test_id("alert-settings")
    expect(alerts.get_by_test_id("thresholds")).to_have_text(re.compile(r"\d+ %"))
    expect(alerts).to_contain_text("changed when signed in with an organization key")
    expect(alerts.get_by_role("textbox")).to_have_count(0)
    expect(alerts.get_by_role("button")).to_have_count(0)
    assert problems == []


def test_upgrade_and_referral_buttons_land_on_the_plan_and_referral_sections(
    page: Page, world: World, problems: list[str]
) -> None:
    tenant = world.tenant(plan="free", name="Bachmanity", group="Apps")
    world.spend_credits(tenant.key, 300, prefix="buttons")  # 60 %: both buttons show
    sign_in(page, tenant.key, then="/widget/usage-bar")
    bar = page.get_by_test_id("usage-bar")
    bar.get_by_role("link", name="Upgrade").click()
    expect(page).to_have_url(f"{world.base}/dashboard/billing#plan")
    plan = page.locator("#plan")
    expect(plan.get_by_role("heading", name="Plan and limits")).to_be_in_viewport()
    expect(plan.get_by_test_id("upgrade")).to_contain_text(
        "ask them to move this organization to a larger plan"
    )
    expect(plan.get_by_test_id("limits").locator("tbody tr").first).to_be_visible()

    page.goto("/widget/usage-bar")
    bar.get_by_role("link", name="Invite a friend, earn credits").click()
    expect(page).to_have_url(f"{world.base}/dashboard/billing#referral")
    referral = page.locator("#referral")
    expect(referral.get_by_role("heading", name="Bonus credits and referrals")).to_be_in_viewport()
    expect(referral.get_by_test_id("referral")).to_contain_text("they never reset")
    expect(referral.get_by_test_id("grants")).to_be_visible()
    assert problems == []
