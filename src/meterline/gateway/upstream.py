"""Sending a request to the upstreams of a model, with failover.

A route is abandoned for the next one on a connect error, a timeout, a 5xx or a 429: the request never
reached a model, or the provider asks us to go elsewhere, so trying the next route is safe and costs the
caller nothing. Any other answer (2xx, or a 4xx that is the request's own fault) is final. For a stream,
the choice is made before the first byte of the body is passed on, so a client never sees two answers.

Upstream keys are attached here and nowhere else; the client's own credentials are never forwarded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from meterline.gateway.routing import Route
from meterline.gateway.wire import with_model

log = logging.getLogger("meterline.gateway")

# aiohttp rather than httpx for the upstream leg: measured on this code's request shape, httpx spent about
# 520 µs of CPU per proxied request against aiohttp's 110 µs, and this is the gateway's hot path.
# What an upstream can fail with once it is being read (the connection breaks, the body is malformed or
# the next byte does not come in time).
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)

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
# Listing an upstream's models is not a request's path: a short wait, and a bounded answer.
_LIST_TIMEOUT_S = 10.0
_LIST_MAX_BYTES = 4 * 1024 * 1024
# Enough of an upstream error body to say what went wrong in the log; never sent to the client.
_ERROR_BODY_BYTES = 2048


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one route was given up."""

    route: str
    kind: str  # connect | timeout | status | protocol
    status: int | None = None
    detail: str = ""


class UpstreamResponse:
    """An upstream's open answer: status and headers are known, the body is read on demand."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = response.headers

    async def aread(self) -> bytes:
        return await self._response.read()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        self._response.release()
        if not self._response.content.at_eof():
            # Not read to the end (a client left, a stream was cut): the connection cannot be reused.
            self._response.close()


@dataclass(slots=True)
class Opened:
    """An upstream answered: the response is open (its body not yet read)."""

    route: Route
    response: UpstreamResponse
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
    target = route.target
    for name, value in target.default_headers.items():
        headers.setdefault(name, value)
    headers.update(target.headers)
    return headers


class Upstreams:
    """One pooled HTTP client for every upstream of the process (made on first use, inside the loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=2000, limit_per_host=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def open(
        self,
        routes: Sequence[Route],
        path: str,
        body: bytes,
        client_headers: Sequence[tuple[bytes, bytes]],
        *,
        model: str,
        content_type: str | None = None,
    ) -> Opened:
        """POST ``body`` to ``path`` on the first route that answers for good (see the module docstring).
        ``model`` is the client's name for the model: a route that knows it by another name (``aliases``)
        gets that name, in its URL or its body."""
        session = self._client()
        failures: list[Failure] = []
        for route in routes:
            upstream = route.upstream
            target = route.target
            headers = upstream_headers(route, client_headers)
            if content_type is not None:
                headers["content-type"] = content_type
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=upstream.connect_timeout_seconds, sock_read=upstream.timeout_seconds
            )
            data = body
            if target.aliases is not None:
                renamed = target.renames_in_body(path, model)
                if renamed is not None:
                    data = with_model(body, content_type, renamed)
            try:
                raw = await session.post(
                    target.url(path, model),
                    data=data,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                )
            except TimeoutError:
                failures.append(Failure(route.name, "timeout"))
                continue
            except aiohttp.ClientError as exc:
                failures.append(Failure(route.name, "connect", detail=type(exc).__name__))
                continue
            response = UpstreamResponse(raw)
            if response.status_code >= 500 or response.status_code == 429:
                detail = scrub(await _error_text(response), route)
                failures.append(Failure(route.name, "status", response.status_code, detail))
                continue
            return Opened(route, response, failures)
        for failure in failures:
            what = f"{failure.kind} {failure.status or ''}".strip()
            log.warning("upstream %s failed: %s %s", failure.route, what, failure.detail)
        raise AllRoutesFailed(failures)

    async def list_models(self, route: Route) -> list[str]:
        """The model ids an upstream lists at its ``/models`` (OpenAI's and Anthropic's shape alike).
        Raises one of ``UPSTREAM_ERRORS`` or ``ValueError`` when it cannot say."""
        upstream = route.upstream
        url = route.target.url("/models", "")
        if upstream.wire_api == "anthropic":  # Anthropic pages its list, 20 by default
            url += ("&" if "?" in url else "?") + "limit=1000"
        timeout = aiohttp.ClientTimeout(total=_LIST_TIMEOUT_S, sock_connect=upstream.connect_timeout_seconds)
        async with self._client().get(
            url, headers=upstream_headers(route, ()), timeout=timeout, allow_redirects=False
        ) as response:
            if response.status != 200:
                raise ValueError(f"answered {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > _LIST_MAX_BYTES:
                    raise ValueError("model list too large")
        try:
            items = orjson.loads(body)["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise ValueError("not a model list") from None
        if not isinstance(items, list):
            raise ValueError("not a model list")
        return [i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str) and i["id"]]


async def _error_text(response: UpstreamResponse) -> str:
    """A short, single-line excerpt of an upstream's error body (for the log only)."""
    data = b""
    try:
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) >= _ERROR_BODY_BYTES:
                break
    except UPSTREAM_ERRORS:
        pass
    finally:
        await response.aclose()
    return data[:_ERROR_BODY_BYTES].decode("utf-8", "replace").replace("\n", " ")


def scrub(text: str, route: Route) -> str:
    """``text`` with the route's key (and configured header values) blanked out, in case an upstream
    echoes them back in an error."""
    for secret in route.target.secrets:
        text = text.replace(secret, "***")
    return text
