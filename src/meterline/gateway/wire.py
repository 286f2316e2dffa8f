"""What the gateway reads from and adds to the wire formats, apart from sending (``upstream``) and
metering streams (``streams``): request parsing and estimates, answers and their usage, error events.

Bodies pass through byte for byte, with two documented exceptions: ``stream_options.include_usage`` is
added to an OpenAI-style streamed request that lacks it (the gateway needs the usage; the extra chunk is
removed before the client sees it), and a non-streamed answer without ``usage`` gets one (seed 001:
every response carries usage).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from meterline import text
from meterline.errors import InvalidRequest
from meterline.gateway import tokens, usage
from meterline.gateway.audio import audio_seconds as audio_duration
from meterline.gateway.flavors import Api, TokenUsage
from meterline.gateway.sse import SSEEvent

_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_MAX_MODEL = 200
_MAX_USER = 200
_STREAMABLE: frozenset[Api] = frozenset({"chat", "completions", "responses", "messages"})
# OpenAI-style streams whose usage comes only when asked for with ``stream_options``.
_ASK_FOR_USAGE: frozenset[Api] = frozenset({"chat", "completions"})


@dataclass(frozen=True, slots=True)
class Parsed:
    """A gateway request as read from the client."""

    model: str
    stream: bool
    forward_body: bytes  # what is sent upstream
    prompt_tokens: int
    max_output_tokens: int  # the request's own maximum, else the operator's default (x n choices)
    user_id: str | None
    client_wants_usage: bool
    content_type: str | None = None  # set when the body is not JSON (multipart audio)
    audio_seconds: Decimal | None = None
    min_output: int = 1  # the least output the request can be sent with (``tokens.min_output``)
    own_output_limit: bool = True  # False when ``max_output_tokens`` is the operator's default


@dataclass(frozen=True, slots=True)
class Answer:
    """A non-streamed upstream answer: the body for the client and what it consumed."""

    body: bytes
    usage: TokenUsage
    audio_seconds: Decimal | None = None


def _json_object(raw: bytes) -> dict[Any, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _not_json(raw, exc.msg) from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def parse_json_request(api: Api, raw: bytes, default_max_tokens: int) -> Parsed:
    body = _json_object(raw)
    model = _model(body.get("model"))
    stream = body.get("stream") is True and api in _STREAMABLE
    wants_usage = True
    forward = raw
    if stream and api in _ASK_FOR_USAGE:
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not wants_usage:
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            forward = orjson.dumps(body)
    return Parsed(
        model=model,
        stream=stream,
        forward_body=forward,
        prompt_tokens=tokens.estimate_prompt_tokens(api, body, model),
        max_output_tokens=tokens.max_output_tokens(api, body, default_max_tokens),
        user_id=_user_of(api, body),
        client_wants_usage=wants_usage,
        min_output=tokens.min_output(api, body),
        # Only chat and Responses answers may run past the default when the request names no limit:
        # Anthropic requires one, legacy completions default to 16 tokens, embeddings produce none.
        own_output_limit=api not in ("chat", "responses") or tokens.own_output_limit(api, body) is not None,
    )


def model_of(raw: bytes) -> str:
    """The model a JSON request names (a request the gateway passes on without metering it)."""
    return _model(_json_object(raw).get("model"))


def with_output_limit(api: Api, forward: bytes, total: int) -> bytes:
    """``forward`` telling the upstream to produce at most ``total`` output tokens in all (split over the
    choices it asks for): in the field the request used, else the flavor's own. Only when a block limit
    on tokens holds the request and left less than it asked for, or it asked for no limit
    (``exchange.Ticket.max_output``)."""
    body = orjson.loads(forward)
    if api == "chat":
        named = body.get("max_tokens") is not None and body.get("max_completion_tokens") is None
        key = "max_tokens" if named else "max_completion_tokens"
        choices = tokens.choices(api, body)
    elif api == "completions":
        key, choices = "max_tokens", tokens.choices(api, body)
    elif api == "responses":
        key, choices = "max_output_tokens", 1
    else:
        key, choices = "max_tokens", 1
    body[key] = max(total // choices, 1)
    return orjson.dumps(body)


def with_model(forward: bytes, content_type: str | None, model: str) -> bytes:
    """``forward`` naming ``model`` where the client named its own (a route's ``aliases``): the JSON
    body's ``model``, or the ``model`` field of a multipart upload (``content_type`` set)."""
    if content_type is None:
        body = orjson.loads(forward)
        body["model"] = model
        return orjson.dumps(body)
    found = _BOUNDARY.search(content_type)
    if found is None:
        return forward
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    parts = forward.split(delimiter)
    for index in range(1, len(parts) - 1):
        head, blank, _value = parts[index].partition(b"\r\n\r\n")
        if blank and _MODEL_FIELD.search(head):
            parts[index] = head + blank + model.encode() + b"\r\n"
            break
    return delimiter.join(parts)


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)
_MODEL_FIELD = re.compile(rb'^content-disposition:[^\r\n]*;\s*name="model"\s*(?:;|$)', re.I | re.M)


