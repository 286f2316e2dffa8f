"""Prompt estimates and output reservations (``meterline.gateway.tokens``): the real offline tokenizer,
OpenAI's chat overhead as the cookbook computes it, request bodies as the official SDKs send them, and
bodies no SDK would send."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.gateway.flavors import Api
from meterline.gateway.tokens import (
    ANTHROPIC_IMAGE_TOKENS,
    ANTHROPIC_TOOL_PROMPT_TOKENS,
    AUDIO_TOKENS,
    CL100K_BASE,
    FILE_TOKENS,
    IMAGE_TOKENS,
    LOW_DETAIL_IMAGE_TOKENS,
    O200K_BASE,
    REPLY_PRIMING_TOKENS,
    TOKEN_CEILING,
    TOKENS_PER_MESSAGE,
    count_tokens,
    encoding_name,
    estimate_prompt_tokens,
    max_output_tokens,
    token_counter,
)
from reference_tokenizer import encoding

APIS: list[Api] = ["chat", "completions", "embeddings", "responses", "messages", "transcriptions"]
O200K = encoding(O200K_BASE)
CL100K = encoding(CL100K_BASE)


def o200k(text: str) -> int:
    return len(O200K.encode_ordinary(text))


# -- encodings --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4", CL100K_BASE),
        ("gpt-4-0613", CL100K_BASE),
        ("gpt-4-turbo-2024-04-09", CL100K_BASE),
        ("gpt-4-32k", CL100K_BASE),
        ("GPT-4", CL100K_BASE),
        ("gpt-3.5-turbo", CL100K_BASE),
        ("gpt-35-turbo", CL100K_BASE),  # Azure's spelling
        ("ft:gpt-3.5-turbo-0125:acme::8abc", CL100K_BASE),
        ("openai/gpt-4", CL100K_BASE),
        ("text-embedding-3-small", CL100K_BASE),
        ("text-embedding-ada-002", CL100K_BASE),
        ("davinci-002", CL100K_BASE),
        ("babbage-002", CL100K_BASE),
        ("text-davinci-003", CL100K_BASE),
        ("ada", CL100K_BASE),
        ("gpt-4o", O200K_BASE),
        ("gpt-4o-mini-2024-07-18", O200K_BASE),
        ("chatgpt-4o-latest", O200K_BASE),
        ("gpt-4.1", O200K_BASE),
        ("gpt-4.1-nano", O200K_BASE),
        ("gpt-4.5-preview", O200K_BASE),
        ("gpt-5", O200K_BASE),
        ("o1", O200K_BASE),
        ("o3-mini", O200K_BASE),
        ("o4-mini", O200K_BASE),
        ("ft:gpt-4o-mini-2024-07-18:acme::x1", O200K_BASE),
        ("claude-opus-4-6", O200K_BASE),
        ("llama-3.1-8b", O200K_BASE),
        ("adamant-7b", O200K_BASE),  # starts like "ada" but is not the GPT-3 model
        ("", O200K_BASE),
    ],
)
def test_encoding_of_each_model_family(model: str, expected: str) -> None:
    assert encoding_name(model) == expected


def test_counts_are_the_tokenizers_own() -> None:
    # tiktoken's documented token ids for this text, in both encodings.
    assert O200K.encode_ordinary("tiktoken is great!") == [83, 8251, 2488, 382, 2212, 0]
    assert CL100K.encode_ordinary("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert count_tokens("tiktoken is great!", "gpt-4o") == 6
    assert count_tokens("tiktoken is great!", "gpt-4") == 6
    text = "Les sanglots longs des violons de l'automne blessent mon cœur d'une langueur monotone. 東京"
    assert count_tokens(text, "gpt-4o") == o200k(text)
    assert count_tokens(text, "gpt-3.5-turbo") == len(CL100K.encode_ordinary(text))
    assert count_tokens(text, "gpt-4o") != count_tokens(text, "gpt-4")  # really two encodings


def test_short_strings_are_remembered_without_changing_counts() -> None:
    count = token_counter("gpt-4o")
    for text in ["user", " the", "東京", "x" * 24, "y" * 25, ""]:
        assert count(text) == count(text) == o200k(text)


def test_special_token_text_is_ordinary_text() -> None:
    assert count_tokens("<|endoftext|>", "gpt-4o") == o200k("<|endoftext|>") == 7
    assert count_tokens("<|endoftext|><|fim_prefix|>", "gpt-4") > 2


# A fresh process: what one server worker pays to count tokens, and bpe-openai's own API beside it
# (imported after the gateway's tokenizer, or before).
_FRESH = """
import sys, warnings

