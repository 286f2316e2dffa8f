"""Usage read from non-streamed answers of every flavor (``meterline.gateway.usage``), the generated text
counted when an upstream reports none, and the usage objects added for the client, checked against the
official SDKs' own types."""

from __future__ import annotations

import json
from typing import Any

import anthropic.types
import pytest
from openai.types import CompletionUsage, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import ResponseUsage

from meterline.gateway.flavors import Api, TokenUsage
from meterline.gateway.usage import (
    generated_text,
    token_count,
    usage_for,
    usage_from_response,
    usage_object,
    with_usage,
)
from meterline.metering.records import UsageVector

CHAT_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The image shows a wooden boardwalk path running through a lush green field.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

COMPLETION_ANSWER: dict[str, Any] = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [
        {"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None, "finish_reason": "length"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

EMBEDDING_ANSWER: dict[str, Any] = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": [0.0023064255, -0.009327292], "index": 0}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

RESPONSES_ANSWER: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "model": "gpt-4o-2024-08-06",
    "output": [
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "Looking at the picture."}],
        },
        {
            "type": "message",
            "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "The image depicts a scenic landscape.", "annotations": []}
            ],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "save",
            "arguments": '{"ok":true}',
        },
    ],
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 64},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 10},
        "total_tokens": 380,
    },
}

ANTHROPIC_ANSWER: dict[str, Any] = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-opus-4-6",
    "content": [
        {"type": "thinking", "thinking": "They want a greeting.", "signature": "EqQB"},
        {"type": "text", "text": "Hi! My name is Claude."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 25,
        "cache_creation_input_tokens": 1_000,
        "cache_read_input_tokens": 2_000,
        "output_tokens": 40,
        "service_tier": "standard",
    },
}


# -- reading usage ----------------------------------------------------------------------------------
def test_chat_usage_with_cached_tokens() -> None:
    assert usage_from_response("chat", CHAT_ANSWER) == TokenUsage(
        1117, 46, cache_read_tokens=1024, detail=UsageVector(service_tier="default")
    )


def test_chat_usage_with_cache_writes() -> None:
    body = {
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cache_write_tokens": 60},
        }
    }
    assert usage_from_response("chat", body) == TokenUsage(100, 1, cache_write_tokens=60)


def test_completions_and_embeddings_usage() -> None:
    assert usage_from_response("completions", COMPLETION_ANSWER) == TokenUsage(5, 7)
    assert usage_from_response("embeddings", EMBEDDING_ANSWER) == TokenUsage(8, 0)


def test_responses_usage() -> None:
    assert usage_from_response("responses", RESPONSES_ANSWER) == TokenUsage(
        328, 52, 128, 64, UsageVector(reasoning_tokens=10)
    )


def test_anthropic_input_tokens_exclude_the_cache() -> None:
    usage = usage_from_response("messages", ANTHROPIC_ANSWER)
    assert usage == TokenUsage(
        25 + 2_000 + 1_000,
        40,
        cache_read_tokens=2_000,
        cache_write_tokens=1_000,
        detail=UsageVector(service_tier="standard"),
    )
    assert usage is not None
    assert usage.total_tokens == 3_065
    plain = {"usage": {"input_tokens": 12, "output_tokens": 3}}
    assert usage_from_response("messages", plain) == TokenUsage(12, 3)
    nulls = {"usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": None}}
    assert usage_from_response("messages", nulls) == TokenUsage(12, 3)


def test_transcription_usage_is_tokens_only_when_typed_so() -> None:
    tokens = {
        "text": "Hello.",
        "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 3, "total_tokens": 17},
    }
    assert usage_from_response("transcriptions", tokens) == TokenUsage(14, 3)
    duration = {"text": "Hello.", "usage": {"type": "duration", "seconds": 3}}
    assert usage_from_response("transcriptions", duration) is None
    assert usage_from_response("transcriptions", {"text": "Hello."}) is None


