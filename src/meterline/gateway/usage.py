"""Token usage of non-streamed upstream answers: reading it, and adding it where it is missing.

Written by hand rather than with ``genai_prices.extract_usage``. That function was measured and
tried on these shapes (genai-prices 0.2.3) and is not exact for what the gateway needs:
* it accepts floats (``"prompt_tokens": 1.5`` is returned as 1.5) where only non-negative
  integers (never booleans) are usage;
* it needs the answer's model in its price database and raises ``LookupError`` for anything else
  (fine-tunes, self-hosted models, new releases): usage must be read whatever the model;
* it raises ``ValueError`` on a missing or invalid field instead of answering "no usage";
* it has no flavor for transcriptions' token usage;
* it costs ~22 µs an answer against ~1 µs for the lookups below.
Pricing still uses genai-prices (``meterline.pricing``); only the extraction is here.

Every result keeps the project's convention (``TokenUsage``): prompt tokens include cached ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import orjson

from meterline.gateway.flavors import Api, TokenUsage


def usage_from_response(api: Api, body: object) -> TokenUsage | None:
    """The upstream's own usage in a non-stream JSON answer; None when it reports none (or nonsense)."""
    if not isinstance(body, Mapping):
        return None
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None
    if api in ("chat", "completions"):
        return openai_chat_usage(usage)
    if api == "embeddings":
        prompt = token_count(usage.get("prompt_tokens"))
        return None if prompt is None else TokenUsage(prompt, 0)
    if api == "responses":
        return openai_responses_usage(usage)
    if api == "messages":
        return anthropic_usage(usage, None)
    # transcriptions: usage is audio seconds (``type: duration``) unless the model bills tokens.
    if usage.get("type") != "tokens":
        return None
    return _tokens(token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens")), 0, 0)


def openai_chat_usage(usage: Mapping[Any, Any]) -> TokenUsage | None:
    """Chat and legacy completions ``usage`` (also the last chunk of a stream)."""
    details = usage.get("prompt_tokens_details")
    cached = written = 0
    if isinstance(details, Mapping):
        cached = token_count(details.get("cached_tokens")) or 0
        written = token_count(details.get("cache_write_tokens")) or 0
    prompt, completion = token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
    return _tokens(prompt, completion, cached, written)


def openai_responses_usage(usage: Mapping[Any, Any]) -> TokenUsage | None:
    """Responses API ``usage`` (also ``response.usage`` of its final stream event)."""
    details = usage.get("input_tokens_details")
    cached = written = 0
    if isinstance(details, Mapping):
        cached = token_count(details.get("cached_tokens")) or 0
        written = token_count(details.get("cache_write_tokens")) or 0
    return _tokens(
        token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens")), cached, written
    )


def anthropic_usage(usage: Mapping[Any, Any], output_tokens: int | None) -> TokenUsage | None:
    """Anthropic ``usage``: its ``input_tokens`` EXCLUDE the cache, so the prompt is the sum of all three.

    ``output_tokens`` overrides the body's own (a stream's ``message_delta`` reports the final count).
    """
    uncached = token_count(usage.get("input_tokens"))
    if uncached is None:
        return None
    read = token_count(usage.get("cache_read_input_tokens")) or 0
    written = token_count(usage.get("cache_creation_input_tokens")) or 0
    output = token_count(usage.get("output_tokens")) if output_tokens is None else output_tokens
    return _tokens(uncached + read + written, output, read, written)


def _tokens(prompt: int | None, completion: int | None, cached: int, written: int) -> TokenUsage | None:
    if prompt is None or completion is None:
        return None
    # An upstream claiming more cached tokens than prompt tokens is inconsistent; the prompt total wins
    # so that ``prompt - cache`` (the uncached tokens priced at the full rate) is never negative.
    cached = min(cached, prompt)
    written = min(written, prompt - cached)
    return TokenUsage(prompt, completion, cached, written)


def token_count(value: object) -> int | None:
    """``value`` if it is a valid token count: a non-negative integer (``True`` is not 1 here)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


# -- the completion text, for a local count ------------------------------------------------------------
def generated_text(api: Api, body: object) -> str:
    """The text the model generated (content, refusals, reasoning, tool-call arguments), joined by "\\n".

    Used to count completion tokens locally when an upstream answers without usage.
    """
    if not isinstance(body, Mapping):
        return ""
    texts: list[str] = []
    if api in ("chat", "completions"):
        for choice in _items(body.get("choices")):
            _add(texts, choice.get("text"))
            message = choice.get("message")
            if isinstance(message, Mapping):
                _chat_message_texts(message, texts)
    elif api == "responses":
        for item in _items(body.get("output")):
            _responses_item_texts(item, texts)
    elif api == "messages":
        for block in _items(body.get("content")):
            _anthropic_block_texts(block, texts)
    elif api == "transcriptions":
        _add(texts, body.get("text"))
    return "\n".join(texts)


def _chat_message_texts(message: Mapping[Any, Any], texts: list[str]) -> None:
    content = message.get("content")
    if isinstance(content, str):
        texts.append(content)
    else:
        for part in _items(content):
            _add(texts, part.get("text"))
    for key in ("refusal", "reasoning_content", "reasoning"):
        _add(texts, message.get(key))
    for call in _items(message.get("tool_calls")):
        _function_texts(call.get("function"), texts)
    _function_texts(message.get("function_call"), texts)
    audio = message.get("audio")
    if isinstance(audio, Mapping):
        _add(texts, audio.get("transcript"))


def _responses_item_texts(item: Mapping[Any, Any], texts: list[str]) -> None:
    kind = item.get("type")
    if kind == "message":
        for part in _items(item.get("content")):
            _add(texts, part.get("text"))
            _add(texts, part.get("refusal"))
    elif kind == "reasoning":
        for part in (*_items(item.get("summary")), *_items(item.get("content"))):
            _add(texts, part.get("text"))
    elif kind in ("function_call", "custom_tool_call"):
        _add(texts, item.get("name"))
        _add(texts, item.get("arguments"))
        _add(texts, item.get("input"))


def _anthropic_block_texts(block: Mapping[Any, Any], texts: list[str]) -> None:
    kind = block.get("type")
    if kind == "text":
        _add(texts, block.get("text"))
    elif kind == "thinking":
        _add(texts, block.get("thinking"))
    elif kind in ("tool_use", "server_tool_use"):
        _add(texts, block.get("name"))
        with contextlib.suppress(TypeError):  # not JSON-able: nothing countable
            texts.append(orjson.dumps(block.get("input")).decode())


def _function_texts(function: object, texts: list[str]) -> None:
    if isinstance(function, Mapping):
        _add(texts, function.get("name"))
        _add(texts, function.get("arguments"))


def _items(value: object) -> list[Mapping[Any, Any]]:
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _add(texts: list[str], value: object) -> None:
    if isinstance(value, str) and value:
        texts.append(value)


# -- usage for the client ------------------------------------------------------------------------------
def usage_object(usage: TokenUsage) -> dict[str, int]:
    """Seed 001's ``usage``: ``{"prompt_tokens", "completion_tokens", "total_tokens"}``."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def usage_for(api: Api, usage: TokenUsage) -> dict[str, Any] | None:
    """``usage`` in the flavor's own shape, so the provider's SDK parses it; None for transcriptions.

    Transcriptions are billed by audio seconds and their ``usage`` is a typed union in the SDK; a
    token object there would be wrong, so none is made.
    """
    if api == "transcriptions":
        return None
    if api == "messages":
        shaped: dict[str, Any] = {
            # Anthropic's input_tokens exclude the cache (see ``anthropic_usage``).
            "input_tokens": usage.prompt_tokens - usage.cache_read_tokens - usage.cache_write_tokens,
            "output_tokens": usage.completion_tokens,
        }
        if usage.cache_read_tokens or usage.cache_write_tokens:
            shaped["cache_read_input_tokens"] = usage.cache_read_tokens
            shaped["cache_creation_input_tokens"] = usage.cache_write_tokens
        return shaped
    if api == "responses":
        return {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": usage.cache_read_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
            },
            "output_tokens": usage.completion_tokens,
            # Required by the SDK's ResponseUsage; a local count cannot tell reasoning apart.
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        }
    shaped = dict(usage_object(usage))
    if usage.cache_read_tokens or usage.cache_write_tokens:
        shaped["prompt_tokens_details"] = {
            "cached_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        }
    return shaped


def with_usage(api: Api, body: Mapping[str, Any], usage: TokenUsage) -> dict[str, Any]:
    """``body`` with a ``usage`` object added if it has none (a shallow copy); an existing one is kept."""
    if isinstance(body.get("usage"), Mapping):
        return dict(body)
    shaped = usage_for(api, usage)
    if shaped is None:
        return dict(body)
    return {**body, "usage": shaped}