def anonymous_mb():
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Anonymous:")) // 1024

def public(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai
    return bpe_openai.get_encoding(name)

from meterline.gateway.tokens import count_tokens, load_encodings
if sys.argv[1] == "public-first":
    public("o200k_base")
before = anonymous_mb()
load_encodings()
grown = anonymous_mb() - before
python_tables = "bpe_openai.registry" in sys.modules
text = "Les sanglots longs des violons de l'automne \\ud800 blessent mon cœur 東京 <|endoftext|> " * 50
same = all(
    count_tokens(text, model) == len(public(name).encode_ordinary(text.replace("\\ud800", "\\ufffd")))
    for model, name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"))
)
print(grown, python_tables, same)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps_rollup")
@pytest.mark.parametrize("order", ["gateway-first", "public-first"])
def test_a_worker_counts_without_the_tokenizers_python_tables(order: str) -> None:
    # bpe-openai's package import reads every encoding's rank table into Python (~85 MB and ~1.5 s a
    # process): a server worker loads only the compiled tokenizer, and still counts as the package does.
    done = subprocess.run([sys.executable, "-c", _FRESH, order], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown, python_tables, same = done.stdout.split()
    assert same == "True"
    if order == "gateway-first":
        assert python_tables == "False"
        assert int(grown) < 80  # both encodings' compiled tables: ~50 MB (~135 MB through the package)


def test_lone_surrogates_do_not_raise() -> None:
    assert count_tokens("\ud800 text", "gpt-4o") >= 2


def test_huge_texts_are_counted_past_the_tokenizers_own_limits() -> None:
    # bpe-openai's Python API refuses >= 1,000,000 characters and > 200,000 tokens in one call: counted
    # whole all the same.
    words = "word " * 300_000
    assert count_tokens(words, "gpt-4o") == 300_001
    prose = ("The quick brown fox jumps over the lazy dog, again and again. " * 20_000).strip()
    assert count_tokens(prose, "gpt-4o") == 20_000 * o200k(
        "The quick brown fox jumps over the lazy dog, again and again."
    )
    no_spaces = "🦜" * 300_000  # 3 tokens each: 900,000
    assert count_tokens(no_spaces, "gpt-4o") == 300_000 * o200k("🦜")


# -- chat -------------------------------------------------------------------------------------------
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4o", 124), ("gpt-4o-mini", 124), ("gpt-4-0613", 129), ("gpt-4", 129), ("gpt-3.5-turbo", 129)],
)
def test_chat_overhead_matches_the_openai_cookbook(model: str, expected: int) -> None:
    # "How to count tokens with tiktoken": num_tokens_from_messages() and the API both report these.
    assert estimate_prompt_tokens("chat", {"model": model, "messages": COOKBOOK_MESSAGES}, model) == expected


def test_chat_formula() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "name": "ann", "content": "Hi there"},
        ],
    }
    expected = REPLY_PRIMING_TOKENS + 2 * TOKENS_PER_MESSAGE
    expected += o200k("developer") + o200k("Be brief.") + o200k("user") + o200k("ann") + 1 + o200k("Hi there")
    assert estimate_prompt_tokens("chat", body, "gpt-4o") == expected


