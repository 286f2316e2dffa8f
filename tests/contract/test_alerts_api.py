"""Usage alerts (seeds 001/002) on every backend: thresholds once per period, projection, frequent
refusals, unusual usage, the outbox in the settle transaction, webhook endpoints and the SSRF guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from conftest import ADMIN, ADMIN_KEY, Tenant, add_key, assert_envelope, in_one_batch, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import Settings, load_settings
from meterline.services import Services, build_services


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        # 100 credits a period, 10 credits (0.10 USD) per event: each event is 10 % of the allowance.
        plans={
            "tiny": {"monthly_credits": 100, "overage": "overage"},
            "strict": {
                "rpm": -1,
                "tpm": -1,
                "daily_tokens": -1,
                "monthly_tokens": -1,
                "daily_calls": 1,
                "monthly_calls": -1,
                "monthly_credits": -1,
            },
            # One credit (0.01 USD) a period, blocked when used: nothing else limits.
            "one": {
                "monthly_credits": 1,
                "overage": "block",
                "rpm": -1,
                "tpm": -1,
                "daily_tokens": -1,
                "monthly_tokens": -1,
                "daily_calls": -1,
                "monthly_calls": -1,
            },
        },
        # "almost": 0.9997 credits (0.009997 USD) a request, so that one leaves too little for another.
        prices={"flat": {"per_request": "0.10"}, "almost": {"per_request": "0.009997"}},
        alert_refusals_per_hour=3,
        alert_unusual_min_volume=1,
        webhook_poll_seconds=3600,
    )


def post(client: TestClient, tenant: Tenant, *events: dict[str, Any]) -> Any:
    return client.post("/v1/events", json={"events": list(events)}, headers=tenant.headers)


def ev(i: int | str, ts: str = "2026-03-14T10:00:00Z") -> dict[str, Any]:
    return {"id": f"e{i}", "model": "flat", "provider": "openai", "prompt_tokens": 1, "timestamp": ts}


def alerts_of(client: TestClient, tenant: Tenant, kind: str | None = None) -> list[dict[str, Any]]:
    response = client.get("/v1/alerts", headers=tenant.headers, params={"limit": 1000})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return [a for a in data if kind is None or a["kind"] == kind]


def thresholds(client: TestClient, tenant: Tenant) -> list[tuple[int, str]]:
    return sorted((a["threshold"], a["period_start"]) for a in alerts_of(client, tenant, "usage_threshold"))


def test_thresholds_fire_once_each_per_period_and_again_next_period(
    client: TestClient, clock: FrozenClock
) -> None:
    tenant = make_tenant(client, plan="tiny", billing_anchor_day=14)
    assert post(client, tenant, *(ev(i) for i in range(4))).status_code == 200
    assert thresholds(client, tenant) == []
    post(client, tenant, ev(4))
    assert thresholds(client, tenant) == [(50, "2026-03-14T00:00:00Z")]
    post(client, tenant, ev(5), ev(6), ev(7))  # 80 %: 75 and 80 at once
    post(client, tenant, ev(8))
    assert [t for t, _ in thresholds(client, tenant)] == [50, 75, 80]
    post(client, tenant, ev(9), ev(10), ev(11))  # past 100 %
    post(client, tenant, ev(12))
    assert [t for t, _ in thresholds(client, tenant)] == [50, 75, 80, 100]
    alert = max(alerts_of(client, tenant, "usage_threshold"), key=lambda a: a["threshold"])
    assert alert["details"]["allowance_nanos"] == 100 * 10**9
    assert "100% of the monthly credit allowance" in alert["message"]

    clock.set(clock.now().replace(month=4, day=15))
    post(client, tenant, *(ev(f"n{i}", "2026-04-15T09:00:00Z") for i in range(5)))
    assert [t for t, p in thresholds(client, tenant) if p == "2026-04-14T00:00:00Z"] == [50]


def test_an_organization_sets_its_own_thresholds(client: TestClient) -> None:
    tenant = make_tenant(client, plan="tiny", billing_anchor_day=14, alert_thresholds=[90, 30, 30])
    assert tenant.org["alert_thresholds"] == [30, 90]
    post(client, tenant, *(ev(i) for i in range(3)))  # 30 %
    post(client, tenant, ev(3), ev(4))  # 50 %: no default 50 % alert for this organization
    assert [t for t, _ in thresholds(client, tenant)] == [30]
    # Back to the deployment's defaults: 50 % fires on the next settle, 75 % and 80 % as usual.
    reset = client.patch(
        f"/v1/admin/organizations/{tenant.org['id']}", json={"alert_thresholds": None}, headers=ADMIN
    )
    assert (reset.status_code, reset.json()["alert_thresholds"]) == (200, None)
    post(client, tenant, ev(5), ev(6), ev(7))  # 80 %
    assert [t for t, _ in thresholds(client, tenant)] == [30, 50, 75, 80]
    changed = client.patch(
        f"/v1/admin/organizations/{tenant.org['id']}", json={"alert_thresholds": [85]}, headers=ADMIN
    )
    assert changed.json()["alert_thresholds"] == [85]
    post(client, tenant, ev(8))  # 90 %
    assert [t for t, _ in thresholds(client, tenant)] == [30, 50, 75, 80, 85]


def test_organizations_settled_in_one_batch_cross_each_their_own_thresholds(
    client: TestClient, services: Services
) -> None:
    """The settles of a batch are one settle; the alerts' reads of its organizations are one round trip.
    Each organization's alerts follow its own usage, allowance or spend cap and thresholds."""
    tenants = {
        "half": make_tenant(client, plan="tiny", billing_anchor_day=14, name="Half"),
        "most": make_tenant(client, plan="tiny", billing_anchor_day=14, name="Most"),
        "own": make_tenant(client, plan="tiny", billing_anchor_day=14, name="Own", alert_thresholds=[10]),
        "spend": make_tenant(client, plan="pro", spend_cap="1.00", billing_anchor_day=14, name="Spend"),
        "little": make_tenant(client, plan="tiny", billing_anchor_day=14, name="Little"),
    }
    for tenant in tenants.values():  # each key stamped (a write outside the writer, once a minute)
        assert client.get("/v1/usage", headers=tenant.headers).status_code == 200
    assert post(client, tenants["half"], *(ev(f"h{i}") for i in range(4))).status_code == 200  # 40 %
    batches = [
        ("half", [ev(f"h{i}") for i in range(4, 6)]),  # 60 %
        ("most", [ev(f"m{i}") for i in range(8)]),  # 80 %
        ("own", [ev("o0")]),  # 10 %: its own threshold
        ("spend", [ev(f"s{i}") for i in range(5)]),  # 0.50 of 1.00
        ("little", [ev("l0")]),  # 10 %: nothing
    ]

    def send(n: int) -> int:
        name, events = batches[n]
        status: int = post(client, tenants[name], *events).status_code
        return status

    retried = services.db.writer.retried
    assert in_one_batch(services, len(batches), send) == [200] * len(batches)
    assert services.db.writer.retried == retried  # one settle for all: it never ran again alone
    fired = {name: [t for t, _ in thresholds(client, tenant)] for name, tenant in tenants.items()}
    assert fired == {"half": [50], "most": [50, 75, 80], "own": [10], "spend": [50], "little": []}
    (spend,) = alerts_of(client, tenants["spend"], "usage_threshold")
    assert spend["details"]["measure"] == "spend"