@pytest.mark.parametrize("bad", [True, False, -1, 1.0, 1.5, "5", None, [], {}])
@pytest.mark.parametrize(
    ("api", "field"),
    [
        ("chat", "prompt_tokens"),
        ("chat", "completion_tokens"),
        ("completions", "completion_tokens"),
        ("embeddings", "prompt_tokens"),
        ("responses", "input_tokens"),
        ("responses", "output_tokens"),
        ("messages", "input_tokens"),
        ("messages", "output_tokens"),
    ],
)
def test_invalid_counts_mean_no_usage(api: Api, field: str, bad: object) -> None:
    body = {
        "chat": CHAT_ANSWER,
        "completions": COMPLETION_ANSWER,
        "embeddings": EMBEDDING_ANSWER,
        "responses": RESPONSES_ANSWER,
        "messages": ANTHROPIC_ANSWER,
    }[api]
    broken = {**body, "usage": {**body["usage"], field: bad}}
    assert usage_from_response(api, broken) is None


def test_invalid_cache_counts_count_as_zero() -> None:
    body = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": True},
        }
    }
    assert usage_from_response("chat", body) == TokenUsage(10, 1)
    body = {"usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": -4}}
    assert usage_from_response("messages", body) == TokenUsage(10, 1)


def test_cache_never_exceeds_the_prompt() -> None:
    body = {
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 50}}
    }
    assert usage_from_response("chat", body) == TokenUsage(10, 1, cache_read_tokens=10)
    body = {
        "usage": {
            "input_tokens": 10,
            "output_tokens": 1,
            "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 8},
        }
    }
    assert usage_from_response("responses", body) == TokenUsage(10, 1, 8, 2)


@pytest.mark.parametrize(
    "body", [None, [], "x", {}, {"usage": None}, {"usage": []}, {"usage": "10"}, {"usage": {}}]
)
@pytest.mark.parametrize(
    "api", ["chat", "completions", "embeddings", "responses", "messages", "transcriptions"]
)
def test_absent_usage(api: Api, body: object) -> None:
    assert usage_from_response(api, body) is None


def test_token_count() -> None:
    assert token_count(0) == 0
    assert token_count(2**40) == 2**40
    assert [token_count(v) for v in (True, -1, 1.0, "1", None)] == [None] * 5


# -- generated text ---------------------------------------------------------------------------------
def test_generated_text_of_each_flavor() -> None:
    assert generated_text("chat", CHAT_ANSWER) == CHAT_ANSWER["choices"][0]["message"]["content"]
    assert generated_text("completions", COMPLETION_ANSWER) == "\n\nThis is indeed a test"
    assert generated_text("embeddings", EMBEDDING_ANSWER) == ""
    assert generated_text("responses", RESPONSES_ANSWER) == (
        'Looking at the picture.\nThe image depicts a scenic landscape.\nsave\n{"ok":true}'
    )
    assert generated_text("messages", ANTHROPIC_ANSWER) == (
        'They want a greeting.\nHi! My name is Claude.\nget_weather\n{"city":"Paris"}'
    )
    assert generated_text("transcriptions", {"text": "Hello there."}) == "Hello there."


def test_generated_text_of_chat_tool_calls_and_several_choices() -> None:
    body = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "Need the weather.",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "w", "arguments": "{}"}}
                    ],
                }
            },
            {
                "message": {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "part"}],
                    "refusal": "No.",
                }
            },
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "audio": {"id": "a", "transcript": "Spoken."},
                }
            },
        ]
    }
    assert generated_text("chat", body) == "Need the weather.\nw\n{}\npart\nNo.\nSpoken."


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"choices": "x"},
        {"choices": [None, {"message": "x"}, {"message": {"content": 5, "tool_calls": [1]}}]},
        {"output": [{"type": "message", "content": "x"}, 3]},
        {"content": [{"type": "tool_use", "input": {"n": 2**70}}]},
    ],
)
@pytest.mark.parametrize(
    "api", ["chat", "completions", "responses", "messages", "transcriptions", "embeddings"]
)
def test_generated_text_of_odd_bodies(api: Api, body: object) -> None:
    assert generated_text(api, body) == ""


