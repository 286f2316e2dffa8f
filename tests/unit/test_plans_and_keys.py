from __future__ import annotations

from meterline.config import PlanConfig
from meterline.quotas import DEFAULT_PLANS, UNLIMITED, build_plans, remaining
from meterline.tenancy.keys import generate_key, hash_key, key_prefix, looks_like_key


def test_default_tiers_match_the_spec() -> None:
    free, pro, ent = DEFAULT_PLANS["free"], DEFAULT_PLANS["pro"], DEFAULT_PLANS["enterprise"]
    assert (free.daily_tokens, free.monthly_tokens, free.daily_calls, free.monthly_calls) == (
        50_000,
        500_000,
        100,
        1_000,
    )
    assert (free.rpm, free.tpm, free.monthly_credits, free.overage) == (100, 1_000_000, 500, "block")
    assert (pro.daily_tokens, pro.monthly_tokens, pro.monthly_credits, pro.overage) == (
        5_000_000,
        50_000_000,
        50_000,
        "overage",
    )
    assert ent.monthly_tokens == ent.daily_calls == ent.rpm == UNLIMITED


def test_config_overrides_and_adds_plans() -> None:
    plans = build_plans(
        {
            "free": PlanConfig(daily_tokens=1_000),
            "startup": PlanConfig(monthly_tokens=25_000_000, overage="overage"),
        }
    )
    assert plans["free"].daily_tokens == 1_000
    assert plans["free"].monthly_tokens == 500_000
    assert plans["startup"].monthly_tokens == 25_000_000
    assert plans["startup"].daily_tokens == 0  # a new plan is closed until it says otherwise


def test_remaining() -> None:
    assert remaining(5000, 1247) == 3753
    assert remaining(5000, 6000) == 0
    assert remaining(-1, 10**9) == -1


def test_keys() -> None:
    key = generate_key()
    assert looks_like_key(key)
    assert key_prefix(key) == key[:16]
    assert hash_key(key) != key
    assert len(hash_key(key)) == 64
    assert generate_key() != key
    assert not looks_like_key(key + "0")
    assert not looks_like_key("Bearer " + key)
