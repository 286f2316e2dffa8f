"""Price resolution: operator override > bundled genai-prices database > unpriced.

Everything here is ``Decimal`` and nothing is rounded: rounding to nanos happens once, in ``charge``.
Only genai-prices' bundled data module is read; its background updater (the one piece of it that touches
the network) is never started, and a snapshot installed by someone else's updater is ignored, so a quote
depends on the installed package version and the request time only.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cache, lru_cache
from typing import Literal, TypeAlias

from genai_prices import types as gp
from genai_prices.data_snapshot import find_provider_by_id

from meterline.config import PriceOverride
from meterline.pricing.usage import MeteredUsage

__all__ = ["PriceBook", "Quote", "QuoteSource"]

log = logging.getLogger(__name__)

QuoteSource: TypeAlias = Literal["override", "genai-prices", "unpriced"]

DATABASE_CURRENCY = "USD"
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
# genai-prices prices audio per hour of audio; probing with a whole hour yields the listed hourly price
# exactly, so a quote divides once (price x seconds / 3600), just as genai-prices does.
_SECONDS_PER_HOUR = 3600
_CURRENCY = re.compile(r"[A-Z]{3}")
# Model names come from clients and upstreams: the lookup cache must stay bounded.
_LOOKUP_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Quote:
    """The exact, unrounded price of one usage row in ``currency``.

    ``input`` and ``output`` are the token (and directional audio) parts; ``total`` also holds parts with
    no direction (per request, per unit, per audio second), so ``total >= input + output``.
    """

    priced: bool
    currency: str
    input: Decimal
    output: Decimal
    total: Decimal
    source: QuoteSource
    provider: str | None


class PriceBook:
    """Resolves what a usage row costs. Cheap to query: database look-ups are cached."""

    __slots__ = ("_override_currency", "_overrides")

    def __init__(self, overrides: Mapping[str, PriceOverride], override_currency: str) -> None:
        if not _CURRENCY.fullmatch(override_currency):
            raise ValueError(f"override currency must be three capital letters, got {override_currency!r}")
        self._overrides: dict[str, PriceOverride] = dict(overrides)
        self._override_currency = override_currency

    def quote(self, usage: MeteredUsage, at: datetime) -> Quote:
        """Price ``usage`` as of ``at``. An unknown model is priced ``False`` at zero, never an error."""
        override = self._override_for(usage)
        if override is not None:
            return _quote_override(override, usage, self._override_currency)
        if usage.model is not None:
            found = _find_model(usage.model, usage.provider)
            if found is not None:
                quoted = _quote_database(found[0], found[1], usage, at)
                if quoted is not None:
                    return quoted
        return Quote(False, DATABASE_CURRENCY, _ZERO, _ZERO, _ZERO, "unpriced", usage.provider)

    def _override_for(self, usage: MeteredUsage) -> PriceOverride | None:
        overrides = self._overrides
        if not overrides:
            return None
        if usage.model is not None:
            if usage.provider is not None:
                scoped = overrides.get(f"{usage.provider}/{usage.model}")
                if scoped is not None:
                    return scoped
            exact = overrides.get(usage.model)
            if exact is not None:
                return exact
        return overrides.get(usage.event)


def _quote_override(price: PriceOverride, usage: MeteredUsage, currency: str) -> Quote:
    cache_read = usage.cache_read_tokens
    cache_write = usage.cache_write_tokens
    # prompt_tokens already includes the cached tokens; pricing them at both rates would bill them twice.
    uncached = max(usage.prompt_tokens - cache_read - cache_write, 0)
    read_price = price.input if price.cache_read is None else price.cache_read
    write_price = price.input if price.cache_write is None else price.cache_write
    input_cost = (uncached * price.input + cache_read * read_price + cache_write * write_price) / _MILLION
    output_cost = usage.completion_tokens * price.output / _MILLION
    total = input_cost + output_cost + usage.requests * price.per_request + usage.units * price.per_unit
    if usage.audio_seconds is not None:
        total += usage.audio_seconds * price.per_audio_second
    return Quote(True, currency, input_cost, output_cost, total, "override", usage.provider)


# --- bundled genai-prices database -------------------------------------------------------------------


@cache
def _bundled_providers() -> list[gp.Provider]:
    # Imported on first use: the data module is large (~0.2 s to import).
    from genai_prices.data import providers

    return providers


@lru_cache(maxsize=_LOOKUP_CACHE_SIZE)
def _find_model(model: str, provider: str | None) -> tuple[gp.Provider, gp.ModelInfo] | None:
    """The database's provider and model for a reference, or None.

    Done here rather than through genai-prices' snapshot because its look-up caches grow without bound on
    unknown names, and a gateway sees whatever names its clients send.
    """
    providers = _bundled_providers()
    ref = model.lower()
    # A provider genai-prices doesn't know (a self-hosted upstream, say) must not hide the model.
    found = find_provider_by_id(providers, provider) if provider else None
    if found is None:
        found = next((p for p in providers if p.model_match and p.model_match.is_match(ref)), None)
    if found is None:
        return None
    info = found.find_model(ref, all_providers=providers)
    return None if info is None else (found, info)


Parts: TypeAlias = tuple[Decimal, Decimal, Decimal]  # (input, output, total)


@dataclass(frozen=True, slots=True)
class _Linear:
    """Prices of one unit of each usage field, read back from genai-prices itself.

    Within one price tier a genai-prices price is linear in the usage counts, so a handful of probes gives
    the coefficients and a quote becomes a few multiplications instead of genai-prices' ~90 us of unit
    decomposition and validation.
    """

    request: Parts
    input_token: Parts
    cache_read_token: Parts
    cache_write_token: Parts
    output_token: Parts
    audio_hour: Parts

    def apply(self, input_tokens: int, usage: MeteredUsage) -> Parts:
        out: list[Decimal] = []
        for i in range(3):
            part = (
                self.request[i] * usage.requests
                + self.input_token[i] * input_tokens
                + self.cache_read_token[i] * usage.cache_read_tokens
                + self.cache_write_token[i] * usage.cache_write_tokens
                + self.output_token[i] * usage.completion_tokens
            )
            if usage.audio_seconds and self.audio_hour[i]:
                part += self.audio_hour[i] * usage.audio_seconds / _SECONDS_PER_HOUR
            out.append(part)
        return out[0], out[1], out[2]


@dataclass(frozen=True, slots=True)
class _Plan:
    """Coefficients per price tier. Tier ``j`` applies when exactly ``j`` tier starts are below the
    request's input tokens (genai-prices' rule: a tier applies once input tokens *exceed* its start)."""

    tier_starts: tuple[int, ...]
    tiers: tuple[_Linear, ...]
    model_price: gp.ModelPrice  # keeps the id() used as the cache key alive and unambiguous


# None means "probing disagreed with genai-prices": that model is priced by genai-prices on every call.
# Keys come from the finite bundled data set, so this never grows past its size.
_plans: dict[tuple[str, str, int], _Plan | None] = {}


def _quote_database(
    provider: gp.Provider, info: gp.ModelInfo, usage: MeteredUsage, at: datetime
) -> Quote | None:
    # genai-prices derives uncached input as input - cache_read - cache_write; keep that non-negative for
    # inconsistent upstream counts, the same clamp the override path applies.
    input_tokens = max(usage.prompt_tokens, usage.cache_read_tokens + usage.cache_write_tokens)
    try:
        model_price = info.get_prices(at)
        key = (provider.id, info.id, id(model_price))
        if key in _plans:
            plan = _plans[key]
        else:
            plan = _plans[key] = _build_plan(provider, info, model_price, at)
        if plan is not None and plan.model_price is model_price:
            tier = plan.tiers[bisect_left(plan.tier_starts, input_tokens)]
            parts = tier.apply(input_tokens, usage)
        else:
            parts = _calc_slow(provider, info, model_price, usage, input_tokens, at)
    except ValueError as exc:
        # Inconsistent data inside genai-prices must not fail a request that already happened upstream.
        log.warning("genai-prices could not price %s/%s: %s", provider.id, info.id, exc)
        return None
    return Quote(True, DATABASE_CURRENCY, parts[0], parts[1], parts[2], "genai-prices", provider.id)


def _usage(
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    audio_seconds: Decimal | None = None,
) -> gp.Usage:
    values: dict[str, int | Decimal] = {}
    for name, value in (
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("cache_read_tokens", cache_read_tokens),
        ("cache_write_tokens", cache_write_tokens),
    ):
        if value:
            values[name] = value
    if audio_seconds is not None:
        # genai-prices nests input audio inside audio; giving only the input figure makes the parent's
        # remainder negative, which it rejects.
        values["audio_seconds"] = audio_seconds
        values["input_audio_seconds"] = audio_seconds
    return gp.Usage(**values)


def _parts(calc: gp.PriceCalculation | gp.CalcPrice) -> Parts:
    if isinstance(calc, gp.PriceCalculation):
        return calc.input_price, calc.output_price, calc.total_price
    return calc["input_price"], calc["output_price"], calc["total_price"]


def _minus(a: Parts, b: Parts) -> Parts:
    return a[0] - b[0], a[1] - b[1], a[2] - b[2]


def _calc_slow(
    provider: gp.Provider,
    info: gp.ModelInfo,
    model_price: gp.ModelPrice,
    usage: MeteredUsage,
    input_tokens: int,
    at: datetime,
) -> Parts:
    gp_usage = _usage(
        input_tokens,
        usage.completion_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.audio_seconds,
    )
    parts = _parts(info.calc_price(gp_usage, provider, genai_request_timestamp=at))
    if usage.requests != 1:
        # genai-prices always bills exactly one request; scale a per-request price to the real count.
        per_request = _parts(model_price.calc_price(gp.Usage()))
        parts = (
            parts[0] + per_request[0] * (usage.requests - 1),
            parts[1] + per_request[1] * (usage.requests - 1),
            parts[2] + per_request[2] * (usage.requests - 1),
        )
    return parts


def _build_plan(
    provider: gp.Provider, info: gp.ModelInfo, model_price: gp.ModelPrice, at: datetime
) -> _Plan | None:
    prices = {k: v for k, v in vars(model_price).items() if not k.startswith("_")}
    starts = tuple(
        sorted({t.start for v in prices.values() if isinstance(v, gp.TieredPrices) for t in v.tiers})
    )
    try:
        tiers: list[_Linear] = []
        for j in range(len(starts) + 1):
            # The smallest input-token count that lands in tier j.
            x = 0 if j == 0 else starts[j - 1] + 1
            flat = gp.ModelPrice(**{k: _price_at(v, x) for k, v in prices.items()})
            linear = _probe(flat)
            if not _agrees(linear, provider, info, x, at):
                return None
            tiers.append(linear)
    except ValueError:
        return None
    return _Plan(starts, tuple(tiers), model_price)


def _price_at(value: Decimal | gp.TieredPrices | None, input_tokens: int) -> Decimal | None:
    if not isinstance(value, gp.TieredPrices):
        return value
    # Mirrors genai-prices' calc_unit_price: the highest tier whose start is exceeded, else the base.
    for tier in reversed(value.tiers):
        if input_tokens > tier.start:
            return tier.price
    return value.base


def _probe(flat: gp.ModelPrice) -> _Linear:
    base = _parts(flat.calc_price(gp.Usage()))
    one_in = _parts(flat.calc_price(_usage(input_tokens=1)))
    return _Linear(
        request=base,
        input_token=_minus(one_in, base),
        cache_read_token=_minus(_parts(flat.calc_price(_usage(input_tokens=1, cache_read_tokens=1))), one_in),
        cache_write_token=_minus(
            _parts(flat.calc_price(_usage(input_tokens=1, cache_write_tokens=1))), one_in
        ),
        output_token=_minus(_parts(flat.calc_price(_usage(output_tokens=1))), base),
        audio_hour=_minus(_parts(flat.calc_price(_usage(audio_seconds=Decimal(_SECONDS_PER_HOUR)))), base),
    )


def _agrees(linear: _Linear, provider: gp.Provider, info: gp.ModelInfo, x: int, at: datetime) -> bool:
    """Cross-check against genai-prices' full calculation with the real provider.

    This catches model-specific rules that are not linear (Groq bills Whisper audio for at least 10 s).
    """
    sample = MeteredUsage(
        info.id,
        provider.id,
        prompt_tokens=x,
        completion_tokens=7,
        cache_read_tokens=x // 3,
        cache_write_tokens=x // 4,
        audio_seconds=Decimal("1.5"),
    )
    expected = _parts(
        info.calc_price(_usage(x, 7, x // 3, x // 4, Decimal("1.5")), provider, genai_request_timestamp=at)
    )
    return linear.apply(x, sample) == expected
