"""The analytics API (SPEC §5, seed 002) on every backend: forecast, timeseries, breakdown, CSV export."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import ADMIN, Tenant, add_key, assert_envelope, make_tenant
from meterline.clock import FrozenClock
from meterline.services import Services
from meterline.storage.reconcile import rebuild


def post(client: TestClient, headers: dict[str, str], *events: dict[str, Any]) -> None:
    response = client.post("/v1/events", json={"events": list(events)}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["rejected"] == 0, response.text


def ev(i: int | str, ts: str = "2026-03-14T10:00:00Z", **fields: Any) -> dict[str, Any]:
    return {
        "id": f"e{i}",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "timestamp": ts,
        **fields,
    }


def workspace(client: TestClient, tenant: Tenant, name: str, group: str | None) -> tuple[str, str]:
    """A second workspace of ``tenant``'s organization and a key of it: (workspace id, key)."""
    ws = client.post(
        "/v1/admin/workspaces",
        json={"organization_id": tenant.org["id"], "name": name, "group": group},
        headers=ADMIN,
    )
    assert ws.status_code == 201, ws.text
    return ws.json()["id"], add_key(client, ws.json()["id"], name=f"{name} key")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def get(client: TestClient, path: str, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    response = client.get(path, params=params, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def one_event_credits(client: TestClient, tenant: Tenant) -> Decimal:
    history = get(client, "/v1/usage/history", tenant.headers, days=1)
    return Decimal(history["data"][0]["credits"])


# -- timeseries -----------------------------------------------------------------------------------------


def test_24h_is_hourly_with_zeros_and_a_source_split(client: TestClient, tenant: Tenant) -> None:
    post(
        client,
        tenant.headers,
        ev(1, "2026-03-14T10:05:00Z", source="web"),
        ev(2, "2026-03-14T10:10:00Z", source="cli"),
        ev(3, "2026-03-14T10:20:00Z", source="cli"),
        ev(4, "2026-03-13T11:00:00Z", source="web"),  # first hour of the range
        ev(5, "2026-03-13T10:59:59Z", source="web"),  # just before it
    )
    one = one_event_credits(client, tenant) / 3  # today's three events
    body = get(client, "/v1/usage/timeseries", tenant.headers, range="24h")
    assert (body["granularity"], body["unit"], body["by"]) == ("hour", "credits", "source")
    assert (body["start"], body["end"]) == ("2026-03-13T11:00:00Z", "2026-03-14T11:00:00Z")
    assert body["series"] == ["cli", "web"]
    data = body["data"]
    assert len(data) == 24
    assert (data[0]["start"], data[0]["end"]) == ("2026-03-13T11:00:00Z", "2026-03-13T12:00:00Z")
    assert data[0]["values"] == {"cli": "0", "web": str(one)}
    assert data[-1]["start"] == "2026-03-14T10:00:00Z"
    assert Decimal(data[-1]["values"]["cli"]) == 2 * one
    assert Decimal(data[-1]["values"]["web"]) == one
    assert Decimal(data[-1]["total"]) == 3 * one
    assert all(b["total"] == "0" and b["values"] == {"cli": "0", "web": "0"} for b in data[1:-1])


def test_7d_daily_and_30d_weekly_buckets(client: TestClient, tenant: Tenant) -> None:
    post(
        client,
        tenant.headers,
        ev(1, "2026-03-14T00:00:00Z"),
        ev(2, "2026-03-08T00:00:00Z"),  # first day of 7d
        ev(3, "2026-03-07T23:59:59Z"),  # outside 7d, in the 30d week of Mar 1-7
        ev(4, "2026-02-13T00:00:00Z"),  # first day of 30d (the 2-day bucket)
        ev(5, "2026-02-12T23:59:59Z"),  # outside 30d
    )
    one = one_event_credits(client, tenant)
    week = get(client, "/v1/usage/timeseries", tenant.headers, range="7d")
    assert week["granularity"] == "day"
    days = week["data"]
    assert [d["start"][:10] for d in days] == [f"2026-03-{d:02d}" for d in range(8, 15)]
    assert [Decimal(d["total"]) for d in days] == [one, 0, 0, 0, 0, 0, one]
    month = get(client, "/v1/usage/timeseries", tenant.headers, range="30d")
    assert month["granularity"] == "week"
    assert [(b["start"][:10], b["end"][:10]) for b in month["data"]] == [
        ("2026-02-13", "2026-02-15"),
        ("2026-02-15", "2026-02-22"),
        ("2026-02-22", "2026-03-01"),
        ("2026-03-01", "2026-03-08"),
        ("2026-03-08", "2026-03-15"),
    ]
    assert [Decimal(b["total"]) for b in month["data"]] == [one, 0, 0, one, 2 * one]
    # The chart's 30 days are the breakdown's 30 days.
    top = get(client, "/v1/usage/breakdown", tenant.headers, by="model", range="30d")
    assert Decimal(top["totals"]["credits"]) == 4 * one


def test_timeseries_by_model_and_identifier(client: TestClient, tenant: Tenant) -> None:
    post(
        client,
        tenant.headers,
        ev(1, model="gpt-4o-mini", identifier_id="user-1"),
        ev(2, model="gpt-4o", identifier_id="user-2"),
        ev(3, event="case.execute", model=None, provider=None, prompt_tokens=0, completion_tokens=0),
    )
    body = get(client, "/v1/usage/timeseries", tenant.headers, range="24h", by="model")
    assert body["series"] == ["(none)", "gpt-4o", "gpt-4o-mini"]
    last = body["data"][-1]
    assert Decimal(last["values"]["gpt-4o"]) > Decimal(last["values"]["gpt-4o-mini"]) > 0
    assert Decimal(last["total"]) == sum(Decimal(v) for v in last["values"].values())
    mine = get(client, "/v1/usage/timeseries", tenant.headers, range="24h", identifier_id="user-1")
    assert mine["identifier_id"] == "user-1"
    assert mine["series"] == ["api"]
    assert mine["data"][-1]["total"] == last["values"]["gpt-4o-mini"]


def test_spend_cap_organizations_see_money(client: TestClient) -> None:
    tenant = make_tenant(client, spend_cap="100", currency="EUR")
    post(client, tenant.headers, ev(1))
    body = get(client, "/v1/usage/timeseries", tenant.headers, range="7d")
    assert body["unit"] == "EUR"
    ledger = get(client, "/v1/usage/ledger", tenant.headers)["data"][0]
    assert body["data"][-1]["total"] == ledger["cost"]
    top = get(client, "/v1/usage/breakdown", tenant.headers, by="model")
    assert top["unit"] == "EUR"
    assert top["data"][0]["cost"] == ledger["cost"]


# -- breakdown ------------------------------------------------------------------------------------------


def _org_with_three_workspaces(client: TestClient) -> tuple[Tenant, str, dict[str, str]]:
    tenant = make_tenant(client, group="eng")
    ws2, key2 = workspace(client, tenant, "Research", "eng")
    _ws3, key3 = workspace(client, tenant, "Sales", "biz")
    # Main: 1 small event; Research: 2 large; Sales: 1 large.
    post(client, tenant.headers, ev("m1", user_id="ann", endpoint="/chat"))
    big = {"prompt_tokens": 10_000, "completion_tokens": 5_000}
    post(client, bearer(key2), ev("r1", user_id="bob", **big), ev("r2", user_id="bob", **big))
    post(client, bearer(key3), ev("s1", user_id="cid", endpoint="/chat", **big))
    org_key = add_key(client, tenant.workspace["id"], name="Org admin", scope="organization")
    return tenant, ws2, {"org": org_key, "research": key2, "sales": key3}


def test_breakdown_by_workspace_is_ranked_with_shares_and_pages(client: TestClient) -> None:
    _tenant, ws2, keys = _org_with_three_workspaces(client)
    body = get(client, "/v1/usage/breakdown", bearer(keys["org"]), by="workspace", limit=2)
    assert (body["total"], body["has_more"], body["unit"]) == (3, True, "credits")
    # Default range: the current billing period (anchored on the 14th, the day the org was created).
    assert (body["start"], body["end"]) == ("2026-03-14T00:00:00Z", "2026-04-14T00:00:00Z")
    first, second = body["data"]
    assert (first["key"], first["name"], first["requests"], first["tokens"]) == (ws2, "Research", 2, 30_000)
    assert second["name"] == "Sales"
    total = Decimal(body["totals"]["credits"])
    assert Decimal(first["share_pct"]) == (Decimal(first["credits"]) * 100 / total).quantize(Decimal("0.01"))
    rest = get(client, "/v1/usage/breakdown", bearer(keys["org"]), by="workspace", limit=2, offset=2)
    assert rest["has_more"] is False
    assert [r["name"] for r in rest["data"]] == ["Main"]
    assert sum(Decimal(r["credits"]) for r in body["data"] + rest["data"]) == total
    past = get(client, "/v1/usage/breakdown", bearer(keys["org"]), by="workspace", offset=10)
    assert (past["data"], past["total"], past["totals"]) == ([], 3, body["totals"])


def test_breakdown_is_scoped_to_the_callers_workspace(client: TestClient) -> None:
    tenant, ws2, keys = _org_with_three_workspaces(client)
    mine = get(client, "/v1/usage/breakdown", bearer(keys["research"]), by="workspace")
    assert [r["key"] for r in mine["data"]] == [ws2]
    assert mine["data"][0]["share_pct"] == "100.00"
    narrowed = get(
        client,
        "/v1/usage/breakdown",
        {**bearer(keys["org"]), "X-Workspace-Id": tenant.workspace["id"]},
        by="user",
    )
    assert [r["key"] for r in narrowed["data"]] == ["ann"]
    other = make_tenant(client, name="Other")
    assert get(client, "/v1/usage/breakdown", other.headers, by="workspace")["data"] == []


def test_breakdown_by_group_user_endpoint_key_and_model(client: TestClient) -> None:
    _, _, keys = _org_with_three_workspaces(client)
    org = bearer(keys["org"])
    groups = get(client, "/v1/usage/breakdown", org, by="workspace_group")["data"]
    assert [(g["key"], g["requests"], g["tokens"]) for g in groups] == [
        ("eng", 3, 30_150),
        ("biz", 1, 15_000),
    ]
    users = get(client, "/v1/usage/breakdown", org, by="user")["data"]
    assert [(u["key"], u["name"]) for u in users] == [("bob", "bob"), ("cid", "cid"), ("ann", "ann")]
    endpoints = get(client, "/v1/usage/breakdown", org, by="endpoint")["data"]
    assert [(e["key"], e["requests"]) for e in endpoints] == [(None, 2), ("/chat", 2)]
    by_key = get(client, "/v1/usage/breakdown", org, by="key")["data"]
    assert [k["name"] for k in by_key] == ["Research key", "Sales key", "Default"]
    assert all(k["key_prefix"] and k["key"].startswith("key_") for k in by_key)
    models = get(client, "/v1/usage/breakdown", org, by="model", range="24h")
    assert [(m["key"], m["requests"], m["share_pct"]) for m in models["data"]] == [
        ("gpt-4o-mini", 4, "100.00")
    ]


def test_breakdown_start_end_widen_to_whole_hours(client: TestClient, tenant: Tenant) -> None:
    post(client, tenant.headers, ev(1, "2026-03-14T09:10:00Z"), ev(2, "2026-03-14T08:59:00Z"))
    body = get(
        client,
        "/v1/usage/breakdown",
        tenant.headers,
        by="model",
        start="2026-03-14T09:30:00Z",
        end="2026-03-14T09:40:00Z",
    )
    assert (body["start"], body["end"]) == ("2026-03-14T09:00:00Z", "2026-03-14T10:00:00Z")
    assert body["data"][0]["requests"] == 1


# -- forecast -------------------------------------------------------------------------------------------


def test_forecast_in_credits(client: TestClient, clock: FrozenClock) -> None:
    tenant = make_tenant(client, billing_anchor_day=1)
    post(client, tenant.headers, ev(1, "2026-03-02T10:00:00Z"), ev(2, "2026-03-14T10:00:00Z"))
    body = get(client, "/v1/usage", tenant.headers)
    consumed = Decimal(body["monthly"]["credits"])
    forecast = body["forecast"]
    assert forecast["unit"] == "credits"
    assert Decimal(str(forecast["avg_per_day"])) == (consumed / 14).quantize(Decimal("0.000000001"))
    remaining = Decimal(str(body["credits"]["remaining"]))
    expected = (remaining * 14 / consumed).quantize(Decimal("0.01"), rounding="ROUND_DOWN")
    assert Decimal(str(forecast["run_out_in_days"])) == expected
    assert forecast["will_run_out_before_period_end"] is False
    # Later in the period the same usage averages lower.
    clock.set(clock.now().replace(day=28))
    later = get(client, "/v1/usage", tenant.headers)["forecast"]
    assert Decimal(str(later["avg_per_day"])) == (consumed / 28).quantize(Decimal("0.000000001"))


def test_forecast_is_null_without_usage_or_with_unlimited_credits(client: TestClient) -> None:
    quiet = make_tenant(client)
    forecast = get(client, "/v1/usage", quiet.headers)["forecast"]
    assert forecast == {
        "avg_per_day": 0,
        "run_out_in_days": None,
        "will_run_out_before_period_end": False,
        "unit": "credits",
    }
    unlimited = make_tenant(client, plan="enterprise", name="Big")
    post(client, unlimited.headers, ev(1))
    forecast = get(client, "/v1/usage", unlimited.headers)["forecast"]
    assert forecast["run_out_in_days"] is None
    assert forecast["avg_per_day"] > 0


@pytest.mark.parametrize(("cap", "runs_out"), [("0.0009", True), ("1", False)])
def test_forecast_of_a_spend_cap(client: TestClient, cap: str, runs_out: bool) -> None:
    tenant = make_tenant(client, spend_cap=cap)
    post(client, tenant.headers, ev(1), ev(2))
    body = get(client, "/v1/usage", tenant.headers)
    spent = Decimal(str(body["spend"]["amount"]))
    forecast = body["forecast"]
    assert forecast["unit"] == "USD"
    assert Decimal(str(forecast["avg_per_day"])) == spent  # first day of the period
    days = ((Decimal(cap) - spent) / spent).quantize(Decimal("0.01"), rounding="ROUND_DOWN")
    assert Decimal(str(forecast["run_out_in_days"])) == days
    assert forecast["will_run_out_before_period_end"] is runs_out


# -- CSV export -----------------------------------------------------------------------------------------


def _csv(response: Any) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith("attachment; filename=")
    return list(csv.DictReader(io.StringIO(response.text)))


def test_export_streams_every_row_with_exact_sums(client: TestClient, tenant: Tenant) -> None:
    events = [
        ev(i, f"2026-03-{1 + i % 13:02d}T{i % 24:02d}:00:00Z", prompt_tokens=97 + i) for i in range(1500)
    ]
    for start in range(0, len(events), 500):
        post(client, tenant.headers, *events[start : start + 500])
    rows = _csv(client.get("/v1/usage/export.csv", headers=tenant.headers))
    assert len(rows) == 1500
    assert len({r["id"] for r in rows}) == 1500
    assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)
    top = get(
        client,
        "/v1/usage/breakdown",
        tenant.headers,
        by="model",
        start="2026-03-01T00:00:00Z",
        end="2026-03-15T00:00:00Z",
    )
    assert sum(Decimal(r["cost"]) for r in rows) == Decimal(top["totals"]["cost"])
    assert sum(Decimal(r["credits"]) for r in rows) == Decimal(top["totals"]["credits"])
    assert sum(int(r["total_tokens"]) for r in rows) == top["data"][0]["tokens"]


def test_focus_export_has_a_line_per_row_and_the_same_sums(client: TestClient, tenant: Tenant) -> None:
    events = [ev(i, f"2026-03-{1 + i % 13:02d}T{i % 24:02d}:00:00Z", prompt_tokens=97 + i) for i in range(40)]
    post(client, tenant.headers, *events)
    ledger = _csv(client.get("/v1/usage/export.csv", headers=tenant.headers))
    answer = client.get("/v1/usage/export.csv", params={"format": "focus"}, headers=tenant.headers)
    assert answer.status_code == 200
    assert "meterline-focus-" in answer.headers["content-disposition"]
    focus = _csv(answer)
    assert [f["x_LedgerRowId"] for f in focus] == [r["id"] for r in ledger]
    assert sum(Decimal(f["BilledCost"]) for f in focus) == sum(Decimal(r["cost"]) for r in ledger)
    assert sum(Decimal(f["ListCost"]) for f in focus) == sum(Decimal(r["list_cost"]) for r in ledger)
    assert sum(Decimal(f["ConsumedQuantity"]) for f in focus) == sum(int(r["total_tokens"]) for r in ledger)
    assert {f["BillingAccountId"] for f in focus} == {tenant.org["id"]}
    assert {f["SubAccountId"] for f in focus} == {tenant.workspace["id"]}
    bad = client.get("/v1/usage/export.csv", params={"format": "xlsx"}, headers=tenant.headers)
    assert bad.status_code == 422
    assert "format" in bad.json()["error"]["message"]


def test_export_filters_like_the_ledger(client: TestClient, tenant: Tenant) -> None:
    post(
        client,
        tenant.headers,
        ev(1, "2026-03-10T00:00:00Z"),
        ev(2, "2026-03-11T00:00:00Z", model="gpt-4o"),
        ev(3, "2026-03-12T00:00:00Z", identifier_id="user-9"),
    )
    rows = _csv(
        client.get(
            "/v1/usage/export.csv",
            params={"start": "2026-03-10T00:00:00Z", "end": "2026-03-11T00:00:00Z", "model": "gpt-4o"},
            headers=tenant.headers,
        )
    )
    assert [r["event_id"] for r in rows] == ["e2"]
    rows = _csv(
        client.get("/v1/usage/export.csv", params={"identifier_id": "user-9"}, headers=tenant.headers)
    )
    assert [r["event_id"] for r in rows] == ["e3"]
    other = make_tenant(client, name="Other")
    assert _csv(client.get("/v1/usage/export.csv", headers=other.headers)) == []


def test_export_neutralizes_formulas(client: TestClient, tenant: Tenant) -> None:
    post(
        client,
        tenant.headers,
        ev(
            1,
            id="=cmd",
            user_id='=HYPERLINK("http://evil")',
            identifier_id="+1+1",
            endpoint="-2",
            run_id="@SUM(A1)",
            metadata={"note": "=1"},
        ),
        ev(2, id="plain", user_id="ann", run_id="run 1"),
    )
    response = client.get("/v1/usage/export.csv", headers=tenant.headers)
    rows = {r["event_id"]: r for r in _csv(response)}
    bad = rows["'=cmd"]
    assert bad["user_id"] == '\'=HYPERLINK("http://evil")'
    assert (bad["identifier_id"], bad["endpoint"], bad["run_id"]) == ("'+1+1", "'-2", "'@SUM(A1)")
    assert (rows["plain"]["user_id"], rows["plain"]["run_id"]) == ("ann", "run 1")
    header = response.text.splitlines()[0].split(",")
    assert header[:3] == ["id", "created_at", "organization_id"]
    assert {"cost", "credits", "model", "key_prefix"} <= set(header)


# -- bad parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/v1/usage/timeseries", {"range": "90d"}, 422),
        ("/v1/usage/timeseries", {"by": "user"}, 422),
        ("/v1/usage/breakdown", {}, 422),
        ("/v1/usage/breakdown", {"by": "planet"}, 422),
        ("/v1/usage/breakdown", {"by": "model", "limit": 0}, 422),
        ("/v1/usage/breakdown", {"by": "model", "range": "7d", "start": "2026-03-01T00:00:00Z"}, 400),
        ("/v1/usage/breakdown", {"by": "model", "start": "2026-03-01T00:00:00Z"}, 400),
        ("/v1/usage/breakdown", {"by": "model", "start": "yesterday", "end": "2026-03-01T00:00:00Z"}, 400),
        (
            "/v1/usage/breakdown",
            {"by": "model", "start": "2026-03-02T00:00:00Z", "end": "2026-03-01T00:00:00Z"},
            400,
        ),
        ("/v1/usage/export.csv", {"start": "2026-13-01T00:00:00Z"}, 400),
        ("/v1/usage/export.csv", {"start": "2026-03-02T00:00:00Z", "end": "2026-03-01T00:00:00Z"}, 400),
    ],
)
def test_bad_parameters_get_the_envelope(
    client: TestClient, tenant: Tenant, path: str, params: dict[str, Any], status: int
) -> None:
    error = assert_envelope(
        client.get(path, params=params, headers=tenant.headers), status, "invalid_request"
    )
    assert error["message"]


