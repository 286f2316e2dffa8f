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
from fnmatch import fnmatchcase
from functools import cache, lru_cache
from typing import Literal, TypeAlias

from genai_prices import types as gp
from genai_prices.data_snapshot import find_provider_by_id

from meterline.config import PriceOverride
from meterline.pricing.usage import GENAI_UNITS, MeteredUsage

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

    __slots__ = ("_matched", "_override_currency", "_overrides", "_patterns")

    def __init__(self, overrides: Mapping[str, PriceOverride], override_currency: str) -> None:
        if not _CURRENCY.fullmatch(override_currency):
            raise ValueError(f"override currency must be three capital letters, got {override_currency!r}")
        self._overrides: dict[str, PriceOverride] = dict(overrides)
        # Keys with a wildcard (``my-model-*``, ``azure/gpt-4o-*``) match model names, in the config's
        # order; an exact key always wins over a pattern.
        self._patterns = [(key, price) for key, price in overrides.items() if _is_pattern(key)]
        self._matched: dict[tuple[str | None, str], PriceOverride | None] = {}
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
            if self._patterns:
                return self._by_pattern(usage.provider, usage.model) or overrides.get(usage.event)
        return overrides.get(usage.event)

    def _by_pattern(self, provider: str | None, model: str) -> PriceOverride | None:
        key = (provider, model)
        if key in self._matched:
            return self._matched[key]
        found = None
        for pattern, price in self._patterns:
            scoped = "/" in pattern
            if (scoped and provider is not None and fnmatchcase(f"{provider}/{model}", pattern)) or (
                not scoped and fnmatchcase(model, pattern)
            ):
                found = price
                break
        if len(self._matched) >= _LOOKUP_CACHE_SIZE:  # model names come from clients: bounded
            self._matched.clear()
        self._matched[key] = found
        return found


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


def _quote_override(price: PriceOverride, usage: MeteredUsage, currency: str) -> Quote:
    cache_read = usage.cache_read_tokens
    cache_write = usage.cache_write_tokens
    written_1h = min(usage.cache_write_1h_tokens, cache_write)
    # prompt_tokens already includes the cached tokens; pricing them at both rates would bill them twice.
    uncached = max(usage.prompt_tokens - cache_read - cache_write, 0)
    read_price = price.input if price.cache_read is None else price.cache_read
    write_price = price.input if price.cache_write is None else price.cache_write
    write_1h_price = write_price if price.cache_write_1h is None else price.cache_write_1h
    input_cost = (
        uncached * price.input
        + cache_read * read_price
        + (cache_write - written_1h) * write_price
        + written_1h * write_1h_price
    ) / _MILLION
    output_cost = usage.completion_tokens * price.output / _MILLION
    total = (
        input_cost
        + output_cost
        + usage.requests * price.per_request
        + usage.units * price.per_unit
        + usage.web_searches * price.per_web_search
    )
    if usage.audio_seconds is not None:
        total += usage.audio_seconds * price.per_audio_second
    return Quote(True, currency, input_cost, output_cost, total, "override", usage.provider)


# --- bundled genai-prices database -------------------------------------------------------------------


@cache
def _bundled_providers() -> list[gp.Provider]:
    # Imported on first use: the data module is large (~0.2 s to import).
    from genai_prices.data import providers

    return providers


@cache
def bundled_models(provider: str) -> tuple[str, ...]:
    """The models the bundled database prices for ``provider`` (its id, e.g. "openai"), deprecated ones
    left out; empty for a provider it does not know."""
    found = find_provider_by_id(_bundled_providers(), provider)
    if found is None:
        return ()
    return tuple(m.id for m in found.models if not m.deprecated)


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


# The input count at which the first tier's coefficients are checked against genai-prices.
_CHECK_INPUT = 1200


def _cached_and_audio(usage: MeteredUsage) -> int:
    """The input tokens the detail counts account for: cached (read or written) or audio."""
    audio_uncached = usage.input_audio_tokens - usage.cache_audio_read_tokens
    return usage.cache_read_tokens + usage.cache_write_tokens + max(audio_uncached, 0)


# The counts a genai-prices quote is linear in, by their ``MeteredUsage`` field and genai-prices unit.
_LINEAR_UNITS = GENAI_UNITS
# A usage every probe starts from: inside every nesting rule with room to add one of any unit, so each
# unit's price is read as the difference one more of it makes (a price is linear within a tier).
_PROBE_BASE = {
    "input_tokens": 1000,
    "cache_read_tokens": 100,
    "cache_write_tokens": 100,
    "cache_write_1h_tokens": 10,
    "input_audio_tokens": 100,
    "cache_audio_read_tokens": 10,
    "output_tokens": 1000,
    "output_audio_tokens": 100,
    "output_reasoning_tokens": 100,
    "web_searches": 0,
    "cache_audio_write_tokens": 0,
}


