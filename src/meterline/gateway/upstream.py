"""Sending a request to the upstreams of a model, with failover.

A route is abandoned for the next one on a connect error, a timeout, a 5xx or a 429: the request never
reached a model, or the provider asks us to go elsewhere, so trying the next route is safe and costs the
caller nothing. Any other answer (2xx, or a 4xx that is the request's own fault) is final. For a stream,
the choice is made before the first byte of the body is passed on, so a client never sees two answers.

Upstream keys are attached here and nowhere else; the client's own credentials are never forwarded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from meterline.gateway.routing import Route

log = logging.getLogger("meterline.gateway")

# Request headers a client may pass to the upstream. Everything else (Authorization, x-api-key, cookies,
# proxy headers, the client's own tracing) stays here.
_FORWARDED = frozenset(
    {
        b"content-type",
        b"accept",
        b"openai-beta",
        b"anthropic-version",
        b"anthropic-beta",
    }
)
_ANTHROPIC_VERSION = "2023-06-01"
# Enough of an upstream error body to say what went wrong in the log; never sent to the client.
_ERROR_BODY_BYTES = 2048


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one route was given up."""

    route: str
    kind: str  # connect | timeout | status | protocol
    status: int | None = None
    detail: str = ""


@dataclass(slots=True)
class Opened:
    """An upstream answered: the response is open (its body not yet read)."""

    route: Route
    response: httpx.Response
    failures: list[Failure] = field(default_factory=list)

    @property
    def failover(self) -> bool:
        return bool(self.failures)


class AllRoutesFailed(Exception):
    def __init__(self, failures: Sequence[Failure]) -> None:
        super().__init__("; ".join(f"{f.route}: {f.kind}" for f in failures))
        self.failures = list(failures)


def upstream_headers(route: Route, client_headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in client_headers
        if name in _FORWARDED
    }
    key = route.upstream.api_key
    if route.upstream.wire_api == "anthropic":
        headers.setdefault("anthropic-version", _ANTHROPIC_VERSION)
        if key is not None:
            headers["x-api-key"] = key.get_secret_value()
    elif key is not None:
        headers["authorization"] = f"Bearer {key.get_secret_value()}"
    return headers


class Upstreams:
    """One pooled HTTP client for every upstream of the process."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=2000, max_keepalive_connections=512, keepalive_expiry=30),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open(
        self,
        routes: Sequence[Route],
        path: str,
        body: bytes,
        client_headers: Sequence[tuple[bytes, bytes]],
        *,
        content_type: str | None = None,
    ) -> Opened:
        """POST ``body`` to ``path`` on the first route that answers for good (see the module docstring)."""
        failures: list[Failure] = []
        for route in routes:
            upstream = route.upstream
            headers = upstream_headers(route, client_headers)
            if content_type is not None:
                headers["content-type"] = content_type
            timeout = httpx.Timeout(upstream.timeout_seconds, connect=upstream.connect_timeout_seconds)
            request = self._client.build_request(
                "POST", upstream.base_url.rstrip("/") + path, content=body, headers=headers, timeout=timeout
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException:
                failures.append(Failure(route.name, "timeout"))
                continue
            except httpx.TransportError as exc:
                failures.append(Failure(route.name, "connect", detail=type(exc).__name__))
                continue
            if response.status_code >= 500 or response.status_code == 429:
                detail = scrub(await _error_text(response), route)
                failures.append(Failure(route.name, "status", response.status_code, detail))
                continue
            return Opened(route, response, failures)
        for failure in failures:
            log.warning(
                "upstream %s failed: %s %s %s",
                failure.route,
                failure.kind,
                failure.status or "",
                failure.detail,
            )
        raise AllRoutesFailed(failures)


async def _error_text(response: httpx.Response) -> str:
    """A short, single-line excerpt of an upstream's error body (for the log only)."""
    try:
        data = b""
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) >= _ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        data = b""
    finally:
        await response.aclose()
    return data[:_ERROR_BODY_BYTES].decode("utf-8", "replace").replace("\n", " ")


def scrub(text: str, route: Route) -> str:
    """``text`` with the route's key blanked out, in case an upstream echoes it back in an error."""
    key = route.upstream.api_key
    secret = key.get_secret_value() if key is not None else ""
    return text.replace(secret, "***") if len(secret) >= 4 else text
