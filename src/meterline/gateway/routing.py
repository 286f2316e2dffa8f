"""Which upstreams serve a model, in failover order (SPEC §9: routes are tried in config order)."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from urllib.parse import quote, urlencode

from meterline.config import UpstreamConfig
from meterline.gateway.flavors import Api

# Model names come from clients: the per-model cache of route lists must stay bounded.
_CACHE_SIZE = 4096


def wire_api_of(api: Api) -> str:
    """The wire format an endpoint needs its upstream to speak."""
    return "anthropic" if api == "messages" else "openai"


# The paths the gateway calls on an upstream (OpenAI's and Anthropic's, under the base URL).
PATHS = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/audio/transcriptions",
    "/messages",
    "/messages/count_tokens",
    "/models",
)
# Azure OpenAI serves these per deployment (``/openai/deployments/{name}/...``); the rest (Responses,
# the model list) under ``/openai`` with the deployment named in the body.
_PER_DEPLOYMENT = frozenset({"/chat/completions", "/completions", "/embeddings", "/audio/transcriptions"})
_ANTHROPIC_VERSION = "2023-06-01"


class Target:
    """Where and how to send requests to one upstream: its URLs and the headers it always gets, built once
    from its config so that a request only looks them up."""

    __slots__ = ("_azure", "_base", "_query", "_urls", "aliases", "default_headers", "headers", "secrets")

    def __init__(self, upstream: UpstreamConfig) -> None:
        self._azure = upstream.api == "azure"
        base = upstream.base_url.rstrip("/")
        if self._azure:
            base = base.removesuffix("/openai") + "/openai"
        self._base = base
        self._query = "?" + urlencode(upstream.query) if upstream.query else ""
        self._urls = {path: self._build(path, None) for path in PATHS} if not self._azure else {}
        # The model names this upstream knows by another name (None when none: the common case costs
        # nothing per request).
        self.aliases: dict[str, str] | None = dict(upstream.aliases) or None
        key = upstream.api_key.get_secret_value() if upstream.api_key is not None else None
        headers: dict[str, str] = {}
        defaults: dict[str, str] = {}  # sent unless the client sent its own
        if upstream.wire_api == "anthropic":
            defaults["anthropic-version"] = _ANTHROPIC_VERSION
            if key is not None:
                headers["x-api-key"] = key
        elif key is not None:
            headers["api-key" if self._azure else "authorization"] = key if self._azure else f"Bearer {key}"
        for name, value in upstream.headers.items():
            headers[name.lower()] = value.get_secret_value()
        self.headers = headers
        self.default_headers = defaults
        # What must never appear in a log line or an error: the key and every configured header value.
        self.secrets = tuple(
            s for s in (key, *(v.get_secret_value() for v in upstream.headers.values())) if s and len(s) >= 4
        )

    def _build(self, path: str, deployment: str | None) -> str:
        if not self._azure:
            return self._base + path + self._query
        if path in _PER_DEPLOYMENT:
            return f"{self._base}/deployments/{quote(deployment or '', safe='')}{path}{self._query}"
        return self._base + path + self._query

    def url(self, path: str, model: str) -> str:
        """The URL of ``path`` for a request for ``model`` (Azure: the model's deployment)."""
        if not self._azure:
            return self._urls.get(path) or self._build(path, None)
        return self._build(path, self.upstream_model(model))

    def upstream_model(self, model: str) -> str:
        """The name this upstream knows ``model`` by."""
        aliases = self.aliases
        return model if aliases is None else aliases.get(model, model)

    def renames_in_body(self, path: str, model: str) -> str | None:
        """The name to put in the body's ``model`` in place of the client's, or None to send it as it is.
        Azure's per-deployment paths name the model in the URL; its body's model is not read."""
        if self.aliases is None or (self._azure and path in _PER_DEPLOYMENT):
            return None
        alias = self.aliases.get(model)
        return alias if alias is not None and alias != model else None


@dataclass(frozen=True, slots=True)
class Route:
    """An upstream as the gateway uses it. ``index`` is its place in the config (0 = preferred)."""

    index: int
    upstream: UpstreamConfig
    target: Target

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
        self._routes = tuple(Route(i, u, Target(u)) for i, u in enumerate(upstreams))
        self.routes_for = lru_cache(maxsize=_CACHE_SIZE)(self._routes_for)

    def _routes_for(self, api: Api, model: str) -> tuple[Route, ...]:
        wire = wire_api_of(api)
        return tuple(r for r in self._routes if r.upstream.wire_api == wire and r.serves(model))

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def __bool__(self) -> bool:
        return bool(self._routes)