def _not_json(raw: bytes, reason: str) -> InvalidRequest:
    """orjson refuses unpaired surrogates as malformed; the lenient parser finds which field held one."""
    found = text.find_in_json(raw, max_length=None)
    if found is not None:
        return InvalidRequest(f"{found[0]} {found[1]}", param=found[0] or None)
    return InvalidRequest(f"request body must be JSON: {reason}")


def parse_transcription(
    raw: bytes, content_type: str, fields: Mapping[str, str], file: tuple[str, str, bytes] | None
) -> Parsed:
    """A multipart ``/v1/audio/transcriptions`` request: forwarded as it came, billed by audio seconds."""
    if file is None:
        raise InvalidRequest("multipart field 'file' (the audio) is required", param="file")
    filename, file_type, data = file
    return Parsed(
        model=_model(fields.get("model")),
        stream=False,
        forward_body=raw,
        prompt_tokens=0,
        max_output_tokens=0,
        user_id=_text(fields.get("user"), _MAX_USER, "user"),
        client_wants_usage=True,
        content_type=content_type,
        audio_seconds=audio_duration(filename, file_type, data),
    )


def _model(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest('model is required: name the model to call, e.g. "gpt-4o-mini"', param="model")
    if (reason := text.problem(value, _MAX_MODEL)) is not None:
        raise InvalidRequest(f"model {reason}", param="model")
    return value


def _text(value: object, limit: int, param: str) -> str | None:
    """A text field the gateway stores (the end user): refused if it cannot be stored, ignored if long."""
    if not isinstance(value, str) or not value:
        return None
    if (reason := text.problem(value, None)) is not None:
        raise InvalidRequest(f"{param} {reason}", param=param)
    return value if len(value) <= limit else None


def _user_of(api: Api, body: Mapping[str, Any]) -> str | None:
    if api == "messages":
        metadata = body.get("metadata")
        return (
            _text(metadata.get("user_id"), _MAX_USER, "metadata.user_id")
            if isinstance(metadata, dict)
            else None
        )
    return _text(body.get("user"), _MAX_USER, "user")


def receipt_opt_out(value: str | None) -> bool:
    """``X-Meterline-Receipt: false`` opts out of a receipt (seed 004)."""
    if value is None:
        return False
    flag = value.strip().lower()
    if flag in ("false", "0", "no", "off"):
        return True
    if flag in ("true", "1", "yes", "on"):
        return False
    raise InvalidRequest("X-Meterline-Receipt must be true or false", param="X-Meterline-Receipt")


def source_of(value: str | None) -> str | None:
    """``X-Meterline-Source`` (web, cli, api, ...: seed 002's chart lines)."""
    if value is None:
        return None
    source = value.strip().lower()
    if not _SOURCE.match(source):
        raise InvalidRequest(
            "X-Meterline-Source must be 1-32 lowercase letters, digits, '_', '.' or '-' (e.g. web, cli)",
            param="X-Meterline-Source",
        )
    return source


def is_event_stream(headers: Mapping[str, str]) -> bool:
    return headers.get("content-type", "").startswith("text/event-stream")


def is_terminal(api: Api, event: SSEEvent) -> bool:
    """The event that ends a successful stream (the row is written before it is passed on)."""
    if api == "messages":
        return event.event == "message_stop"
    if api == "responses":
        return event.event in ("response.completed", "response.incomplete", "response.failed")
    return event.data == "[DONE]"


def usage_event(api: Api, model: str, counts: TokenUsage) -> bytes:
    """A chat/completions usage-only chunk (``"choices": []`` with ``usage``), for a client that asked
    for usage (``stream_options.include_usage``) of an upstream that sent none: seed 001, every
    response carries usage."""
    chat = api == "chat"
    chunk: dict[str, Any] = {
        "id": "chatcmpl-meterline-usage" if chat else "cmpl-meterline-usage",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": usage.usage_for("chat", counts),
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def error_event(api: Api, code: str, message: str) -> bytes:
    """A final error event in the stream's own format, which the provider's SDK raises as an error."""
    if api == "messages":
        payload = {"type": "error", "error": {"type": code, "message": message}}
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
    body = orjson.dumps({"error": {"type": code, "code": code, "message": message}})
    if api == "responses":
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


def read_answer(api: Api, parsed: Parsed, content: bytes, content_type: str | None) -> Answer:
    """The usage of a non-streamed answer: the upstream's own count, else counted here."""
    if api == "transcriptions":
        return _transcription_answer(parsed, content)
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return Answer(content, TokenUsage(parsed.prompt_tokens, 0))
    reported = usage.usage_from_response(api, data)
    if reported is not None:
        return Answer(content, reported)
    counted = TokenUsage(
        parsed.prompt_tokens, tokens.count_tokens(usage.generated_text(api, data), parsed.model)
    )
    return Answer(orjson.dumps(usage.with_usage(api, data, counted)), counted)


def _transcription_answer(parsed: Parsed, content: bytes) -> Answer:
    # Parsed with Decimal floats: a duration is money's factor here and must not pass through float.
    try:
        data = json.loads(content, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        return Answer(content, TokenUsage(0, 0), parsed.audio_seconds)
    seconds = parsed.audio_seconds
    if not isinstance(data, dict):
        return Answer(content, TokenUsage(0, 0), seconds)
    reported = data.get("usage")
    if isinstance(reported, dict):
        if reported.get("type") == "duration":
            seconds = _seconds(reported.get("seconds")) or seconds
        return Answer(content, TokenUsage(0, 0), seconds)
    if data.get("duration") is not None:
        seconds = _seconds(data.get("duration")) or seconds
    if seconds is None:
        return Answer(content, TokenUsage(0, 0), seconds)
    # Seed 001: every response carries usage. The duration billed, in OpenAI's own shape, added at the
    # end of the object as it came (its other numbers are passed on as the upstream wrote them).
    body = content.rstrip()
    if not body.endswith(b"}"):
        return Answer(content, TokenUsage(0, 0), seconds)
    shown = b'"usage":{"type":"duration","seconds":' + str(seconds).encode() + b"}}"
    joined = body[:-1].rstrip() + (b"" if body[:-1].rstrip().endswith(b"{") else b",") + shown
    return Answer(joined, TokenUsage(0, 0), seconds)


def _seconds(value: object) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return None
    try:
        seconds = Decimal(value)
    except InvalidOperation:
        return None
    return seconds if seconds.is_finite() and 0 <= seconds <= 86_400 * 7 else None


def upstream_message(content: bytes) -> str:
    """The message of an upstream's error body (OpenAI's and Anthropic's shapes), shortened."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:200].decode("utf-8", "replace") or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(data.get("message"), str):
            return str(data["message"])[:500]
    return "(no message)"
