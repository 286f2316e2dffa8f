"""Every ``Client`` method against a real server: the typed answers match what the server recorded."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest

from conftest import NOW
from meterline.sdk import (
    AsyncClient,
    AuthenticationError,
    ConflictError,
    Event,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    VerificationError,
)
from meterline.sdk.receipts import Receipt
from sdk.conftest import Server


def _events(n: int, start: int = 0, **fields: object) -> list[Event]:
    return [
        Event(
            id=f"ev-{i}",
            model="gpt-4o-mini",
            provider="openai",
            prompt_tokens=1000,
            completion_tokens=500,
            user_id=f"user-{i % 3}",
            timestamp=NOW - timedelta(minutes=i),
            **fields,  # type: ignore[arg-type]
        )
        for i in range(start, start + n)
    ]


def test_events_are_sent_idempotently_and_read_back(server: Server) -> None:
    with server.client() as client:
        first = client.send_events(_events(3))
        assert (first.accepted, first.duplicates, first.rejected) == (3, 0, 0)
        # gpt-4o-mini: 1000 x $0.15/M + 500 x $0.60/M
        assert [r.cost for r in first.data] == [Decimal("0.00045")] * 3
        assert all(isinstance(r.cost, Decimal) for r in first.data)
        again = client.send_events(_events(3))
        assert (again.accepted, again.duplicates) == (3, 3)
        assert [r.ledger_id for r in again.data] == [r.ledger_id for r in first.data]
        with pytest.raises(ConflictError) as conflict:
            client.send_events([Event(id="ev-0", model="gpt-4o-mini", prompt_tokens=1)])
        assert conflict.value.code == "conflict"
        assert conflict.value.status_code == 409
        assert conflict.value.request_id

        ledger = client.ledger()
        assert ledger.total_count == 3
        assert sum(row.cost for row in ledger.data) == Decimal("0.00135")
        summary = client.usage()
        assert summary.plan == "pro"
        assert summary.usage == 4500
        assert summary.daily.tokens.usage == 4500
        assert summary.monthly.cost == Decimal("0.00135")
        assert summary.daily.calls.usage == 3
        assert summary.billing_period.days_elapsed >= 0
        assert any(limit.name == "monthly_tokens" for limit in summary.limits)
        assert isinstance(summary.credits.monthly.used, Decimal)
        assert summary.forecast.unit == "credits"
        history = client.history(days=7)
        assert len(history.data) == 7
        assert history.data[-1].date == NOW.date()
        assert history.data[-1].tokens == 4500
        assert history.data[-1].cost == Decimal("0.00135")


def test_paging_iterators_walk_every_page(server: Server) -> None:
    with server.client() as client:
        client.send_events(_events(25))
        events = client.events(page=1, per_page=10)
        assert (events.pagination.total, events.pagination.has_more, len(events.data)) == (25, True, 10)
        assert len({e.id for e in client.iter_events(per_page=7)}) == 25
        rows = list(client.iter_ledger(page_size=4))
        assert len({r.id for r in rows}) == 25
        assert [r.created_at for r in rows] == sorted((r.created_at for r in rows), reverse=True)
        assert {r.event_id for r in rows} == {f"ev-{i}" for i in range(25)}
        filtered = list(client.iter_ledger(page_size=3, start=NOW - timedelta(minutes=4)))
        assert len(filtered) == 5

        top = client.breakdown("user", limit=2)
        assert (top.total, top.has_more, len(top.data)) == (3, True, 2)
        every = list(client.iter_breakdown("user", page_size=1))
        assert sorted(r.key or "" for r in every) == ["user-0", "user-1", "user-2"]
        assert sum(r.requests for r in every) == 25
        assert sum(r.share_pct for r in every) == pytest.approx(Decimal(100), abs=Decimal("0.1"))
        series = client.timeseries(range="24h")
        assert series.granularity == "hour"
        assert sum(p.total for p in series.data) == sum(r.credits for r in rows)
        client.send_events(
            [
                replace(e, model="o4-mini", cache_read_tokens=600, reasoning_tokens=200)
                for e in _events(2, start=100)
            ]
            + [replace(e, model="no-such-model-3") for e in _events(1, start=200)]
        )
        by_model = {r.key: r for r in client.breakdown("model").data}
        assert by_model["o4-mini"].usage is not None
        assert (
            by_model["o4-mini"].usage["cache_read_tokens"],
            by_model["o4-mini"].usage["reasoning_tokens"],
        ) == (
            1200,
            400,
        )
        assert by_model["no-such-model-3"].unpriced_requests == 1
        assert client.breakdown("model").totals.unpriced_requests == 1
        assert client.breakdown("user").totals.unpriced_requests is None


def test_csv_export_streams_to_a_file_and_to_an_iterator(server: Server, tmp_path: object) -> None:
    with server.client() as client:
        client.send_events(_events(12))
        buffer = io.BytesIO()
        seen: list[int] = []
        written = client.export_csv(buffer, on_chunk=lambda chunk: seen.append(len(chunk)))
        text = buffer.getvalue().decode()
        assert written == len(buffer.getvalue()) == sum(seen)
        lines = text.strip().splitlines()
        assert len(lines) == 13  # header + rows
        assert b"".join(client.iter_export()) == buffer.getvalue()
        windowed = b"".join(client.iter_export(start=NOW - timedelta(minutes=2), end=NOW)).decode()
        assert len(windowed.strip().splitlines()) == 4
        with pytest.raises(InvalidRequestError) as bad:
            list(client.iter_export(start="yesterday"))
        assert bad.value.param == "start"


def test_receipts_are_verified_locally(server: Server) -> None:
    with server.client() as client:
        batch = client.send_events(_events(3))
        receipt_id = batch.data[0].receipt_id
        assert receipt_id
        receipt = client.receipt(receipt_id)
        assert receipt.verified
        assert receipt.claims is not None
        assert receipt.claims["jti"] == receipt_id
        assert receipt.ledger_id == batch.data[0].ledger_id
        with pytest.raises(NotFoundError):
            client.receipt("no-such-receipt")
        # A receipt whose listed fields differ from what was signed does not pass.
        forged = Receipt(**{**{f: getattr(receipt, f) for f in Receipt.__dataclass_fields__}, "seq": 99})
        with pytest.raises(VerificationError):
            client.verify_receipt(forged)
        with pytest.raises(PermissionDeniedError):
            client.receipts()
    with server.client(server.org_key) as org:
        page = org.receipts(limit=2)
        assert (len(page.data), page.has_more, page.head and page.head.seq) == (2, True, 3)
        assert [r.seq for r in org.iter_receipts(page_size=1)] == [1, 2, 3]
        chain = org.verify_chain(page_size=2)
        assert chain.ok
        assert chain.report.count == 3
        assert chain.organization_id == server.tenant.org["id"]


def test_reservations_tokens_alerts_and_webhooks(server: Server) -> None:
    with server.client() as client:
        held = client.reserve(model="gpt-4o-mini", prompt_tokens=100, completion_tokens=50)
        assert held.status == "reserved"
        assert held.estimate is not None
        assert held.estimate.total_tokens == 150
        settled = client.settle(held.id, completion_tokens=20)
        assert settled.total_tokens == 120
        assert client.settle(held.id, completion_tokens=20).duplicate
        other = client.reserve(model="gpt-4o-mini", prompt_tokens=10)
        assert client.release(other.id).status == "released"
        with pytest.raises(NotFoundError):
            client.settle(other.id)

        pair = client.issue_token("end-user-1", limits={"daily_tokens": 1000})
        assert pair.limits == {"daily_tokens": 1000}
        with server.client(pair.access_token) as end_user:
            assert end_user.usage().scope["identifier_id"] == "end-user-1"
        rotated = client.refresh_token(pair.refresh_token)
        assert rotated.refresh_token != pair.refresh_token
        with pytest.raises(AuthenticationError):
            client.refresh_token(pair.refresh_token)  # a refresh token works once

        assert client.alerts().total_count >= 0
        with pytest.raises(PermissionDeniedError):
            client.create_webhook("https://example.com/hook")
    with server.client(server.org_key) as org:
        with pytest.raises(InvalidRequestError):
            org.create_webhook("not a url")
        assert org.webhooks() == []
        hook = org.create_webhook("http://127.0.0.1:9/hooks/meterline", description="ops")
        assert hook.secret is not None
        assert hook.secret.startswith("whsec_")
        (listed,) = org.webhooks()
        assert (listed.id, listed.url, listed.description, listed.secret) == (hook.id, hook.url, "ops", None)
        org.delete_webhook(hook.id)
        assert org.webhooks() == []
        assert org.health()["status"] == "ok"


def test_typed_errors_carry_the_envelope(server: Server) -> None:
    with (
        server.client("ml_live_not_a_real_key_000000000000") as bad,
        pytest.raises(AuthenticationError) as denied,
    ):
        bad.usage()
    error = denied.value
    assert (error.status_code, error.code, error.type) == (401, "unauthorized", "authentication_error")
    assert error.request_id
    assert error.message
    with server.client() as client, pytest.raises(InvalidRequestError) as invalid:
        client.history(days=400)
    assert (invalid.value.status_code, invalid.value.param) == (422, "days")


def test_models_lists_what_the_gateway_routes(server: Server) -> None:
    with server.client() as client:
        served = client.models()
    # The named models, and those of the upstream's own list that the "claude-*" pattern route matches.
    assert [(m.id, m.owned_by) for m in served] == [
        ("claude-haiku-4-5", "anthropic"),
        ("claude-opus-4-1", "anthropic"),
        ("claude-sonnet-4-5", "anthropic"),
        ("gpt-3.5-turbo-instruct", "openai"),
        ("gpt-4o", "openai"),
        ("gpt-4o-mini", "openai"),
        ("text-embedding-3-small", "openai"),
    ]
    with server.client(key="mk_not_a_key") as stranger, pytest.raises(AuthenticationError):
        stranger.models()


def test_async_client(server: Server) -> None:
    async def run() -> None:
        async with AsyncClient(server.base, server.tenant.key) as client:
            batch = await client.send_events(_events(5))
            assert batch.accepted == 5
            assert (await client.usage()).usage == 7500
            assert len([e async for e in client.iter_events(per_page=2)]) == 5
            assert len([r async for r in client.iter_ledger(page_size=2)]) == 5
            assert len([r async for r in client.iter_breakdown("model", page_size=1)]) == 1
            assert (await client.timeseries()).range == "7d"
            assert (await client.history(days=3)).data[-1].tokens == 7500
            receipt_id = batch.data[0].receipt_id
            assert receipt_id
            assert (await client.receipt(receipt_id)).verified
            csv = b"".join([chunk async for chunk in client.iter_export()])
            assert len(csv.decode().strip().splitlines()) == 6
            with pytest.raises(NotFoundError):
                await client.release("res_missing")
            held = await client.reserve(model="gpt-4o-mini", prompt_tokens=10, completion_tokens=5)
            assert (await client.settle(held.id)).total_tokens == 15
            pair = await client.issue_token("async-user")
            assert (await client.refresh_token(pair.refresh_token)).identifier_id == "async-user"
            assert (await client.alerts()).total_count >= 0
            assert "gpt-4o-mini" in [m.id for m in await client.models()]
            assert (await client.ledger(limit=2, model="gpt-4o-mini")).total_count == 6
        async with AsyncClient(server.base, server.org_key) as org:
            assert (await org.verify_chain()).report.count == 6
            hook = await org.create_webhook("http://127.0.0.1:9/async")
            assert [h.id for h in await org.webhooks()] == [hook.id]
            await org.delete_webhook(hook.id)
            assert (await org.receipts(limit=1)).has_more

    asyncio.run(run())
