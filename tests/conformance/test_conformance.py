"""Conformance vectors: usage objects in the exact shapes the providers document, one file per case in
``cases/`` (the provider's answer, plain or streamed, and the expected cost worked out by hand from the
public price table, with the arithmetic in the file).

Each case runs through the gateway (the fake upstream replays the provider's answer to the official
SDK's request) and through ``POST /v1/events`` (the same usage as an event), on SQLite and PostgreSQL;
both must give the expected cost and the same row.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import ADMIN_KEY, NOW, Tenant, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.services import build_services
from meterline.testing.fake_upstream import FakeUpstream
from servers import ThreadServer

CASES = sorted((Path(__file__).parent / "cases").glob("*.json"))
UPSTREAM_KEY = "sk-conformance-0123456789abcdef"
# The ledger fields a case may state; every other vector field must be 0 / null / false.
VECTOR = {
    "cache_write_1h_tokens": 0,
    "input_audio_tokens": 0,
    "cache_audio_read_tokens": 0,
    "output_audio_tokens": 0,
    "reasoning_tokens": 0,
    "accepted_prediction_tokens": 0,
    "rejected_prediction_tokens": 0,
    "web_searches": 0,
    "web_fetches": 0,
    "service_tier": None,
    "batch": False,
}


def load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert case["arithmetic"], f"{path.name}: the expected cost must show its arithmetic"
    return case


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


class Server:
    def __init__(self, base: str, http: httpx.Client, tenant: Tenant) -> None:
        self.base, self.http, self.tenant = base, http, tenant

    def ledger(self) -> list[dict[str, Any]]:
        response = self.http.get("/v1/usage/ledger", headers=self.tenant.headers)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["data"]
        return rows


@pytest.fixture
def server(database_url: str, tmp_path: Path, upstream: FakeUpstream) -> Iterator[Server]:
    upstream.reset()
    routes = [
        # A batch upstream: the rows it serves say batch (batch_event.json).
        {"name": "openai-batch", "provider": "openai", "base_url": upstream.url, "api_key": UPSTREAM_KEY,
         "models": ["gpt-4o-mini"], "batch": True},
        {"name": "openai", "provider": "openai", "base_url": upstream.url, "api_key": UPSTREAM_KEY,
         "models": ["o4-*", "gpt-*", "no-such-*"]},
        {"name": "anthropic", "provider": "anthropic", "base_url": upstream.url, "api_key": UPSTREAM_KEY,
         "models": ["claude-*"]},
        {"name": "google", "provider": "google", "base_url": upstream.url, "api_key": UPSTREAM_KEY,
         "models": ["gemini-*"]},
    ]  # fmt: skip
    settings = load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        upstreams=routes,
    )
    services = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    try:
        with (
            ThreadServer(create_app(settings, services=services)) as running,
            httpx.Client(base_url=running.base, timeout=30) as http,
        ):
            yield Server(running.base, http, make_tenant(http, plan="enterprise"))  # type: ignore[arg-type]
    finally:
        services.close()


def through_the_gateway(server: Server, upstream: FakeUpstream, case: dict[str, Any]) -> dict[str, Any]:
    if "stream" in case:
        upstream.script("replay", events=case["stream"])
    else:
        upstream.script("replay", json=case["answer"])
    request = case["request"]
    key = server.tenant.key
    if case["api"] == "messages":
        with anthropic.Anthropic(base_url=server.base, api_key=key, max_retries=0) as claude:
            if request.get("stream"):
                for _ in claude.messages.create(**request):
                    pass
            else:
                claude.messages.create(**request)
    else:
        with openai.OpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0) as client:
            create = client.responses.create if case["api"] == "responses" else client.chat.completions.create
            answer = create(**request)
            if request.get("stream"):
                for _ in answer:
                    pass
    (row,) = server.ledger()
    return row


def through_events(server: Server, case: dict[str, Any], model: str) -> dict[str, Any]:
    event = {"id": f"conformance-{uuid.uuid4()}", "model": model, "provider": case["provider"]}
    event |= {k: v for k, v in case["expected"]["row"].items() if v not in (0, None, False)}
    response = server.http.post("/v1/events", json={"events": [event]}, headers=server.tenant.headers)
    assert response.status_code == 200, response.text
    rows = [r for r in server.ledger() if r["event_id"] == event["id"]]
    assert len(rows) == 1
    return rows[0]


def billed(row: dict[str, Any]) -> dict[str, Any]:
    """What a row bills: the fields both paths must agree on."""
    names = (
        "cost",
        "priced",
        "prompt_tokens",
        "completion_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
    )
    return {name: row[name] for name in (*names, *VECTOR)}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_the_case_costs_what_the_price_table_says_both_ways(
    path: Path, server: Server, upstream: FakeUpstream
) -> None:
    case = load(path)
    expected = {**VECTOR, **case["expected"]["row"]}
    rows = []
    if "request" in case:
        rows.append(through_the_gateway(server, upstream, case))
    model = case["request"]["model"] if "request" in case else case["model"]
    rows.append(through_events(server, case, model))
    for row in rows:
        assert Decimal(row["cost"]) == Decimal(case["expected"]["cost"]), (path.name, row)
        assert row["priced"] is case["expected"].get("priced", True)
        assert {name: row[name] for name in expected} == expected, path.name
    assert all(billed(row) == billed(rows[0]) for row in rows)


def test_every_case_is_well_formed() -> None:
    assert len(CASES) >= 11
    for path in CASES:
        case = load(path)
        assert {"about", "prices", "arithmetic", "provider", "expected"} <= set(case), path.name
        assert "request" in case or "model" in case, path.name
        assert set(case["expected"]["row"]) <= {
            "prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_write_tokens", *VECTOR,
        }, path.name  # fmt: skip
