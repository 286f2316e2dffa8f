"""Every SDK result is named as the JSON API names it: each field of the answer the client received is
an attribute of the same name (nested objects as nested attributes) holding the same value. The names
the SDK used before still work, with a DeprecationWarning."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from conftest import NOW
from meterline.sdk import AsyncClient, Client, Event
from meterline.sdk._json import loads, time
from sdk.conftest import Server

# The JSON's type tag: the SDK's class is the type.
NOT_MIRRORED = frozenset({"object"})


class Answers:
    """The bodies of the answers an httpx client received, as the SDK parses them (exact decimals)."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.bodies.append(loads(response.content))

    @property
    def last(self) -> Any:
        return self.bodies[-1]


def mirrors(value: object, data: object, where: str = "result", skip: frozenset[str] = frozenset()) -> None:
    """``value`` holds ``data``: every JSON field as an attribute (or key) of the same name and value."""
    if isinstance(data, Mapping):
        if isinstance(value, Mapping):
            assert set(value) == set(data), where
            for key, item in data.items():
                mirrors(value[key], item, f"{where}[{key!r}]")
            return
        assert dataclasses.is_dataclass(value), f"{where}: {value!r} is not an object"
        for key, item in data.items():
            if key in NOT_MIRRORED or key in skip:
                continue
            fields = {f.name for f in dataclasses.fields(value)}
            assert key in fields, f"{where}.{key}: the API's field has no SDK field of that name"
            mirrors(getattr(value, key), item, f"{where}.{key}")
    elif isinstance(data, list):
        assert isinstance(value, list), where
        assert len(value) == len(data), where
        for i, (mine, theirs) in enumerate(zip(value, data, strict=True)):
            mirrors(mine, theirs, f"{where}[{i}]")
    elif isinstance(value, datetime):
        assert value == time(data), where
    elif isinstance(value, date):
        assert value == date.fromisoformat(str(data)), where
    elif isinstance(value, Decimal):
        assert value == Decimal(str(data)), where
    else:
        assert value == data, f"{where}: {value!r} != {data!r}"


@pytest.fixture
def answers(server: Server) -> Iterator[tuple[Answers, Callable[..., Client]]]:
    seen = Answers()
    opened: list[httpx.Client] = []

    def client(key: str | None = None) -> Client:
        http = httpx.Client(timeout=30, event_hooks={"response": [seen]})
        opened.append(http)
        return server.client(key, http_client=http)

    yield seen, client
    for http in opened:
        http.close()


def _events(n: int) -> list[Event]:
    return [
        Event(
            id=f"name-{i}",
            model="gpt-4o-mini",
            provider="openai",
            prompt_tokens=1000,
            completion_tokens=500,
            cache_read_tokens=200,
            reasoning_tokens=50,
            user_id=f"user-{i % 2}",
            run_id="run-1",
            metadata={"ticket": i},
            timestamp=NOW - timedelta(minutes=i),
        )
        for i in range(n)
    ]


def test_every_result_is_named_as_the_api_json(
    server: Server, answers: tuple[Answers, Callable[..., Client]]
) -> None:
    seen, open_client = answers
    client = open_client()
    org = open_client(server.org_key)

    def check(result: object, skip: frozenset[str] = frozenset()) -> None:
        mirrors(result, seen.last, type(result).__name__, skip)

    batch = client.send_events([*_events(4), Event(id="bad", model="gpt-4o-mini", prompt_tokens=-1)])
    check(batch)
    assert batch.data[-1].error is not None  # a rejected event's error is mirrored too
    check(client.usage())
    check(client.usage(identifier_id="nobody"))
    # History's ``days`` is still the deprecated name of ``data`` (the API's ``days`` is len(data)).
    history = client.history(days=3)
    check(history, skip=frozenset({"days"}))
    assert seen.last["days"] == len(history.data) == 3
    check(client.events(per_page=2))
    check(client.ledger(limit=3))
    check(client.timeseries(range="24h", by="model"))
    check(client.breakdown("model"))
    check(client.breakdown("key"))
    check(client.breakdown("user", limit=1))
    held = client.reserve(model="gpt-4o-mini", prompt_tokens=100, completion_tokens=50)
    check(held)
    check(client.settle(held.id, completion_tokens=20))
    check(client.release(client.reserve(model="gpt-4o-mini", prompt_tokens=1).id))
    pair = client.issue_token("end-user-1", limits={"daily_tokens": 1000, "spend_cap": Decimal("1.50")})
    check(pair)
    assert pair.limits == {"daily_tokens": 1000, "spend_cap": Decimal("1.50")}  # money stays exact
    check(client.alerts())
    served = client.models()
    mirrors(served, seen.last["data"], "models")
    receipt_id = batch.data[0].receipt_id
    assert receipt_id
    check(client.receipt(receipt_id, verify=False))
    check(org.receipts(limit=2))
    hook = org.create_webhook("http://127.0.0.1:9/names", description="names")
    check(hook)
    mirrors(org.webhooks(), seen.last["data"], "webhooks")