def test_chat_content_parts() -> None:
    def estimate(parts: list[Any]) -> int:
        body = {"messages": [{"role": "user", "content": parts}]}
        return estimate_prompt_tokens("chat", body, "gpt-4o") - REPLY_PRIMING_TOKENS - TOKENS_PER_MESSAGE - 1

    text = {"type": "text", "text": "What is in this image?"}
    assert estimate([text]) == o200k("What is in this image?")
    assert estimate([text, text]) == 2 * o200k("What is in this image?")
    assert (
        estimate([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]) == IMAGE_TOKENS
    )
    low = {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}}
    assert estimate([low]) == LOW_DETAIL_IMAGE_TOKENS
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    assert estimate([audio]) == AUDIO_TOKENS
    assert estimate([{"type": "file", "file": {"file_id": "file-1"}}]) == FILE_TOKENS
    assert estimate([{"type": "refusal", "refusal": "No."}]) == o200k("No.")
    unknown: list[Any] = [{"type": "hologram", "text": "ignored"}, {"text": "no type"}, 7, None, ["nested"]]
    assert estimate(unknown) == 0


def test_chat_assistant_tool_calls_and_tool_results() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    body = {
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        ]
    }
    expected = REPLY_PRIMING_TOKENS + 2 * TOKENS_PER_MESSAGE
    expected += o200k("assistant") + o200k("get_weather") + o200k('{"city":"Paris"}')
    expected += o200k("tool") + o200k("call_1") + o200k("18 degrees")
    assert estimate_prompt_tokens("chat", body, "gpt-4o") == expected


def test_tools_count_as_their_json_text() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    bare = {"messages": [{"role": "user", "content": "Weather in Paris?"}]}
    with_tools = {**bare, "tools": tools}
    extra = estimate_prompt_tokens("chat", with_tools, "gpt-4o") - estimate_prompt_tokens(
        "chat", bare, "gpt-4o"
    )
    assert extra == o200k(orjson.dumps(tools).decode())
    functions = {**bare, "functions": [tools[0]["function"]]}
    extra = estimate_prompt_tokens("chat", functions, "gpt-4o") - estimate_prompt_tokens(
        "chat", bare, "gpt-4o"
    )
    assert extra == o200k(orjson.dumps([tools[0]["function"]]).decode())
    schema = {"name": "answer", "schema": {"type": "object"}}
    formatted = {**bare, "response_format": {"type": "json_schema", "json_schema": schema}}
    extra = estimate_prompt_tokens("chat", formatted, "gpt-4o") - estimate_prompt_tokens(
        "chat", bare, "gpt-4o"
    )
    assert extra == o200k(orjson.dumps(schema).decode())


def test_definitions_that_are_not_json_still_count_their_strings() -> None:
    huge_int = {"name": "f", "description": "describe it", "limit": 2**70}
    body = {"messages": [], "tools": [huge_int]}
    assert estimate_prompt_tokens("chat", body, "gpt-4o") >= REPLY_PRIMING_TOKENS + o200k("describe it")
    deep: Any = "bottom"
    for _ in range(2_000):  # deeper than orjson serializes
        deep = [deep]
    assert estimate_prompt_tokens("chat", {"tools": deep}, "gpt-4o") == REPLY_PRIMING_TOKENS + o200k("bottom")


# -- completions, embeddings ------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["completions", "embeddings"])
def test_text_and_token_array_inputs(api: Api) -> None:
    field = "prompt" if api == "completions" else "input"

    def estimate(value: object) -> int:
        return estimate_prompt_tokens(api, {"model": "text-embedding-3-small", field: value}, "gpt-4o")

    assert estimate("Say this is a test") == o200k("Say this is a test")
    assert estimate(["Say this", "is a test"]) == o200k("Say this") + o200k("is a test")
    assert estimate([1212, 318, 257, 1332]) == 4
    assert estimate([[1212, 318], [257, 1332, 13]]) == 5
    assert estimate([]) == 0
    assert estimate(None) == 0
    assert estimate([True, None, 2.5, {"a": 1}, "ok"]) == o200k("ok")  # only what is countable