@dataclass(frozen=True, slots=True)
class _Linear:
    """Prices of one unit of each usage field, read back from genai-prices itself.

    Within one price tier a genai-prices price is linear in the usage counts (its nested units are
    differences of them), so a handful of probes gives the coefficients and a quote becomes a few
    multiplications instead of genai-prices' ~90 us of unit decomposition and validation.
    """

    request: Parts
    per_unit: tuple[tuple[str, Parts], ...]  # (MeteredUsage field, price of one), priced fields only
    audio_hour: Parts

    def apply(self, input_tokens: int, usage: MeteredUsage) -> Parts:
        requests = usage.requests
        a, b, c = self.request
        a, b, c = a * requests, b * requests, c * requests
        for name, (x, y, z) in self.per_unit:
            count = input_tokens if name == "prompt_tokens" else getattr(usage, name)
            if count:
                a, b, c = a + x * count, b + y * count, c + z * count
        if usage.audio_seconds:
            x, y, z = self.audio_hour
            seconds = usage.audio_seconds
            if x:
                a += x * seconds / _SECONDS_PER_HOUR
            if y:
                b += y * seconds / _SECONDS_PER_HOUR
            if z:
                c += z * seconds / _SECONDS_PER_HOUR
        return a, b, c


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
    # genai-prices derives uncached text input as input - cache_read - cache_write - uncached audio; keep
    # that non-negative for inconsistent upstream counts, the same clamp the override path applies.
    input_tokens = max(usage.prompt_tokens, _cached_and_audio(usage))
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


def _genai_usage(usage: MeteredUsage, input_tokens: int) -> gp.Usage:
    # Every unit is given, zeros too: genai-prices wants the overlap of two reported units (cached audio)
    # stated rather than guessed. Cache writes of audio are not reported by any provider: none.
    values: dict[str, int | Decimal] = {"cache_audio_write_tokens": 0}
    for name, unit in GENAI_UNITS:
        values[unit] = input_tokens if name == "prompt_tokens" else getattr(usage, name)
    if usage.audio_seconds is not None:
        # genai-prices nests input audio inside audio; giving only the input figure makes the parent's
        # remainder negative, which it rejects.
        values["audio_seconds"] = usage.audio_seconds
        values["input_audio_seconds"] = usage.audio_seconds
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
    gp_usage = _genai_usage(usage, input_tokens)
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
            # The smallest input-token count that lands in tier j; checked at a count inside it with
            # every unit in play (the first tier ends at its start, inclusive).
            x = 0 if j == 0 else starts[j - 1] + 1
            check = min(starts[0], _CHECK_INPUT) if j == 0 and starts else x or _CHECK_INPUT
            flat = gp.ModelPrice(**{k: _price_at(v, x) for k, v in prices.items()})
            linear = _probe(flat)
            if not _agrees(linear, provider, info, check, at):
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
    at_base = _parts(flat.calc_price(gp.Usage(**_PROBE_BASE)))
    per_unit: list[tuple[str, Parts]] = []
    for name, unit in _LINEAR_UNITS:
        one_more = _parts(flat.calc_price(gp.Usage(**{**_PROBE_BASE, unit: _PROBE_BASE.get(unit, 0) + 1})))
        price = _minus(one_more, at_base)
        if price != (_ZERO, _ZERO, _ZERO):
            per_unit.append((name, price))
    audio = gp.Usage(audio_seconds=Decimal(_SECONDS_PER_HOUR), input_audio_seconds=Decimal(_SECONDS_PER_HOUR))
    return _Linear(
        request=base, per_unit=tuple(per_unit), audio_hour=_minus(_parts(flat.calc_price(audio)), base)
    )


def _agrees(linear: _Linear, provider: gp.Provider, info: gp.ModelInfo, x: int, at: datetime) -> bool:
    """Cross-check against genai-prices' full calculation with the real provider, on a usage with every
    unit in it.

    This catches model-specific rules that are not linear (Groq bills Whisper audio for at least 10 s).
    """
    sample = MeteredUsage(
        info.id,
        provider.id,
        prompt_tokens=x,
        completion_tokens=14,
        cache_read_tokens=x // 3,
        cache_write_tokens=x // 4,
        cache_write_1h_tokens=x // 8,
        input_audio_tokens=x // 6,
        cache_audio_read_tokens=x // 12,
        output_audio_tokens=3,
        reasoning_tokens=5,
        web_searches=2,
        audio_seconds=Decimal("1.5"),
    )
    expected = _parts(info.calc_price(_genai_usage(sample, x), provider, genai_request_timestamp=at))
    return linear.apply(x, sample) == expected
