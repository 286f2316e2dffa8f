"""How a range of hours is covered by rollup entries (``storage.rollup_reads.spans``)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from meterline.metering.reading import Scope
from meterline.metering.records import LedgerRow
from meterline.storage.rollup_reads import DAY, FULL, HOUR, PERIOD, Span, spans, with_periods
from meterline.storage.usage_rollups import deltas, period_day

ORG = Scope("org_1")
D = 20_000  # a day index; hours of that day are D * 24 ...


def test_whole_days_are_read_as_day_entries() -> None:
    assert spans(ORG, D * 24, (D + 7) * 24, hours_kept=True) == [Span(DAY, D, D + 7)]


def test_partial_days_at_either_end_are_hours() -> None:
    first, end = D * 24 + 5, (D + 3) * 24 + 17
    assert spans(ORG, first, end, hours_kept=True) == [
        Span(HOUR, first, (D + 1) * 24),
        Span(DAY, D + 1, D + 3),
        Span(HOUR, (D + 3) * 24, end),
    ]
    # A dimension without hour entries reads those hours from usage_hourly.
    assert [s.grain for s in spans(ORG, first, end, hours_kept=False)] == [FULL, DAY, FULL]


def test_within_one_day_or_hours_wanted_it_is_hours_only() -> None:
    assert spans(ORG, D * 24 + 3, D * 24 + 20, hours_kept=True) == [Span(HOUR, D * 24 + 3, D * 24 + 20)]
    assert spans(ORG, D * 24, (D + 2) * 24, hours_kept=True, days=False) == [Span(HOUR, D * 24, (D + 2) * 24)]
    assert spans(ORG, 10, 10, hours_kept=True) == []


MAR_14 = 20526  # 2026-03-14: periods anchored on the 14th run Feb 14 (20498) - Mar 14 - Apr 14 (20557)


def test_a_billing_period_is_one_entry() -> None:
    days = [Span(DAY, MAR_14, 20557)]
    assert with_periods(days, 14, today=MAR_14 + 3) == [Span(PERIOD, MAR_14, MAR_14 + 1)]


def test_most_of_a_period_is_its_entry_minus_the_days_outside() -> None:
    covered = spans(ORG, 20504 * 24 + 7, MAR_14 * 24 + 10, hours_kept=False)  # Feb 20 07:00 - Mar 14 10:00
    assert with_periods(covered, 14, today=MAR_14) == [
        Span(FULL, 20504 * 24 + 7, 20505 * 24),
        Span(PERIOD, 20498, 20499),
        Span(DAY, 20498, 20505, -1),  # Feb 14 - 20, before the range
        Span(FULL, MAR_14 * 24, MAR_14 * 24 + 10),
    ]


def test_days_still_to_come_cost_nothing_to_subtract() -> None:
    # Mar 14 - 17 of the current period, on Mar 17: the period entry minus the (empty) days after.
    days = [Span(DAY, MAR_14, MAR_14 + 4)]
    assert with_periods(days, 14, today=MAR_14 + 3) == [
        Span(PERIOD, MAR_14, MAR_14 + 1),
        Span(DAY, MAR_14 + 4, 20557, -1),
    ]
    # The same days read later, when the rest of the period holds usage: the days themselves.
    assert with_periods(days, 14, today=20600) == days
    # A few past days across a period boundary stay days.
    assert with_periods([Span(DAY, MAR_14 - 2, MAR_14 + 2)], 14, today=20600) == [
        Span(DAY, MAR_14 - 2, MAR_14),
        Span(DAY, MAR_14, MAR_14 + 2),
    ]


def test_identifiers_read_usage_hourly() -> None:
    assert spans(Scope("org_1", "ws_1", "user-7"), D * 24, (D + 7) * 24, hours_kept=True) == [
        Span(FULL, D * 24, (D + 7) * 24)
    ]


def test_period_days_follow_the_anchor_clamped_to_the_month() -> None:
    # 2026-03-01 is day 20513; anchored on the 31st, that day belongs to the period from Feb 28.
    assert period_day(20513, 1) == 20513
    assert period_day(20513, 31) == 20512
    assert period_day(20513 + 13, 14) == 20513 + 13
    assert period_day(20513 + 12, 14) == 20498  # Mar 13 is in the period from Feb 14


def _row(i: int, at: datetime, user: str | None) -> LedgerRow:
    return LedgerRow(
        id=f"r{i}", organization_id="org_1", workspace_id="ws_1", key_id="key_1", key_prefix="ml_live_x",
        key_name="k", identifier_id=None, user_id=user, source="cli", endpoint=None, event="chat", units=1,
        run_id=None, metadata=None, model="gpt-4o-mini", modality="text", provider="openai", region=None,
        billing_unit="token", audio_ms=None, prompt_tokens=10, completion_tokens=5, cache_read_tokens=0,
        cache_write_tokens=0, total_tokens=15, currency="USD", list_cost_nanos=7, discount_applied_pct=0,
        cost_nanos=7, credits_nanos=700, priced=True, overage=False, failover=False, receipt_id=None,
        idempotency_key=None, request_hash=None, created_at=at, recorded_at=at, credits_monthly_nanos=700,
        credits_bonus_nanos=0,
    )  # fmt: skip


def test_a_row_adds_to_each_planned_entry_once() -> None:
    at = datetime(2026, 3, 13, 9, 30, tzinfo=UTC)
    entries = deltas([_row(1, at, "ann")], anchor_day=14)
    by_scope = Counter(e[1] for e in entries)
    assert by_scope == {"": 13, "ws_1": 11}  # the workspace dimension is kept for the organization only
    keys = {e[:6] for e in entries}
    assert ("org_1", "", "user", PERIOD, 20498, "ann") in keys  # the period that began on Feb 14
    assert ("org_1", "ws_1", "endpoint", DAY, 20525, "") in keys  # no endpoint: ''
    assert ("org_1", "", "source", HOUR, 20525 * 24 + 9, "cli") in keys
    # A second row in the same hour adds to the same entries; another user adds entries of its own.
    twice = deltas([_row(1, at, "ann"), _row(2, at, "ann"), _row(3, at, "bob")], anchor_day=14)
    assert len(twice) == len(entries) + 4  # bob's user entries: day and period, organization and workspace
    ann = next(e for e in twice if e[:6] == ("org_1", "", "user", DAY, 20525, "ann"))
    assert ann[6:] == (2, 2, 20, 10, 30, 14, 1400)
    assert twice == sorted(twice)  # settles lock shared entries in one order
