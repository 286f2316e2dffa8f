"""The dashboard's pure parts: the allocation behind the progress bar and the usage bar's buttons, and how
figures read. Bodies are what ``GET /v1/usage`` returns, decoded with exact decimals."""

from __future__ import annotations

import ast
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterline.dashboard import allocation_of
from meterline.dashboard.formatting import amount, days, exact, percent
from meterline.dashboard.views import THRESHOLDS_HELP, links, parse_thresholds, usage_bar

DASHBOARD = Path(__file__).resolve().parents[2] / "src" / "meterline" / "dashboard"


def summary(
    *,
    plan: str = "pro",
    allowance: Any = 500,
    monthly_used: str = "0",
    bonus_used: str = "0",
    bonus_left: str = "0",
    overage: str = "0",
    cap: str | None = None,
    spent: str = "0",
) -> dict[str, Any]:
    used = Decimal(monthly_used) + Decimal(bonus_used) + Decimal(overage)
    text = json.dumps(
        {
            "plan": plan,
            "billing_period": {"end": "2026-04-01T00:00:00Z"},
            "spend": {"amount": spent, "cap": cap, "currency": "USD", "in_flight": "0"},
            "credits": {
                "monthly": {"allowance": allowance, "used": monthly_used},
                "bonus": {"used_this_period": bonus_used, "remaining": bonus_left},
                "overage": overage,
                "in_flight": "0",
                "used": str(used),
            },
        }
    )
    body: dict[str, Any] = json.loads(text, parse_float=Decimal)
    return body


def test_allocation_is_monthly_plus_the_bonus_available_this_period() -> None:
    a = allocation_of(summary(allowance=500, monthly_used="500", bonus_used="100", bonus_left="900"))
    assert a.total == Decimal(1500)
    assert a.used == Decimal(600)
    assert a.used_pct == Decimal("40.0")
    assert a.monthly_pct == Decimal("33.3")
    assert a.bonus_pct == Decimal("6.7")


@pytest.mark.parametrize(
    ("plan", "used", "referral", "upgrade"),
    [
        ("pro", "249.99", False, False),
        ("pro", "250", True, False),
        ("pro", "374.99", True, False),
        ("pro", "375", True, True),
        ("free", "0", False, True),
        ("free", "260", True, True),
    ],
)
def test_buttons_show_at_half_and_three_quarters(plan: str, used: str, referral: bool, upgrade: bool) -> None:
    a = allocation_of(summary(plan=plan, monthly_used=used))
    assert (a.show_referral, a.show_upgrade) == (referral, upgrade)


def test_spend_cap_organizations_count_money() -> None:
    a = allocation_of(summary(cap="250", spent="187.5"))
    assert (a.unit, a.total, a.used, a.used_pct) == ("USD", Decimal(250), Decimal("187.5"), Decimal("75.0"))
    assert a.show_upgrade


def test_unlimited_plans_have_no_percentage_and_no_buttons() -> None:
    a = allocation_of(summary(plan="enterprise", allowance=-1, monthly_used="12345.6"))
    assert a.total is None
    assert a.used_pct is None
    assert not a.show_referral
    assert not a.show_upgrade
    bar = usage_bar(summary(plan="enterprise", allowance=-1, monthly_used="12345.6"))
    assert bar["label"] == "12,345.60 credits used · unlimited"
    assert bar["used_pct"] is None


def test_overuse_never_draws_past_the_end_of_the_bar() -> None:
    a = allocation_of(summary(allowance=100, monthly_used="100", overage="50"))
    assert a.used_pct == Decimal("150.0")
    assert a.monthly_pct == Decimal(100)
    assert a.bonus_pct == Decimal(0)
    assert usage_bar(summary(allowance=100, monthly_used="100", overage="50"))["bar_pct"] == "100"


def test_figures_read_exactly_without_floats() -> None:
    assert amount(Decimal("1234.565"), "credits") == "1,234.56 credits"  # half-even
    assert amount(Decimal("0.000042"), "USD") == "$0.0000"
    assert amount(Decimal("0.00042"), "EUR") == "€0.0004"
    assert amount(Decimal("-3.5"), "USD") == "-$3.50"
    assert amount(Decimal("12"), "CHF") == "CHF 12.00"
    assert exact(Decimal("0.018000")) == "0.018"
    assert percent(None) == "—"
    assert days(1) == "1 day"
    assert days(Decimal("2065.61")) == "2,065.6 days"
    with pytest.raises(TypeError):
        allocation_of({**summary(), "credits": {**summary()["credits"], "used": 1.5}})


@pytest.mark.parametrize(
    ("typed", "parsed"),
    [("50, 75, 80, 100", [50, 75, 80, 100]), ("90%,30 %", [90, 30]), (" 40\n 60;  ", [40, 60]), ("0", [0])],
)
def test_typed_thresholds_are_read_as_the_api_takes_them(typed: str, parsed: list[int]) -> None:
    # Ranges (0 is refused) are the API's to check, with its own message.
    assert parse_thresholds(typed) == parsed


@pytest.mark.parametrize(
    ("typed", "says"), [("", "Enter"), (" , ", "Enter"), ("50, 7.5", "“7.5”"), ("²", "“²”")]
)
def test_thresholds_that_are_not_whole_numbers_say_what_to_type(typed: str, says: str) -> None:
    with pytest.raises(ValueError, match=THRESHOLDS_HELP.replace("(", r"\(").replace(")", r"\)")) as error:
        parse_thresholds(typed)
    assert says in str(error.value)


def test_the_buttons_lead_to_the_operators_pages_when_set() -> None:
    default = links(None, None)
    assert (default["upgrade"], default["referral"]) == (
        "/dashboard/billing#plan",
        "/dashboard/billing#referral",
    )
    configured = links("https://example.com/plans", "/referrals")
    assert (configured["upgrade"], configured["referral"]) == ("https://example.com/plans", "/referrals")
    assert configured["upgrade_configured"]
    assert configured["referral_configured"]


def test_the_dashboard_package_knows_no_http_and_no_storage() -> None:
    forbidden = ("fastapi", "starlette", "sqlalchemy", "meterline.api", "meterline.storage")
    for file in DASHBOARD.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n.startswith(forbidden)], file