def test_completions_suffix_is_prompt_text() -> None:
    body = {"prompt": "def add(a, b):", "suffix": "    return total"}
    assert estimate_prompt_tokens("completions", body, "gpt-4o") == o200k("def add(a, b):") + o200k(
        "    return total"
    )


# -- responses --------------------------------------------------------------------------------------
def test_responses_string_input_and_instructions() -> None:
    body = {"model": "gpt-4.1", "instructions": "Talk like a pirate.", "input": "Are semicolons optional?"}
    expected = (
        REPLY_PRIMING_TOKENS
        + 2 * TOKENS_PER_MESSAGE
        + o200k("Talk like a pirate.")
        + o200k("Are semicolons optional?")
    )
    assert estimate_prompt_tokens("responses", body, "gpt-4.1") == expected


def test_responses_items() -> None:
    body = {
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is in this image?"},
                    {"type": "input_image", "image_url": "https://x.test/a.jpg"},
                ],
            },
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "A cat."}],
            },
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q":"cat"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "Felis catus"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "Thinking about cats."}],
            },
            {"type": "item_reference", "id": "msg_0"},
            {"type": "input_file", "file_id": "file-1"},
        ]
    }
    expected = REPLY_PRIMING_TOKENS
    expected += TOKENS_PER_MESSAGE + o200k("user") + o200k("what is in this image?") + IMAGE_TOKENS
    expected += TOKENS_PER_MESSAGE + o200k("assistant") + o200k("A cat.")
    expected += o200k("lookup") + o200k('{"q":"cat"}') + o200k("Felis catus") + o200k("Thinking about cats.")
    expected += FILE_TOKENS
    assert estimate_prompt_tokens("responses", body, "gpt-4o") == expected


# -- Anthropic messages -----------------------------------------------------------------------------
def test_anthropic_system_messages_and_blocks() -> None:
    body = {
        "model": "claude-opus-4-6",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Hello"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "User greets.", "signature": "sig"},
                    {"type": "tool_use", "id": "tu_1", "name": "clock", "input": {"tz": "UTC"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "tu_1",
                        "content": [{"type": "text", "text": "12:00"}],
                    },
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "Plain doc."},
                    },
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                    },
                    {"type": "redacted_thinking", "data": "opaque"},
                ],
            },
        ],
    }
    expected = REPLY_PRIMING_TOKENS + 4 * TOKENS_PER_MESSAGE + o200k("You are terse.")
    expected += o200k("user") + o200k("Hello")
    expected += o200k("assistant") + o200k("User greets.") + o200k("clock") + o200k('{"tz":"UTC"}')
    expected += o200k("user") + o200k("12:00") + ANTHROPIC_IMAGE_TOKENS + o200k("Plain doc.") + FILE_TOKENS
    assert estimate_prompt_tokens("messages", body, "claude-opus-4-6") == expected
    as_string = {**body, "system": "You are terse."}
    assert estimate_prompt_tokens("messages", as_string, "claude-opus-4-6") == expected


def test_anthropic_tools_add_the_tool_use_system_prompt() -> None:
    tools = [
        {"name": "clock", "description": "Time now", "input_schema": {"type": "object", "properties": {}}}
    ]
    bare = {"messages": [{"role": "user", "content": "Time?"}]}
    extra = estimate_prompt_tokens(
        "messages", {**bare, "tools": tools}, "claude-opus-4-6"
    ) - estimate_prompt_tokens("messages", bare, "claude-opus-4-6")
    assert extra == ANTHROPIC_TOOL_PROMPT_TOKENS + o200k(orjson.dumps(tools).decode())
    assert estimate_prompt_tokens(
        "messages", {**bare, "tools": []}, "claude-opus-4-6"
    ) == estimate_prompt_tokens("messages", bare, "claude-opus-4-6")


