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
import re
from collections.abc import Mapping
from typing import Any

import orjson

from meterline.gateway.flavors import Api, TokenUsage
from meterline.metering.records import UsageVector


def usage_from_response(api: Api, body: object) -> TokenUsage | None:
    """The upstream's own usage in a non-stream JSON answer; None when it reports none (or nonsense)."""
    if not isinstance(body, Mapping):
        return None
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None
    if api in ("chat", "completions"):
        return openai_chat_usage(usage, body.get("service_tier"))
    if api == "embeddings":
        prompt = token_count(usage.get("prompt_tokens"))
        return None if prompt is None else TokenUsage(prompt, 0)
    if api == "responses":
        return openai_responses_usage(usage, body)
    if api == "messages":
        return anthropic_usage(usage, None)
    # transcriptions: usage is audio seconds (``type: duration``) unless the model bills tokens.
    if usage.get("type") != "tokens":
        return None
    return _tokens(token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens")), 0, 0)


def openai_chat_usage(usage: Mapping[Any, Any], service_tier: object = None) -> TokenUsage | None:
    """Chat and legacy completions ``usage`` (also the last chunk of a stream); ``service_tier`` is the
    answer's own (beside ``usage``)."""
    details = _mapping(usage.get("prompt_tokens_details"))
    out = _mapping(usage.get("completion_tokens_details"))
    prompt, completion = token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
    reasoning = _count(out, "reasoning_tokens")
    if (
        reasoning
        and prompt is not None
        and completion is not None
        and token_count(usage.get("total_tokens")) == prompt + completion + reasoning
    ):
        # Some OpenAI-compatible servers (Gemini behind proxies) report reasoning beside the completion
        # instead of inside it; their total says so. It is output all the same.
        completion += reasoning
    return _tokens(
        prompt,
        completion,
        _count(details, "cached_tokens"),
        _count(details, "cache_write_tokens"),
        input_audio=_count(details, "audio_tokens"),
        output_audio=_count(out, "audio_tokens"),
        reasoning=reasoning,
        accepted=_count(out, "accepted_prediction_tokens"),
        rejected=_count(out, "rejected_prediction_tokens"),
        service_tier=service_tier,
    )


def openai_responses_usage(usage: Mapping[Any, Any], response: Mapping[Any, Any]) -> TokenUsage | None:
    """Responses API ``usage`` (also ``response.usage`` of its final stream event). Web searches are
    the ``web_search_call`` items of the ``response``'s output (billed per call)."""
    details = _mapping(usage.get("input_tokens_details"))
    out = _mapping(usage.get("output_tokens_details"))
    searches = sum(1 for item in _items(response.get("output")) if item.get("type") == "web_search_call")
    return _tokens(
        token_count(usage.get("input_tokens")),
        token_count(usage.get("output_tokens")),
        _count(details, "cached_tokens"),
        _count(details, "cache_write_tokens"),
        input_audio=_count(details, "audio_tokens"),
        output_audio=_count(out, "audio_tokens"),
        reasoning=_count(out, "reasoning_tokens"),
        web_searches=searches,
        service_tier=response.get("service_tier"),
    )


def anthropic_usage(usage: Mapping[Any, Any], output_tokens: int | None) -> TokenUsage | None:
    """Anthropic ``usage``: its ``input_tokens`` EXCLUDE the cache, so the prompt is the sum of all three.

    ``output_tokens`` overrides the body's own (a stream's ``message_delta`` reports the final count).
    ``cache_creation`` splits the writes into 5-minute and 1-hour ones; ``server_tool_use`` counts web
    searches and fetches; ``service_tier`` is inside ``usage`` here.
    """
    uncached = token_count(usage.get("input_tokens"))
    if uncached is None:
        return None
    read = token_count(usage.get("cache_read_input_tokens")) or 0
    written = token_count(usage.get("cache_creation_input_tokens")) or 0
    output = token_count(usage.get("output_tokens")) if output_tokens is None else output_tokens
    tools = _mapping(usage.get("server_tool_use"))
    return _tokens(
        uncached + read + written,
        output,
        read,
        written,
        written_1h=_count(_mapping(usage.get("cache_creation")), "ephemeral_1h_input_tokens"),
        web_searches=_count(tools, "web_search_requests"),
        web_fetches=_count(tools, "web_fetch_requests"),
        service_tier=usage.get("service_tier"),
    )


def _tokens(
    prompt: int | None,
    completion: int | None,
    cached: int,
    written: int,
    *,
    written_1h: int = 0,
    input_audio: int = 0,
    output_audio: int = 0,
    reasoning: int = 0,
    accepted: int = 0,
    rejected: int = 0,
    web_searches: int = 0,
    web_fetches: int = 0,
    service_tier: object = None,
) -> TokenUsage | None:
    """The counts an upstream reported, made consistent: a part never exceeds what holds it (the
    totals win), so every count is priced once and none negatively."""
    if prompt is None or completion is None:
        return None
    # An upstream claiming more cached tokens than prompt tokens is inconsistent; the prompt total wins
    # so that ``prompt - cache`` (the uncached tokens priced at the full rate) is never negative.
    cached = min(cached, prompt)
    written = min(written, prompt - cached)
    input_audio = min(input_audio, prompt)
    # Audio that does not fit beside the cached text was read from the cache too (providers that report
    # audio input do not split their cached count): the least overlap that makes the counts add up.
    cached_audio = min(max(input_audio - (prompt - cached - written), 0), cached)
    input_audio = min(input_audio, prompt - cached - written + cached_audio)  # audio writes: not reported
    reasoning = min(reasoning, completion)
    output_audio = min(output_audio, completion - reasoning)
    tier = service_tier if isinstance(service_tier, str) and _SERVICE_TIER.fullmatch(service_tier) else None
    if not (written_1h or input_audio or output_audio or reasoning or accepted or rejected) and not (
        web_searches or web_fetches or tier
    ):
        return TokenUsage(prompt, completion, cached, written)
    detail = UsageVector(
        cache_write_1h_tokens=min(written_1h, written),
        input_audio_tokens=input_audio,
        cache_audio_read_tokens=cached_audio,
        output_audio_tokens=output_audio,
        reasoning_tokens=reasoning,
        accepted_prediction_tokens=min(accepted, completion),
        rejected_prediction_tokens=min(rejected, completion - min(accepted, completion)),
        web_searches=web_searches,
        web_fetches=web_fetches,
        service_tier=tier,
    )
    return TokenUsage(prompt, completion, cached, written, detail)


def _mapping(value: object) -> Mapping[Any, Any]:
    return value if isinstance(value, Mapping) else _EMPTY


def _count(values: Mapping[Any, Any], key: str) -> int:
    return token_count(values.get(key)) or 0


_EMPTY: Mapping[Any, Any] = {}
# What a service tier may be to be stored (it is an upstream's text): e.g. default, flex, priority.
_SERVICE_TIER = re.compile(r"[a-z0-9_-]{1,32}")


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