# -- usage for the client ---------------------------------------------------------------------------
def test_usage_object_is_seed_001s_shape() -> None:
    assert usage_object(TokenUsage(25, 100)) == {
        "prompt_tokens": 25,
        "completion_tokens": 100,
        "total_tokens": 125,
    }


def test_with_usage_keeps_an_existing_usage() -> None:
    added = with_usage("chat", CHAT_ANSWER, TokenUsage(1, 1))
    assert added == CHAT_ANSWER
    assert added is not CHAT_ANSWER


def test_with_usage_adds_the_chat_shape_the_sdk_parses() -> None:
    bare = {key: value for key, value in CHAT_ANSWER.items() if key != "usage"}
    added = with_usage("chat", bare, TokenUsage(1117, 46))
    assert added["usage"] == {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163}
    assert "usage" not in bare  # a copy, the original is untouched
    assert ChatCompletion.model_validate(added).usage == CompletionUsage(
        prompt_tokens=1117, completion_tokens=46, total_tokens=1163
    )
    nulled = with_usage("completions", {**COMPLETION_ANSWER, "usage": None}, TokenUsage(5, 7))
    assert nulled["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_with_usage_for_embeddings() -> None:
    bare = {key: value for key, value in EMBEDDING_ANSWER.items() if key != "usage"}
    added = with_usage("embeddings", bare, TokenUsage(8, 0))
    assert CreateEmbeddingResponse.model_validate(added).usage.total_tokens == 8


def test_with_usage_for_anthropic_gives_back_the_uncached_input() -> None:
    bare = {key: value for key, value in ANTHROPIC_ANSWER.items() if key != "usage"}
    added = with_usage(
        "messages", bare, TokenUsage(3_025, 40, cache_read_tokens=2_000, cache_write_tokens=1_000)
    )
    parsed = anthropic.types.Message.model_validate(added).usage
    assert (parsed.input_tokens, parsed.output_tokens) == (25, 40)
    assert (parsed.cache_read_input_tokens, parsed.cache_creation_input_tokens) == (2_000, 1_000)
    assert usage_from_response("messages", added) == TokenUsage(3_025, 40, 2_000, 1_000)  # round trip
    assert usage_for("messages", TokenUsage(12, 3)) == {"input_tokens": 12, "output_tokens": 3}


def test_with_usage_for_responses() -> None:
    bare = {key: value for key, value in RESPONSES_ANSWER.items() if key != "usage"}
    added = with_usage("responses", bare, TokenUsage(328, 52))
    usage = ResponseUsage.model_validate(added["usage"])
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (328, 52, 380)
    assert usage_from_response("responses", added) == TokenUsage(328, 52)


def test_no_token_usage_is_invented_for_transcriptions() -> None:
    assert with_usage("transcriptions", {"text": "Hi."}, TokenUsage(0, 2)) == {"text": "Hi."}
    assert usage_for("transcriptions", TokenUsage(0, 2)) is None


# -- the usage vector ---------------------------------------------------------------------------------
def test_anthropic_one_hour_cache_writes_and_server_tools_are_read() -> None:
    # Anthropic's documented shape: cache_creation splits the writes; server_tool_use counts tool calls.
    body = {
        "usage": {
            "input_tokens": 50,
            "cache_creation_input_tokens": 3_000,
            "cache_read_input_tokens": 1_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 2_000},
            "output_tokens": 300,
            "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 1},
            "service_tier": "priority",
        }
    }
    assert usage_from_response("messages", body) == TokenUsage(
        4_050,
        300,
        cache_read_tokens=1_000,
        cache_write_tokens=3_000,
        detail=UsageVector(
            cache_write_1h_tokens=2_000, web_searches=3, web_fetches=1, service_tier="priority"
        ),
    )


