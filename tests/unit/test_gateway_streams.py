"""Metering streams (``meterline.gateway.streams``): stream transcripts in the shapes of the openai and
anthropic SDKs' stream types, the usage-only chunk dropped when the client did not ask for it, local
counts when the upstream reports nothing, and events no upstream should send."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.gateway.flavors import Api, TokenUsage
from meterline.gateway.sse import SSEEvent, SSEParser
from meterline.gateway.streams import StreamError, StreamMeter
from meterline.gateway.tokens import CL100K_BASE, O200K_BASE
from reference_tokenizer import encoding

O200K = encoding(O200K_BASE)


def o200k(text: str) -> int:
    return len(O200K.encode_ordinary(text))


def sse(payload: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return head + b"data: " + data + b"\n\n"


def run(meter: StreamMeter, body: bytes, chunk_size: int = 7) -> bytes:
    """The bytes the client receives, feeding the body in small chunks as a socket would."""
    parser = SSEParser()
    forwarded: list[bytes] = []
    for start in range(0, len(body), chunk_size):
        forwarded.extend(
            event.raw for event in parser.feed(body[start : start + chunk_size]) if meter.observe(event)
        )
    forwarded.extend(event.raw for event in parser.flush() if meter.observe(event))
    return b"".join(forwarded)


# -- OpenAI chat --------------------------------------------------------------------------------------
def chat_chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: object = None) -> bytes:
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    chunk = {
        "id": "chatcmpl-AKmyNr0rHoWbYbLNuX2TV3jL6Ltxc",
        "object": "chat.completion.chunk",
        "created": 1729441343,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_482c22a7bc",
        "choices": choices,
        "usage": usage,
    }
    return sse(chunk)


DELTAS = ["Hello", "!", " How", " can", " I", " assist", " you", " today", "?"]
CHAT_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
CHAT_BODY_START = chat_chunk({"role": "assistant", "content": "", "refusal": None})
CHAT_CONTENT = b"".join(chat_chunk({"content": text}) for text in DELTAS) + chat_chunk({}, "stop")
USAGE_CHUNK = chat_chunk(None, usage=CHAT_USAGE)
DONE = b"data: [DONE]\n\n"
CHAT_STREAM = CHAT_BODY_START + CHAT_CONTENT + USAGE_CHUNK + DONE


def test_chat_stream_when_the_client_asked_for_usage() -> None:
    meter = StreamMeter("chat", "gpt-4o-mini", prompt_estimate=21, client_wants_usage=True)
    assert run(meter, CHAT_STREAM) == CHAT_STREAM
    assert meter.reported
    assert meter.final() == meter.usage_so_far() == TokenUsage(19, 10)
    assert meter.counted_completion_tokens == sum(o200k(text) for text in DELTAS) == 9
    assert meter.events_seen == 13
    assert meter.output_events == 9
    assert meter.error is None


def test_the_usage_chunk_the_gateway_asked_for_is_not_forwarded() -> None:
    meter = StreamMeter("chat", "gpt-4o-mini", prompt_estimate=21, client_wants_usage=False)
    assert run(meter, CHAT_STREAM) == CHAT_BODY_START + CHAT_CONTENT + DONE
    assert meter.final() == TokenUsage(19, 10)


def test_the_sdk_reads_the_stream_without_the_usage_chunk() -> None:
    meter = StreamMeter("chat", "gpt-4o-mini", prompt_estimate=21, client_wants_usage=False)
    forwarded = run(meter, CHAT_STREAM)

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=forwarded, headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://gateway.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(upstream)),
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "".join(DELTAS)
    assert all(chunk.usage is None for chunk in chunks)


def test_chat_stream_without_usage_is_counted_locally() -> None:
    meter = StreamMeter("chat", "gpt-4o-mini", prompt_estimate=21, client_wants_usage=False)
    assert run(meter, CHAT_BODY_START + CHAT_CONTENT + DONE) == CHAT_BODY_START + CHAT_CONTENT + DONE
    assert not meter.reported
    assert meter.final() == TokenUsage(21, 9)


def test_usage_so_far_grows_as_the_stream_goes() -> None:
    meter = StreamMeter("chat", "gpt-4o-mini", prompt_estimate=5, client_wants_usage=True)
    parser = SSEParser()
    assert not meter.first_output_seen
    seen = []
    for event in parser.feed(CHAT_BODY_START + CHAT_CONTENT):
        meter.observe(event)
        seen.append(meter.usage_so_far().completion_tokens)
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    assert meter.first_output_seen


def test_the_live_meter_never_shows_more_than_the_settle_bills() -> None:
    # The usage bar went 75.04 -> 75.03 at a settle: progress had shown the local counts, and the
    # provider counted less. Progress now shows counts made here less their margin (5 %, at least 16),
    # so a provider's count within that margin of ours only moves the meter up at the settle.
    long_text = ["Hello there, friend."] * 100
    body = b"".join(chat_chunk({"content": text}) for text in long_text) + chat_chunk({}, "stop")
    meter = StreamMeter("chat", "gpt-4o-mini", prompt_estimate=400, client_wants_usage=True)
    shown = []
    for event in SSEParser().feed(CHAT_BODY_START + body):
        meter.observe(event)
        shown.append(meter.progress_so_far())
    counted = meter.usage_so_far()
    assert counted == TokenUsage(400, 500)
    assert shown[-1] == TokenUsage(400 - 20, 500 - 25)
    assert [u.completion_tokens for u in shown] == sorted(u.completion_tokens for u in shown)
    # The provider counted 4 % fewer of each: still at or above anything shown.
    for event in SSEParser().feed(chat_chunk(None, usage={"prompt_tokens": 384, "completion_tokens": 480})):
        meter.observe(event)
    settled = meter.final()
    assert settled == meter.progress_so_far() == TokenUsage(384, 480)
    assert all(u.prompt_tokens <= settled.prompt_tokens for u in shown)
    assert all(u.completion_tokens <= settled.completion_tokens for u in shown)
    # Small counts keep 16 tokens back; what the upstream reported (Anthropic's prompt, at its start)
    # is shown as it is.
    small = StreamMeter("chat", "gpt-4o-mini", prompt_estimate=10, client_wants_usage=True)
    run(small, CHAT_BODY_START + CHAT_CONTENT)
    assert small.progress_so_far() == TokenUsage(0, 0)


def test_chat_cached_tokens_and_several_choices() -> None:
    two = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [
            {"index": 0, "delta": {"content": "Yes"}},
            {"index": 1, "delta": {"content": "No way"}},
        ],
    }
    usage = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 1920},
    }
    meter = StreamMeter("chat", "gpt-4o", prompt_estimate=2000, client_wants_usage=True)
    run(meter, sse(two))
    assert meter.usage_so_far() == TokenUsage(2000, o200k("Yes") + o200k("No way"))
    assert meter.output_events == 1
    run(meter, sse({"choices": [], "usage": usage}))
    assert meter.final() == TokenUsage(2006, 300, cache_read_tokens=1920)


def test_chat_tool_call_and_reasoning_deltas_are_counted() -> None:
    call_start = {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    arguments = [
        {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        for text in ['{"', "city", '":"', "Paris", '"}']
    ]
    body = b"".join(chat_chunk(delta) for delta in [call_start, *arguments])
    body += chat_chunk({"reasoning_content": "Think."}) + chat_chunk(
        {"function_call": {"name": "f", "arguments": "{}"}}
    )
    meter = StreamMeter("chat", "gpt-4o", prompt_estimate=0, client_wants_usage=True)
    run(meter, body)
    expected = o200k("get_weather") + sum(o200k(t) for t in ['{"', "city", '":"', "Paris", '"}'])
    expected += o200k("Think.") + o200k("f") + o200k("{}")
    assert meter.final().completion_tokens == expected


def test_completions_stream() -> None:
    chunks = [
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [{"text": text, "index": 0, "finish_reason": None}],
        }
        for text in ["\n\n", "This", " is", " a", " test"]
    ]
    body = b"".join(sse(chunk) for chunk in chunks)
    body += sse(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
        }
    )
    meter = StreamMeter("completions", "gpt-3.5-turbo-instruct", prompt_estimate=6, client_wants_usage=False)
    assert run(meter, body + DONE) == b"".join(sse(chunk) for chunk in chunks) + DONE
    assert meter.final() == TokenUsage(5, 5)
    assert meter.counted_completion_tokens == sum(
        len(encoding(CL100K_BASE).encode_ordinary(t)) for t in ["\n\n", "This", " is", " a", " test"]
    )


def test_an_error_in_a_chat_stream() -> None:
    meter = StreamMeter("chat", "gpt-4o", prompt_estimate=3, client_wants_usage=True)
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    body = CHAT_BODY_START + chat_chunk({"content": "Hi"}) + sse(error)
    assert run(meter, body) == body
    assert meter.error == StreamError("The server had an error", "server_error", None)
    assert meter.final() == TokenUsage(3, 1)


# -- OpenAI Responses ---------------------------------------------------------------------------------
def response_object(status: str, usage: object) -> dict[str, Any]:
    return {
        "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
        "object": "response",
        "created_at": 1741290958,
        "status": status,
        "model": "gpt-4.1-2025-04-14",
        "output": [],
        "usage": usage,
    }


RESPONSES_DELTAS = ["Hi", " there", "!"]
RESPONSES_USAGE = {
    "input_tokens": 37,
    "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
    "output_tokens": 11,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 48,
}


def responses_stream(final: bytes) -> bytes:
    body = sse(
        {"type": "response.created", "sequence_number": 0, "response": response_object("in_progress", None)},
        "response.created",
    )
    body += sse(
        {
            "type": "response.output_item.added",
            "sequence_number": 1,
            "output_index": 0,
            "item": {
                "id": "msg_1",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            },
        },
        "response.output_item.added",
    )
    for number, text in enumerate(RESPONSES_DELTAS, start=2):
        delta = {
            "type": "response.output_text.delta",
            "sequence_number": number,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": text,
            "logprobs": [],
        }
        body += sse(delta, "response.output_text.delta")
    body += sse(
        {
            "type": "response.function_call_arguments.delta",
            "sequence_number": 5,
            "item_id": "fc_1",
            "output_index": 1,
            "delta": '{"a":1}',
        },
        "response.function_call_arguments.delta",
    )
    body += sse(
        {"type": "response.audio.delta", "sequence_number": 6, "delta": "UklGRiQAAABXQVZF"},
        "response.audio.delta",
    )
    return body + final


def test_responses_stream() -> None:
    completed = sse(
        {
            "type": "response.completed",
            "sequence_number": 7,
            "response": response_object("completed", RESPONSES_USAGE),
        },
        "response.completed",
    )
    body = responses_stream(completed)
    meter = StreamMeter("responses", "gpt-4.1", prompt_estimate=40, client_wants_usage=False)
    assert run(meter, body) == body  # the Responses API always streams its usage: nothing is dropped
    assert meter.counted_completion_tokens == sum(o200k(t) for t in RESPONSES_DELTAS) + o200k('{"a":1}')
    assert meter.reported
    assert meter.final() == TokenUsage(37, 11, cache_read_tokens=16)


def test_responses_stream_cut_before_completion() -> None:
    meter = StreamMeter("responses", "gpt-4.1", prompt_estimate=40, client_wants_usage=True)
    run(meter, responses_stream(b""))
    assert not meter.reported
    assert meter.final() == TokenUsage(40, sum(o200k(t) for t in RESPONSES_DELTAS) + o200k('{"a":1}'))


def test_responses_failed_and_error_events() -> None:
    failed = response_object("failed", RESPONSES_USAGE) | {
        "error": {"code": "server_error", "message": "Boom"}
    }
    meter = StreamMeter("responses", "gpt-4.1", prompt_estimate=40, client_wants_usage=True)
    run(meter, responses_stream(sse({"type": "response.failed", "sequence_number": 7, "response": failed})))
    assert meter.error == StreamError("Boom", None, "server_error")
    assert meter.final() == TokenUsage(37, 11, cache_read_tokens=16)
    meter = StreamMeter("responses", "gpt-4.1", prompt_estimate=40, client_wants_usage=True)
    run(
        meter,
        sse({"type": "error", "code": "rate_limit_exceeded", "message": "Slow down", "param": None}, "error"),
    )
    assert meter.error == StreamError("Slow down", "error", "rate_limit_exceeded")


# -- Anthropic messages -------------------------------------------------------------------------------
def anthropic_stream(start_usage: dict[str, Any], final_usage: dict[str, Any] | None) -> bytes:
    message = {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-opus-4-6",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    body = sse({"type": "message_start", "message": message}, "message_start")
    body += sse(
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
        "content_block_start",
    )
    body += sse(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "Let me think."},
        },
        "content_block_delta",
    )
    body += sse(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"},
        },
        "content_block_delta",
    )
    body += sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    body += b'event: ping\ndata: {"type": "ping"}\n\n'
    body += sse(
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    )
    for text in ["Hello", "!", " Nice to meet you."]:
        body += sse(
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": text}},
            "content_block_delta",
        )
    body += sse({"type": "content_block_stop", "index": 1}, "content_block_stop")
    body += sse(
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}},
        },
        "content_block_start",
    )
    body += sse(
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'},
        },
        "content_block_delta",
    )
    body += sse({"type": "content_block_stop", "index": 2}, "content_block_stop")
    if final_usage is not None:
        body += sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": final_usage,
            },
            "message_delta",
        )
        body += sse({"type": "message_stop"}, "message_stop")
    return body


ANTHROPIC_LOCAL = sum(
    o200k(t)
    for t in ["Let me think.", "Hello", "!", " Nice to meet you.", "get_weather", '{"city": "Paris"}']
)
START_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 1_000,
    "cache_read_input_tokens": 2_000,
    "output_tokens": 1,
}


def test_anthropic_stream_with_cache() -> None:
    body = anthropic_stream(START_USAGE, {"output_tokens": 57})
    meter = StreamMeter("messages", "claude-opus-4-6", prompt_estimate=3_100, client_wants_usage=False)
    assert run(meter, body) == body
    assert meter.reported
    assert meter.final() == TokenUsage(3_025, 57, cache_read_tokens=2_000, cache_write_tokens=1_000)
    assert meter.counted_completion_tokens == ANTHROPIC_LOCAL


def test_anthropic_prompt_is_known_from_message_start() -> None:
    meter = StreamMeter("messages", "claude-opus-4-6", prompt_estimate=3_100, client_wants_usage=True)
    run(meter, anthropic_stream(START_USAGE, None))  # cut before message_delta
    assert not meter.reported
    assert meter.final() == TokenUsage(
        3_025, ANTHROPIC_LOCAL, cache_read_tokens=2_000, cache_write_tokens=1_000
    )
    # The live meter shows the reported prompt as it is, and the local output count less its margin.
    assert meter.progress_so_far() == TokenUsage(
        3_025, max(ANTHROPIC_LOCAL - 16, 0), cache_read_tokens=2_000, cache_write_tokens=1_000
    )


def test_anthropic_message_delta_repeating_input_counts_replaces_them() -> None:
    final = {
        "input_tokens": 30,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 2_000,
        "output_tokens": 57,
    }
    meter = StreamMeter("messages", "claude-opus-4-6", prompt_estimate=0, client_wants_usage=True)
    run(meter, anthropic_stream(START_USAGE, final))
    assert meter.final() == TokenUsage(3_030, 57, cache_read_tokens=2_000, cache_write_tokens=1_000)


def test_anthropic_without_message_start_keeps_the_estimate() -> None:
    meter = StreamMeter("messages", "claude-opus-4-6", prompt_estimate=50, client_wants_usage=True)
    run(meter, sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}}, "message_delta"))
    assert meter.final() == TokenUsage(50, 9)
    assert not meter.reported


def test_anthropic_error_event() -> None:
    meter = StreamMeter("messages", "claude-opus-4-6", prompt_estimate=50, client_wants_usage=True)
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    run(meter, sse(error, "error"))
    assert meter.error == StreamError("Overloaded", "overloaded_error", None)


# -- what no upstream should send ---------------------------------------------------------------------
ODD_EVENTS = [
    b"data: {not json\n\n",
    b"data: [1, 2, 3]\n\n",
    b'data: "text"\n\n',
    b"data: null\n\n",
    b"data: 123456789012345678901234567890\n\n",
    b": keep-alive\n\n",
    b"\n",
    b'data: {"choices": "x", "usage": 5}\n\n',
    b'data: {"choices": [null, 1, {"delta": "x"}, '
    b'{"delta": {"content": 5, "tool_calls": [1, {"function": 2}]}}]}\n\n',
    b'data: {"choices": [{"delta": {"tool_calls": "x", "function_call": []}}], '
    b'"usage": {"prompt_tokens": -1}}\n\n',
    b'data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": 5}}\n\n',
    b'data: {"type": "content_block_delta", "delta": {"type": ["x"]}}\n\n',
    b'data: {"type": "content_block_delta", "delta": "x"}\n\n',
    b'data: {"type": "message_start", "message": {"usage": {"input_tokens": "25"}}}\n\n',
    b'data: {"type": "message_start", "message": "x"}\n\n',
    b'data: {"type": "message_delta", "usage": {"output_tokens": true}}\n\n',
    b'data: {"type": "message_delta", "usage": 3}\n\n',
    b'data: {"type": "content_block_start", "content_block": 3}\n\n',
    b'data: {"type": "response.completed", "response": {"usage": {"input_tokens": 1.5}}}\n\n',
    b'data: {"type": "response.completed", "response": 3}\n\n',
    b'data: {"type": "response.failed", "response": {"error": 3}}\n\n',
    b'data: {"type": "response.output_text.delta", "delta": {"x": 1}}\n\n',
    b'data: {"type": {"nested": 1}}\n\n',
    b'data: {"error": "plain string"}\n\n',
    b'data: {"error": {"message": 5, "code": 429}}\n\n',
    b"data: \xff\xfe\n\n",
]


@pytest.mark.parametrize("api", ["chat", "completions", "responses", "messages"])
def test_odd_events_are_forwarded_and_count_nothing(api: Api) -> None:
    meter = StreamMeter(api, "gpt-4o", prompt_estimate=11, client_wants_usage=True)
    body = b"".join(ODD_EVENTS)
    assert run(meter, body) == body
    assert meter.final().completion_tokens == 0
    assert meter.final().prompt_tokens == 11
    assert meter.events_seen == len(ODD_EVENTS)
    assert not meter.reported


def test_error_shapes_are_normalized() -> None:
    meter = StreamMeter("chat", "gpt-4o", prompt_estimate=0, client_wants_usage=True)
    run(meter, b'data: {"error": "plain string"}\n\n')
    assert meter.error == StreamError("plain string")
    run(meter, b'data: {"error": {"message": 5, "code": 429}}\n\n')
    assert meter.error == StreamError("upstream error in the stream", None, "429")


KEYS = st.sampled_from(
    ["choices", "delta", "content", "text", "tool_calls", "function", "arguments", "usage", "prompt_tokens",
     "type", "message", "response", "output_tokens", "input_tokens", "error", "content_block", "partial_json"]
)  # fmt: skip
VALUES = st.none() | st.booleans() | st.integers(-5, 2**70) | st.text(max_size=10) | st.sampled_from(
    ["message_start", "message_delta", "content_block_delta", "text_delta", "response.completed",
     "response.output_text.delta", "response.failed", "error"]
)  # fmt: skip
PAYLOADS = st.recursive(
    VALUES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(
    api=st.sampled_from(["chat", "completions", "responses", "messages"]),
    payloads=st.lists(PAYLOADS, max_size=5),
)
def test_any_json_event_is_metered_without_raising(api: Api, payloads: list[Any]) -> None:
    meter = StreamMeter(api, "gpt-4o", prompt_estimate=4, client_wants_usage=False)
    # json, not orjson: big integers too, which orjson refuses to write (and the meter to read).
    body = b"".join(sse(json.dumps(payload).encode()) for payload in payloads)
    run(meter, body)
    usage = meter.final()
    assert usage.prompt_tokens >= 0
    assert usage.completion_tokens >= 0
    assert usage.cache_read_tokens + usage.cache_write_tokens <= usage.prompt_tokens


def test_text_without_word_boundaries_is_not_counted_again_from_its_start() -> None:
    # Chinese or JSON without spaces streamed one character at a time: each piece must not re-count the
    # whole text so far (that grew with the square of the answer, on the event loop).
    from meterline.gateway.tokens import RunningCount, token_counter

    counter = token_counter("gpt-4o-mini")
    counted = 0

    def count(text: str) -> int:
        nonlocal counted
        counted += len(text)
        return counter(text)

    text = "这是一个测试。我们正在测试流式传输的计数。" * 200
    running = RunningCount(count)
    for character in text:
        running.add(character)
    assert counted <= 100 * len(text)  # linear: a bounded tail per piece, not the text so far
    assert abs(running.total - counter(text)) <= len(text) // 100  # and still the joined text's count


def test_a_finish_reason_marks_the_answer_complete() -> None:
    meter = StreamMeter("chat", "gpt-4o-mini", 10, client_wants_usage=False)
    assert not meter.finished
    meter.observe(
        SSEEvent(b"", None, '{"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}')
    )
    assert not meter.finished
    meter.observe(SSEEvent(b"", None, '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'))
    assert meter.finished
    anthropic_meter = StreamMeter("messages", "claude-sonnet-4-5", 10, client_wants_usage=True)
    anthropic_meter.observe(
        SSEEvent(b"", "message_delta", '{"type": "message_delta", "delta": {"stop_reason": "end_turn"}}')
    )
    assert anthropic_meter.finished
