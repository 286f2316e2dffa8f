"""``UsageTracker`` and the offline estimates: exact costs from the server's price book, and forwarding
to a real server that counts every recorded call once, however often a batch is resent."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace

import anthropic.types
import openai.types
import pytest

from meterline.sdk import APIConnectionError, Client, UsageTracker, estimate_request_cost, estimate_tokens
from sdk.conftest import Server
from servers import free_port

# genai-prices, per million tokens (USD)
MINI_IN, MINI_OUT = Decimal("0.15"), Decimal("0.6")
HAIKU_IN, HAIKU_OUT, HAIKU_READ = Decimal("1"), Decimal("5"), Decimal("0.1")
MILLION = Decimal(1_000_000)

TEXTS = [
    "Hello world",
    "Explain quantum computing.",
    "Ünïcödé, emoji 🎉 and 中文 mixed with code: `def f(x): return x**2`",
    "The quick brown fox jumps over the lazy dog. " * 40,
]


def _tokenizer(name: str) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        return bpe_openai.get_encoding(name)


@pytest.mark.parametrize(("model", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
def test_estimate_tokens_is_the_tokenizers_count(model: str, encoding: str) -> None:
    tokenizer = _tokenizer(encoding)
    for text in TEXTS:
        assert estimate_tokens(text, model) == len(tokenizer.encode_ordinary(text))  # type: ignore[attr-defined]
    assert estimate_tokens("Hello world", model) == 2


def test_estimate_request_cost_counts_per_message_overhead() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Explain quantum computing."},
    ]
    o200k = _tokenizer("o200k_base")

    def count(text: str) -> int:
        return len(o200k.encode_ordinary(text))  # type: ignore[attr-defined]

    # 3 tokens wrap each message (role and content are counted too), 3 prime the reply.
    expected = 3 + sum(3 + count(m["role"]) + count(m["content"]) for m in messages)
    estimate = estimate_request_cost(messages, "gpt-4o-mini", max_output_tokens=500)
    assert estimate.estimated_input_tokens == expected
    assert estimate.estimated_total_tokens == expected + 500
    assert estimate.encoding == "o200k_base"
    assert estimate.estimated_cost == (expected * MINI_IN + 500 * MINI_OUT) / MILLION
    assert estimate.priced
    named = estimate_request_cost([{**messages[1], "name": "ada"}], "gpt-4o-mini", 0)
    assert (
        named.estimated_input_tokens
        == 3 + 3 + count("user") + count(messages[1]["content"]) + count("ada") + 1
    )
    unknown = estimate_request_cost(messages, "my-private-model", 100)
    assert (unknown.priced, unknown.estimated_cost) == (False, Decimal(0))


def test_report_per_model_from_every_response_shape() -> None:
    tracker = UsageTracker()
    chat = tracker.record(
        {
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "usage": {"prompt_tokens": 25, "completion_tokens": 100, "total_tokens": 125},
        }
    )
    assert chat.cost == (25 * MINI_IN + 100 * MINI_OUT) / MILLION
    tracker.record(
        openai.types.CompletionUsage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        model="gpt-4o-mini",
    )
    tracker.record(
        {
            "object": "list",
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }
    )
    tracker.record(
        {
            "object": "response",
            "model": "gpt-4o-mini",
            "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
        }
    )
    claude = tracker.record(
        anthropic.types.Usage(
            input_tokens=10, output_tokens=5, cache_read_input_tokens=100, cache_creation_input_tokens=0
        ),
        model="claude-haiku-4-5",
    )
    # Anthropic's input_tokens leave the cache out: the prompt is 110, of which 100 are cache reads.
    assert (claude.prompt_tokens, claude.cache_read_tokens) == (110, 100)
    assert claude.cost == (10 * HAIKU_IN + 100 * HAIKU_READ + 5 * HAIKU_OUT) / MILLION
    tracker.record({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}, model="my-private-model")

    report = tracker.report()
    assert report.total_requests == 6
    assert report.total_tokens == 125 + 15 + 8 + 10 + 115 + 8
    assert report.avg_tokens_per_request == Decimal(report.total_tokens) / 6
    assert report.by_model["gpt-4o-mini"].requests == 3
    assert report.by_model["gpt-4o-mini"].tokens == 150
    assert report.total_cost == sum(u.cost for u in report.by_model.values())
    assert isinstance(report.total_cost, Decimal)
    assert report.unpriced_models == ["my-private-model"]
    assert report.as_dict()["total_requests"] == 6
    with pytest.raises(ValueError, match="no token usage"):
        tracker.record({"id": "x"})


def test_operator_prices_override_the_database() -> None:
    tracker = UsageTracker(prices={"llama-3.1-8b": {"input": "0.10", "output": "0.10"}})
    call = tracker.record(
        {"prompt_tokens": 25, "completion_tokens": 100, "total_tokens": 125}, model="llama-3.1-8b"
    )
    assert call.cost == Decimal("0.0000125")
    assert call.priced


def test_forwarded_usage_is_counted_once_however_often_it_is_sent(server: Server) -> None:
    with server.client() as client:
        tracker = UsageTracker(client=client, batch_size=2, clock=server.clock.now)
        calls = [
            tracker.record(
                {"prompt_tokens": 100 + i, "completion_tokens": 10, "total_tokens": 110 + i},
                model="gpt-4o-mini",
            )
            for i in range(5)
        ]
        assert len(tracker.pending) == 1  # two full batches went on their own
        tracker.flush()
        assert tracker.pending == []
        ledger = {row.event_id: row for row in client.iter_ledger()}
        assert set(ledger) == {c.event_id for c in calls}
        for call in calls:
            assert ledger[call.event_id].cost == call.cost
            assert ledger[call.event_id].source == "sdk"

        # An answer lost on the way back: the server has the batch, the tracker does not know it.
        lost = UsageTracker(client=client, batch_size=10, clock=server.clock.now)
        for _ in range(3):
            lost.record({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, model="gpt-4o-mini")
        client.send_events(lost.pending)
        (resent,) = lost.flush()
        assert (resent.accepted, resent.duplicates) == (3, 3)
        assert client.ledger().total_count == 8
        assert client.usage().monthly.cost == tracker.report().total_cost + lost.report().total_cost


@dataclass
class _Usage:  # what hand-written code (seed 001's tracker) passes: plain attributes
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class _Response:
    model: str
    usage: _Usage


def test_plain_attribute_objects_are_recorded_like_sdk_responses(server: Server) -> None:
    with server.client() as client:
        tracker = UsageTracker(client=client, clock=server.clock.now)
        bare = tracker.record(
            SimpleNamespace(prompt_tokens=1200, completion_tokens=300, total_tokens=1500), model="gpt-4o-mini"
        )
        whole = tracker.record(_Response("gpt-4o-mini", _Usage(1000, 100, 1100)))
        nested = tracker.record(
            SimpleNamespace(
                model="gpt-4o-mini",
                usage=SimpleNamespace(
                    prompt_tokens=2000,
                    completion_tokens=10,
                    total_tokens=2010,
                    prompt_tokens_details=SimpleNamespace(cached_tokens=1024),
                ),
            )
        )
        assert (bare.prompt_tokens, bare.completion_tokens) == (1200, 300)
        assert (whole.model, whole.prompt_tokens, whole.completion_tokens) == ("gpt-4o-mini", 1000, 100)
        assert (nested.prompt_tokens, nested.cache_read_tokens) == (2000, 1024)
        assert bare.cost == (1200 * MINI_IN + 300 * MINI_OUT) / MILLION
        tracker.flush()
        ledger = {row.event_id: row for row in client.iter_ledger()}
        for call in (bare, whole, nested):
            assert ledger[call.event_id].cost == call.cost
        looped = SimpleNamespace(prompt_tokens=10, completion_tokens=1, total_tokens=11)
        looped.again = looped  # an object graph is read lazily: a cycle costs nothing
        assert tracker.record(looped, model="gpt-4o-mini").prompt_tokens == 10
        with pytest.raises(ValueError, match="no token usage"):
            tracker.record(SimpleNamespace(text="hello"), model="gpt-4o-mini")


def test_the_usage_vector_is_priced_and_sent_as_the_gateway_reads_it(server: Server) -> None:
    # An Anthropic answer with 1-hour cache writes and web searches, and a Responses answer with two
    # web_search_call items: the tracker's cost and the server's row are what the gateway bills.
    message = anthropic.types.Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Found it."}],
            "stop_reason": "end_turn",
            "usage": {
                "input_tokens": 50,
                "cache_creation_input_tokens": 3000,
                "cache_read_input_tokens": 1000,
                "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                "output_tokens": 300,
                "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 0},
            },
        }
    )
    responses = {
        "object": "response",
        "model": "gpt-4o-mini",
        "output": [{"type": "web_search_call", "id": "ws_1"}, {"type": "web_search_call", "id": "ws_2"}],
        "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
    }
    with server.client() as client:
        tracker = UsageTracker(client=client, clock=server.clock.now)
        claude = tracker.record(message)
        # 50 x 3 + 1,000 x 0.30 + 1,000 x 3.75 + 2,000 x 6 + 300 x 15 per million; 3 searches x $0.01.
        assert claude.cost == Decimal("0.0207") + Decimal("0.03")
        searched = tracker.record(responses)
        tracker.flush()
        rows = {row.event_id: row for row in client.iter_ledger()}
        assert rows[claude.event_id].cost == claude.cost
        assert rows[searched.event_id].cost == searched.cost
        sent = {call.event_id: call for call in (claude, searched)}
        assert set(rows) == set(sent)
    raw = server.http.get("/v1/usage/ledger", headers=server.tenant.headers).json()["data"]
    by_id = {r["event_id"]: r for r in raw}
    assert (by_id[claude.event_id]["cache_write_1h_tokens"], by_id[claude.event_id]["web_searches"]) == (
        2000,
        3,
    )
    assert by_id[searched.event_id]["web_searches"] == 2


def test_an_unreachable_server_keeps_the_events_queued(server: Server) -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "k", sleep=lambda _s: None) as dead:
        tracker = UsageTracker(client=dead, batch_size=1, clock=server.clock.now)
        call = tracker.record(
            {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, model="gpt-4o-mini"
        )
    assert isinstance(tracker.last_error, APIConnectionError)
    assert [e.id for e in tracker.pending] == [call.event_id]
    with server.client() as client:
        tracker.client = client
        (sent,) = tracker.flush()
        assert (sent.accepted, sent.duplicates) == (1, 0)
        assert client.ledger().data[0].event_id == call.event_id
