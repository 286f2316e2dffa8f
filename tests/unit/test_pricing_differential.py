"""The price book's fast path (per-unit coefficients probed from genai-prices) against genai-prices' own
``calc_price``, for every bundled model, on usage vectors with every unit the ledger carries, and at
every price tier's boundary ±1 input token. Equal exactly (Decimals, unrounded), so equal to the nano."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from genai_prices import types as gp
from genai_prices.data import providers

from meterline.pricing import MeteredUsage, PriceBook
from meterline.pricing.price_book import _find_model, _genai_usage, _plans
from meterline.pricing.usage import GENAI_UNITS

AT = datetime(2026, 6, 1, 12, tzinfo=UTC)
_FIELDS = (*(name for name, _ in GENAI_UNITS), "audio_seconds")


def _vectors(model_price: gp.ModelPrice) -> list[MeteredUsage]:
    """A spread of consistent usage vectors, and each tier boundary of the model's prices ±1 token."""
    prices = [v for k, v in vars(model_price).items() if not k.startswith("_")]
    starts = sorted({t.start for v in prices if isinstance(v, gp.TieredPrices) for t in v.tiers})
    inputs = [0, 1, 7, 1234, 98_765]
    for start in starts:
        inputs += [start - 1, start, start + 1]
    vectors: list[MeteredUsage] = []
    for n in inputs:
        if n < 0:
            continue
        vectors.append(MeteredUsage("m", None, prompt_tokens=n, completion_tokens=n // 2 + 3))
        vectors.append(
            MeteredUsage(
                "m",
                None,
                prompt_tokens=n,
                completion_tokens=311,
                cache_read_tokens=n // 3,
                cache_write_tokens=n // 5,
                cache_write_1h_tokens=n // 11,
                input_audio_tokens=n // 7,
                cache_audio_read_tokens=n // 29,
                output_audio_tokens=17,
                reasoning_tokens=101,
                web_searches=n % 4,
                audio_seconds=Decimal("12.345") if n % 2 else None,
            )
        )
    return vectors


def _expected(usage: MeteredUsage, provider: gp.Provider, info: gp.ModelInfo) -> Decimal | None:
    try:
        calc = info.calc_price(_genai_usage(usage, usage.prompt_tokens), provider, genai_request_timestamp=AT)
    except ValueError:
        return None  # genai-prices cannot price it: the book answers "unpriced", never an error
    return calc.total_price


def test_every_bundled_model_is_priced_as_genai_prices_prices_it() -> None:
    book = PriceBook({}, "USD")
    compared = 0
    mismatches: list[str] = []
    for provider in providers:
        for model in provider.models:
            found = _find_model(model.id, provider.id)
            if found is None:
                continue
            found_provider, info = found
            try:
                model_price = info.get_prices(AT)
            except ValueError:
                continue
            for vector in _vectors(model_price):
                usage = MeteredUsage(
                    info.id,
                    found_provider.id,
                    **{
                        name: getattr(vector, name)
                        for name in (*(n for n, _ in GENAI_UNITS), "audio_seconds")
                    },
                )
                quote = book.quote(usage, AT)
                expected = _expected(usage, found_provider, info)
                got = quote.total if quote.priced else None
                compared += 1
                if got != expected:
                    mismatches.append(f"{found_provider.id}/{info.id} {usage}: {got} != {expected}")
    assert compared > 10_000
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]}"
    # The comparison is of the fast path: a model whose probes disagree with genai-prices is priced by
    # genai-prices itself (None here), which would make it pass by construction. Only Groq's Whisper
    # models (billed for at least 10 s of audio) are not linear.
    slow = sorted(f"{provider}/{model}" for (provider, model, _), plan in _plans.items() if plan is None)
    assert slow == ["groq/whisper-large-v3", "groq/whisper-large-v3-turbo"]


def test_one_hour_cache_writes_and_web_searches_are_priced_as_anthropic_lists_them() -> None:
    # claude-sonnet-4-5: $3 input, $3.75 5-minute write, $6 1-hour write per MTok; $10 per 1,000 searches.
    usage = MeteredUsage(
        "claude-sonnet-4-5",
        "anthropic",
        prompt_tokens=1000,
        completion_tokens=100,
        cache_write_tokens=500,
        cache_write_1h_tokens=200,
        web_searches=3,
    )
    quote = PriceBook({}, "USD").quote(usage, AT)
    # 500 uncached x 3 + 300 x 3.75 + 200 x 6 = 3,825 per MTok; 100 x 15 = 1,500; 3 x $0.01.
    assert quote.input == Decimal("0.003825")
    assert quote.total == Decimal("0.003825") + Decimal("0.0015") + Decimal("0.03")