@pytest.mark.parametrize("value", [[], [0], [1001], [50.5], ["50"], "50", list(range(1, 22))])
def test_bad_thresholds_are_refused(client: TestClient, tenant: Tenant, value: Any) -> None:
    created = client.post(
        "/v1/admin/organizations", json={"name": "X", "alert_thresholds": value}, headers=ADMIN
    )
    assert_envelope(created, 422, "invalid_request")
    patched = client.patch(
        f"/v1/admin/organizations/{tenant.org['id']}", json={"alert_thresholds": value}, headers=ADMIN
    )
    assert_envelope(patched, 422, "invalid_request")
    assert (
        client.get(f"/v1/admin/organizations/{tenant.org['id']}", headers=ADMIN).json()["alert_thresholds"]
        is None
    )


def _org_key(client: TestClient, tenant: Tenant) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {add_key(client, tenant.workspace['id'], 'Org key', scope='organization')}"
    }


def test_an_organization_key_sets_its_thresholds_and_a_workspace_key_reads_them(client: TestClient) -> None:
    """Seed 001, "set up alerts in your dashboard": the organization's own key, not only the operator."""
    tenant = make_tenant(client, plan="tiny", billing_anchor_day=14)
    org_key = _org_key(client, tenant)
    read = client.get("/v1/organization", headers=tenant.headers)
    assert read.status_code == 200, read.text
    assert (read.json()["alert_thresholds"], read.json()["default_alert_thresholds"]) == (
        None,
        [50, 75, 80, 100],
    )
    changed = client.patch("/v1/organization", json={"alert_thresholds": [90, 30, 30]}, headers=org_key)
    assert changed.status_code == 200, changed.text
    assert changed.json()["alert_thresholds"] == [30, 90]
    assert client.get("/v1/organization", headers=tenant.headers).json()["alert_thresholds"] == [30, 90]
    # The same organization record the operator sees, and the alerts follow it.
    admin_view = client.get(f"/v1/admin/organizations/{tenant.org['id']}", headers=ADMIN).json()
    assert admin_view["alert_thresholds"] == [30, 90]
    post(client, tenant, *(ev(i) for i in range(5)))  # 50 %: no default 50 % alert
    assert [t for t, _ in thresholds(client, tenant)] == [30]

    # A workspace key reads them but does not change them; an access token does neither.
    refused = client.patch("/v1/organization", json={"alert_thresholds": [10]}, headers=tenant.headers)
    assert_envelope(refused, 403, "forbidden")
    issued = client.post("/v1/token", json={"identifier_id": "user-1"}, headers=tenant.headers).json()
    token = {"Authorization": f"Bearer {issued['access_token']}"}
    assert_envelope(client.get("/v1/organization", headers=token), 403, "forbidden")
    assert_envelope(client.get("/v1/organization"), 401, "unauthorized")
    # Null: back to the deployment's defaults.
    reset = client.patch("/v1/organization", json={"alert_thresholds": None}, headers=org_key)
    assert (reset.status_code, reset.json()["alert_thresholds"]) == (200, None)


