"""One Settings object, built from (lowest to highest precedence) defaults, a TOML file and
``METERLINE_*`` environment variables. It is passed to whatever needs it, never read from a global.

``load_settings`` turns every problem into a ``ConfigError`` that names the file and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from meterline.errors import ConfigError
from meterline.money import parse_decimal

# Admin keys that appear in docs, tutorials and default configs everywhere. Refused outright.
KNOWN_DEFAULT_ADMIN_KEYS = frozenset(
    {
        "admin",
        "administrator",
        "changeme",
        "change-me",
        "changeit",
        "secret",
        "password",
        "passw0rd",
        "meterline",
        "meterline-admin",
        "admin-key",
        "adminkey",
        "sk-admin",
        "sk-1234",
        "test",
        "default",
        "letmein",
        "12345678",
        "1234567890",
        "qwerty",
        "your-admin-key",
        "master",
        "root",
        "token",
    }
)
MIN_ADMIN_KEY_LENGTH = 16
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _decimal(value: object, what: str) -> Decimal:
    return parse_decimal(value, what=what)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    """One upstream route. Routes are tried in config order for a model; later ones are failover."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    provider: str = Field(default="openai", min_length=1, max_length=64)
    base_url: str = Field(pattern=r"^https?://[^\s]+$")
    api_key: SecretStr | None = None
    # Model names or shell-style patterns (``gpt-4o*``); ``*`` serves every model. Without ``models``, the
    # names ``aliases`` gives when it is set, else ``*``.
    models: tuple[str, ...] = ("*",)
    region: str | None = Field(default=None, max_length=64)
    # Which API the upstream speaks: by default Anthropic's for provider "anthropic", else OpenAI's;
    # "azure" is OpenAI's on Azure OpenAI's deployment URLs, with the key sent as ``api-key``.
    api: Literal["openai", "anthropic", "azure"] | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    # A batch upstream: the rows it serves say ``batch`` (the bundled price data has no batch prices yet).
    batch: bool = False
    # Longest wait for the next byte of an answer (a stream may run longer than this in total).
    timeout_seconds: float = Field(default=600.0, gt=0, le=3600)
    # What ``GET /v1/models`` says owns this route's models (default: the provider), e.g. "azure".
    owned_by: str | None = Field(default=None, min_length=1, max_length=128)
    # Query parameters added to every URL of this upstream (Azure's ``api-version``); a query string in
    # ``base_url`` is read into these (``query`` wins on a clash) and kept after the path.
    query: dict[str, str] = Field(default_factory=dict)
    # Headers sent with every request to this upstream, after the key's own (they may hold secrets: kept
    # out of logs and error messages like the key).
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    # The name this upstream knows a model by, for the model the client names (an Azure deployment, a
    # provider's own prefix). The ledger row keeps the client's name: the real model, priced as such.
    aliases: dict[str, str] = Field(default_factory=dict)

    @property
    def wire_api(self) -> Literal["openai", "anthropic"]:
        if self.api == "azure":
            return "openai"
        if self.api is not None:
            return self.api
        return "anthropic" if self.provider == "anthropic" else "openai"

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the gateway itself")
            if any(c in secret.get_secret_value() for c in "\r\n\0"):
                raise ValueError(f"the value of header {name!r} holds a line break")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: dict[str, str]) -> dict[str, str]:
        for model, alias in value.items():
            if not model or not alias or len(alias) > 200:
                raise ValueError("an alias maps a model name to a name of 1 to 200 characters")
            if any(c in model for c in "*?["):
                raise ValueError(f"alias {model!r}: aliases name models, not patterns")
        return value

    @model_validator(mode="after")
    def _routing(self) -> UpstreamConfig:
        if "models" not in self.model_fields_set and self.aliases:
            object.__setattr__(self, "models", tuple(self.aliases))
        unserved = [m for m in self.aliases if not any(fnmatchcase(m, p) for p in self.models)]
        if unserved:
            raise ValueError(f"aliases name models that `models` does not serve: {', '.join(unserved)}")
        url, _, query = self.base_url.partition("?")
        if query:
            pairs = dict(parse_qsl(query, keep_blank_values=True))
            object.__setattr__(self, "base_url", url)
            object.__setattr__(self, "query", {**pairs, **self.query})
        if self.api == "azure" and "api-version" not in self.query:
            raise ValueError(
                'an Azure upstream needs its API version, e.g. query = { "api-version" = "2024-10-21" }'
            )
        return self


