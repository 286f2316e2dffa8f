"""Anthropic-shaped answers for ``POST /v1/messages``, following the ``anthropic`` SDK's types."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from meterline.testing._fake_common import (
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

_ERRORS: Mapping[int, tuple[str, str]] = {
    400: ("invalid_request_error", "The request is invalid (fake upstream)."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found."),
    405: ("invalid_request_error", "Method not allowed."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Rate limited (fake upstream)."),
    500: ("api_error", "Internal server error (fake upstream)."),
    503: ("overloaded_error", "Overloaded (fake upstream)."),
    529: ("overloaded_error", "Overloaded (fake upstream)."),
}


def error(status: int, message: str | None = None, request_id: str = "req_fake") -> bytes:
    kind, default = _ERRORS.get(status, ("api_error", "Upstream error (fake)."))
    error_object = {"type": kind, "message": message or default}
    return orjson.dumps({"type": "error", "error": error_object, "request_id": request_id})


def _usage(prompt: int, plan: Plan, output_tokens: int) -> dict[str, Any]:
    # Anthropic's input_tokens excludes cache reads and writes; the three add up to the whole prompt.
    usage: dict[str, Any] = {
        "input_tokens": prompt,
        "cache_creation_input_tokens": plan.cache_write,
        "cache_read_input_tokens": plan.cache_read,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    written_1h = int(plan.params.get("cache_creation_1h_tokens", 0)) if plan.mode == "cache" else 0
    if written_1h:  # the API's split of the writes by cache lifetime
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": plan.cache_write - written_1h,
            "ephemeral_1h_input_tokens": written_1h,
        }
    searches = int(plan.params.get("web_search_requests", 0))
    if searches:
        usage["server_tool_use"] = {"web_search_requests": searches, "web_fetch_requests": 0}
    return usage


def _prompt_of(body: Mapping[str, Any]) -> int:
    turns = body.get("messages")
    turns = turns if isinstance(turns, list) else []
    system = body.get("system")
    return prompt_tokens([*texts_of(system), *texts_of(turns)], len(turns) + (1 if system else 0))


def count_tokens(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody:
    """``POST /v1/messages/count_tokens``: the prompt count P a ``messages`` request would report."""
    body: Mapping[str, Any] = req.json if isinstance(req.json, dict) else {}
    return JsonBody(200, orjson.dumps({"input_tokens": _prompt_of(body)}), _JSON)


# Anthropic's own model list (``GET /v1/models`` with an ``anthropic-version`` header).
MODELS = ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]
_MODELS_BODY = orjson.dumps(
    {
        "data": [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in MODELS
        ],
        "has_more": False,
        "first_id": MODELS[0],
        "last_id": MODELS[-1],
    }
)


def models(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody:
    return JsonBody(200, _MODELS_BODY, _JSON)


_JSON = [(b"content-type", b"application/json")]


def messages(req: Exchange, mode: str, params: Mapping[str, Any]) -> JsonBody | StreamBody:
    body: Mapping[str, Any] = req.json if isinstance(req.json, dict) else {}
    limit = request_limit(body, "max_tokens")
    plan = make_plan(mode, params, limit)
    prompt = _prompt_of(body)
    stop_reason = "max_tokens" if limit is not None and not plan.capped else "end_turn"
    message: dict[str, Any] = {
        "id": f"msg_fake{req.number}",
        "type": "message",
        "role": "assistant",
        "model": str(body.get("model", "claude-sonnet-4-5")),
        "content": [{"type": "text", "text": plan.text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
    }
    output = plan.pieces + plan.reasoning
    if not body.get("stream"):
        if plan.reports_usage:
            message["usage"] = _usage(prompt, plan, output)
        return JsonBody(200, orjson.dumps(message), [(b"content-type", b"application/json")])

    start = {**message, "content": [], "stop_reason": None}
    if plan.reports_usage:
        # As the real API: message_start carries the input side and a provisional output count of 1.
        start["usage"] = _usage(prompt, plan, 1)
    head = [
        sse({"type": "message_start", "message": start}, event="message_start"),
        sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            event="content_block_start",
        ),
        sse({"type": "ping"}, event="ping"),
    ]
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": PIECE}}
    piece_frame = sse(delta, event="content_block_delta")

    def tail() -> list[bytes]:
        final: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        }
        if plan.reports_usage:
            final["usage"] = {"output_tokens": output}
            searches = int(plan.params.get("web_search_requests", 0))
            if searches:  # cumulative, as the real API reports server tool use at the end
                final["usage"]["server_tool_use"] = {"web_search_requests": searches, "web_fetch_requests": 0}
        return [
            sse({"type": "content_block_stop", "index": 0}, event="content_block_stop"),
            sse(final, event="message_delta"),
            sse({"type": "message_stop"}, event="message_stop"),
        ]

    return StreamBody(plan.pieces, head, lambda _: piece_frame, tail)