def test_transcription_prompt() -> None:
    fields = {"model": "whisper-1", "prompt": "Meterline, Anthropic"}
    assert estimate_prompt_tokens("transcriptions", fields, "whisper-1") == o200k("Meterline, Anthropic")
    assert estimate_prompt_tokens("transcriptions", {"model": "whisper-1"}, "whisper-1") == 0


# -- bodies as the SDKs send them -------------------------------------------------------------------
def _openai_bodies(call: Any) -> dict[str, Any]:
    sent: list[dict[str, Any]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(500, json={"error": {"message": "not needed"}})

    client = openai.OpenAI(
        api_key="sk-test", base_url="http://upstream.test/v1", max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(upstream)),
    )  # fmt: skip
    with pytest.raises(openai.InternalServerError):
        call(client)
    return sent[0]


def test_openai_sdk_chat_request() -> None:
    body = _openai_bodies(
        lambda client: client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this picture."},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x.test/cat.png", "detail": "low"},
                        },
                    ],
                },
            ],
            tools=[{"type": "function", "function": {"name": "save", "parameters": {"type": "object"}}}],
            max_completion_tokens=300,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected = (
        REPLY_PRIMING_TOKENS
        + 2 * TOKENS_PER_MESSAGE
        + o200k("system")
        + o200k("You are a helpful assistant.")
    )
    expected += o200k("user") + o200k("Describe this picture.") + LOW_DETAIL_IMAGE_TOKENS
    expected += o200k(orjson.dumps(body["tools"]).decode())
    assert estimate_prompt_tokens("chat", body, "gpt-4o-mini") == expected
    assert max_output_tokens("chat", body, 4096) == 600


def test_openai_sdk_responses_and_embeddings_requests() -> None:
    body = _openai_bodies(
        lambda client: client.responses.create(
            model="gpt-4.1", instructions="Be brief.", input="Tell me a joke.", max_output_tokens=50
        )
    )
    assert estimate_prompt_tokens("responses", body, "gpt-4.1") == (
        REPLY_PRIMING_TOKENS + 2 * TOKENS_PER_MESSAGE + o200k("Be brief.") + o200k("Tell me a joke.")
    )
    assert max_output_tokens("responses", body, 4096) == 50
    body = _openai_bodies(
        lambda client: client.embeddings.create(model="text-embedding-3-small", input=["one", "two three"])
    )
    cl = len(CL100K.encode_ordinary("one")) + len(CL100K.encode_ordinary("two three"))
    assert estimate_prompt_tokens("embeddings", body, "text-embedding-3-small") == cl
    assert max_output_tokens("embeddings", body, 4096) == 0


def test_anthropic_sdk_messages_request() -> None:
    sent: list[dict[str, Any]] = []

    def upstream(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(500, json={"type": "error", "error": {"type": "api_error", "message": "no"}})

    client = anthropic.Anthropic(
        api_key="sk-ant-test", base_url="http://upstream.test", max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(upstream)),
    )  # fmt: skip
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(
            model="claude-opus-4-6",
            max_tokens=1024,
            system="You are a poet.",
            messages=[{"role": "user", "content": "Write a haiku about meters."}],
        )
    body = sent[0]
    expected = REPLY_PRIMING_TOKENS + 2 * TOKENS_PER_MESSAGE + o200k("You are a poet.")
    expected += o200k("user") + o200k("Write a haiku about meters.")
    assert estimate_prompt_tokens("messages", body, "claude-opus-4-6") == expected
    assert max_output_tokens("messages", body, 4096) == 1024