# Headers the gateway sets for every request: a configured one would fight it.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", "connection"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")


_UNITS_METER = re.compile(r"units:[A-Za-z0-9_.:-]{1,64}")


class LimitConfig(_Strict):
    """A limit beyond the named ones, e.g. ``{meter = "units:case.execute", window = "period", max = 5000}``.
    ``max`` is in the meter's unit (whole credits / currency units for credits and spend); -1 unlimited."""

    meter: str
    window: Literal["minute", "day", "period"]
    scope: Literal["organization", "workspace", "key", "identifier"] = "organization"
    max: int = Field(ge=-1, le=10**15)
    policy: Literal["block", "overage"] = "block"
    name: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _rate_limits_block(self) -> LimitConfig:
        if self.window == "minute" and self.policy == "overage":
            raise ValueError(
                'a minute window is a rate limit and always blocks: use policy = "block", or a day or '
                "period window for an allowance that may be passed"
            )
        return self

    @field_validator("meter")
    @classmethod
    def _meter(cls, value: str) -> str:
        if value in ("tokens", "calls", "credits", "spend"):
            return value
        if _UNITS_METER.fullmatch(value):
            return value
        raise ValueError(f"unknown meter {value!r}: use tokens, calls, credits, spend or units:<event>")


class PlanConfig(_Strict):
    """A plan's limits. ``-1`` means unlimited (seed 003); ``None`` keeps the default tier's value."""

    daily_tokens: int | None = Field(default=None, ge=-1)
    monthly_tokens: int | None = Field(default=None, ge=-1)
    daily_calls: int | None = Field(default=None, ge=-1)
    monthly_calls: int | None = Field(default=None, ge=-1)
    rpm: int | None = Field(default=None, ge=-1)
    tpm: int | None = Field(default=None, ge=-1)
    monthly_credits: int | None = Field(default=None, ge=-1)
    overage: Literal["block", "overage"] | None = None
    discount_pct: int | None = Field(default=None, ge=0, le=100)
    limits: tuple[LimitConfig, ...] | None = None
    # Gateway: end a stream with an error event when the organization's credits run out mid-response.
    stream_cutoff: bool | None = None
    # Gateway: what a stream the client left costs: what was generated until then, or nothing.
    disconnect: Literal["bill_generated", "void"] | None = None
    # Usage of a model with no price: recorded at cost 0 (and alerted), or refused.
    unpriced: Literal["record", "block"] | None = None
    # The meter of ``GET /v1/usage``'s top-level usage/limit/remaining (seed 003): tokens, calls or
    # units:<event>. Unset: tokens, or the first extra limit's meter for a plan with no token limit.
    primary_meter: str | None = None

    @field_validator("primary_meter")
    @classmethod
    def _primary_meter(cls, value: str | None) -> str | None:
        # Counted meters only: the top-level figures are integers (seed 003), money is in ``credits``.
        if value is None or value in ("tokens", "calls") or _UNITS_METER.fullmatch(value):
            return value
        raise ValueError(f"unknown primary_meter {value!r}: use tokens, calls or units:<event>")


