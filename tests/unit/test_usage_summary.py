"""The usage summary's top level (seed 003): which limit it reports, and which meter a plan is sold by."""

from __future__ import annotations

import pytest

from meterline.config import LimitConfig, PlanConfig, load_settings
from meterline.errors import ConfigError
from meterline.metering.summary import tightest
from meterline.quotas import DEFAULT_PLANS, build_plans
from meterline.quotas.engine import LimitStatus
from meterline.quotas.limits import Limit, Scope, Window


def status(meter: str, window: Window, scope: Scope, max_: int, consumed: int) -> LimitStatus:
    return LimitStatus(
        Limit(meter, window, scope, max_, "block", f"{scope}.{window}_{meter}"), None, consumed
    )


def test_the_least_remaining_wins_whatever_its_scope() -> None:
    organization = status("tokens", "period", "organization", 50_000_000, 1_000)
    identifier = status("tokens", "period", "identifier", 100_000, 150)
    assert tightest([organization, identifier], "tokens") is identifier
    # The organization nearly used up: its 500 left are less than the identifier's 99,850.
    spent = status("tokens", "period", "organization", 50_000_000, 49_999_500)
    assert tightest([spent, identifier], "tokens") is spent


def test_only_finite_period_limits_on_the_meter_count() -> None:
    statuses = [
        status("tokens", "day", "identifier", 10_000, 0),  # a day limit is not the period's quota
        status("tokens", "minute", "organization", 1_000, 0),
        status("calls", "period", "organization", 5, 0),  # another meter
        status("tokens", "period", "key", -1, 0),  # unlimited
    ]
    assert tightest(statuses, "tokens") is None
    plan = status("tokens", "period", "organization", 50_000_000, 0)
    assert tightest([*statuses, plan], "tokens") is plan
    cases = status("units:case.execute", "period", "organization", 5_000, 1_247)
    assert tightest([*statuses, plan, cases], "units:case.execute") is cases


def test_ties_go_to_the_smaller_then_the_narrower_limit() -> None:
    both_used_up = [
        status("tokens", "period", "organization", 1_000, 1_000),
        status("tokens", "period", "workspace", 500, 600),
    ]
    assert tightest(both_used_up, "tokens") is both_used_up[1]
    same = [
        status("tokens", "period", "organization", 1_000, 0),
        status("tokens", "period", "workspace", 1_000, 0),
        status("tokens", "period", "key", 1_000, 0),
        status("tokens", "period", "identifier", 1_000, 0),
    ]
    for order in (same, same[::-1]):
        assert tightest(order, "tokens") is same[3]


def test_plans_are_sold_by_tokens_unless_they_say_or_limit_only_something_else() -> None:
    assert {plan.meter for plan in DEFAULT_PLANS.values()} == {"tokens"}  # enterprise too: unlimited tokens
    names = ("daily_tokens", "monthly_tokens", "daily_calls", "monthly_calls", "rpm", "tpm")
    open_ = dict.fromkeys(names, -1)
    cases = LimitConfig(meter="units:case.execute", window="period", max=5_000)
    plans = build_plans(
        {
            # The README's plan sold by cases: no token limit, one extra limit on cases.
            "cases": PlanConfig(**open_, limits=(LimitConfig(meter="units:x", window="day", max=-1), cases)),
            "capped": PlanConfig(**{**open_, "tpm": 10_000}, limits=(cases,)),
            "named": PlanConfig(**open_, primary_meter="calls"),
            "pro": PlanConfig(primary_meter="units:case.execute"),
        }
    )
    assert plans["cases"].meter == "units:case.execute"  # the first extra limit that limits anything
    assert plans["capped"].meter == "tokens"  # it limits tokens: they stay the headline
    assert plans["named"].meter == "calls"
    assert plans["pro"].meter == "units:case.execute"
    assert plans["pro"].monthly_tokens == 50_000_000


@pytest.mark.parametrize("meter", ["credits", "spend", "units:", "units:two words", "cases"])
def test_a_primary_meter_must_be_counted(meter: str) -> None:
    with pytest.raises(ConfigError, match="primary_meter"):
        load_settings(plans={"cases": {"primary_meter": meter}})