@pytest.mark.parametrize("value", [[], [0], [1001], [50.5], ["50"], "50", list(range(1, 22))])
def test_bad_thresholds_from_an_organization_key_are_refused(
    client: TestClient, tenant: Tenant, value: Any
) -> None:
    response = client.patch(
        "/v1/organization", json={"alert_thresholds": value}, headers=_org_key(client, tenant)
    )
    assert assert_envelope(response, 422, "invalid_request")["param"].startswith("alert_thresholds")
    assert client.get("/v1/organization", headers=tenant.headers).json()["alert_thresholds"] is None


def test_only_a_spend_cap_organization_changes_its_cap(client: TestClient) -> None:
    credits_org = make_tenant(client, plan="tiny", name="Credits")
    refused = client.patch("/v1/organization", json={"spend_cap": "5"}, headers=_org_key(client, credits_org))
    assert assert_envelope(refused, 403, "forbidden")["param"] == "spend_cap"
    assert client.get("/v1/organization", headers=credits_org.headers).json()["spend_cap"] is None

    capped = make_tenant(client, plan="pro", name="BYOM", spend_cap="1.00", billing_anchor_day=14)
    org_key = _org_key(client, capped)
    changed = client.patch("/v1/organization", json={"spend_cap": "2.50"}, headers=org_key)
    assert (changed.status_code, changed.json()["spend_cap"]) == (200, "2.5")
    usage = client.get("/v1/usage", headers=capped.headers).json()
    assert str(usage["spend"]["cap"]) == "2.5"
    post(client, capped, *(ev(i) for i in range(13)))  # 1.30 of 2.50: 50 % of the new cap
    assert [t for t, _ in thresholds(client, capped)] == [50]
    for bad, status in (("-1", 400), ("1e400", 400), ("abc", 422), (0.5, 422), (None, 422)):
        response = client.patch("/v1/organization", json={"spend_cap": bad}, headers=org_key)
        assert assert_envelope(response, status, "invalid_request")["param"] in ("spend_cap", None), bad
    assert_envelope(
        client.patch("/v1/organization", json={"plan": "enterprise"}, headers=org_key), 422, "invalid_request"
    )
    assert client.get("/v1/organization", headers=org_key).json()["spend_cap"] == "2.5"
    # The operator's path refuses an absurd cap the same way (it is one domain function).
    absurd = client.patch(
        f"/v1/admin/organizations/{capped.org['id']}", json={"spend_cap": "1e400"}, headers=ADMIN
    )
    assert_envelope(absurd, 400, "invalid_request")


