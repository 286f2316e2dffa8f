"""The gateway's endpoints (SPEC §3): OpenAI-compatible and Anthropic ``/v1/messages`` (and its
``count_tokens``), ``/v1/models``, and Prometheus ``/metrics``.

The application answers the six relay endpoints ahead of FastAPI's routing
(``meterline.api.gateway.RelayEndpoints``); the FastAPI routes here answer the same way, through the same
``respond``, and are what OpenAPI documents."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from meterline.api.auth import get_principal
from meterline.api.gateway import count_tokens, gateway_of, respond
from meterline.api.responses import JSON
from meterline.errors import Forbidden, Unauthorized

router = APIRouter(tags=["gateway"])


def _body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """The request body as documented in OpenAPI: the fields the gateway reads; everything else in the
    provider's schema passes through to the upstream unchanged."""
    schema = {"type": "object", "required": required, "properties": properties, "additionalProperties": True}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_MESSAGES = {"type": "array", "items": {"type": "object"}}
_COMMON = {
    "model": {"type": "string"},
    "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer"},
    "user": {"type": "string"},
}
CHAT = _body(
    ["model", "messages"], {**_COMMON, "messages": _MESSAGES, "max_completion_tokens": {"type": "integer"}}
)
COMPLETIONS = _body(["model", "prompt"], {**_COMMON, "prompt": {}})
EMBEDDINGS = _body(["model", "input"], {"model": {"type": "string"}, "input": {}})
RESPONSES = _body(["model", "input"], {**_COMMON, "input": {}, "max_output_tokens": {"type": "integer"}})
MESSAGES = _body(["model", "messages", "max_tokens"], {**_COMMON, "messages": _MESSAGES, "system": {}})
COUNT_TOKENS = _body(
    ["model", "messages"], {"model": {"type": "string"}, "messages": _MESSAGES, "system": {}}
)


@router.post("/v1/chat/completions", response_model=None, openapi_extra=CHAT)
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, streamed or not, metered and forwarded to the model's routes."""
    return await respond(request, "/v1/chat/completions")


@router.post("/v1/completions", response_model=None, openapi_extra=COMPLETIONS)
async def completions(request: Request) -> Response:
    """OpenAI legacy completions."""
    return await respond(request, "/v1/completions")


@router.post("/v1/embeddings", response_model=None, openapi_extra=EMBEDDINGS)
async def embeddings(request: Request) -> Response:
    """OpenAI embeddings (billed by input tokens)."""
    return await respond(request, "/v1/embeddings")


@router.post("/v1/responses", response_model=None, openapi_extra=RESPONSES)
async def responses(request: Request) -> Response:
    """OpenAI Responses API, streamed or not."""
    return await respond(request, "/v1/responses")


@router.post("/v1/audio/transcriptions", response_model=None)
async def transcriptions(request: Request) -> Response:
    """OpenAI audio transcriptions (multipart; billed by audio seconds)."""
    return await respond(request, "/v1/audio/transcriptions")


@router.post("/v1/messages", response_model=None, openapi_extra=MESSAGES)
async def messages(request: Request) -> Response:
    """Anthropic messages, streamed or not (authenticate with ``x-api-key`` or a bearer token)."""
    return await respond(request, "/v1/messages")


@router.post("/v1/messages/count_tokens", response_model=None, openapi_extra=COUNT_TOKENS)
async def messages_count_tokens(request: Request) -> Response:
    """Anthropic token counting, passed to an upstream serving the model: needs a key, never billed."""
    return await count_tokens(request)


@router.get("/v1/models")
async def models(request: Request) -> JSON:
    """The models the routes serve: those they name, and for patterns the upstream's own list (kept ten
    minutes) or, when it cannot be had, the price book's models of the route's provider, filtered by the
    patterns."""
    gateway = gateway_of(request)
    await run_in_threadpool(get_principal, request, gateway.services, gateway.tokens)
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": route.upstream.owned_by or route.provider}
        for model, route in await gateway.catalog.models()
    ]
    return JSON({"object": "list", "data": data})


def _on_loopback(request: Request) -> bool:
    host = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format: gateway requests, latency, upstream errors, failovers, refusals, in flight.

    Counts by organization-free labels, but still the deployment's traffic: with ``metrics_token`` set it
    wants that bearer token; without, only a client on loopback (a scraper beside the process) is
    answered. Behind a local reverse proxy that forwards the client's address, remote scrapes are refused
    too, as they should be."""
    gateway = gateway_of(request)
    token = gateway.services.settings.metrics_token
    if token is not None:
        given = request.headers.get("authorization", "")
        scheme, _, credential = given.partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), expected):
            raise Unauthorized("GET /metrics wants the deployment's metrics_token as a bearer token")
    elif not _on_loopback(request):
        raise Forbidden(
            "GET /metrics answers only clients on loopback; set metrics_token to scrape it from elsewhere "
            "(sent as Authorization: Bearer <metrics_token>)"
        )
    registry = gateway.metrics
    return Response(registry.render(), media_type=registry.content_type)