def test_analytics_need_a_key(client: TestClient) -> None:
    for path in ("/v1/usage/timeseries", "/v1/usage/breakdown?by=model", "/v1/usage/export.csv"):
        assert_envelope(client.get(path), 401, "unauthorized")


# -- what the tokens were (the usage vector) ------------------------------------------------------------


def test_breakdown_by_model_says_what_the_tokens_were_in_every_scope(
    client: TestClient, services: Services, tenant: Tenant
) -> None:
    _, key2 = workspace(client, tenant, "Research", "eng")
    claude = {"model": "claude-sonnet-4-5", "provider": "anthropic", "prompt_tokens": 5_000}
    post(
        client,
        tenant.headers,
        ev(1, **claude, cache_read_tokens=3_000, cache_write_tokens=1_500, cache_write_1h_tokens=1_000),
        ev(2, **claude, web_searches=2, identifier_id="user-1"),
        ev(3, model="o4-mini", completion_tokens=900, reasoning_tokens=700, ts="2026-03-14T08:10:00Z"),
        ev(4, model="no-such-model-7"),
        ev(5),  # plain usage: no detail at all
    )
    post(client, bearer(key2), ev("r1", model="no-such-model-7"), ev("r2", **claude, web_searches=5))

    def detail(headers: dict[str, str], **params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body = get(client, "/v1/usage/breakdown", headers, by="model", **params)
        return {r["key"]: r for r in body["data"]}, body["totals"]

    org = bearer(add_key(client, tenant.workspace["id"], name="Org admin", scope="organization"))
    rows, totals = detail(org)
    assert rows["claude-sonnet-4-5"]["usage"] == {
        "cache_read_tokens": 3_000,
        "cache_write_tokens": 1_500,
        "cache_write_1h_tokens": 1_000,
        "input_audio_tokens": 0,
        "cache_audio_read_tokens": 0,
        "output_audio_tokens": 0,
        "reasoning_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
        "web_searches": 7,
        "web_fetches": 0,
    }
    assert rows["o4-mini"]["usage"]["reasoning_tokens"] == 700
    assert not any(rows["gpt-4o-mini"]["usage"].values())
    assert [(k, r["unpriced_requests"]) for k, r in rows.items() if r["unpriced_requests"]] == [
        ("no-such-model-7", 2)
    ]
    assert totals["unpriced_requests"] == 2
    # A workspace sees its own; an identifier its own; a range only its hours.
    mine, mine_totals = detail(bearer(key2))
    assert mine["claude-sonnet-4-5"]["usage"]["web_searches"] == 5
    assert mine["claude-sonnet-4-5"]["usage"]["cache_read_tokens"] == 0
    assert mine_totals["unpriced_requests"] == 1
    main, _ = detail(tenant.headers)
    assert main["claude-sonnet-4-5"]["usage"]["web_searches"] == 2
    user, _ = detail(org, identifier_id="user-1")
    assert list(user) == ["claude-sonnet-4-5"]
    assert user["claude-sonnet-4-5"]["usage"]["web_searches"] == 2
    early, early_totals = detail(org, start="2026-03-14T08:00:00Z", end="2026-03-14T09:00:00Z")
    assert list(early) == ["o4-mini"]
    assert early_totals["unpriced_requests"] == 0
    # Other dimensions are not slowed by it, and the projection equals the ledger.
    assert "usage" not in get(client, "/v1/usage/breakdown", org, by="user")["data"][0]
    reconciled = client.get("/v1/admin/reconcile", headers=ADMIN).json()
    assert reconciled["ok"], reconciled
    # Four claude entries (organization, two workspaces, one identifier), two o4-mini, three unpriced.
    assert rebuild(services.db).as_json()["rebuilt"]["usage_details"] == 9
    assert detail(org) == (rows, totals)
