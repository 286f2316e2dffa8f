"""The fake LLM upstream, driven by the official ``openai`` and ``anthropic`` SDKs over real loopback HTTP.

One server for the module (start-up costs about a second); each test starts from ``reset()``. Every
count is checked exactly: the output is N one-token pieces, the prompt count follows the documented
formula, and the SDKs must parse every shape, streamed and not.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest

from meterline.testing import MESSAGE_OVERHEAD, PIECE, FakeUpstream
from reference_tokenizer import encoding
from servers import free_port

KEY = "sk-fake-test-key"
O200K = encoding("o200k_base")
CL100K = encoding("cl100k_base")
USER = [{"role": "user", "content": "How many tokens is this sentence, exactly?"}]


def prompt_tokens(texts: list[str], messages: int) -> int:
    """The documented formula: o200k tokens of the texts joined by newlines, plus 3 per message."""
    return len(O200K.encode_ordinary("\n".join(texts))) + MESSAGE_OVERHEAD * messages


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(b"\0\0" * int(seconds * rate))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture
def oai(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def claude(upstream: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=upstream.origin, api_key=KEY, max_retries=0) as client:
        yield client


# -- the piece -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [O200K, CL100K], ids=["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("count", [1, 2, 3, 16, 100, 4096])
def test_n_pieces_are_exactly_n_tokens(tokenizer: Any, count: int) -> None:
    assert len(tokenizer.encode_ordinary(PIECE)) == 1
    assert len(tokenizer.encode_ordinary(PIECE * count)) == count


# -- chat completions ------------------------------------------------------------------------------


def test_chat_counts_are_exact(oai: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
    ]
    answer = oai.chat.completions.create(model="gpt-4o-mini", messages=messages, max_completion_tokens=7)
    assert answer.choices[0].message.content == PIECE * 7
    assert answer.choices[0].finish_reason == "length"
    assert answer.model == "gpt-4o-mini"
    assert answer.usage is not None
    expected = prompt_tokens(["You are terse.", "Hello", "there"], 2)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (expected, 7)
    assert answer.usage.total_tokens == expected + 7
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_without_a_limit_generates_the_default_16(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert answer.choices[0].message.content == PIECE * 16
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 16


def test_chat_stream_sends_one_piece_per_chunk_and_usage_only_when_asked(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="m", messages=USER, max_tokens=5, stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == [PIECE] * 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"

    asked = list(
        oai.chat.completions.create(
            model="m",
            messages=USER,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = asked[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        prompt_tokens([USER[0]["content"]], 1),
        5,
    )
    assert all(chunk.usage is None for chunk in asked[:-1])


def test_prompt_counting_follows_the_formula_for_many_messages(oai: openai.OpenAI) -> None:
    texts = ["one", "two words", "and a third, longer message"]
    messages: Any = [{"role": "user", "content": text} for text in texts]
    answer = oai.chat.completions.create(model="m", messages=messages, max_tokens=1)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == prompt_tokens(texts, 3)


# -- completions and embeddings ----------------------------------------------------------------------


def test_completions_plain_and_streamed(oai: openai.OpenAI) -> None:
    answer = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test", max_tokens=4)
    assert answer.choices[0].text == PIECE * 4
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        prompt_tokens(["Say this is a test"], 0),
        4,
    )

    stream = oai.completions.create(
        model="m", prompt="Say", max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PIECE * 3
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_embeddings_base64_by_default_and_float_on_request(
    oai: openai.OpenAI, upstream: FakeUpstream
) -> None:
    inputs = ["first input", "second"]
    by_default = oai.embeddings.create(model="text-embedding-3-small", input=inputs)
    as_float = oai.embeddings.create(model="text-embedding-3-small", input=inputs, encoding_format="float")
    assert [list(e.embedding) for e in by_default.data] == [e.embedding for e in as_float.data]
    assert len(by_default.data) == 2
    assert len(by_default.data[0].embedding) == 8
    assert by_default.usage.prompt_tokens == prompt_tokens(inputs, 0) == by_default.usage.total_tokens
    sent = [r.json for r in upstream.requests()]
    assert sent[0]["encoding_format"] == "base64"  # what the SDK asks for unless told otherwise
    sized = oai.embeddings.create(model="m", input="x", dimensions=3)
    assert len(sized.data[0].embedding) == 3


# -- responses -----------------------------------------------------------------------------------------


RESPONSES_STREAM = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_responses_plain(oai: openai.OpenAI) -> None:
    answer = oai.responses.create(
        model="gpt-4o-mini", instructions="Be brief.", input="Hi there", max_output_tokens=6
    )
    assert answer.output_text == PIECE * 6
    assert answer.status == "completed"
    assert answer.usage is not None
    expected = prompt_tokens(["Be brief.", "Hi there"], 2)
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (expected, 6)
    assert answer.usage.total_tokens == expected + 6
    assert answer.usage.input_tokens_details.cached_tokens == 0
    assert answer.usage.output_tokens_details.reasoning_tokens == 0


def test_responses_stream_has_the_real_event_sequence(oai: openai.OpenAI) -> None:
    items: Any = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]
    events = list(oai.responses.create(model="m", input=items, max_output_tokens=3, stream=True))
    assert [event.type for event in events] == RESPONSES_STREAM
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == [PIECE] * 3
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 3
    assert completed.response.usage.input_tokens == prompt_tokens(["Hello"], 1)
    assert completed.response.output_text == PIECE * 3


# -- audio and models ---------------------------------------------------------------------------------


def test_transcription_reports_the_wav_duration(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    audio = wav_bytes(2.5)
    plain = oai.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio, "audio/wav"))
    assert plain.text == PIECE * 16
    assert plain.usage is not None
    assert plain.usage.type == "duration"
    assert plain.usage.seconds == 3  # billed whole seconds, rounded up
    verbose = oai.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", audio, "audio/wav"), response_format="verbose_json"
    )
    assert verbose.duration == 2.5
    assert verbose.usage is not None
    assert verbose.usage.seconds == 3
    recorded = upstream.last_request()
    assert recorded.form is not None
    assert recorded.form["model"] == "whisper-1"
    assert recorded.form["file"] == {"filename": "a.wav", "content_type": "audio/wav", "size": len(audio)}
    assert recorded.body is None


def test_transcription_of_a_non_wav_file_is_one_second(oai: openai.OpenAI) -> None:
    answer = oai.audio.transcriptions.create(
        model="whisper-1", file=("a.mp3", b"ID3 not a wav", "audio/mpeg")
    )
    assert answer.usage is not None
    assert answer.usage.seconds == 1
    text = oai.audio.transcriptions.create(
        model="whisper-1", file=("a.mp3", b"x", "audio/mpeg"), response_format="text"
    )
    assert text == PIECE * 16


def test_models_answer_in_any_mode_and_consume_no_script(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.set_default("status", code=500)
    upstream.script("status", code=503)
    assert "gpt-4o-mini" in [model.id for model in oai.models.list()]
    assert len(upstream.state()["queue"]) == 1


def test_anthropic_models_and_count_tokens(claude: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    listed = [m.id for m in claude.models.list()]
    assert listed == ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]
    counted = claude.messages.count_tokens(
        model="claude-haiku-4-5", system="Be kind.", messages=[{"role": "user", "content": "Hello"}]
    )
    assert counted.input_tokens == prompt_tokens(["Be kind.", "Hello"], 2)


def test_azure_shapes_want_an_api_version_and_the_api_key_header(upstream: FakeUpstream) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    path = f"{upstream.origin}/openai/deployments/my-dep/chat/completions"
    versioned = f"{path}?api-version=2024-10-21"
    ok = httpx.post(versioned, json=body, headers={"api-key": KEY})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.post(versioned, json=body, headers={"authorization": f"Bearer {KEY}"}).status_code == 401
    assert httpx.post(path, json=body, headers={"api-key": KEY}).status_code == 404
    listed = httpx.get(f"{upstream.origin}/openai/models?api-version=2024-10-21", headers={"api-key": KEY})
    assert "gpt-4o" in [m["id"] for m in listed.json()["data"]]
    seen = upstream.requests()[0]
    assert (seen.path, seen.query, seen.status) == (
        "/openai/deployments/my-dep/chat/completions",
        "api-version=2024-10-21",
        200,
    )


# -- anthropic messages ---------------------------------------------------------------------------------


def test_messages_plain(claude: anthropic.Anthropic) -> None:
    answer = claude.messages.create(
        model="claude-fake-1",
        max_tokens=9,
        system="Be kind.",
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert answer.content[0].type == "text"
    assert answer.content[0].text == PIECE * 9
    assert answer.stop_reason == "max_tokens"
    assert answer.usage.input_tokens == prompt_tokens(["Be kind.", "Hello"], 2)
    assert answer.usage.output_tokens == 9
    assert (answer.usage.cache_read_input_tokens, answer.usage.cache_creation_input_tokens) == (0, 0)


def test_messages_stream_has_the_real_event_sequence(claude: anthropic.Anthropic) -> None:
    stream = claude.messages.create(
        model="claude", max_tokens=4, messages=[{"role": "user", "content": "Hello"}], stream=True
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = events[0], events[-2]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == prompt_tokens(["Hello"], 1)
    assert start.message.usage.output_tokens == 1
    assert start.message.usage.cache_read_input_tokens == 0
    assert delta.type == "message_delta"
    assert delta.usage.output_tokens == 4


def test_messages_stream_helper_accumulates_the_message(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="claude", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == PIECE * 5
    assert final.usage.output_tokens == 5


# -- modes ---------------------------------------------------------------------------------------------


def test_no_usage_reports_nothing_anywhere(
    oai: openai.OpenAI, claude: anthropic.Anthropic, upstream: FakeUpstream
) -> None:
    upstream.set_default("no_usage")
    assert oai.chat.completions.create(model="m", messages=USER).usage is None
    chunks = list(
        oai.chat.completions.create(
            model="m",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert oai.responses.create(model="m", input="x").usage is None
    events = list(oai.responses.create(model="m", input="x", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is None
    headers = {"x-api-key": KEY}
    embedded = httpx.post(f"{upstream.url}/embeddings", headers=headers, json={"model": "m", "input": "x"})
    assert "usage" not in embedded.json()
    raw = httpx.post(
        f"{upstream.origin}/v1/messages",
        headers={"x-api-key": KEY},
        json={"model": "c", "max_tokens": 2, "messages": USER, "stream": True},
    )
    assert '"usage"' not in raw.text
    assert "message_stop" in raw.text
    plain = httpx.post(
        f"{upstream.origin}/v1/messages",
        headers={"x-api-key": KEY},
        json={"model": "c", "max_tokens": 2, "messages": USER},
    )
    assert "usage" not in plain.json()


def test_cache_mode_reports_cached_tokens_per_provider(
    oai: openai.OpenAI, claude: anthropic.Anthropic, upstream: FakeUpstream
) -> None:
    upstream.set_default("cache", cached_tokens=100, cache_read_tokens=40, cache_creation_tokens=7)
    counted = prompt_tokens([USER[0]["content"]], 1)
    chat = oai.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert chat.usage is not None
    assert chat.usage.prompt_tokens_details is not None
    assert (chat.usage.prompt_tokens, chat.usage.prompt_tokens_details.cached_tokens) == (counted + 100, 100)
    response = oai.responses.create(model="m", input=USER, max_output_tokens=2)
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens) == (
        counted + 100,
        100,
    )
    message = claude.messages.create(model="c", max_tokens=2, messages=USER)
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
        counted,
        40,
        7,
    )
    events = list(claude.messages.create(model="c", max_tokens=2, messages=USER, stream=True))
    assert events[0].type == "message_start"
    assert events[0].message.usage.cache_read_input_tokens == 40


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_status_mode_answers_openai_errors(
    oai: openai.OpenAI, upstream: FakeUpstream, code: int, error: type[openai.APIStatusError]
) -> None:
    upstream.script("status", code=code)
    with pytest.raises(error) as raised:
        oai.chat.completions.create(model="m", messages=USER)
    assert raised.value.status_code == code
    body = raised.value.body
    assert isinstance(body, dict)
    assert set(body) >= {"message", "type", "param", "code"}
    assert (raised.value.response.headers.get("retry-after") == "1") is (code == 429)


@pytest.mark.parametrize(
    ("code", "error", "kind"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "overloaded_error"),
    ],
)
def test_status_mode_answers_anthropic_errors(
    claude: anthropic.Anthropic,
    upstream: FakeUpstream,
    code: int,
    error: type[anthropic.APIStatusError],
    kind: str,
) -> None:
    upstream.script("status", code=code, retry_after=7)
    with pytest.raises(error) as raised:
        claude.messages.create(model="c", max_tokens=2, messages=USER)
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    assert (raised.value.response.headers.get("retry-after") == "7") is (code == 429)


def collect_contents(stream: Any, into: list[str | None]) -> None:
    for chunk in stream:
        into.append(chunk.choices[0].delta.content)


def test_cut_streams_raise_in_the_sdks(
    oai: openai.OpenAI, claude: anthropic.Anthropic, upstream: FakeUpstream
) -> None:
    upstream.script("cut", count=3, after=2)
    received: list[str | None] = []
    with pytest.raises(openai.APIConnectionError):
        collect_contents(oai.chat.completions.create(model="m", messages=USER, stream=True), received)
    assert received == ["", PIECE, PIECE]  # the role chunk, then `after` pieces, then nothing
    with pytest.raises(openai.APIConnectionError):
        list(oai.responses.create(model="m", input="x", stream=True))
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        list(claude.messages.create(model="c", max_tokens=9, messages=USER, stream=True))
    recorded = upstream.requests()
    assert [(r.outcome, r.pieces_sent) for r in recorded] == [("cut", 2)] * 3


def test_cut_plain_answer_raises(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.script("cut")
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=USER)


def test_hang_times_out_and_notices_the_client_leaving(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.script("hang")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.3).chat.completions.create(model="m", messages=USER)
    assert time.monotonic() - started < 2
    recorded = upstream.wait_for_outcome(upstream.last_request().number, "disconnected")
    assert recorded.status is None


def test_slow_delays_the_first_byte_and_each_chunk(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.script("slow", delay_ms=150, chunk_delay_ms=30)
    started = time.monotonic()
    stream = oai.chat.completions.create(model="m", messages=USER, max_tokens=3, stream=True)
    first = next(iter(stream))
    assert time.monotonic() - started >= 0.15
    assert first.choices[0].delta.role == "assistant"
    rest = list(stream)
    assert time.monotonic() - started >= 0.15 + 3 * 0.03
    assert len([c for c in rest if c.choices and c.choices[0].delta.content]) == 3


def test_drip_stops_when_the_client_disconnects(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.script("drip", chunk_delay_ms=10)
    stream = oai.chat.completions.create(model="m", messages=USER, stream=True)
    for index, _ in enumerate(stream):
        if index == 4:
            break
    stream.close()
    recorded = upstream.wait_for_outcome(upstream.last_request().number, "disconnected")
    assert 4 <= recorded.pieces_sent < 1000
    assert recorded.mode == "drip"


# -- scripting, auth, recording -------------------------------------------------------------------------


def test_scripts_run_in_order_then_fall_back_to_the_default(
    oai: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.set_default("no_usage")
    upstream.script("status", count=2, code=500)
    upstream.script("cache", cached_tokens=5)
    assert [entry["count"] for entry in upstream.state()["queue"]] == [2, 1]
    outcomes = []
    for _ in range(4):
        try:
            answer = oai.chat.completions.create(model="m", messages=USER, max_tokens=1)
        except openai.InternalServerError:
            outcomes.append("500")
        else:
            details = answer.usage.prompt_tokens_details if answer.usage else None
            outcomes.append("no usage" if details is None else f"cached {details.cached_tokens}")
    assert outcomes == ["500", "500", "cached 5", "no usage"]
    assert [r.mode for r in upstream.requests()] == ["status", "status", "cache", "no_usage"]
    upstream.reset()
    assert upstream.state()["default"]["mode"] == "ok"
    assert upstream.requests() == []


def test_unknown_modes_are_refused(upstream: FakeUpstream) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        upstream.script("explode")
    with pytest.raises(ValueError, match="unknown mode"):
        upstream.set_default("explode")


def test_a_wrong_key_gets_401_in_each_providers_format(upstream: FakeUpstream) -> None:
    upstream.script("status", code=500)  # a refused request must not consume the script
    with (
        openai.OpenAI(base_url=upstream.url, api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        bad.chat.completions.create(model="m", messages=USER)
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "invalid_api_key"
    with (
        anthropic.Anthropic(base_url=upstream.origin, api_key="wrong", max_retries=0) as bad_claude,
        pytest.raises(anthropic.AuthenticationError) as refused,
    ):
        bad_claude.messages.create(model="c", max_tokens=1, messages=USER)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert len(upstream.state()["queue"]) == 1
    assert [(r.status, r.mode) for r in upstream.requests()] == [(401, None), (401, None)]


def test_either_key_header_works_on_any_route(upstream: FakeUpstream) -> None:
    body = {"model": "m", "messages": USER, "max_tokens": 1}
    assert (
        httpx.post(f"{upstream.url}/chat/completions", json=body, headers={"x-api-key": KEY}).status_code
        == 200
    )
    bearer = {"authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{upstream.url}/messages", json=body, headers=bearer).status_code == 200
    assert httpx.post(f"{upstream.url}/messages", json=body).status_code == 401


def test_unknown_paths_and_bad_bodies(upstream: FakeUpstream) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    missing = httpx.post(f"{upstream.url}/nope", headers=headers, json={})
    assert missing.status_code == 404
    assert "error" in missing.json()
    not_json = httpx.post(f"{upstream.url}/chat/completions", headers=headers, content=b"{nope")
    assert not_json.status_code == 400
    assert httpx.get(f"{upstream.url}/chat/completions", headers=headers).status_code == 405


def test_requests_are_recorded_byte_for_byte(upstream: FakeUpstream) -> None:
    raw = (
        b'{"model": "m",  "messages": [{"role": "user", "content": "h\\u00e9"}],'
        b' "stream_options": {"include_usage": true}}'
    )
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "X-Custom": "Yes"}
    response = httpx.post(f"{upstream.url}/chat/completions?trace=1", content=raw, headers=headers)
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_fake")
    recorded = upstream.last_request()
    assert recorded.body is not None
    assert recorded.body.encode() == raw
    assert recorded.json["stream_options"] == {"include_usage": True}
    assert recorded.headers["authorization"] == f"Bearer {KEY}"
    assert recorded.headers["x-custom"] == "Yes"
    assert (recorded.method, recorded.path, recorded.query) == ("POST", "/v1/chat/completions", "trace=1")
    assert (recorded.body_size, recorded.status, recorded.outcome, recorded.mode) == (
        len(raw),
        200,
        "completed",
        "ok",
    )
    upstream.clear()
    assert upstream.requests() == []


def test_pieces_param_and_the_cap(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.script("ok", pieces=3)
    forced = oai.chat.completions.create(model="m", messages=USER, max_tokens=50)
    assert forced.choices[0].message.content == PIECE * 3
    upstream.script("ok", max_pieces=4)
    capped = oai.chat.completions.create(model="m", messages=USER, max_tokens=50)
    assert capped.choices[0].message.content == PIECE * 4
    assert capped.choices[0].finish_reason == "stop"
    upstream.script("ok", reasoning_tokens=10)
    reasoning = oai.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert reasoning.usage is not None
    assert reasoning.usage.completion_tokens == 12
    assert reasoning.usage.completion_tokens_details is not None
    assert reasoning.usage.completion_tokens_details.reasoning_tokens == 10


# -- the command line ----------------------------------------------------------------------------------


def test_command_line_server_with_bounded_history() -> None:
    port = free_port()
    command = [sys.executable, "-m", "meterline.testing.fake_upstream", "--port", str(port)]
    command += ["--mode", "no_usage", "--history", "2", "--api-key", "cli-key"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=dict(os.environ))
    try:
        origin = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{origin}/_fake/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        body = {"model": "m", "messages": USER, "max_tokens": 2}
        for _ in range(3):
            answer = httpx.post(f"{origin}/v1/chat/completions", json=body, headers={"x-api-key": "cli-key"})
            assert answer.status_code == 200
            assert "usage" not in answer.json()
        recorded = httpx.get(f"{origin}/_fake/requests").json()["requests"]
        assert [r["number"] for r in recorded] == [2, 3]
        assert orjson.loads(recorded[-1]["body"]) == body
    finally:
        process.terminate()
        process.wait(10)
