"""OpenAI-shaped answers: chat completions, completions, embeddings, responses, transcriptions, models.

Shapes follow the official ``openai`` SDK's types (``openai.types``), so the SDK parses every answer.
"""

from __future__ import annotations

import base64
import io
import math
import struct
import wave
from collections.abc import Mapping
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import orjson

from meterline.testing._fake_common import (
    DONE,
    PIECE,
    Exchange,
    JsonBody,
    Plan,
    StreamBody,
    make_plan,
    prompt_tokens,
    request_limit,
    sse,
    texts_of,
)

JSON = [(b"content-type", b"application/json")]
FINGERPRINT = "fp_fake"
EMBEDDING_DIMENSIONS = 8
MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o3-mini", "text-embedding-3-small", "whisper-1"]

_ERRORS: Mapping[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "The request is invalid (fake upstream)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to do that (fake upstream)."),
    404: ("invalid_request_error", "unknown_url", "Unknown request URL."),
    405: ("invalid_request_error", None, "Method not allowed."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (fake upstream)."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def error(status: int, message: str | None = None) -> bytes:
    kind, code, default = _ERRORS.get(status, ("server_error", None, "Upstream error (fake)."))
    return orjson.dumps({"error": {"message": message or default, "type": kind, "param": None, "code": code}})


def _json(data: Any) -> JsonBody:
    return JsonBody(200, orjson.dumps(data), JSON)


def _body(req: Exchange) -> Mapping[str, Any]:
    return req.json if isinstance(req.json, dict) else {}


def _wants_usage_chunk(body: Mapping[str, Any], plan: Plan) -> bool:
    options = body.get("stream_options")
    return plan.reports_usage and isinstance(options, dict) and options.get("include_usage") is True


def _chat_usage(prompt: int, plan: Plan) -> dict[str, Any]:
    completion = plan.pieces + plan.reasoning
    prompt_total = prompt + plan.cached
    return {
        "prompt_tokens": prompt_total,
        "completion_tokens": completion,
        "total_tokens": prompt_total + completion,
        "prompt_tokens_details": {"cached_tokens": plan.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _finish(body: Mapping[str, Any], plan: Plan, *keys: str) -> str:
    return "length" if request_limit(body, *keys) is not None and not plan.capped else "stop"


# -- chat completions -------------------------------------------------------------------------------


def chat(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody | StreamBody:
    body = _body(req)
    limits = ("max_completion_tokens", "max_tokens")
    plan = make_plan(mode, params, request_limit(body, *limits))
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    prompt = prompt_tokens(texts_of(messages), len(messages))
    model = str(body.get("model", "gpt-4o-mini"))
    base = {"id": f"chatcmpl-fake{req.number}", "created": req.created, "model": model}
    finish = _finish(body, plan, *limits)
    if not body.get("stream"):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": plan.text,
            "refusal": None,
            "annotations": [],
        }
        answer: dict[str, Any] = {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }
        if plan.reports_usage:
            answer["usage"] = _chat_usage(prompt, plan)
        return _json(answer)

    with_usage = _wants_usage_chunk(body, plan)
    chunk = {**base, "object": "chat.completion.chunk", "system_fingerprint": FINGERPRINT}
    if with_usage:
        chunk["usage"] = None  # the real API sends an explicit null on every chunk but the last

    def frame(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**chunk, "choices": [choice]})

    piece_frame = frame({"content": plan.piece}, None)

    def tail() -> list[bytes]:
        frames = [frame({}, finish)]
        if with_usage:
            frames.append(sse({**chunk, "choices": [], "usage": _chat_usage(prompt, plan)}))
        frames.append(DONE)
        return frames

    head = [frame({"role": "assistant", "content": "", "refusal": None}, None)]
    return StreamBody(plan.pieces, head, lambda _: piece_frame, tail)


# -- legacy completions -----------------------------------------------------------------------------


def completions(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody | StreamBody:
    body = _body(req)
    plan = make_plan(mode, params, request_limit(body, "max_tokens"))
    raw = body.get("prompt", "")
    prompts = raw if isinstance(raw, list) else [raw]
    ids = sum(len(p) if isinstance(p, list) else 1 for p in prompts if not isinstance(p, str))
    prompt = prompt_tokens([p for p in prompts if isinstance(p, str)], 0, ids)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt + plan.cached,
        "completion_tokens": plan.pieces,
        "total_tokens": prompt + plan.cached + plan.pieces,
    }
    if plan.cached:
        usage["prompt_tokens_details"] = {"cached_tokens": plan.cached}
    base = {
        "id": f"cmpl-fake{req.number}",
        "object": "text_completion",
        "created": req.created,
        "model": str(body.get("model", "gpt-3.5-turbo-instruct")),
        "system_fingerprint": FINGERPRINT,
    }
    finish = _finish(body, plan, "max_tokens")

    def choice(text: str, finish_reason: str | None) -> list[dict[str, Any]]:
        return [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]

    if not body.get("stream"):
        answer: dict[str, Any] = {**base, "choices": choice(plan.text, finish)}
        if plan.reports_usage:
            answer["usage"] = usage
        return _json(answer)

    with_usage = _wants_usage_chunk(body, plan)
    if with_usage:
        base["usage"] = None
    piece_frame = sse({**base, "choices": choice(PIECE, None)})

    def tail() -> list[bytes]:
        frames = [sse({**base, "choices": choice("", finish)})]
        if with_usage:
            frames.append(sse({**base, "choices": [], "usage": usage}))
        return [*frames, DONE]

    return StreamBody(plan.pieces, [], lambda _: piece_frame, tail)


# -- embeddings ------------------------------------------------------------------------------------


def _vector(index: int, dimensions: int) -> list[float]:
    # Exactly representable in float32, so the base64 and float encodings decode to the same numbers.
    return [((index + j) % 8 + 1) / 8.0 for j in range(dimensions)]


def embeddings(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody:
    body = _body(req)
    plan = make_plan(mode, params, None)
    raw = body.get("input", "")
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    ids = sum(len(i) for i in inputs if isinstance(i, list))
    prompt = prompt_tokens([i for i in inputs if isinstance(i, str)], 0, ids)
    dims = body.get("dimensions")
    dimensions = dims if isinstance(dims, int) and dims > 0 else EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index in range(len(inputs)):
        vector = _vector(index, dimensions)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    answer: dict[str, Any] = {"object": "list", "data": data, "model": str(body.get("model", ""))}
    if plan.reports_usage:
        answer["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return _json(answer)


# -- responses ---------------------------------------------------------------------------------------


def _responses_usage(prompt: int, plan: Plan) -> dict[str, Any]:
    output = plan.pieces + plan.reasoning
    input_total = prompt + plan.cached
    return {
        "input_tokens": input_total,
        "input_tokens_details": {"cached_tokens": plan.cached, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning},
        "total_tokens": input_total + output,
    }


def responses(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody | StreamBody:
    body = _body(req)
    plan = make_plan(mode, params, request_limit(body, "max_output_tokens"))
    raw = body.get("input", "")
    items = raw if isinstance(raw, list) else [raw]
    instructions = body.get("instructions")
    texts = [*texts_of(instructions), *texts_of(items)]
    prompt = prompt_tokens(texts, len(items) + (1 if isinstance(instructions, str) else 0))
    item_id = f"msg_fake{req.number}"

    def message(status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [_output_text(text)]
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def response(status: str, output: list[dict[str, Any]], usage: bool) -> dict[str, Any]:
        return {
            "id": f"resp_fake{req.number}",
            "object": "response",
            "created_at": req.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": request_limit(body, "max_output_tokens"),
            "model": str(body.get("model", "gpt-4o-mini")),
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": _responses_usage(prompt, plan) if usage else None,
            "user": None,
            "metadata": {},
        }

    if not body.get("stream"):
        return _json(response("completed", [message("completed", plan.text)], plan.reports_usage))

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    head = [
        _event("response.created", 0, response=response("in_progress", [], False)),
        _event("response.in_progress", 1, response=response("in_progress", [], False)),
        _event("response.output_item.added", 2, output_index=0, item=message("in_progress", None)),
        _event("response.content_part.added", 3, **where, part=_output_text("")),
    ]
    delta = orjson.dumps({"type": "response.output_text.delta", **where, "delta": PIECE, "logprobs": []})
    # Only the sequence number changes between deltas: splice it into pre-serialized JSON.
    delta_prefix = b"event: response.output_text.delta\ndata: " + delta[:-1] + b',"sequence_number":'

    def piece(index: int) -> bytes:
        return delta_prefix + str(4 + index).encode() + b"}\n\n"

    def tail() -> list[bytes]:
        seq = 4 + plan.pieces
        text = plan.text
        done = message("completed", text)
        return [
            _event("response.output_text.done", seq, **where, text=text, logprobs=[]),
            _event("response.content_part.done", seq + 1, **where, part=_output_text(text)),
            _event("response.output_item.done", seq + 2, output_index=0, item=done),
            _event("response.completed", seq + 3, response=response("completed", [done], plan.reports_usage)),
        ]

    return StreamBody(plan.pieces, head, piece, tail)


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _event(kind: str, sequence: int, **fields: Any) -> bytes:
    return sse({"type": kind, "sequence_number": sequence, **fields}, event=kind)


# -- audio transcriptions ----------------------------------------------------------------------------


def parse_form(content_type: str, body: bytes) -> dict[str, Message]:
    """Multipart form fields by name (the stdlib MIME parser; fine for test-sized uploads)."""
    prefix = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    parsed = BytesParser(policy=HTTP).parsebytes(prefix + body)
    fields: dict[str, Message] = {}
    if parsed.is_multipart():
        for part in parsed.get_payload():
            if isinstance(part, Message):
                name = part.get_param("name", header="content-disposition")
                if isinstance(name, str):
                    fields[name] = part
    return fields


def field_text(part: Message | None) -> str | None:
    if part is None:
        return None
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None


def wav_seconds(data: bytes) -> float | None:
    try:
        with wave.open(io.BytesIO(data)) as audio:
            frames: int = audio.getnframes()
            rate: int = audio.getframerate()
    except (wave.Error, EOFError):
        return None
    return frames / rate if rate else None


def transcriptions(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody:
    plan = make_plan(mode, params, None)
    form = parse_form(req.headers.get("content-type", ""), req.body)
    upload = form.get("file")
    payload = upload.get_payload(decode=True) if upload is not None else None
    exact = wav_seconds(payload) if isinstance(payload, bytes) else None
    # Billed like the real API: whole seconds, rounded up; 1 when the file is not a readable WAV.
    seconds = math.ceil(exact) if exact is not None else 1
    duration = exact if exact is not None else 1.0
    response_format = field_text(form.get("response_format")) or "json"
    if response_format in ("text", "srt", "vtt"):
        return JsonBody(200, plan.text.encode(), [(b"content-type", b"text/plain; charset=utf-8")])
    answer: dict[str, Any] = {"text": plan.text}
    if response_format == "verbose_json":
        answer = {"task": "transcribe", "language": "english", "duration": duration, **answer, "segments": []}
    if plan.reports_usage:
        answer["usage"] = {"type": "duration", "seconds": seconds}
    return _json(answer)


# -- models ------------------------------------------------------------------------------------------

_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake"} for m in MODELS],
    }
)


def models(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody:
    return JsonBody(200, _MODELS_BODY, JSON)
