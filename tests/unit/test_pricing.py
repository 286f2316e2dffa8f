"""meterline.pricing: price resolution, conversion, discounts and credits. Exact money only."""

from __future__ import annotations

import ast
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import genai_prices
import pytest
from genai_prices import data_snapshot
from genai_prices import types as gp
from genai_prices.data import providers as bundled_providers
from hypothesis import given, settings
from hypothesis import strategies as st

import meterline.pricing
from meterline.config import PriceOverride
from meterline.errors import InvalidRequest
from meterline.pricing import (
    Charge,
    CurrencyRates,
    MeteredUsage,
    PriceBook,
    Quote,
    charge_for,
)
from meterline.pricing import price_book as price_book_module

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
MTOK = Decimal(1_000_000)
RATES = CurrencyRates({"EUR": Decimal("0.92"), "JPY": Decimal("150")})


def usd(total: str, *, priced: bool = True, currency: str = "USD") -> Quote:
    amount = Decimal(total)
    return Quote(priced, currency, amount, Decimal(0), amount, "override" if priced else "unpriced", None)


def book(**overrides: PriceOverride) -> PriceBook:
    return PriceBook(overrides, "USD")


# --- MeteredUsage ----------------------------------------------------------------------------------------


def test_usage_defaults() -> None:
    usage = MeteredUsage("gpt-4o-mini", "openai")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.requests, usage.units) == (0, 0, 1, 0)
    assert usage.event == "llm.request"
    assert usage.audio_seconds is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("prompt_tokens", -1), ("completion_tokens", -5), ("requests", -1), ("units", True), ("units", 1.0)],
)
def test_usage_rejects_bad_counts(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        MeteredUsage("m", None, **{field: value})  # type: ignore[arg-type]
    assert info.value.param == field


@pytest.mark.parametrize("seconds", [2.5, Decimal("-1"), Decimal("NaN")])
def test_usage_rejects_float_or_invalid_audio_seconds(seconds: object) -> None:
    with pytest.raises(InvalidRequest):
        MeteredUsage("whisper-1", None, audio_seconds=seconds)  # type: ignore[arg-type]


# --- overrides --------------------------------------------------------------------------------------------


def test_override_beats_database() -> None:
    prices = PriceBook({"gpt-4o-mini": PriceOverride(input=Decimal(1), output=Decimal(2))}, "EUR")
    quote = prices.quote(
        MeteredUsage("gpt-4o-mini", "openai", prompt_tokens=1000, completion_tokens=500), NOW
    )
    assert quote == Quote(
        True, "EUR", Decimal("0.001"), Decimal("0.001"), Decimal("0.002"), "override", "openai"
    )


def test_provider_scoped_override_key_wins_over_bare_model() -> None:
    prices = book(
        **{
            "openai/gpt-4o": PriceOverride(input=Decimal(10)),
            "gpt-4o": PriceOverride(input=Decimal(20)),
        }
    )
    million = 1_000_000
    assert prices.quote(MeteredUsage("gpt-4o", "openai", prompt_tokens=million), NOW).total == Decimal(10)
    assert prices.quote(MeteredUsage("gpt-4o", "azure", prompt_tokens=million), NOW).total == Decimal(20)
    assert prices.quote(MeteredUsage("gpt-4o", None, prompt_tokens=million), NOW).total == Decimal(20)


def test_override_math_prices_cache_tokens_once() -> None:
    price = PriceOverride(
        input=Decimal(2),
        output=Decimal(8),
        cache_read=Decimal("0.2"),
        cache_write=None,
        per_request=Decimal("0.001"),
        per_audio_second=Decimal("0.0001"),
    )
    usage = MeteredUsage(
        "house-model",
        None,
        prompt_tokens=1000,
        completion_tokens=50,
        cache_read_tokens=300,
        cache_write_tokens=100,
        requests=2,
        audio_seconds=Decimal("2.5"),
    )
    quote = book(**{"house-model": price}).quote(usage, NOW)
    # 600 uncached x 2 + 300 cache reads x 0.2 + 100 cache writes x 2 (no cache_write price: input price)
    expected_input = (600 * Decimal(2) + 300 * Decimal("0.2") + 100 * Decimal(2)) / MTOK
    assert quote.input == expected_input == Decimal("0.00146")
    assert quote.output == Decimal("0.0004")
    assert quote.total == Decimal("0.00146") + Decimal("0.0004") + Decimal("0.002") + Decimal("0.00025")
    assert quote.source == "override"


def test_glob_price_entries_match_model_names_and_exact_entries_win() -> None:
    # ``[prices."my-model-*"]`` used to be ignored without a word: the model was recorded at cost 0.
    prices = book(
        **{
            "my-model-large": PriceOverride(input=Decimal(9)),
            "my-model-*": PriceOverride(input=Decimal(1)),
            "azure/gpt-4o-*": PriceOverride(input=Decimal(3)),
        }
    )

    def input_price(model: str, provider: str | None = None) -> Decimal:
        quote = prices.quote(MeteredUsage(model, provider, prompt_tokens=1_000_000), NOW)
        assert quote.priced, model
        return quote.total

    assert input_price("my-model-small") == 1
    assert input_price("my-model-large") == 9  # the exact entry, not the pattern
    assert input_price("gpt-4o-2024-08-06", "azure") == 3
    assert prices.quote(MeteredUsage("gpt-4o-2024-08-06", "openai", prompt_tokens=1_000_000), NOW).source == (
        "genai-prices"
    )
    assert not prices.quote(MeteredUsage("other-model", None, prompt_tokens=10), NOW).priced


def test_one_hour_cache_writes_and_web_searches_have_override_prices() -> None:
    price = PriceOverride(
        input=Decimal(2),
        cache_write=Decimal("2.5"),
        cache_write_1h=Decimal(4),
        per_web_search=Decimal("0.01"),
    )
    usage = MeteredUsage(
        "house-model",
        None,
        prompt_tokens=1000,
        cache_write_tokens=300,
        cache_write_1h_tokens=100,
        web_searches=2,
    )
    quote = book(**{"house-model": price}).quote(usage, NOW)
    # 700 uncached x 2 + 200 5-minute writes x 2.5 + 100 1-hour writes x 4, per million; 2 searches.
    assert quote.input == Decimal("0.0023")
    assert quote.total == Decimal("0.0023") + Decimal("0.02")


def test_override_clamps_uncached_input_at_zero() -> None:
    price = PriceOverride(input=Decimal(1000), cache_read=Decimal(1))
    usage = MeteredUsage("house-model", None, prompt_tokens=10, cache_read_tokens=30)
    quote = book(**{"house-model": price}).quote(usage, NOW)
    assert quote.input == Decimal(30) / MTOK  # the 30 cached tokens only, nothing at the input price


def test_event_override_prices_units_and_requests() -> None:
    prices = book(**{"case.execute": PriceOverride(per_unit=Decimal("0.05"), per_request=Decimal("0.01"))})
    quote = prices.quote(MeteredUsage(None, None, units=3, event="case.execute"), NOW)
    assert quote.priced
    assert quote.total == Decimal("0.16")
    assert (quote.input, quote.output) == (Decimal(0), Decimal(0))


def test_event_override_applies_when_model_has_no_override() -> None:
    prices = book(
        **{
            "case.execute": PriceOverride(per_unit=Decimal(2)),
            "other-model": PriceOverride(input=Decimal(1)),
        }
    )
    quote = prices.quote(MeteredUsage("no-such-model", None, units=4, event="case.execute"), NOW)
    assert (quote.source, quote.total) == ("override", Decimal(8))


def test_event_without_override_is_unpriced() -> None:
    quote = book().quote(MeteredUsage(None, None, units=3, event="case.execute"), NOW)
    assert quote == Quote(False, "USD", Decimal(0), Decimal(0), Decimal(0), "unpriced", None)


def test_bad_override_currency() -> None:
    with pytest.raises(ValueError, match="three capital letters"):
        PriceBook({}, "usd")


# --- bundled genai-prices database -----------------------------------------------------------------------


def test_gpt_4o_mini_from_database() -> None:
    usage = MeteredUsage(
        "gpt-4o-mini", "openai", prompt_tokens=1000, completion_tokens=200, cache_read_tokens=400
    )
    quote = book().quote(usage, NOW)
    # Published: $0.15 input, $0.075 cached input, $0.60 output per million tokens.
    expected_input = (600 * Decimal("0.15") + 400 * Decimal("0.075")) / MTOK
    expected_output = 200 * Decimal("0.6") / MTOK
    assert (quote.priced, quote.source, quote.currency, quote.provider) == (
        True,
        "genai-prices",
        "USD",
        "openai",
    )
    assert quote.input == expected_input == Decimal("0.00012")
    assert quote.output == expected_output == Decimal("0.00012")
    assert quote.total == Decimal("0.00024")


def test_claude_3_5_sonnet_with_cache_read_and_write() -> None:
    usage = MeteredUsage(
        "claude-3-5-sonnet",
        "anthropic",
        prompt_tokens=1000,
        completion_tokens=500,
        cache_read_tokens=200,
        cache_write_tokens=100,
    )
    quote = book().quote(usage, NOW)
    # Published per MTok: $3 input, $0.30 cache read, $3.75 cache write (5 min), $15 output.
    # prompt_tokens includes the cached ones: 1000 - 200 - 100 = 700 uncached.
    expected_input = (700 * Decimal(3) + 200 * Decimal("0.3") + 100 * Decimal("3.75")) / MTOK
    assert quote.input == expected_input == Decimal("0.002535")
    assert quote.output == 500 * Decimal(15) / MTOK == Decimal("0.0075")
    assert quote.total == Decimal("0.010035")
    assert quote.provider == "anthropic"
    # Same figure when genai-prices has to find the provider from the model name.
    assert (
        book()
        .quote(
            MeteredUsage(
                "claude-3-5-sonnet",
                None,
                prompt_tokens=1000,
                completion_tokens=500,
                cache_read_tokens=200,
                cache_write_tokens=100,
            ),
            NOW,
        )
        .total
        == quote.total
    )


def test_whisper_by_audio_seconds() -> None:
    quote = book().quote(MeteredUsage("whisper-1", None, audio_seconds=Decimal(90)), NOW)
    # $0.006 per minute = $0.36 per hour.
    assert quote.total == Decimal("0.36") * 90 / 3600 == Decimal("0.009")
    assert quote.input == Decimal("0.009")  # transcription audio is input
    assert quote.provider == "openai"


def test_text_embedding_3_small() -> None:
    quote = book().quote(MeteredUsage("text-embedding-3-small", "openai", prompt_tokens=12345), NOW)
    assert quote.total == 12345 * Decimal("0.02") / MTOK == Decimal("0.0002469")
    assert quote.output == 0


def test_historical_price_by_request_time() -> None:
    usage = MeteredUsage(
        "ministral-8b-latest", "mistral", prompt_tokens=1_000_000, completion_tokens=1_000_000
    )
    # Mistral raised Ministral 8B from $0.10 to $0.15 per MTok on 2025-12-02.
    assert book().quote(usage, datetime(2025, 6, 1, tzinfo=UTC)).total == Decimal("0.2")
    assert book().quote(usage, datetime(2026, 1, 1, tzinfo=UTC)).total == Decimal("0.3")


def test_unknown_provider_falls_back_to_model_match() -> None:
    quote = book().quote(MeteredUsage("gpt-4o-mini", "my-vllm-box", prompt_tokens=1_000_000), NOW)
    assert (quote.priced, quote.provider, quote.total) == (True, "openai", Decimal("0.15"))


@pytest.mark.parametrize(
    "usage",
    [
        MeteredUsage("definitely-not-a-model-9000", None, prompt_tokens=10),
        MeteredUsage("definitely-not-a-model-9000", "openai", prompt_tokens=10),
        MeteredUsage(None, None, prompt_tokens=10),
        MeteredUsage("gpt-4o-mini", "anthropic", prompt_tokens=10),  # known provider without that model
    ],
)
def test_unknown_model_is_unpriced_not_an_error(usage: MeteredUsage) -> None:
    quote = book().quote(usage, NOW)
    assert not quote.priced
    assert quote.total == quote.input == quote.output == 0
    assert quote.source == "unpriced"
    charge = charge_for(
        quote,
        currency="EUR",
        discount_pct=10,
        rates=RATES,
        credit_value=Decimal("0.01"),
        credit_currency="USD",
    )
    assert charge == Charge(False, "EUR", 0, 10, 0, 0)


def test_requests_multiply_per_request_database_price() -> None:
    # Perplexity's Sonar bills per thousand requests; genai-prices itself always counts one request.
    one = book().quote(MeteredUsage("sonar", "perplexity", requests=1), NOW)
    three = book().quote(MeteredUsage("sonar", "perplexity", requests=3), NOW)
    assert one.total > 0
    assert three.total == 3 * one.total


def _tiered_model() -> tuple[gp.Provider, gp.ModelInfo]:
    for provider in bundled_providers:
        for model in provider.models:
            if isinstance(model.prices, gp.ModelPrice) and any(
                isinstance(v, gp.TieredPrices) for v in vars(model.prices).values()
            ):
                return provider, model
    pytest.skip("no tiered model in this genai-prices release")


def test_tiered_prices_match_genai_prices_on_both_sides_of_the_threshold() -> None:
    provider, model = _tiered_model()
    assert isinstance(model.prices, gp.ModelPrice)
    start = min(
        t.start for v in vars(model.prices).values() if isinstance(v, gp.TieredPrices) for t in v.tiers
    )
    for prompt in (start - 1, start, start + 1, start * 3):
        usage = MeteredUsage(
            model.id, provider.id, prompt_tokens=prompt, completion_tokens=1000, cache_read_tokens=prompt // 4
        )
        expected = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=prompt, output_tokens=1000, cache_read_tokens=prompt // 4),
            model.id,
            provider_id=provider.id,
            genai_request_timestamp=NOW,
        )
        assert book().quote(usage, NOW).total == expected.total_price, prompt


