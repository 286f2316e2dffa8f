"""``instrument()`` on the official ``anthropic`` client (sync, async, ``create(stream=True)`` and the
``messages.stream()`` helper): through the Meterline gateway to the fake upstream, what the tracker
recorded equals what the server metered; called directly against the fake upstream, the forwarded usage
is what the server then reports. Anything else is refused with a TypeError, not silently ignored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from meterline.sdk import TrackedCall, UsageTracker, instrument
from meterline.testing.fake_upstream import FakeUpstream
from sdk.conftest import UPSTREAM_KEY, Server

MODEL = "claude-haiku-4-5"
HELLO: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say hello."}]

Tokens = tuple[int, int, int, int]  # prompt, completion, cache reads, cache writes


def _recorded(calls: list[TrackedCall]) -> list[Tokens]:
    return sorted(
        (c.prompt_tokens, c.completion_tokens, c.cache_read_tokens, c.cache_write_tokens) for c in calls
    )


def _metered(server: Server) -> tuple[list[Tokens], Decimal]:
    with server.client() as reader:
        rows = list(reader.iter_ledger())
        cost = reader.usage().monthly.cost
    tokens = sorted(
        (r.prompt_tokens, r.completion_tokens, r.cache_read_tokens, r.cache_write_tokens) for r in rows
    )
    return tokens, cost


def test_sync_create_stream_and_stream_helper_are_recorded_as_metered(
    server: Server, upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    upstream.set_default("cache")  # cache reads and writes in every answer
    claude = anthropic.Anthropic(base_url=server.base, api_key=server.tenant.key, max_retries=0)
    request.addfinalizer(claude.close)
    tracker = instrument(claude)
    assert instrument(claude) is tracker

    message = claude.messages.create(model=MODEL, max_tokens=6, messages=HELLO)
    assert isinstance(message, anthropic.types.Message)  # returned unchanged
    stream = claude.messages.create(model=MODEL, max_tokens=5, messages=HELLO, stream=True)
    assert isinstance(stream, anthropic.Stream)
    events = [event.type for event in stream]
    assert events[0] == "message_start"
    with claude.messages.stream(model=MODEL, max_tokens=4, messages=HELLO) as helper:
        text = "".join(helper.text_stream)
        final = helper.get_final_message()
    assert text
    beta = claude.beta.messages.create(model=MODEL, max_tokens=2, messages=HELLO)
    assert beta.usage.output_tokens == 2

    report = tracker.report()
    assert report.total_requests == 4
    assert report.by_model[MODEL].requests == 4
    assert not any(c.estimated for c in tracker.calls)
    assert sorted(c.completion_tokens for c in tracker.calls) == [2, 4, 5, 6]
    assert all((c.cache_read_tokens, c.cache_write_tokens) == (1024, 256) for c in tracker.calls)
    assert message.usage.cache_read_input_tokens == 1024
    assert final.usage.output_tokens == 4
    ledger, cost = _metered(server)
    assert _recorded(list(tracker.calls)) == ledger
    assert report.total_cost == cost


def test_async_create_stream_and_stream_helper_are_recorded_as_metered(
    server: Server, upstream: FakeUpstream
) -> None:
    upstream.set_default("cache")

    async def run() -> UsageTracker:
        async with anthropic.AsyncAnthropic(
            base_url=server.base, api_key=server.tenant.key, max_retries=0
        ) as claude:
            tracker = instrument(claude)
            message = await claude.messages.create(model=MODEL, max_tokens=3, messages=HELLO)
            assert message.usage.output_tokens == 3
            stream = await claude.messages.create(model=MODEL, max_tokens=6, messages=HELLO, stream=True)
            assert isinstance(stream, anthropic.AsyncStream)
            assert [event.type async for event in stream][-1] == "message_stop"
            async with claude.messages.stream(model=MODEL, max_tokens=2, messages=HELLO) as helper:
                assert (await helper.get_final_message()).usage.output_tokens == 2
            return tracker

    tracker = asyncio.run(run())
    assert tracker.report().total_requests == 3
    assert not any(c.estimated for c in tracker.calls)
    ledger, cost = _metered(server)
    assert _recorded(list(tracker.calls)) == ledger
    assert sorted(row[1] for row in ledger) == [2, 3, 6]
    assert tracker.report().total_cost == cost


def test_a_direct_client_forwards_what_the_provider_reported(
    server: Server, upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    # Not through the gateway: the tracker forwards each call to the server as an event.
    upstream.set_default("cache")
    claude = anthropic.Anthropic(base_url=upstream.origin, api_key=UPSTREAM_KEY, max_retries=0)
    request.addfinalizer(claude.close)
    meterline = server.client()
    request.addfinalizer(meterline.close)
    tracker = instrument(claude, UsageTracker(client=meterline, clock=server.clock.now))

    message = claude.messages.create(model=MODEL, max_tokens=7, messages=HELLO)
    streamed = list(claude.messages.create(model=MODEL, max_tokens=3, messages=HELLO, stream=True))
    start = streamed[0]
    assert start.type == "message_start"
    tracker.flush()

    usage = message.usage
    assert usage.cache_read_input_tokens is not None
    assert usage.cache_creation_input_tokens is not None
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    expected = sorted(
        [
            (prompt, 7, usage.cache_read_input_tokens, usage.cache_creation_input_tokens),
            (prompt, 3, usage.cache_read_input_tokens, usage.cache_creation_input_tokens),
        ]
    )
    ledger, cost = _metered(server)
    assert ledger == expected == _recorded(list(tracker.calls))
    assert cost == tracker.report().total_cost
    with server.client() as reader:
        rows = list(reader.iter_ledger())
    assert {(r.model, r.provider, r.endpoint, r.source) for r in rows} == {
        (MODEL, "anthropic", "/v1/messages", "sdk")
    }


@pytest.mark.parametrize(
    "thing",
    [
        pytest.param(lambda: httpx.Client(), id="httpx-client"),
        pytest.param(lambda: object(), id="object"),
        pytest.param(lambda: openai, id="openai-module"),
        pytest.param(lambda: anthropic.Anthropic(api_key="k").messages, id="a-resource"),
    ],
)
def test_what_cannot_be_instrumented_is_refused(thing: Callable[[], object]) -> None:
    with pytest.raises(TypeError, match=r"openai\.OpenAI.*anthropic\.Anthropic"):
        instrument(thing())


def test_a_stream_cut_before_its_final_usage_is_recorded_as_an_estimate(
    upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    # The connection drops after two pieces: message_start gave the prompt side, the output is counted
    # locally (each piece is one token), and the call is flagged as estimated.
    upstream.reset()
    upstream.script("cut", after=2)
    claude = anthropic.Anthropic(base_url=upstream.origin, api_key=UPSTREAM_KEY, max_retries=0)
    request.addfinalizer(claude.close)
    tracker = instrument(claude)
    seen: list[anthropic.types.RawMessageStreamEvent] = []
    stream = claude.messages.create(model=MODEL, max_tokens=8, messages=HELLO, stream=True)
    with pytest.raises((anthropic.APIError, httpx.HTTPError)):
        seen.extend(stream)
    assert seen[0].type == "message_start"
    prompt = seen[0].message.usage.input_tokens
    (call,) = tracker.calls
    assert [e.type for e in seen].count("content_block_delta") == 2
    assert (call.estimated, call.prompt_tokens, call.completion_tokens) == (True, prompt, 2)