def test_projected_run_out_fires_once_per_period(client: TestClient, clock: FrozenClock) -> None:
    tenant = make_tenant(client, plan="tiny", billing_anchor_day=1)
    # Day 14 of 31: 20 credits so far -> 1.43/day -> 44 projected: fine.
    post(client, tenant, ev(1), ev(2))
    assert alerts_of(client, tenant, "projected_run_out") == []
    # 50 credits by day 14 -> 110 projected > 100.
    post(client, tenant, ev(3), ev(4), ev(5))
    post(client, tenant, ev(6))
    (alert,) = alerts_of(client, tenant, "projected_run_out")
    assert alert["period_start"] == "2026-03-01T00:00:00Z"
    assert alert["details"]["days_elapsed"] == 14
    assert alert["details"]["days_in_period"] == 31
    assert "before the billing period ends on 2026-04-01" in alert["message"]


def test_spend_cap_organizations_measure_money_against_the_cap(client: TestClient) -> None:
    tenant = make_tenant(client, plan="pro", spend_cap="1.00", billing_anchor_day=14)
    post(client, tenant, *(ev(i) for i in range(5)))  # 0.50 of 1.00
    (alert,) = alerts_of(client, tenant, "usage_threshold")
    assert alert["threshold"] == 50
    assert alert["details"]["measure"] == "spend"
    assert "spend cap" in alert["message"]


def almost(i: int | str) -> dict[str, Any]:
    """An event costing 0.9997 credits (0.009997 USD)."""
    return {"id": f"a{i}", "model": "almost", "provider": "openai", "prompt_tokens": 1}


def full_alerts(client: TestClient, tenant: Tenant) -> list[dict[str, Any]]:
    return [a for a in alerts_of(client, tenant, "usage_threshold") if a["threshold"] == 100]


@pytest.mark.parametrize(
    ("org_fields", "code", "measure"),
    [
        ({"plan": "one"}, "credits_exhausted", "credits"),
        ({"plan": "pro", "spend_cap": "0.01"}, "spend_cap_reached", "spend"),
    ],
    ids=["credits", "spend_cap"],
)
def test_a_refusal_by_the_used_up_allowance_fires_the_100_threshold_once(
    client: TestClient, services: Services, org_fields: dict[str, Any], code: str, measure: str
) -> None:
    # Blocked at 99.97 %: no settle reaches 100 %, yet from now on the organization is refused.
    tenant = make_tenant(client, billing_anchor_day=14, name="Org", **org_fields)
    org_key = add_key(client, tenant.workspace["id"], "Org key", scope="organization")
    hook = client.post(
        "/v1/alerts/webhooks",
        json={"url": "http://93.184.216.34/hook"},
        headers={"Authorization": f"Bearer {org_key}"},
    )
    assert hook.status_code == 201, hook.text
    assert post(client, tenant, almost(1)).status_code == 200
    assert [t for t, _ in thresholds(client, tenant)] == [50, 75, 80]

    assert_envelope(post(client, tenant, almost(2)), 429, code)
    (full,) = full_alerts(client, tenant)
    assert full["period_start"] == "2026-03-14T00:00:00Z"
    details = full["details"]
    assert details["measure"] == measure
    assert details["used_pct"] == "99.97"
    assert details["refused"] is True
    assert details["used_nanos"] + details["requested_nanos"] > details["allowance_nanos"]
    assert details["period_end"] == "2026-04-14T00:00:00+00:00"
    assert full["message"].startswith("100% of the")
    assert "refused" in full["message"]
    assert len(services.webhooks.outbox(full["id"])) == 1

    for i in range(3, 6):  # refused again: said once per period
        assert post(client, tenant, almost(i)).status_code == 429
    assert [t for t, _ in thresholds(client, tenant)] == [50, 75, 80, 100]


