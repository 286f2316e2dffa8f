"""OpenTelemetry GenAI spans as usage events: which attributes the real instrumentations set, and how one
span becomes one event of ``POST /v1/events`` (the same validation and settle follow).

A span is a model call when it names a model and reports a token count. The attribute names differ by
instrumentation and by semantic-conventions release, so each figure is looked up in a list of names, the
current GenAI convention first (docs/opentelemetry.md has the table):

* the official ``opentelemetry-instrumentation-openai-v2`` and OpenLLMetry's openai/anthropic
  instrumentations set ``gen_ai.*`` (older releases ``gen_ai.usage.prompt_tokens``, ``llm.usage.*``);
* OpenInference sets ``llm.model_name``, ``llm.token_count.*`` and ``llm.system``/``llm.provider``.

Counts follow the ledger's convention (the GenAI one): input tokens include cache reads and writes. A
span whose cached tokens exceed its input count reported input without them (Anthropic's own
convention), and they are added back.

One call is one event, however many spans of its trace report it: with the Anthropic SDK's own tracing
on, OpenLLMetry's Anthropic instrumentation adds a second span (``anthropic.chat`` beside the SDK's
``anthropic.messages.create``) with the same response id. The event's id is therefore the trace and the
provider's response id when the span has one, else the trace and span ids; either way an exporter's
retry counts once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MODEL = ("gen_ai.response.model", "gen_ai.request.model", "llm.model_name", "embedding.model_name")
PROVIDER = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
INPUT = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.prompt_tokens",
    "llm.usage.prompt_tokens",
    "llm.token_count.prompt",
)
OUTPUT = (
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.usage.completion_tokens",
    "llm.token_count.completion",
)
CACHE_READ = (
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_read_input_tokens",
    "llm.token_count.prompt_details.cache_read",
)
CACHE_WRITE = (
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_write.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens",
    "llm.token_count.prompt_details.cache_write",
)
REASONING = (
    "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.reasoning_tokens",
    "llm.token_count.completion_details.reasoning",
)
RESPONSE_ID = ("gen_ai.response.id",)
OPERATION = ("gen_ai.operation.name",)
USER = ("user.id", "enduser.id", "gen_ai.user")
IDENTIFIER = ("meterline.identifier_id",)
SOURCE = ("meterline.source",)
SERVICE = ("service.name",)

# The gateway endpoint a call of this operation would have used: the rows read alike either way.
_ENDPOINTS = {
    ("chat", "anthropic"): "/v1/messages",
    ("chat", None): "/v1/chat/completions",
    ("text_completion", None): "/v1/completions",
    ("embeddings", None): "/v1/embeddings",
}
# GenAI ``gen_ai.provider.name`` values that name a platform, as the price book names its provider.
_PROVIDERS = {
    "gcp.vertex_ai": "google",
    "gcp.gemini": "google",
    "aws.bedrock": "aws",
    "az.ai.openai": "azure",
}
_SOURCE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass(frozen=True, slots=True)
class Span:
    """What an OTLP span says, decoded: ids in lowercase hex, attributes as plain Python values."""

    trace_id: str
    span_id: str
    name: str
    end: datetime
    attributes: Mapping[str, Any]
    resource: Mapping[str, Any]


def _first(attributes: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = attributes.get(name)
        if value is not None and value != "":
            return value
    return None


def _count(attributes: Mapping[str, Any], names: Sequence[str]) -> int | None:
    value = _first(attributes, names)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _source(value: str | None) -> str | None:
    """``service.name`` as a row's source: lower case, only the characters a source may hold."""
    if value is None:
        return None
    cleaned = "".join(ch if ch in _SOURCE_CHARS else "-" for ch in value.lower()).strip("-")[:32]
    return cleaned or None


def ids_valid(span: Span) -> bool:
    """OTLP's ids: a trace id of 16 bytes and a span id of 8, neither all zeros."""
    return (
        len(span.trace_id) == 32
        and len(span.span_id) == 16
        and span.trace_id.strip("0") != ""
        and span.span_id.strip("0") != ""
    )


def event_id(span: Span, provider: str | None) -> str:
    """The trace and the provider's response id when the span has one (two spans of one call, in one
    trace, are one event; a server that reuses response ids across calls loses nothing), else the trace
    and span ids. Either way a resent span is the same event."""
    response = _text(_first(span.attributes, RESPONSE_ID))
    if response is not None:
        digest = hashlib.sha256(f"{span.trace_id}\x00{provider}\x00{response}".encode()).hexdigest()[:40]
        return f"otel:response:{digest}"
    return f"otel:span:{span.trace_id}:{span.span_id}"


def event_of(span: Span) -> dict[str, Any] | None:
    """The ``POST /v1/events`` body of a GenAI span, or None for a span that is not a model call."""
    attributes = span.attributes
    model = _text(_first(attributes, MODEL))
    prompt = _count(attributes, INPUT)
    completion = _count(attributes, OUTPUT)
    if model is None or (prompt is None and completion is None):
        return None
    provider = _text(_first(attributes, PROVIDER))
    provider = None if provider is None else _PROVIDERS.get(provider.lower(), provider.lower())
    cache_read = _count(attributes, CACHE_READ) or 0
    cache_write = _count(attributes, CACHE_WRITE) or 0
    prompt = prompt or 0
    if cache_read + cache_write > prompt:
        prompt += cache_read + cache_write  # reported without its cached part
    operation = _text(_first(attributes, OPERATION))
    if operation is None and attributes.get("openinference.span.kind") == "EMBEDDING":
        operation = "embeddings"
    endpoint = _ENDPOINTS.get((operation or "chat", provider)) or _ENDPOINTS.get((operation or "chat", None))
    event: dict[str, Any] = {
        "id": event_id(span, provider),
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion or 0,
        "cache_read_tokens": cache_read,
        "cache_write_tokens": cache_write,
        "timestamp": span.end.isoformat(),
    }
    reasoning = _count(attributes, REASONING)
    if reasoning:
        event["reasoning_tokens"] = reasoning
    optional = {
        "provider": provider,
        "endpoint": endpoint,
        "user_id": _text(_first(attributes, USER)) or _text(_first(span.resource, USER)),
        "identifier_id": _text(_first(attributes, IDENTIFIER)) or _text(_first(span.resource, IDENTIFIER)),
        "source": _source(
            _text(_first(attributes, SOURCE))
            or _text(_first(span.resource, SOURCE))
            or _text(_first(span.resource, SERVICE))
        ),
    }
    event.update({k: v for k, v in optional.items() if v is not None})
    return event


__all__ = ["Span", "event_id", "event_of", "ids_valid"]
