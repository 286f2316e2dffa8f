"""Every read of the analytics API equals the ledger, whatever mix of hour, day and billing-period rollups
answers it: ranges with partial days, whole days, the billing period, and after the anchor day moved."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from fastapi.testclient import TestClient
from test_analytics_api import bearer, get, post, workspace

from conftest import ADMIN, NOW, Tenant, add_key, make_tenant
from meterline.clock import rfc3339
from meterline.services import Services
from meterline.storage.reconcile import reconcile

USERS = ("ann", "bob", "cid", "dan")
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-20241022")


def _events(client: TestClient, tenant: Tenant) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """60 events over the 42 days before NOW (two billing periods), across 3 workspaces."""
    ws2, key2 = workspace(client, tenant, "Research", "eng")
    ws3, key3 = workspace(client, tenant, "Sales", "biz")
    places = [(tenant.workspace["id"], tenant.headers), (ws2, bearer(key2)), (ws3, bearer(key3))]
    sent: list[dict[str, Any]] = []
    for i in range(60):
        at = NOW - timedelta(hours=17 * i, minutes=7)
        ws, headers = places[i % 3]
        event = {
            "id": f"spread-{i}",
            "model": MODELS[i % 3],
            "provider": "anthropic" if i % 3 == 2 else "openai",
            "prompt_tokens": 100 + i,
            "completion_tokens": i,
            "user_id": USERS[i % 4],
            "endpoint": "/chat" if i % 2 else "/embed",
            "timestamp": rfc3339(at),
        }
        post(client, headers, event)
        sent.append({**event, "workspace": ws, "at": at, "tokens": 100 + 2 * i})
    return sent, {"org": add_key(client, tenant.workspace["id"], name="Org", scope="organization")}


def _expected(sent: list[dict[str, Any]], start: str, end: str, field: str) -> dict[str, tuple[int, int]]:
    counts: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for e in sent:
        if start <= rfc3339(e["at"]) < end:
            counts[e[field]] += 1
            tokens[e[field]] += e["tokens"]
    return {k: (counts[k], tokens[k]) for k in counts}


def _breakdown(client: TestClient, key: str, by: str, **params: Any) -> dict[str, Any]:
    body = get(client, "/v1/usage/breakdown", bearer(key), by=by, limit=1000, **params)
    body["by_key"] = {r["key"]: (r["requests"], r["tokens"]) for r in body["data"]}
    return body


FIELDS = {"workspace": "workspace", "user": "user_id", "model": "model", "endpoint": "endpoint"}
RANGES: list[dict[str, str]] = [
    {},  # the billing period: one period entry per value
    {"range": "24h"},  # hours only
    {"range": "7d"},  # whole days
    {"range": "30d"},
    # Partial days at both ends (hours) around whole days, crossing the period boundary.
    {"start": "2026-02-27T05:00:00Z", "end": "2026-03-13T17:00:00Z"},
    {"start": "2026-03-10T03:00:00Z", "end": "2026-03-10T21:00:00Z"},  # within one day
    # Most of a billing period (Feb 14 - Mar 14): its period entry minus the 6 days before the range.
    {"start": "2026-02-20T00:00:00Z", "end": "2026-03-14T00:00:00Z"},
    {"start": "2026-02-20T07:00:00Z", "end": "2026-03-14T10:00:00Z"},  # and hours at both ends
]


def test_breakdowns_equal_the_ledger_for_every_kind_of_range(client: TestClient, tenant: Tenant) -> None:
    sent, keys = _events(client, tenant)
    for params in RANGES:
        for by, field in FIELDS.items():
            body = _breakdown(client, keys["org"], by, **params)
            expected = _expected(sent, body["start"], body["end"], field)
            assert body["by_key"] == expected, (params, by)
        totals = {
            by: {
                k: v
                for k, v in _breakdown(client, keys["org"], by, **params)["totals"].items()
                if k != "unpriced_requests"
            }
            for by in (*FIELDS, "key")
        }
        assert len({str(t) for t in totals.values()}) == 1, params  # every dimension sums to the same


def test_a_workspace_sees_its_own_share_of_every_range(client: TestClient, tenant: Tenant) -> None:
    sent, _ = _events(client, tenant)
    mine = [e for e in sent if e["workspace"] == tenant.workspace["id"]]
    for params in RANGES:
        body = _breakdown(client, tenant.key, "user", **params)
        assert body["by_key"] == _expected(mine, body["start"], body["end"], "user_id"), params
        own = _breakdown(client, tenant.key, "workspace", **params)["by_key"]
        assert own == _expected(mine, body["start"], body["end"], "workspace"), params


def _ledger(client: TestClient, key: str) -> list[tuple[str, str, Decimal]]:
    """(created_at, model, credits) of every ledger row the key sees."""
    body = get(client, "/v1/usage/ledger", bearer(key), limit=1000)
    assert body["total_count"] == len(body["data"])
    return [(r["created_at"], r["model"], Decimal(r["credits"])) for r in body["data"]]


def _credits(rows: list[tuple[str, str, Decimal]], start: str, end: str, model: str | None = None) -> Decimal:
    return sum((c for at, m, c in rows if start <= at < end and model in (None, m)), start=Decimal(0))


def test_timeseries_history_and_summary_equal_the_ledger(client: TestClient, tenant: Tenant) -> None:
    _, keys = _events(client, tenant)
    rows = _ledger(client, keys["org"])
    assert len(rows) == 60
    assert _credits(rows, "", "9") > 0
    for range_ in ("24h", "7d", "30d"):
        body = get(client, "/v1/usage/timeseries", bearer(keys["org"]), range=range_, by="model")
        assert sum(Decimal(b["total"]) for b in body["data"]) == _credits(rows, body["start"], body["end"])
        for bucket in body["data"]:
            for model in MODELS:
                got = Decimal(bucket["values"].get(model, "0"))
                assert got == _credits(rows, bucket["start"], bucket["end"], model), (range_, bucket)
    history = get(client, "/v1/usage/history", bearer(keys["org"]), days=45)
    for day in history["data"]:
        start = f"{day['date']}T00:00:00Z"
        end = rfc3339(datetime.fromisoformat(start) + timedelta(days=1))
        assert Decimal(day["credits"]) == _credits(rows, start, end), day
    assert sum(d["calls"] for d in history["data"]) == 60
    usage = get(client, "/v1/usage", bearer(keys["org"]))
    today = rfc3339(NOW)[:10]
    assert Decimal(usage["daily"]["credits"]) == _credits(rows, f"{today}T00:00:00Z", f"{today}T23:59:59Z")


def test_moving_the_anchor_day_moves_the_period_entries(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    sent, keys = _events(client, tenant)
    before = _breakdown(client, keys["org"], "user")
    assert (before["start"], before["end"]) == ("2026-03-14T00:00:00Z", "2026-04-14T00:00:00Z")
    moved = client.patch(
        f"/v1/admin/organizations/{tenant.org['id']}", json={"billing_anchor_day": 3}, headers=ADMIN
    )
    assert moved.status_code == 200, moved.text
    after = _breakdown(client, keys["org"], "user")
    assert (after["start"], after["end"]) == ("2026-03-03T00:00:00Z", "2026-04-03T00:00:00Z")
    assert after["by_key"] == _expected(sent, after["start"], after["end"], "user_id")
    # New usage lands in the new period's entries, and the whole projection still equals the ledger.
    post(client, tenant.headers, {"id": "late", "model": MODELS[0], "prompt_tokens": 5, "user_id": "eve"})
    assert _breakdown(client, keys["org"], "user")["by_key"]["eve"] == (1, 5)
    assert reconcile(services.db).ok
    other = make_tenant(client, name="Other")
    assert _breakdown(client, other.key, "user")["data"] == []
