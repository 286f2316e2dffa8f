"""Which upstreams serve a model, in failover order (SPEC §9: routes are tried in config order)."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

from meterline.config import UpstreamConfig
from meterline.gateway.flavors import Api

# Model names come from clients: the per-model cache of route lists must stay bounded.
_CACHE_SIZE = 4096


def wire_api_of(api: Api) -> str:
    """The wire format an endpoint needs its upstream to speak."""
    return "anthropic" if api == "messages" else "openai"


@dataclass(frozen=True, slots=True)
class Route:
    """An upstream as the gateway uses it. ``index`` is its place in the config (0 = preferred)."""

    index: int
    upstream: UpstreamConfig

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def provider(self) -> str:
        return self.upstream.provider

    @property
    def region(self) -> str | None:
        return self.upstream.region

    @property
    def batch(self) -> bool:
        return self.upstream.batch

    def serves(self, model: str) -> bool:
        return any(p == model or fnmatchcase(model, p) for p in self.upstream.models)


class RouteTable:
    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        self._routes = tuple(Route(i, u) for i, u in enumerate(upstreams))
        self.routes_for = lru_cache(maxsize=_CACHE_SIZE)(self._routes_for)

    def _routes_for(self, api: Api, model: str) -> tuple[Route, ...]:
        wire = wire_api_of(api)
        return tuple(r for r in self._routes if r.upstream.wire_api == wire and r.serves(model))

    def models(self) -> list[tuple[str, Route]]:
        """Models named explicitly by a route (patterns are not models), each with its first route."""
        seen: dict[str, Route] = {}
        for route in self._routes:
            for pattern in route.upstream.models:
                if not any(c in pattern for c in "*?[") and pattern not in seen:
                    seen[pattern] = route
        return sorted(seen.items())

    def __bool__(self) -> bool:
        return bool(self._routes)
