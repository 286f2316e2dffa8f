"""The alert rules (seeds 001/002): thresholds, projection, refusals, unusual usage, SSRF, backoff."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook

from meterline.alerts import (
    allowance_refused,
    check_url,
    crossed_thresholds,
    frequent_refusals,
    is_public,
    new_secret,
    projected_run_out,
    refused_by_allowance,
    retry_delay,
    unusual_trigger,
    unusual_usage,
)
from meterline.errors import InvalidRequest

START = datetime(2026, 3, 1, tzinfo=UTC)
END = datetime(2026, 4, 1, tzinfo=UTC)


def test_thresholds_fire_at_exactly_their_percent_and_only_once() -> None:
    assert crossed_thresholds(49, 100, (50, 75, 80, 100)) == []
    assert crossed_thresholds(50, 100, (50, 75, 80, 100)) == [50]
    assert crossed_thresholds(81, 100, (50, 75, 80, 100), fired={50}) == [75, 80]
    assert crossed_thresholds(500, 100, (50, 75, 80, 100), fired={50, 75, 80, 100}) == []
    assert crossed_thresholds(10, 0, (50,)) == []


def test_projection_compares_the_daily_average_times_the_period_with_the_allowance() -> None:
    # Day 10 of 31: 40 used -> 4/day -> 124 > 100.
    alert = projected_run_out(40, 100, datetime(2026, 3, 10, 12, tzinfo=UTC), START, END)
    assert alert is not None
    assert alert.details["avg_per_day_nanos"] == 4
    assert alert.details["days_in_period"] == 31
    assert alert.details["run_out_in_days"] == 15
    assert projected_run_out(30, 100, datetime(2026, 3, 10, 12, tzinfo=UTC), START, END) is None
    assert projected_run_out(100, 100, datetime(2026, 3, 10, tzinfo=UTC), START, END) is None


def test_frequent_refusals_need_n_within_the_hour() -> None:
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert frequent_refusals(9, 10, hour) is None
    alert = frequent_refusals(10, 10, hour)
    assert alert is not None
    assert "10 requests refused" in alert.message


def test_unusual_usage_says_why_it_fired() -> None:
    day = datetime(2026, 3, 8, tzinfo=UTC)
    alert = unusual_usage(400 * 10**9, [100 * 10**9] * 7, day, factor=Decimal(3), min_volume=50)
    assert alert is not None
    assert alert.details["today_nanos"] == 400 * 10**9
    assert alert.details["baseline_nanos"] == str(100 * 10**9)
    assert alert.details["factor"] == "4.00"
    assert alert.message == (
        "unusual usage pattern: 400.00 credits today, 4.00x the daily mean of the previous 7 days "
        "(100.00 credits a day)"
    )
    spend = unusual_usage(7 * 10**8, [0] * 7, day, factor=Decimal(3), min_volume=1, unit="USD")
    assert spend is not None
    assert "0.70 USD today, no usage in the previous days" in spend.message
    assert unusual_usage(300, [100] * 7, day, factor=Decimal(3), min_volume=50) is None
    assert unusual_usage(40, [0] * 7, day, factor=Decimal(3), min_volume=50) is None  # below the minimum


@given(
    previous=st.lists(st.integers(min_value=0, max_value=10**15), min_size=1, max_size=7),
    factor=st.decimals(min_value=Decimal("1.01"), max_value=1000, places=2),
    min_volume=st.integers(min_value=0, max_value=10**12),
)
def test_the_unusual_trigger_is_the_least_usage_that_fires(
    previous: list[int], factor: Decimal, min_volume: int
) -> None:
    # A process reads the database only once its running total reaches the trigger: below it the rule
    # must not fire, at it it must.
    day = datetime(2026, 3, 8, tzinfo=UTC)
    trigger = unusual_trigger(previous, factor=factor, min_volume=min_volume)
    assert trigger is not None
    assert unusual_usage(trigger, previous, day, factor=factor, min_volume=min_volume) is not None
    assert unusual_usage(trigger - 1, previous, day, factor=factor, min_volume=min_volume) is None


def test_the_unusual_trigger_at_exactly_the_factor() -> None:
    assert unusual_trigger([10] * 7, factor=Decimal(3), min_volume=0) == 31  # more than 3 x 10
    assert unusual_trigger([10] * 7, factor=Decimal(3), min_volume=50) == 50
    assert unusual_trigger([], factor=Decimal(3), min_volume=0) is None


def _limit(**changes: object) -> dict[str, object]:
    limit = {
        "name": "credits",
        "meter": "credits",
        "window": "period",
        "scope": "organization",
        "max": 10**9,
        "consumed": 999_700_000,
        "requested": 999_700_000,
    }
    return {**limit, **changes}


def test_only_the_organizations_period_allowance_is_a_used_up_allowance() -> None:
    assert refused_by_allowance(_limit())
    assert refused_by_allowance(_limit(name="spend_cap", meter="spend"))
    assert not refused_by_allowance(_limit(scope="key", name="key.monthly_credits"))
    assert not refused_by_allowance(_limit(name="daily_credits", window="day"))
    assert not refused_by_allowance(_limit(name="monthly_tokens", meter="tokens"))
    assert not refused_by_allowance(_limit(name="rpm", meter="calls", window="minute"))
    assert not refused_by_allowance(None)
    assert not refused_by_allowance({})


def test_only_a_used_up_allowance_fires_not_a_large_request_that_did_not_fit() -> None:
    assert refused_by_allowance(_limit(consumed=990_000_000))  # 99 %: used up
    assert not refused_by_allowance(_limit(consumed=989_999_999, requested=600_000_000))
    assert not refused_by_allowance(_limit(consumed=500_000_000, requested=600_000_000))


def test_a_refusal_by_the_allowance_is_the_100_threshold_with_what_was_used() -> None:
    alert = allowance_refused(999_700_000, 10**9, 999_700_000, START, END, "credits")
    assert (alert.kind, alert.threshold, alert.period_start) == ("usage_threshold", 100, START)
    assert alert.details["used_pct"] == "99.97"
    assert alert.details["refused"] is True
    assert alert.message == (
        "100% of the monthly credit allowance reached in the billing period ending 2026-04-01: 99.97% is "
        "used and requests that need more than is left are refused"
    )
    spend = allowance_refused(10**7, 10**7, 1, START, END, "spend")
    assert spend.message.startswith("100% of the spend cap reached")
    assert spend.details["used_pct"] == "100.00"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::1",
        "224.0.0.1",
        "0.0.0.0",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "100.64.0.1",
        "240.0.0.1",
    ],
)
def test_private_and_reserved_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)


def test_public_addresses_are_public() -> None:
    assert is_public("93.184.216.34")
    assert is_public("2606:4700::1111")


def test_check_url_refuses_every_address_if_any_is_private() -> None:
    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]

    with pytest.raises(InvalidRequest, match=r"resolves to 127\.0\.0\.1"):
        check_url("https://rebind.example/x", allow_private=False, resolver=resolver)
    assert check_url("https://rebind.example/x", allow_private=True, resolver=resolver)
    with pytest.raises(InvalidRequest, match="http"):
        check_url("ftp://example.com/", allow_private=True)
    with pytest.raises(InvalidRequest):
        check_url("http://user:pw@example.com/", allow_private=True)


def test_backoff_grows_and_then_repeats() -> None:
    delays = [retry_delay(n) for n in range(1, 10)]
    assert delays[:3] == [5, 30, 120]
    assert delays == sorted(delays)
    assert delays[-1] == delays[-2]


def test_secrets_are_standard_webhooks_secrets() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    hook = Webhook(secret)
    now = datetime.now(UTC)
    signature = hook.sign("msg_1", now, '{"a":1}')
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    assert hook.verify('{"a":1}', headers) == {"a": 1}
