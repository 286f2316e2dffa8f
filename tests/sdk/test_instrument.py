"""``instrument()`` on the official ``openai`` client, through the Meterline gateway to the fake upstream:
the client's answers are untouched, and what the tracker recorded equals what the server metered."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal

import anthropic
import openai
import pytest
from openai import AsyncStream, Stream

from meterline.gateway.tokens import estimate_prompt_tokens
from meterline.sdk import UsageTracker, instrument
from sdk.conftest import Server

HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.tenant.key, max_retries=0) as opened:
        yield opened


def _ledger_tokens(server: Server) -> list[tuple[int, int]]:
    with server.client() as client:
        rows = list(client.iter_ledger())
    return sorted((r.prompt_tokens, r.completion_tokens) for r in rows)


def _recorded(tracker: UsageTracker) -> tuple[int, int, Decimal]:
    report = tracker.report()
    return report.prompt_tokens, report.completion_tokens, report.total_cost


def test_sync_calls_and_streams_are_recorded_unchanged(server: Server, client: openai.OpenAI) -> None:
    tracker = instrument(client)
    assert instrument(client) is tracker  # instrumenting twice does not count twice

    completion = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=7)  # type: ignore[arg-type]
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    client.embeddings.create(model="text-embedding-3-small", input="hello there")
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=4)

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=5, stream=True)  # type: ignore[arg-type]
    assert isinstance(stream, Stream)
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks), "no usage chunk was asked for, none is added"
    with_usage = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [c.usage for c in with_usage if c.usage is not None]

    report = tracker.report()
    assert report.total_requests == 5
    assert report.by_model["gpt-4o-mini"].requests == 3
    # Calls that reported usage are recorded with the gateway's counts exactly; the stream without usage
    # was counted locally: its output with the model's tokenizer (what the gateway counts too), its prompt
    # as estimated before sending (the fake upstream's own prompt count differs).
    (estimated,) = [c for c in tracker.calls if c.estimated]
    exact = sorted((c.prompt_tokens, c.completion_tokens) for c in tracker.calls if not c.estimated)
    ledger = _ledger_tokens(server)
    (streamed,) = [row for row in ledger if row not in exact]
    assert estimated.completion_tokens == streamed[1] == 5
    assert estimated.prompt_tokens == estimate_prompt_tokens("chat", {"messages": HELLO}, "gpt-4o-mini")
    assert sorted([*exact, streamed]) == ledger
    with server.client() as reader:
        metered = reader.usage().monthly.cost
    assert metered == report.total_cost - estimated.cost + _cost(streamed)


def _cost(tokens: tuple[int, int]) -> Decimal:
    return (tokens[0] * Decimal("0.15") + tokens[1] * Decimal("0.6")) / 1_000_000


def test_include_usage_asks_the_stream_for_its_usage(server: Server, client: openai.OpenAI) -> None:
    tracker = instrument(client, include_usage=True)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=4, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert _recorded(tracker)[:2] == (chunks[-1].usage.prompt_tokens, 4)
    assert not any(c.estimated for c in tracker.calls)


def test_async_client_plain_and_streamed(server: Server) -> None:
    async def run() -> UsageTracker:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base}/v1", api_key=server.tenant.key, max_retries=0
        ) as client:
            tracker = instrument(client)
            plain = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
            assert plain.usage is not None
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HELLO,  # type: ignore[arg-type]
                max_tokens=6,
                stream=True,
            )
            assert isinstance(stream, AsyncStream)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text
            return tracker

    tracker = asyncio.run(run())
    assert tracker.report().total_requests == 2
    ledger = _ledger_tokens(server)
    assert [c.estimated for c in tracker.calls] == [False, True]
    plain, streamed = tracker.calls
    assert (plain.prompt_tokens, plain.completion_tokens) in ledger
    assert streamed.completion_tokens == 6
    assert sorted(row[1] for row in ledger) == [3, 6]


def test_responses_api_plain_and_streamed(server: Server, client: openai.OpenAI) -> None:
    tracker = instrument(client)
    answer = client.responses.create(model="gpt-4o-mini", input="Say hello.", max_output_tokens=5)
    assert answer.usage is not None
    events = list(
        client.responses.create(model="gpt-4o-mini", input="Say hello.", max_output_tokens=4, stream=True)
    )
    assert events[-1].type == "response.completed"
    recorded = sorted((c.prompt_tokens, c.completion_tokens) for c in tracker.calls)
    assert not any(c.estimated for c in tracker.calls)
    assert recorded == _ledger_tokens(server)
    assert answer.usage.output_tokens in [c.completion_tokens for c in tracker.calls]


def test_anthropic_messages_through_the_gateway_are_recorded_exactly(
    server: Server, request: pytest.FixtureRequest
) -> None:
    claude = anthropic.Anthropic(base_url=server.base, api_key=server.tenant.key, max_retries=0)
    request.addfinalizer(claude.close)
    tracker = UsageTracker()
    message = claude.messages.create(
        model="claude-haiku-4-5", max_tokens=6, messages=[{"role": "user", "content": "Hi"}]
    )
    call = tracker.record(message)
    assert call.model == message.model
    with server.client() as reader:
        (row,) = reader.ledger().data
    assert (call.prompt_tokens, call.completion_tokens) == (row.prompt_tokens, row.completion_tokens)
    assert call.cost == row.list_cost