def test_an_alert_is_named_as_the_api_json(
    server: Server, answers: tuple[Answers, Callable[..., Client]]
) -> None:
    seen, open_client = answers
    client = open_client()
    # Usage of a model without a price is recorded at cost 0 and says so with an alert.
    client.send_events([Event(id="unpriced", model="no-such-model-9", prompt_tokens=10)])
    alerts = client.alerts()
    assert [a.kind for a in alerts.data] == ["unpriced_usage"]
    mirrors(alerts, seen.last, "AlertPage")


def _old_and_new(server: Server) -> list[tuple[Any, str, Any]]:
    with server.client() as client:
        batch = client.send_events(_events(3))
        held = client.reserve(model="gpt-4o-mini", prompt_tokens=100, completion_tokens=50)
        summary = client.usage()
        history = client.history(days=2)
        events = client.events(per_page=2)
        breakdown = client.breakdown("model")
        series = client.timeseries()
    assert held.estimate is not None
    credits = summary.credits
    pages = events.pagination
    return [
        (batch, "results", batch.data),
        (history, "days", history.data),
        (events, "page", pages.page),
        (events, "per_page", pages.per_page),
        (events, "total", pages.total),
        (events, "has_more", pages.has_more),
        (breakdown, "rows", breakdown.data),
        (breakdown, "total_credits", breakdown.totals.credits),
        (breakdown, "total_cost", breakdown.totals.cost),
        (breakdown, "unpriced_requests", breakdown.totals.unpriced_requests),
        (series, "points", series.data),
        (held, "estimate_tokens", held.estimate.total_tokens),
        (held, "estimate_cost", held.estimate.cost),
        (held, "estimate_credits", held.estimate.credits),
        (held, "currency", held.estimate.currency),
        (credits, "monthly_allowance", credits.monthly.allowance),
        (credits, "monthly_used", credits.monthly.used),
        (credits, "monthly_remaining", credits.monthly.remaining),
        (credits, "bonus_granted", credits.bonus.granted),
        (credits, "bonus_used", credits.bonus.used),
        (credits, "bonus_remaining", credits.bonus.remaining),
    ]


def test_old_names_still_work_and_warn(server: Server) -> None:
    checked = _old_and_new(server)
    for result, old, new in checked:
        with pytest.warns(DeprecationWarning, match=rf"\.{old} is deprecated, use \.\S+ \(the API's name\)"):
            assert getattr(result, old) == new, old
    assert {old for _, old, _ in checked} >= {"rows", "results", "points", "days"}
    assert sum(1 for _, _, new in checked if new) >= 15  # the values compared are not all empty


def test_the_async_client_reads_the_same_names(server: Server) -> None:
    async def run() -> None:
        seen = Answers()

        async def hook(response: httpx.Response) -> None:
            await response.aread()
            seen.bodies.append(loads(response.content))

        async with (
            httpx.AsyncClient(timeout=30, event_hooks={"response": [hook]}) as http,
            AsyncClient(server.base, server.tenant.key, http_client=http) as client,
        ):

            def check(result: object) -> None:
                mirrors(result, seen.last, type(result).__name__)

            check(await client.send_events(_events(2)))
            check(await client.breakdown("model"))
            check(await client.usage())
            check(await client.events())
            assert len([row async for row in client.iter_breakdown("model", page_size=1)]) == 1
            assert len([event async for event in client.iter_events(per_page=1)]) == 2

    asyncio.run(run())
