"""The quota engine keeps each subject's placed limits between decisions (only the amounts change); a
decision must still see every change of terms or time at once: a plan, a key's limits, a spend cap, a
new UTC day, a new billing period, a minute that has rolled. Each test makes the same decision twice
around a change and expects the second to follow the new terms."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from meterline.clock import FrozenClock, to_micros
from meterline.errors import LimitExceeded
from meterline.quotas import DEFAULT_PLANS
from meterline.quotas.engine import QuotaEngine, Reservation, Subject, WindowQuery, amounts_of
from meterline.quotas.memory import MemoryCounterStore

# The last half second of a billing period (anchored on the 1st) and of a UTC day.
EVE = datetime(2026, 1, 31, 23, 59, 59, 500_000, tzinfo=UTC)
BIG = 10**12
ONE_CALL = amounts_of(tokens=10, credits_nanos=0, cost_nanos=0, event="llm.request", units=1)


class EmptyLedger:
    def window_usage(self, query: WindowQuery) -> int:
        return 0

    def recent_usage(self, query: WindowQuery) -> list[tuple[int, int]]:
        return []

    def bonus_available(self, organization_id: str, period_start_us: int) -> int:
        return 0


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(EVE)


@pytest.fixture
def engine(clock: FrozenClock) -> QuotaEngine:
    return QuotaEngine(MemoryCounterStore(), EmptyLedger(), clock)


def subject(**plan_limits: int) -> Subject:
    """An organization whose plan allows ``plan_limits`` and nothing else stands in the way."""
    limits = {"daily_tokens": BIG, "monthly_tokens": BIG, "daily_calls": BIG, "monthly_calls": BIG}
    limits |= {"rpm": BIG, "tpm": BIG, "monthly_credits": -1} | plan_limits
    plan = replace(DEFAULT_PLANS["free"], name="test", **limits)  # type: ignore[arg-type]
    return Subject("org_1", plan, billing_anchor_day=1, workspace_id="ws_1", key_id="key_1")


def admitted(engine: QuotaEngine, who: Subject) -> bool:
    try:
        reservation = engine.reserve(who, ONE_CALL)
    except LimitExceeded:
        return False
    engine.settle([(reservation, ONE_CALL)])
    return True


def test_a_lower_plan_limit_applies_to_the_next_decision(engine: QuotaEngine) -> None:
    assert admitted(engine, subject(daily_calls=5))
    assert admitted(engine, subject(daily_calls=5))
    assert not admitted(engine, subject(daily_calls=2))
    assert admitted(engine, subject(daily_calls=3))


def test_a_plan_policy_change_applies_to_the_next_decision(engine: QuotaEngine) -> None:
    blocking = subject(daily_calls=1)
    assert admitted(engine, blocking)
    assert not admitted(engine, blocking)
    overage = replace(blocking, plan=replace(blocking.plan, overage="overage"))
    reservation = engine.reserve(overage, ONE_CALL)
    assert reservation.overage


def test_key_limits_and_spend_caps_apply_to_the_next_decision(engine: QuotaEngine) -> None:
    plain = subject()
    assert admitted(engine, replace(plain, key_limits={"daily_calls": 5}))
    assert not admitted(engine, replace(plain, key_limits={"daily_calls": 1}))
    assert admitted(engine, replace(plain, key_limits={"daily_calls": 2}))
    assert not admitted(engine, replace(plain, key_limits={"daily_calls": 2}))
    assert admitted(engine, plain)  # the key's limit lifted
    costly = amounts_of(tokens=10, credits_nanos=0, cost_nanos=10, event="llm.request", units=1)
    capped = replace(plain, spend_cap_nanos=15)
    engine.settle([(engine.reserve(capped, costly), costly)])
    with pytest.raises(LimitExceeded, match="spend cap"):
        engine.reserve(capped, costly)
    engine.reserve(replace(plain, spend_cap_nanos=20), costly)


def test_a_new_utc_day_and_billing_period_open_new_windows(engine: QuotaEngine, clock: FrozenClock) -> None:
    limited = subject(daily_calls=1, monthly_calls=1)  # admitted again only once both windows are new
    assert admitted(engine, limited)
    assert not admitted(engine, limited)
    clock.advance(seconds=0.25)  # still the same day: the same windows
    assert not admitted(engine, limited)
    clock.advance(seconds=0.25)  # midnight: a new day and, anchored on the 1st, a new billing period
    assert admitted(engine, limited)
    assert not admitted(engine, limited)
    reservation = engine.reserve(subject(), ONE_CALL)
    ends = {b.limit.window: b.window.end for b in reservation.bounds if b.window is not None}
    assert ends == {"day": datetime(2026, 2, 2, tzinfo=UTC), "period": datetime(2026, 3, 1, tzinfo=UTC)}


def test_a_rate_limit_frees_up_as_its_minute_rolls(engine: QuotaEngine, clock: FrozenClock) -> None:
    clock.set(EVE - timedelta(hours=1))  # the same day throughout
    limited = subject(rpm=1)
    assert admitted(engine, limited)
    clock.advance(seconds=30)
    assert not admitted(engine, limited)
    # Usage reported two minutes late is outside every minute: no rate limit applies to it.
    late = engine.reserve_many([(limited, ONE_CALL, clock.now() - timedelta(minutes=2))])[0]
    assert isinstance(late, Reservation)
    clock.advance(seconds=31)
    assert admitted(engine, limited)


def test_a_late_report_is_counted_in_its_own_day_and_never_refused(
    engine: QuotaEngine, clock: FrozenClock
) -> None:
    daily = subject(daily_calls=1)
    assert admitted(engine, daily)
    clock.advance(seconds=1)  # the next day
    assert admitted(engine, daily)
    late = engine.reserve_many([(daily, ONE_CALL, EVE)])[0]  # yesterday's window is full: still admitted
    assert isinstance(late, Reservation)
    days = {b.window.start for b in late.bounds if b.window is not None and b.limit.window == "day"}
    assert days == {datetime(2026, 1, 31, tzinfo=UTC)}
    assert not admitted(engine, daily)  # today's window is full, and the late report is not in it


def test_a_reservation_expires_a_ttl_after_its_decision(engine: QuotaEngine, clock: FrozenClock) -> None:
    reservation = engine.reserve(subject(), ONE_CALL, ttl=timedelta(minutes=2))
    assert reservation.expires_at == EVE + timedelta(minutes=2)
    assert reservation.decided_us == to_micros(EVE)


class Granted(EmptyLedger):
    """Bonus credits that grow when the test says (a grant made through another process)."""

    def __init__(self) -> None:
        self.bonus_nanos = 0

    def bonus_available(self, organization_id: str, period_start_us: int) -> int:
        return self.bonus_nanos


def test_a_kept_placement_is_never_older_than_the_bonus_it_was_placed_with(clock: FrozenClock) -> None:
    ledger = Granted()
    engine = QuotaEngine(MemoryCounterStore(), ledger, clock)
    who = subject(monthly_credits=1)
    two_credits = amounts_of(tokens=10, credits_nanos=2 * 10**9, cost_nanos=0, event="llm.request", units=1)
    with pytest.raises(LimitExceeded):
        engine.reserve(who, two_credits)  # 1 credit a month, no bonus: placed and kept
    ledger.bonus_nanos = 5 * 10**9
    # What the bonus's read ahead does in the background (``kept.py``), while the placement is still kept.
    bonus = engine._bonus
    (key,) = bonus._entries
    bonus.keep(key, ledger.bonus_available(*key), bonus.began())
    engine.reserve(who, two_credits)  # placed again, with the bonus read


def test_a_grant_during_a_placement_is_not_kept_behind_it(clock: FrozenClock) -> None:
    """``forget_bonus`` while a decision places its limits: what it placed is not kept for the next one."""
    ledger = Granted()
    engine = QuotaEngine(MemoryCounterStore(), ledger, clock)
    who = subject(monthly_credits=1)
    two_credits = amounts_of(tokens=10, credits_nanos=2 * 10**9, cost_nanos=0, event="llm.request", units=1)
    reading = ledger.bonus_available

    def granted_while_read(organization_id: str, period_start_us: int) -> int:
        value = reading(organization_id, period_start_us)
        ledger.bonus_nanos = 5 * 10**9
        engine.forget_bonus(organization_id)  # the grant, made through this process
        return value

    ledger.bonus_available = granted_while_read  # type: ignore[method-assign]
    with pytest.raises(LimitExceeded):
        engine.reserve(who, two_credits)  # decided on what was read before the grant
    ledger.bonus_available = reading  # type: ignore[method-assign]
    engine.reserve(who, two_credits)
