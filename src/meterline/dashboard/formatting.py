"""How figures read on the pages: exact ``Decimal`` in, text out. Never a ``float``.

Money and credits arrive as exact decimals from the JSON twins. Display rounds them (half-even, like the
ledger) to a few places; the exact value stays available for a tooltip (``exact``).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
_CENT = Decimal("0.01")
_MILLI = Decimal("0.0001")


def _grouped(value: Decimal, places: Decimal) -> str:
    return f"{value.quantize(places, rounding=ROUND_HALF_EVEN):,}"


def currency_symbol(currency: str) -> str:
    """'$' for USD, '€' for EUR, ...; the code and a space for currencies without a common symbol."""
    return _SYMBOLS.get(currency, f"{currency} ")


def number(value: int | Decimal) -> str:
    """An integer count with thousands separators: 1234567 -> '1,234,567'."""
    return f"{value:,}"


def amount(value: Decimal | int, unit: str) -> str:
    """Credits (``unit == "credits"``) or money in the currency ``unit``, rounded for reading.

    Amounts under one cent keep four places so that a small but non-zero figure never reads as zero.
    """
    value = Decimal(value)
    places = _MILLI if value and abs(value) < 1 else _CENT
    text = _grouped(value, places)
    if unit == "credits":
        return f"{text} credits"
    symbol = currency_symbol(unit)
    return f"-{symbol}{text[1:]}" if text.startswith("-") else f"{symbol}{text}"


def short_amount(value: Decimal | int, unit: str) -> str:
    """``amount`` without the word "credits", for cards and table cells whose header names the unit."""
    text = amount(value, unit)
    return text.removesuffix(" credits")


def exact(value: Decimal | int) -> str:
    """The exact decimal text, trailing zeros dropped: for tooltips and ``data-`` attributes."""
    text = format(Decimal(value), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def percent(value: Decimal | None) -> str:
    """'42.5 %' with one decimal; an em dash when there is no percentage (unlimited allowance)."""
    if value is None:
        return "—"
    return f"{value.quantize(Decimal('0.1'), rounding=ROUND_HALF_EVEN)} %"


def days(value: Decimal | int | None) -> str:
    """Days, as the metric cards show them ("12 days", "3.5 days", "—" when there is no forecast)."""
    if value is None:
        return "—"
    value = Decimal(value)
    whole = value == value.to_integral_value()
    text = f"{value:,.0f}" if whole else f"{value.quantize(Decimal('0.1'), rounding=ROUND_HALF_EVEN):,}"
    return f"{text} day" if value == 1 else f"{text} days"
