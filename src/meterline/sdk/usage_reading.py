"""Reading ``usage`` from what LLM SDKs return: OpenAI-compatible chat, completions, responses and
embeddings answers and Anthropic messages, as SDK objects or plain dicts, whole or just their ``usage``.

The counting rules are the gateway's (``meterline.gateway.usage``): prompt tokens include cached
tokens, and Anthropic's separately reported cache reads/writes are added back in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal

from meterline.gateway.flavors import TokenUsage
from meterline.gateway.usage import anthropic_usage, openai_chat_usage, openai_responses_usage, token_count

Kind = Literal["chat", "completions", "embeddings", "responses", "messages"]

# The ledger's ``modality`` of each kind (SPEC §4's event field).
MODALITY: dict[Kind, str] = {
    "chat": "chat",
    "completions": "completion",
    "embeddings": "embedding",
    "responses": "responses",
    "messages": "chat",
}
ENDPOINT: dict[Kind, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
_OBJECT_KINDS: dict[str, Kind] = {
    "chat.completion": "chat",
    "chat.completion.chunk": "chat",
    "text_completion": "completions",
    "list": "embeddings",
    "response": "responses",
}


@dataclass(frozen=True, slots=True)
class ReadUsage:
    kind: Kind
    tokens: TokenUsage
    model: str | None
    provider: str | None


# Plain objects are read this deep (a response, its usage, the usage's details, and one more).
_PLAIN_DEPTH = 4


def as_mapping(value: object) -> Mapping[str, Any] | None:
    """A dict view of an SDK object (pydantic models of the openai/anthropic SDKs), a mapping, or a plain
    attribute object as hand-written code makes them (a dataclass, ``types.SimpleNamespace``, any object
    with public attributes: seed 001's tracker reads ``usage.total_tokens``)."""
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        dumped = dump()
        return dumped if isinstance(dumped, Mapping) else None
    plain = _plain(value, _PLAIN_DEPTH)
    return plain if isinstance(plain, dict) else None


def _plain(value: object, depth: int) -> object:
    """``value`` with its attribute objects turned into dicts of their public attributes (nested ones
    too, ``depth`` levels down); numbers, strings, mappings and lists as they are."""
    if value is None or isinstance(value, str | int | float | bool | Mapping | list | tuple) or depth <= 0:
        return value
    if is_dataclass(value) and not isinstance(value, type):
        attributes = {f.name: getattr(value, f.name) for f in fields(value)}
    else:
        found = getattr(value, "__dict__", None)
        if not isinstance(found, dict) or isinstance(value, type):
            return value
        attributes = found
    return {
        name: _plain(item, depth - 1)
        for name, item in attributes.items()
        if isinstance(name, str) and not name.startswith("_") and not callable(item)
    }


def read_usage(value: object) -> ReadUsage | None:
    """The usage of a whole response, or of a bare ``usage`` object; None when there is none."""
    data = as_mapping(value)
    if data is None:
        return None
    usage = as_mapping(data.get("usage"))
    if usage is None:
        return _bare(data)
    model = data.get("model") if isinstance(data.get("model"), str) else None
    kind = _kind_of_response(data, usage)
    tokens = _tokens(kind, usage, data)
    if tokens is None:
        return None
    return ReadUsage(kind, tokens, model, "anthropic" if kind == "messages" else None)


def _kind_of_response(data: Mapping[str, Any], usage: Mapping[str, Any]) -> Kind:
    if data.get("type") == "message":
        return "messages"
    found = _OBJECT_KINDS.get(str(data.get("object")))
    return found if found is not None else _kind_of_usage(usage)


def _kind_of_usage(usage: Mapping[str, Any]) -> Kind:
    if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:
        return "messages"
    if "input_tokens" in usage:
        # Responses usage has a total; Anthropic's never does.
        return "responses" if "total_tokens" in usage else "messages"
    return "chat" if usage.get("completion_tokens") is not None else "embeddings"


def _bare(usage: Mapping[str, Any]) -> ReadUsage | None:
    if not any(k in usage for k in ("prompt_tokens", "input_tokens")):
        return None
    kind = _kind_of_usage(usage)
    tokens = _tokens(kind, usage, {})
    return (
        None if tokens is None else ReadUsage(kind, tokens, None, "anthropic" if kind == "messages" else None)
    )


def _tokens(kind: Kind, usage: Mapping[str, Any], response: Mapping[str, Any]) -> TokenUsage | None:
    """``usage`` read as the gateway reads it; ``response`` (empty for a bare ``usage``) holds what an
    answer reports beside it: its service tier, a Responses answer's web search calls."""
    if kind in ("chat", "completions"):
        return openai_chat_usage(usage, response.get("service_tier"))
    if kind == "embeddings":
        prompt = token_count(usage.get("prompt_tokens"))
        return None if prompt is None else TokenUsage(prompt, 0)
    if kind == "responses":
        return openai_responses_usage(usage, response)
    return anthropic_usage(usage, None)
