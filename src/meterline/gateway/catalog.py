"""The models the gateway lists (``GET /v1/models``).

A route serves the models it names and those its patterns match. Named ones are listed as they are; for
a pattern, the candidates are the upstream's own list (its ``/models``, fetched when first asked for and
kept for ``LIST_TTL_US``), or, when that list cannot be had, the bundled price book's models of the
route's provider. Either way only the names the route's patterns match are listed, each with the first
route (in config order) that serves it. Listing is never on a request's path: the relay does not use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from meterline.gateway.routing import Route, RouteTable
from meterline.pricing.price_book import bundled_models

log = logging.getLogger("meterline.gateway")

# How long an upstream's list is kept; a failed fetch is tried again sooner (the price book stands in).
LIST_TTL_US = 10 * 60 * 1_000_000
RETRY_US = 60 * 1_000_000


def is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


@dataclass(frozen=True, slots=True)
class _Listed:
    names: tuple[str, ...]
    until_us: int


class Catalog:
    def __init__(
        self,
        routes: RouteTable,
        fetch: Callable[[Route], Awaitable[list[str]]],
        now_us: Callable[[], int],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self._routes = routes
        self._fetch = fetch
        self._now_us = now_us
        self._errors = errors
        self._listed: dict[int, _Listed] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def models(self) -> list[tuple[str, Route]]:
        """Every model a route serves, sorted, each with its first route."""
        routes = self._routes.routes
        candidates = await asyncio.gather(*(self._candidates(r) for r in routes))
        seen: dict[str, Route] = {}
        for route, names in zip(routes, candidates, strict=True):
            for name in names:
                if name not in seen and route.serves(name):
                    seen[name] = route
        return sorted(seen.items())

    async def _candidates(self, route: Route) -> Sequence[str]:
        upstream = route.upstream
        named = [m for m in upstream.models if not is_pattern(m)] + list(upstream.aliases)
        if not any(is_pattern(m) for m in upstream.models):
            return named
        return [*named, *await self._upstream_list(route)]

    async def _upstream_list(self, route: Route) -> tuple[str, ...]:
        lock = self._locks.setdefault(route.index, asyncio.Lock())
        async with lock:  # callers arriving together wait for one fetch
            listed = self._listed.get(route.index)
            now = self._now_us()
            if listed is not None and now < listed.until_us:
                return listed.names
            try:
                names = tuple(await self._fetch(route))
                until = now + LIST_TTL_US
            except self._errors as exc:
                why = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
                log.warning(
                    "upstream %s did not list its models (%s): using the price book's", route.name, why
                )
                names = bundled_models(route.provider)
                until = now + RETRY_US
            self._listed[route.index] = _Listed(names, until)
            return names