def test_groq_whisper_minimum_billing_is_respected() -> None:
    # Groq bills Whisper for at least 10 s: not linear, so it must go through genai-prices' own rules.
    quote = book().quote(MeteredUsage("whisper-large-v3", "groq", audio_seconds=Decimal(2)), NOW)
    expected = genai_prices.calc_price(
        genai_prices.Usage(audio_seconds=Decimal(2), input_audio_seconds=Decimal(2)),
        "whisper-large-v3",
        provider_id="groq",
        genai_request_timestamp=NOW,
    )
    assert quote.total == expected.total_price > 0
    assert (
        quote.total
        == book().quote(MeteredUsage("whisper-large-v3", "groq", audio_seconds=Decimal(10)), NOW).total
    )


def _every_bundled_model() -> Iterator[tuple[gp.Provider, gp.ModelInfo]]:
    for provider in bundled_providers:
        for model in provider.models:
            yield provider, model


def test_fast_path_equals_genai_prices_for_every_bundled_model() -> None:
    rng = random.Random(20261101)
    for provider, model in _every_bundled_model():
        prompt = rng.choice([0, 7, 1000, 150_000, 250_000, 300_000, 2_000_000])
        cache_read, cache_write = rng.randint(0, prompt // 2), rng.randint(0, prompt // 3)
        output = rng.randint(0, 5000)
        audio = rng.choice([None, Decimal("2.5"), Decimal(61)])
        usage = MeteredUsage(
            model.id,
            provider.id,
            prompt_tokens=prompt,
            completion_tokens=output,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            audio_seconds=audio,
        )
        gp_usage = genai_prices.Usage(
            input_tokens=prompt or None,
            output_tokens=output or None,
            cache_read_tokens=cache_read or None,
            cache_write_tokens=cache_write or None,
            audio_seconds=audio,
            input_audio_seconds=audio,
        )
        expected = model.calc_price(gp_usage, provider, genai_request_timestamp=NOW)
        got = price_book_module._quote_database(provider, model, usage, NOW)
        assert got is not None, (provider.id, model.id)
        assert (got.input, got.output, got.total) == (
            expected.input_price,
            expected.output_price,
            expected.total_price,
        ), (provider.id, model.id)


def test_installed_custom_snapshot_is_ignored() -> None:
    # An updater elsewhere in the process could install fetched data; quotes stay on the bundled data.
    data_snapshot.set_custom_snapshot(data_snapshot.DataSnapshot(providers=[], from_auto_update=True))
    try:
        quote = book().quote(MeteredUsage("gpt-4o-mini", "openai", prompt_tokens=1_000_000), NOW)
    finally:
        data_snapshot.set_custom_snapshot(None)
    assert quote.total == Decimal("0.15")


def test_lookup_cache_is_bounded() -> None:
    info = price_book_module._find_model.cache_info()
    assert info.maxsize is not None


def test_no_http_or_database_imports_in_package() -> None:
    forbidden = {
        "httpx",
        "httpx2",
        "requests",
        "urllib",
        "aiohttp",
        "sqlalchemy",
        "psycopg",
        "fastapi",
        "starlette",
        "redis",
        "sqlite3",
        "socket",
    }
    package = Path(meterline.pricing.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, (source.name, names)


def test_public_api() -> None:
    assert meterline.pricing.__all__ == sorted(meterline.pricing.__all__)
    assert {"Charge", "CurrencyRates", "MeteredUsage", "PriceBook", "Quote", "charge_for"} <= set(
        meterline.pricing.__all__
    )


# --- currency conversion ----------------------------------------------------------------------------------


def test_convert_usd_to_eur_is_exact() -> None:
    assert RATES.convert(Decimal("0.010035"), "USD", "EUR") == Decimal("0.0092322")
    assert RATES.convert(Decimal("0.92"), "EUR", "USD") == Decimal(1)
    assert RATES.convert(Decimal("150"), "JPY", "EUR") == Decimal("0.92")
    assert RATES.convert(Decimal("1.23"), "EUR", "EUR") == Decimal("1.23")


def test_unknown_currency_is_an_error_naming_it() -> None:
    with pytest.raises(InvalidRequest, match="GBP"):
        RATES.convert(Decimal(1), "USD", "GBP")
    with pytest.raises(InvalidRequest, match="CHF"):
        RATES.convert(Decimal(1), "CHF", "USD")
    with pytest.raises(InvalidRequest, match="GBP"):
        charge_for(
            usd("1"),
            currency="GBP",
            discount_pct=0,
            rates=RATES,
            credit_value=Decimal("0.01"),
            credit_currency="USD",
        )


@pytest.mark.parametrize("rates", [{"EUR": Decimal(0)}, {"EUR": Decimal(-1)}, {"USD": Decimal(2)}])
def test_bad_rates_rejected(rates: dict[str, Decimal]) -> None:
    with pytest.raises(ValueError, match="rate"):
        CurrencyRates(rates)


def test_rates_reject_floats() -> None:
    with pytest.raises(ValueError, match="Decimal"):
        CurrencyRates({"EUR": 0.92})  # type: ignore[dict-item]


# --- charges: discount, rounding, credits -----------------------------------------------------------------


def charge(
    quote: Quote,
    *,
    currency: str = "USD",
    pct: int = 0,
    credit_value: str = "0.01",
    credit_currency: str = "USD",
) -> Charge:
    return charge_for(
        quote,
        currency=currency,
        discount_pct=pct,
        rates=RATES,
        credit_value=Decimal(credit_value),
        credit_currency=credit_currency,
    )


def test_charge_converts_discounts_and_prices_credits() -> None:
    result = charge(usd("0.010035"), currency="EUR", pct=20)
    assert result.priced
    assert result.currency == "EUR"
    assert result.list_cost_nanos == 9_232_200  # 0.010035 x 0.92 EUR
    assert result.cost_nanos == 7_385_760  # x 0.80
    assert result.discount_pct == 20
    assert result.credits_nanos == 802_800_000  # 0.008028 USD / 0.01 USD per credit


def test_credits_equal_cost_over_credit_value() -> None:
    result = charge(usd("0.010035"))
    assert result.cost_nanos == result.list_cost_nanos == 10_035_000
    assert result.credits_nanos == 1_003_500_000  # 1.0035 credits
    in_eur = charge(usd("1"), currency="EUR", credit_value="0.5", credit_currency="EUR")
    assert in_eur.credits_nanos == 1_840_000_000  # 0.92 EUR / 0.50 EUR per credit


def test_discount_rounds_half_even_at_the_nano() -> None:
    assert charge(usd("0.000000003"), pct=50).cost_nanos == 2  # 1.5 -> 2
    assert charge(usd("0.000000005"), pct=50).cost_nanos == 2  # 2.5 -> 2
    assert charge(usd("0.0000000025")).list_cost_nanos == 2  # 2.5 -> 2
    assert charge(usd("0.0000000035")).list_cost_nanos == 4  # 3.5 -> 4


def test_list_and_net_are_each_rounded_once_from_the_exact_amount() -> None:
    result = charge(usd("0.0000000035"), pct=10)
    assert result.list_cost_nanos == 4  # 3.5 -> 4
    assert result.cost_nanos == 3  # 3.15 -> 3; discounting the rounded list (3.6) would give 4


def test_non_terminating_conversion_rounds_once() -> None:
    result = charge(usd("1", currency="EUR"), currency="USD")
    # 1 / 0.92 = 1.0869565217391304347826...
    assert result.list_cost_nanos == 1_086_956_522


def test_full_discount_is_free() -> None:
    result = charge(usd("12.5"), pct=100)
    assert (result.list_cost_nanos, result.cost_nanos, result.credits_nanos) == (12_500_000_000, 0, 0)


@pytest.mark.parametrize("pct", [-1, 101, True, 10.0])
def test_discount_must_be_0_to_100(pct: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        charge(usd("1"), pct=pct)  # type: ignore[arg-type]
    assert info.value.param == "discount_pct"


@pytest.mark.parametrize("value", [Decimal(0), Decimal(-1), Decimal("Infinity")])
def test_credit_value_must_be_positive(value: Decimal) -> None:
    with pytest.raises(InvalidRequest):
        charge_for(
            usd("1"), currency="USD", discount_pct=0, rates=RATES, credit_value=value, credit_currency="USD"
        )


# --- properties -------------------------------------------------------------------------------------------


def half_even_nanos(amount: Fraction) -> int:
    """Reference rounding on exact rationals, independent of Decimal contexts."""
    scaled = amount * 1_000_000_000
    floor = scaled.numerator // scaled.denominator
    rest = scaled - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2):
        return floor + 1
    return floor


amounts = st.decimals(min_value=0, max_value=10_000, places=12, allow_nan=False, allow_infinity=False)
rate_values = st.decimals(
    min_value=Decimal("0.0001"), max_value=100_000, places=4, allow_nan=False, allow_infinity=False
)
rows = st.tuples(amounts, st.integers(min_value=0, max_value=100))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(rows, min_size=1, max_size=40),
    quote_rate=rate_values,
    org_rate=rate_values,
    credit_rate=rate_values,
    credit_value=st.decimals(
        min_value=Decimal("0.000001"), max_value=1000, places=6, allow_nan=False, allow_infinity=False
    ),
)
def test_charges_are_exact_integers_and_sum_row_by_row(
    rows: list[tuple[Decimal, int]],
    quote_rate: Decimal,
    org_rate: Decimal,
    credit_rate: Decimal,
    credit_value: Decimal,
) -> None:
    rates = CurrencyRates({"AAA": quote_rate, "BBB": org_rate, "CCC": credit_rate})
    charges = [
        charge_for(
            Quote(True, "AAA", total, Decimal(0), total, "override", None),
            currency="BBB",
            discount_pct=pct,
            rates=rates,
            credit_value=credit_value,
            credit_currency="CCC",
        )
        for total, pct in rows
    ]
    expected_costs = []
    expected_credits = []
    for (total, pct), result in zip(rows, charges, strict=True):
        assert type(result.list_cost_nanos) is int
        assert type(result.cost_nanos) is int
        assert type(result.credits_nanos) is int
        assert 0 <= result.cost_nanos <= result.list_cost_nanos
        exact_list = Fraction(total) * Fraction(org_rate) / Fraction(quote_rate)
        exact_net = exact_list * (100 - pct) / 100
        exact_credits = (
            Fraction(total)
            * Fraction(credit_rate)
            / Fraction(quote_rate)
            * (100 - pct)
            / 100
            / Fraction(credit_value)
        )
        assert result.list_cost_nanos == half_even_nanos(exact_list)
        expected_costs.append(half_even_nanos(exact_net))
        expected_credits.append(half_even_nanos(exact_credits))
    assert [c.cost_nanos for c in charges] == expected_costs
    assert sum(c.cost_nanos for c in charges) == sum(expected_costs)
    assert sum(c.credits_nanos for c in charges) == sum(expected_credits)


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.integers(min_value=0, max_value=5_000_000),
    completion=st.integers(min_value=0, max_value=1_000_000),
    cache_read=st.integers(min_value=0, max_value=5_000_000),
    cache_write=st.integers(min_value=0, max_value=5_000_000),
)
def test_override_quote_matches_exact_rational_formula(
    prompt: int, completion: int, cache_read: int, cache_write: int
) -> None:
    price = PriceOverride(
        input=Decimal("2.5"), output=Decimal("10"), cache_read=Decimal("1.25"), cache_write=Decimal("3.125")
    )
    usage = MeteredUsage(
        "m",
        None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
    )
    quote = book(m=price).quote(usage, NOW)
    uncached = max(prompt - cache_read - cache_write, 0)
    exact = (
        Fraction(uncached) * Fraction("2.5")
        + cache_read * Fraction("1.25")
        + cache_write * Fraction("3.125")
        + completion * 10
    ) / 1_000_000
    assert Fraction(quote.total) == exact
    assert isinstance(quote.total, Decimal)