def test_openai_chat_details_are_read_as_parts_of_the_totals() -> None:
    body = {
        "service_tier": "flex",
        "usage": {
            "prompt_tokens": 1_000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 200, "audio_tokens": 300},
            "completion_tokens_details": {
                "reasoning_tokens": 120,
                "audio_tokens": 80,
                "accepted_prediction_tokens": 10,
                "rejected_prediction_tokens": 5,
            },
        },
    }
    assert usage_from_response("chat", body) == TokenUsage(
        1_000,
        500,
        cache_read_tokens=200,
        detail=UsageVector(
            input_audio_tokens=300,
            reasoning_tokens=120,
            output_audio_tokens=80,
            accepted_prediction_tokens=10,
            rejected_prediction_tokens=5,
            service_tier="flex",
        ),
    )


def test_responses_web_search_calls_are_counted_from_the_output() -> None:
    body = {
        "output": [
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {"type": "web_search_call", "id": "ws_2", "status": "completed"},
            {"type": "message", "content": [{"type": "output_text", "text": "Found it."}]},
        ],
        "usage": {"input_tokens": 10, "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0}},
    }
    assert usage_from_response("responses", body) == TokenUsage(10, 4, detail=UsageVector(web_searches=2))


def test_inconsistent_details_are_bounded_by_the_totals() -> None:
    # Parts larger than what holds them: the totals win, nothing is priced twice or negatively.
    body = {
        "service_tier": "not a tier\x00",
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 80, "audio_tokens": 50},
            "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 9},
        },
    }
    usage = usage_from_response("chat", body)
    assert usage == TokenUsage(
        100,
        10,
        cache_read_tokens=80,
        # 20 uncached tokens hold at most 20 audio ones: 30 of the audio was read from the cache.
        detail=UsageVector(
            input_audio_tokens=50, cache_audio_read_tokens=30, reasoning_tokens=8, output_audio_tokens=2
        ),
    )


def test_reasoning_reported_beside_the_completion_is_added_to_it() -> None:
    # Gemini through some OpenAI-compatible proxies: completion 0, reasoning 60, and a total that counts
    # the 60 apart. Clamping the reasoning into the completion would bill the thinking as nothing.
    beside = {
        "usage": {
            "prompt_tokens": 21,
            "completion_tokens": 0,
            "total_tokens": 81,
            "completion_tokens_details": {"reasoning_tokens": 60},
        }
    }
    assert usage_from_response("chat", beside) == TokenUsage(21, 60, detail=UsageVector(reasoning_tokens=60))
    inside = {"usage": {**beside["usage"], "completion_tokens": 70, "total_tokens": 91}}
    assert usage_from_response("chat", inside) == TokenUsage(21, 70, detail=UsageVector(reasoning_tokens=60))


def test_the_output_limit_is_told_in_the_field_the_request_used_split_over_its_choices() -> None:
    from meterline.gateway.wire import with_output_limit

    def told(api: Api, body: dict[str, Any], total: int) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(with_output_limit(api, json.dumps(body).encode(), total))
        return result

    assert told("chat", {"model": "m", "max_tokens": 100}, 30)["max_tokens"] == 30
    assert told("chat", {"model": "m", "n": 3}, 30)["max_completion_tokens"] == 10
    assert told("chat", {"model": "m", "max_tokens": 9, "max_completion_tokens": 100}, 30) == {
        "model": "m",
        "max_tokens": 9,
        "max_completion_tokens": 30,
    }
    assert told("completions", {"model": "m", "best_of": 4, "n": 2}, 30)["max_tokens"] == 7
    assert told("responses", {"model": "m"}, 30)["max_output_tokens"] == 30
    assert told("messages", {"model": "m", "max_tokens": 1024}, 30)["max_tokens"] == 30
