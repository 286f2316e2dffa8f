from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.money import format_nanos, from_nanos, parse_decimal, to_nanos


def test_rounding_is_half_even_at_the_nano() -> None:
    assert to_nanos(Decimal("0.0000000005")) == 0
    assert to_nanos(Decimal("0.0000000015")) == 2
    assert to_nanos(Decimal("0.0000000025")) == 2
    assert to_nanos(Decimal("-0.0000000015")) == -2


def test_round_trip_and_text() -> None:
    assert from_nanos(182_000) == Decimal("0.000182")
    assert format_nanos(182_000) == "0.000182"
    assert format_nanos(0) == "0"
    assert format_nanos(12_500_000_000) == "12.5"
    assert format_nanos(9_274) == "0.000009274"


def test_floats_are_refused() -> None:
    with pytest.raises(ValueError, match="float"):
        parse_decimal(0.1, what="price")
    assert parse_decimal("0.1", what="price") == Decimal("0.1")
    with pytest.raises(ValueError, match="finite"):
        parse_decimal("Infinity", what="price")