def test_a_batch_with_events_refused_by_the_allowance_fires_the_100_threshold(client: TestClient) -> None:
    # Some events of the batch are recorded, the others refused: no 429, yet the allowance is used up.
    tenant = make_tenant(client, plan="one", billing_anchor_day=14)
    response = post(client, tenant, almost(1), almost(2))
    assert response.status_code != 429, response.text
    assert (response.json()["accepted"], response.json()["rejected"]) == (1, 1)
    assert [t for t, _ in thresholds(client, tenant)] == [50, 75, 80, 100]


def test_the_refused_100_threshold_fires_once_across_processes_and_then_costs_no_write(
    settings: Settings, clock: FrozenClock
) -> None:
    """The database decides (the alert's unique index); each process remembers what it was told, so a
    refusal after that writes nothing."""
    quiet = settings.model_copy(update={"alert_refusals_per_hour": 1000})
    one, other = (build_services(quiet, clock=clock, migrate=False) for _ in range(2))
    attempts = {"one": 0, "other": 0}

    def count_attempts(name: str) -> Any:
        def before(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if statement.startswith("INSERT INTO alerts") and "usage_threshold" in parameters:
                attempts[name] += 1

        return before

    event.listen(one.db.engine, "before_cursor_execute", count_attempts("one"))
    event.listen(other.db.engine, "before_cursor_execute", count_attempts("other"))
    try:
        with (
            TestClient(create_app(quiet, services=one), raise_server_exceptions=False) as first,
            TestClient(create_app(quiet, services=other), raise_server_exceptions=False) as second,
        ):
            tenant = make_tenant(first, plan="one", billing_anchor_day=14)
            assert post(first, tenant, almost(1)).status_code == 200  # 50, 75, 80 % at settle
            settled = attempts["one"]
            assert post(first, tenant, almost(2)).status_code == 429
            assert (attempts["one"], len(full_alerts(first, tenant))) == (settled + 1, 1)
            assert post(first, tenant, almost(3)).status_code == 429
            assert attempts["one"] == settled + 1  # remembered: no write
            # The other process does not know yet: it asks the database once, which says it fired.
            assert post(second, tenant, almost(4)).status_code == 429
            assert post(second, tenant, almost(5)).status_code == 429
            assert attempts["other"] == 1
            assert len(full_alerts(second, tenant)) == 1
    finally:
        one.close()
        other.close()


def test_frequent_refusals_fire_after_n_429s_within_the_hour(client: TestClient, clock: FrozenClock) -> None:
    tenant = make_tenant(client, plan="strict")
    first = post(client, tenant, ev(0))
    assert first.status_code == 200, first.text
    for i in range(1, 3):
        assert post(client, tenant, ev(i)).status_code == 429
    assert alerts_of(client, tenant, "rate_limits_exceeded_frequently") == []
    assert post(client, tenant, ev(3)).status_code == 429
    (alert,) = alerts_of(client, tenant, "rate_limits_exceeded_frequently")
    assert alert["details"] == {"refusals_last_hour": 3, "limit": 3}
    post(client, tenant, ev(4))
    assert len(alerts_of(client, tenant, "rate_limits_exceeded_frequently")) == 1  # once per hour


def test_refusals_on_every_process_sharing_redis_count_toward_one_alert(
    settings: Settings, clock: FrozenClock, redis_url_clean: str
) -> None:
    """Two server processes (two apps over one database and one Redis): two refusals on one and one on
    the other reach the deployment's three; each alone would stay under it."""
    shared = settings.model_copy(update={"redis_url": redis_url_clean})
    one, other = (build_services(shared, clock=clock, migrate=False) for _ in range(2))
    try:
        with (
            TestClient(create_app(shared, services=one), raise_server_exceptions=False) as first,
            TestClient(create_app(shared, services=other), raise_server_exceptions=False) as second,
        ):
            tenant = make_tenant(first, plan="strict")
            assert post(first, tenant, ev(0)).status_code == 200
            assert post(first, tenant, ev(1)).status_code == 429
            assert post(second, tenant, ev(2)).status_code == 429
            assert alerts_of(second, tenant, "rate_limits_exceeded_frequently") == []
            assert post(second, tenant, ev(3)).status_code == 429
            (alert,) = alerts_of(first, tenant, "rate_limits_exceeded_frequently")
            assert alert["details"] == {"refusals_last_hour": 3, "limit": 3}
            assert post(first, tenant, ev(4)).status_code == 429  # the first process asks once, too
            assert len(alerts_of(second, tenant, "rate_limits_exceeded_frequently")) == 1
    finally:
        one.close()
        other.close()


def test_unusual_usage_says_why(client: TestClient, clock: FrozenClock) -> None:
    tenant = make_tenant(client, plan="pro")
    # One event (10 credits) on each of the previous 7 days, then 5 today.
    baseline = [ev(f"b{d}", f"2026-03-{d:02d}T12:00:00Z") for d in range(7, 14)]
    post(client, tenant, *baseline)
    assert alerts_of(client, tenant, "unusual_usage") == []
    post(client, tenant, *(ev(f"t{i}", "2026-03-14T10:00:00Z") for i in range(5)))
    (alert,) = alerts_of(client, tenant, "unusual_usage")
    assert alert["details"]["today_nanos"] == 50 * 10**9
    assert alert["details"]["baseline_nanos"] == str(10 * 10**9)
    assert alert["details"]["factor"] == "5.00"
    assert "5.00x the daily mean" in alert["message"]
    assert alert["period_start"] == "2026-03-14T00:00:00Z"


BASELINE = [ev(f"b{d}", f"2026-03-{d:02d}T12:00:00Z") for d in range(7, 14)]  # 10 credits a day


def test_unusual_usage_fires_on_a_spike_after_earlier_traffic_in_the_same_hour(
    client: TestClient, clock: FrozenClock
) -> None:
    tenant = make_tenant(client, plan="pro")
    post(client, tenant, *BASELINE)
    post(client, tenant, ev("t0", "2026-03-14T10:05:00Z"))  # an ordinary 10 credits earlier this hour
    assert alerts_of(client, tenant, "unusual_usage") == []
    clock.advance(minutes=20)  # 10:50: the same clock hour
    post(client, tenant, ev("t1", "2026-03-14T10:45:00Z"))
    post(client, tenant, *(ev(f"t{i}", "2026-03-14T10:46:00Z") for i in range(2, 4)))  # 40 > 3 x 10
    (alert,) = alerts_of(client, tenant, "unusual_usage")
    assert alert["details"]["today_nanos"] == 40 * 10**9
    assert alert["details"]["factor"] == "4.00"
    for i in range(4, 7):  # once a day, not on every following settle
        post(client, tenant, ev(f"t{i}", "2026-03-14T10:47:00Z"))
    assert len(alerts_of(client, tenant, "unusual_usage")) == 1
    clock.advance(days=1)  # a new day: today starts again from nothing
    post(client, tenant, ev("next", "2026-03-15T10:00:00Z"))
    assert len(alerts_of(client, tenant, "unusual_usage")) == 1


def test_unusual_usage_split_over_processes_is_seen_within_five_minutes(
    settings: Settings, clock: FrozenClock
) -> None:
    """Each process adds what it settles to today's usage as last read, and reads it again when that
    crosses the trigger or five minutes after its last read: a spike split over processes is seen."""
    one, other = (build_services(settings, clock=clock, migrate=False) for _ in range(2))
    try:
        with (
            TestClient(create_app(settings, services=one), raise_server_exceptions=False) as first,
            TestClient(create_app(settings, services=other), raise_server_exceptions=False) as second,
        ):
            tenant = make_tenant(first, plan="pro")
            post(first, tenant, *BASELINE)  # the first reads today: 0
            post(second, tenant, ev("t0", "2026-03-14T10:00:00Z"))  # the second reads today: 10
            post(first, tenant, ev("t1", "2026-03-14T10:01:00Z"), ev("t2", "2026-03-14T10:01:00Z"))
            post(second, tenant, ev("t3", "2026-03-14T10:02:00Z"))  # 40 in all; 20 and 20 seen
            assert alerts_of(first, tenant, "unusual_usage") == []
            clock.advance(minutes=5)
            post(first, tenant, ev("t4", "2026-03-14T10:03:00Z"))
            (alert,) = alerts_of(second, tenant, "unusual_usage")
            assert alert["details"]["today_nanos"] == 50 * 10**9
    finally:
        one.close()
        other.close()


def test_an_alert_and_its_outbox_row_commit_with_the_usage(
    client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = make_tenant(client, plan="tiny", billing_anchor_day=14, name="Org")
    org_key = add_key(client, tenant.workspace["id"], "Org key", scope="organization")
    hook = client.post(
        "/v1/alerts/webhooks",
        json={"url": "http://93.184.216.34/hook"},
        headers={"Authorization": f"Bearer {org_key}"},
    )
    assert hook.status_code == 201, hook.text
    post(client, tenant, *(ev(i) for i in range(4)))
    with services.db.read() as conn:
        queued = conn.exec_driver_sql("SELECT COUNT(*) FROM webhook_outbox").scalar_one()

    # A failure after the alert was written in the settle transaction rolls both back.
    monkeypatch.setattr(services.ledger, "_alerts", _ThenCrash(services.ledger._alerts))
    assert post(client, tenant, ev(4)).status_code == 500
    monkeypatch.undo()
    assert alerts_of(client, tenant) == [
        a for a in alerts_of(client, tenant) if a["kind"] != "usage_threshold"
    ]
    with services.db.read() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM webhook_outbox").scalar_one() == queued

    assert post(client, tenant, ev(4)).status_code == 200
    (alert,) = alerts_of(client, tenant, "usage_threshold")
    rows = services.webhooks.outbox(alert["id"])
    assert len(rows) == 1
    assert rows[0]["attempts"] == 0
    assert rows[0]["delivered_at_us"] is None


class _ThenCrash:
    """Evaluates alerts (writing them and their outbox rows in the settle transaction), then fails."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def evaluate_in(self, *args: Any) -> None:
        self._inner.evaluate_in(*args)
        raise RuntimeError("crash after the alert")


def test_webhook_endpoints_show_the_secret_once(client: TestClient, tenant: Tenant) -> None:
    org_key = add_key(client, tenant.workspace["id"], "Org key", scope="organization")
    headers = {"Authorization": f"Bearer {org_key}"}
    created = client.post(
        "/v1/alerts/webhooks", json={"url": "https://93.184.216.34/h", "description": "ops"}, headers=headers
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["secret"].startswith("whsec_")
    assert body["url"] == "https://93.184.216.34/h"
    listed = client.get("/v1/alerts/webhooks", headers=tenant.headers).json()["data"]
    assert [e["id"] for e in listed] == [body["id"]]
    assert "secret" not in listed[0]
    # A workspace key reads alerts but does not manage endpoints.
    assert_envelope(
        client.delete(f"/v1/alerts/webhooks/{body['id']}", headers=tenant.headers), 403, "forbidden"
    )
    assert client.delete(f"/v1/alerts/webhooks/{body['id']}", headers=headers).status_code == 200
    assert client.get("/v1/alerts/webhooks", headers=headers).json()["data"] == []
    assert_envelope(client.delete(f"/v1/alerts/webhooks/{body['id']}", headers=headers), 404, "not_found")
    assert_envelope(client.get("/v1/alerts"), 401, "unauthorized")
    assert client.get("/v1/alerts/webhooks", headers=ADMIN).status_code == 401


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.5/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://localhost:8080/hook",
        "http://192.168.0.10/hook",
        "ftp://example.com/hook",
        "not a url",
    ],
)
def test_webhook_urls_to_private_addresses_are_refused(client: TestClient, tenant: Tenant, url: str) -> None:
    org_key = add_key(client, tenant.workspace["id"], "Org key", scope="organization")
    response = client.post(
        "/v1/alerts/webhooks", json={"url": url}, headers={"Authorization": f"Bearer {org_key}"}
    )
    assert assert_envelope(response, 400, "invalid_request")["param"] == "url"


def test_an_alert_fires_once_even_when_two_writers_decide_it(services: Services, tenant: Tenant) -> None:
    """Two processes may both see a threshold crossed: the unique index lets one alert through."""
    from datetime import UTC, datetime

    from meterline.alerts import Alert
    from meterline.storage.alert_store import fire

    alert = Alert("usage_threshold", 50, datetime(2026, 3, 14, tzinfo=UTC), "50%")
    now = datetime(2026, 3, 14, 11, tzinfo=UTC)
    results = []
    for _ in range(2):
        with services.db.write() as conn:
            results.append(fire(conn, tenant.org["id"], alert, now))
    assert results == [True, False]
    _, total = services.alerts.list_alerts(tenant.org["id"], limit=10, offset=0)
    assert total == 1


def test_access_tokens_do_not_read_alerts(client: TestClient, tenant: Tenant) -> None:
    issued = client.post("/v1/token", json={"identifier_id": "user-1"}, headers=tenant.headers)
    assert issued.status_code == 200, issued.text
    headers = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    assert_envelope(client.get("/v1/alerts", headers=headers), 403, "forbidden")


def test_alert_settings_are_validated(database_url: str) -> None:
    from meterline.errors import ConfigError

    with pytest.raises(ConfigError, match="alert_thresholds"):
        load_settings(database_url=database_url, alert_thresholds=[0, 50])
    assert load_settings(database_url=database_url, alert_thresholds=[80, 50, 80]).alert_thresholds == (
        50,
        80,
    )


def test_unpriced_usage_is_said_once_per_model_and_period(client: TestClient, clock: FrozenClock) -> None:
    # A model missing from the price book is recorded at cost 0: the organization hears of it once per
    # model and billing period (a webhook too), not silently and not on every request.
    tenant = make_tenant(client, plan="pro", billing_anchor_day=14)
    mystery = {"model": "mystery-model", "provider": "openai", "prompt_tokens": 5, "completion_tokens": 5}
    for batch in range(3):
        assert post(client, tenant, {"id": f"m{batch}", **mystery}).status_code == 200
    post(client, tenant, {"id": "other", **mystery, "model": "other-mystery"})
    post(client, tenant, ev("priced"))  # a priced model: no such alert
    said = alerts_of(client, tenant, "unpriced_usage")
    assert sorted(a["details"]["model"] for a in said) == ["mystery-model", "other-mystery"]
    assert all(a["period_start"] == "2026-03-14T00:00:00Z" for a in said)
    assert "'mystery-model' was recorded at cost 0" in next(
        a["message"] for a in said if a["details"]["model"] == "mystery-model"
    )
    clock.set(clock.now().replace(month=4, day=15))
    post(client, tenant, {"id": "next-period", **mystery, "timestamp": "2026-04-15T09:00:00Z"})
    assert len(alerts_of(client, tenant, "unpriced_usage")) == 3