# -- odd and hostile bodies -------------------------------------------------------------------------
ODD_BODIES: list[Any] = [
    None,
    [],
    "text",
    42,
    {},
    {"messages": "not a list"},
    {"messages": [None, 1, "x", [], {"content": {"nested": True}}, {"role": 5, "name": None}]},
    {"messages": [{"role": "user", "content": [{"type": 3}, {"type": "text", "text": 9}]}]},
    {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "x"}, {"function": {"name": 1}}]}]},
    {"prompt": {"a": "b"}, "input": 3.5, "suffix": ["x"]},
    {
        "input": [
            {"type": "message"},
            {"role": None, "content": 1},
            {"type": "function_call_output", "output": 3},
        ]
    },
    {"input": [{"type": "reasoning", "summary": "x"}, {"type": "tool_result", "content": {"x": 1}}]},
    {"system": {"type": "text"}, "messages": [{"content": [{"type": "document", "source": "x"}]}]},
    {"tools": {"not": "a list"}, "functions": 7, "response_format": "json"},
    {"instructions": ["x"], "text": {"format": "y"}},
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("body", ODD_BODIES)
def test_odd_shapes_never_raise(api: Api, body: Any) -> None:
    assert estimate_prompt_tokens(api, body, "gpt-4o") >= 0
    assert max_output_tokens(api, body, 100) in (0, 100)


def test_nesting_is_followed_only_so_deep() -> None:
    block: Any = {"type": "text", "text": "deep"}
    for _ in range(10_000):
        block = {"type": "tool_result", "content": [block]}
    body = {"messages": [{"role": "user", "content": [block]}]}
    assert (
        estimate_prompt_tokens("messages", body, "claude-opus-4-6")
        == REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + 1
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
KEYS = st.sampled_from(
    [
        "messages",
        "content",
        "role",
        "name",
        "type",
        "text",
        "tools",
        "prompt",
        "input",
        "system",
        "instructions",
        "tool_calls",
        "function",
        "arguments",
        "source",
        "data",
        "summary",
        "output",
        "image_url",
        "detail",
    ]
)
SHAPED = st.recursive(
    st.none()
    | st.integers()
    | st.text(max_size=20)
    | st.sampled_from(["text", "image_url", "tool_result", "message"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(api=st.sampled_from(APIS), body=st.dictionaries(KEYS, SHAPED, max_size=6) | JSON)
def test_any_json_is_estimated_without_raising(api: Api, body: Any) -> None:
    assert estimate_prompt_tokens(api, body, "gpt-4o") >= 0
    assert max_output_tokens(api, body, 7) >= 0


# -- output reservations ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("api", "body", "expected"),
    [
        ("chat", {"max_completion_tokens": 300, "max_tokens": 10}, 300),
        ("chat", {"max_tokens": 10}, 10),
        ("chat", {"max_completion_tokens": -1, "max_tokens": 10}, 10),
        ("chat", {"max_completion_tokens": 0}, 0),
        ("chat", {}, 4096),
        ("chat", {"max_tokens": 10, "n": 3}, 30),
        ("chat", {"n": 2}, 8192),
        ("chat", {"max_tokens": True}, 4096),
        ("chat", {"max_tokens": 10.0}, 4096),
        ("chat", {"max_tokens": "10"}, 4096),
        ("chat", {"max_tokens": None}, 4096),
        ("chat", {"max_tokens": 10, "n": 0}, 10),
        ("chat", {"max_tokens": 10, "n": True}, 10),
        ("completions", {"max_tokens": 16}, 16),
        ("completions", {"max_tokens": 16, "n": 2}, 32),
        ("completions", {"max_tokens": 16, "n": 2, "best_of": 5}, 80),
        ("completions", {"max_tokens": -5}, 4096),
        ("completions", {"max_completion_tokens": 99}, 4096),
        ("responses", {"max_output_tokens": 50, "max_tokens": 99}, 50),
        ("responses", {"max_output_tokens": False}, 4096),
        ("messages", {"max_tokens": 1024}, 1024),
        ("messages", {"max_tokens": []}, 4096),
        ("embeddings", {"max_tokens": 10}, 0),
        ("transcriptions", {"max_tokens": 10}, 0),
        ("chat", {"max_tokens": 2**80, "n": 128}, TOKEN_CEILING),
        ("chat", "not an object", 4096),
    ],
)
def test_max_output_tokens(api: Api, body: Any, expected: int) -> None:
    assert max_output_tokens(api, body, 4096) == expected
