"""Reading ``usage`` from what LLM SDKs return: OpenAI-compatible chat, completions, responses and
embeddings answers and Anthropic messages, as SDK objects or plain dicts, whole or just their ``usage``.

The counting rules are the gateway's (``meterline.gateway.usage``): prompt tokens include cached
tokens, and Anthropic's separately reported cache reads/writes are added back in."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


def as_mapping(value: object) -> Mapping[str, Any] | None:
    """A dict view of an SDK object (pydantic models of the openai/anthropic SDKs), a mapping, or a plain
    attribute object as hand-written code makes them (a dataclass, ``types.SimpleNamespace``, any object
    with public attributes or properties: seed 001's tracker reads ``usage.total_tokens``)."""
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        dumped = dump()
        return dumped if isinstance(dumped, Mapping) else None
    if _is_plain(value):
        return _Attributes(value)
    return None


def _is_plain(value: object) -> bool:
    return not isinstance(value, str | bytes | int | float | bool | list | tuple | type) and value is not None


class _Attributes(Mapping[str, Any]):
    """An object's public attributes read as a mapping, lazily: only the names asked for are read (an
    object graph is never walked whole), nested objects are views too, and a name the object does not
    have, a private one or a method is simply absent."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __getitem__(self, name: str) -> Any:
        if not isinstance(name, str) or name.startswith("_"):
            raise KeyError(name)
        try:
            found = getattr(self._value, name)
        except AttributeError:
            raise KeyError(name) from None
        if callable(found) and not isinstance(found, type):
            raise KeyError(name)
        if isinstance(found, Mapping) or not _is_plain(found):
            return found
        return as_mapping(found)

    def _names(self) -> list[str]:
        value = self._value
        if is_dataclass(value):
            names = [f.name for f in fields(value)]
        else:
            names = list(getattr(value, "__dict__", {}))
            names += [n for cls in type(value).__mro__ for n in getattr(cls, "__slots__", ())]
        return [n for n in dict.fromkeys(names) if isinstance(n, str) and not n.startswith("_")]

    def __iter__(self) -> Iterator[str]:
        return iter(n for n in self._names() if n in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True


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