class PriceOverride(_Strict):
    """Operator price for one model, per million tokens (per second/request where named), in ``currency``."""

    input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None  # 1-hour cache writes; the cache_write price when unset
    per_request: Decimal = Decimal(0)
    per_web_search: Decimal = Decimal(0)
    per_audio_second: Decimal = Decimal(0)
    per_unit: Decimal = Decimal(0)

    @field_validator("*", mode="before")
    @classmethod
    def _exact(cls, value: object, info: Any) -> object:
        if value is None:
            return None
        amount = _decimal(value, f"price {info.field_name}")
        if amount < 0:
            raise ValueError(f"price {info.field_name} must not be negative")
        return amount


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERLINE_", extra="forbid", frozen=True)

    database_url: str = "sqlite:///meterline.db"
    # PostgreSQL: the connections each serving process keeps open, and how many more it may open while it
    # is busiest (closed again once they are given back). Every worker of every machine counts towards
    # the server's max_connections: `meterline serve` warns when its workers could exceed what is free.
    database_pool_size: int = Field(default=10, ge=2, le=1000)
    database_max_overflow: int = Field(default=20, ge=0, le=1000)
    redis_url: str | None = None
    # `meterline serve`: processes behind one port ("auto": one per CPU). Quota counters: with
    # `redis_url`, in Redis; else "auto" keeps them in-process for one process and in the database (exact
    # across processes) for several; "memory" and "database" choose.
    workers: int | Literal["auto"] = Field(default=1)
    counters: Literal["auto", "memory", "database"] = "auto"
    admin_key: SecretStr | None = None
    # OpenTelemetry out (OTLP/HTTP base URL, e.g. http://collector:4318): a GenAI span per gateway request
    # and the GenAI client metrics. Off when unset.
    otel_endpoint: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    otel_headers: dict[str, SecretStr] = Field(default_factory=dict)
    otel_service_name: str = Field(default="meterline", min_length=1, max_length=128)
    otel_metrics_interval_ms: int = Field(default=60_000, ge=100, le=3_600_000)
    # `GET /metrics` wants it as a bearer token when set; unset, it answers loopback clients only.
    metrics_token: SecretStr | None = Field(default=None, min_length=16)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    credit_value: Decimal = Decimal("0.01")
    # Units of each currency per one USD (the price database's currency). USD is always 1.
    currency_rates: dict[str, Decimal] = Field(default_factory=lambda: {"EUR": Decimal("0.92")})
    default_plan: str = "free"
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # The deployment's Ed25519 key (access tokens, receipts); created on first start. Every server
    # process of one deployment must read the same file.
    signing_key_file: str = "meterline-signing-key.json"
    # Quotas: what to do when the shared counter store (Redis) cannot be reached, and how long a
    # reservation may stay open before it is settled at its estimate.
    quota_fail_open: bool = False
    reservation_ttl_seconds: int = Field(default=900, ge=1, le=86_400)
    upstreams: tuple[UpstreamConfig, ...] = ()
    # Gateway: the output tokens reserved when a request names no max_tokens, and how often a stream's
    # consumption so far is published (GET /v1/usage shows it before the stream ends).
    gateway_default_max_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    stream_progress_interval_ms: int = Field(default=250, ge=10, le=60_000)
    plans: dict[str, PlanConfig] = Field(default_factory=dict)
    prices: dict[str, PriceOverride] = Field(default_factory=dict)
    # Alerts: percent of the period's credit allowance (or spend cap) that fire once each per period;
    # quota refusals (429s) within an hour that fire "rate limits exceeded frequently"; today's usage
    # above factor x the previous 7 days' mean, and at least the minimum (whole credits, or currency
    # units for spend-cap organizations), fires "unusual usage".
    alert_thresholds: tuple[int, ...] = Field(default=(50, 75, 80, 100), min_length=1, max_length=20)
    alert_refusals_per_hour: int = Field(default=10, ge=1, le=1_000_000)
    alert_unusual_factor: Decimal = Field(default=Decimal(3), gt=1, le=1000)
    alert_unusual_min_volume: int = Field(default=100, ge=0)
    # Webhooks: private/loopback destinations are refused (SSRF) unless allowed here; per-attempt
    # timeout, attempts before giving up, and how often the sender looks for due deliveries.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    webhook_max_attempts: int = Field(default=10, ge=1, le=100)
    webhook_poll_seconds: float = Field(default=2.0, gt=0, le=3600)
    # `meterline serve`: where the access log's JSON lines go (stderr, stdout, off, or a file appended
    # to), and the level of the server's own messages (start-up, shutdown, errors).
    access_log: str = Field(default="stderr", min_length=1, max_length=4096)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # Dashboard: where the usage bar's and the dashboard's Upgrade and referral buttons lead (an http(s)
    # address, or a path on this server); unset, to the Billing page's plan and referral sections.
    upgrade_url: str | None = Field(default=None, max_length=2000)
    referral_url: str | None = Field(default=None, max_length=2000)

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= t <= 1000 for t in value):
            raise ValueError("alert_thresholds are percentages between 1 and 1000")
        return tuple(sorted(set(value)))

    @field_validator("upgrade_url", "referral_url")
    @classmethod
    def _link(cls, value: str | None) -> str | None:
        # A link people follow from the dashboard: a web address or a path of this server, nothing a
        # browser would run (javascript:) or resolve elsewhere (//host).
        if value is None:
            return None
        if not re.fullmatch(r"https?://[^\s/]+[^\s]*|/(?![/\\])[^\s]*", value):
            raise ValueError("must be an http(s) address or a path starting with /")
        return value

    @field_validator("credit_value", mode="before")
    @classmethod
    def _credit_value(cls, value: object) -> Decimal:
        amount = _decimal(value, "credit_value")
        if amount <= 0:
            raise ValueError("credit_value must be greater than 0")
        return amount

    @field_validator("currency_rates", mode="before")
    @classmethod
    def _rates(cls, value: object) -> dict[str, Decimal]:
        if not isinstance(value, dict):
            raise ValueError('currency_rates must be a table of CURRENCY = "rate"')
        rates: dict[str, Decimal] = {}
        for code, raw in value.items():
            if not re.fullmatch(r"[A-Z]{3}", str(code)):
                raise ValueError(f"currency code {code!r} must be three capital letters")
            rate = _decimal(raw, f"currency_rates.{code}")
            if rate <= 0:
                raise ValueError(f"currency_rates.{code} must be greater than 0")
            rates[str(code)] = rate
        return rates

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if value != "auto" and not 1 <= int(value) <= 64:
            raise ValueError('workers must be 1 to 64, or "auto" (one per CPU)')
        return value

    @property
    def worker_count(self) -> int:
        """How many serving processes ``workers`` asks for."""
        if self.workers != "auto":
            return int(self.workers)
        # The CPUs this process may run on (its affinity), not every CPU of the machine.
        return max(1, min(len(os.sched_getaffinity(0)), 64))

    @property
    def counter_store(self) -> str:
        """Where quota counters live: "redis", "database" or "memory" (see ``counters``)."""
        if self.redis_url is not None and not self.redis_url.lower().startswith("memory:"):
            return "redis"
        if self.counters != "auto":
            return self.counters
        return "database" if self.worker_count > 1 else "memory"

    @model_validator(mode="after")
    def _one_counter_store(self) -> Settings:
        if self.counters != "auto" and self.counter_store == "redis":
            raise ValueError(
                f'counters = "{self.counters}" and redis_url both say where quota counters are kept (with '
                "redis_url, in Redis): remove one of them"
            )
        return self

    @field_validator("otel_headers")
    @classmethod
    def _otel_headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # The HTTP client would reject such a value on every export, with the value in its error (a log
        # line per batch): refused here, by name only.
        for name, secret in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            text = secret.get_secret_value()
            if text != text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise ValueError(
                    f"the value of header {name!r} has surrounding spaces or a control character"
                )
        return value

    @field_validator("admin_key")
    @classmethod
    def _admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if secret.strip().lower() in KNOWN_DEFAULT_ADMIN_KEYS:
            raise ValueError("admin key is a well-known default; generate one with `meterline keygen`")
        if len(secret) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(f"admin key must be at least {MIN_ADMIN_KEY_LENGTH} characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("database_url must start with sqlite:/// or postgresql://")
        return value

    @field_validator("upstreams")
    @classmethod
    def _unique_upstreams(cls, value: tuple[UpstreamConfig, ...]) -> tuple[UpstreamConfig, ...]:
        names = [u.name for u in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique: {', '.join(duplicates)}")
        return value

    def rate_for(self, currency: str) -> Decimal | None:
        if currency == "USD":
            return Decimal(1)
        return self.currency_rates.get(currency)


def _interpolate(value: Any, path: str) -> Any:
    """Replace ``${VAR}`` in strings with the environment's value (a missing variable is an error)."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return os.environ[name]

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _describe(error: ValidationError, source: str, file_keys: set[str], options: set[str]) -> str:
    """Each problem named by where its value came from: the command's option, the environment variable,
    or the config file (as ``load_settings`` lets one beat the other)."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        field = str(item["loc"][0]) if item["loc"] else ""
        variable = f"METERLINE_{field.upper()}"
        if field in options:
            problems.append(f"{key} (from --{field.replace('_', '-')}): {message}")
        elif field and variable in os.environ:
            problems.append(f"{key} (from {variable}): {message}")
        elif field in file_keys:
            problems.append(f"{source}: {key}: {message}")
        else:  # a default, or a check of several settings (its message names them)
            problems.append(f"{key}: {message}" if field else message)
    return "; ".join(problems)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``path`` (or ``$METERLINE_CONFIG``), the environment and explicit overrides."""
    path = path or os.environ.get("METERLINE_CONFIG")
    data: dict[str, Any] = {}
    source = "environment"
    if path:
        file = Path(path)
        source = str(file)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{file}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read: {exc}") from None
        data = _interpolate(raw, file.name)
    # Environment beats the file: drop file keys that the environment sets.
    for field in Settings.model_fields:
        if f"METERLINE_{field.upper()}" in os.environ:
            data.pop(field, None)
    file_keys = set(data)
    options = {k for k, v in overrides.items() if v is not None}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, file_keys, options)) from None
