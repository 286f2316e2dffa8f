"""From a quote to what an organization is charged: currency conversion, discount, credits.

Each amount is computed as one fraction of exact Decimals and rounded to integer nanos exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

from meterline.errors import InvalidRequest
from meterline.money import to_nanos
from meterline.pricing.price_book import DATABASE_CURRENCY, Quote

__all__ = ["Charge", "CurrencyRates", "charge_for"]

_ONE = Decimal(1)
_HUNDRED = Decimal(100)
# Products of prices, counts and rates are exact at this precision, so the single division is the only
# rounding before the nano. A quotient that is not exact has an infinite expansion and is therefore never
# a true half-nano tie, and at 100 digits it is far too close to its true value to be mistaken for one: so
# rounding it to the nano gives the same nanos as rounding the exact fraction.
_EXACT = Context(prec=100, rounding=ROUND_HALF_EVEN)


class CurrencyRates:
    """Exchange rates as units of each currency per one USD (the price database's currency)."""

    __slots__ = ("_rates",)

    def __init__(self, rates: Mapping[str, Decimal]) -> None:
        table: dict[str, Decimal] = {}
        for code, rate in rates.items():
            if not isinstance(rate, Decimal) or not rate.is_finite() or rate <= 0:
                raise ValueError(f"exchange rate for {code} must be a positive Decimal, got {rate!r}")
            table[code] = rate
        if table.setdefault(DATABASE_CURRENCY, _ONE) != _ONE:
            usd = table[DATABASE_CURRENCY]
            raise ValueError(f"the {DATABASE_CURRENCY} rate is 1 by definition, got {usd}")
        self._rates = table

    def rate(self, currency: str) -> Decimal:
        """Units of ``currency`` per one USD."""
        rate = self._rates.get(currency)
        if rate is None:
            raise InvalidRequest(
                f"no exchange rate for currency {currency!r}; add it to currency_rates", param="currency"
            )
        return rate

    def convert(self, amount: Decimal, from_currency: str, to_currency: str) -> Decimal:
        """``amount`` in ``to_currency``, unrounded (see ``_EXACT`` for how exact that is)."""
        source = self.rate(from_currency)
        target = self.rate(to_currency)
        if from_currency == to_currency:
            return amount
        with localcontext(_EXACT):
            return amount * target / source


@dataclass(frozen=True, slots=True)
class Charge:
    """One row's settled amounts. ``list_cost_nanos`` is before the discount, ``cost_nanos`` after, both in
    ``currency``; ``credits_nanos`` is the discounted cost in nanos of a credit."""

    priced: bool
    currency: str
    list_cost_nanos: int
    discount_pct: int
    cost_nanos: int
    credits_nanos: int


def charge_for(
    quote: Quote,
    *,
    currency: str,
    discount_pct: int,
    rates: CurrencyRates,
    credit_value: Decimal,
    credit_currency: str,
) -> Charge:
    """Convert ``quote`` to the organization's ``currency``, apply its discount and price it in credits.

    ``credit_value`` is what one credit is worth in ``credit_currency``.
    """
    if type(discount_pct) is not int or not 0 <= discount_pct <= 100:
        raise InvalidRequest(
            f"discount_pct must be an integer from 0 to 100, got {discount_pct!r}", param="discount_pct"
        )
    if not isinstance(credit_value, Decimal) or not credit_value.is_finite() or credit_value <= 0:
        raise InvalidRequest(
            f"credit_value must be a positive Decimal, got {credit_value!r}", param="credit_value"
        )
    # Looked up even for an unpriced quote, so a missing rate shows up on the first request, not the first
    # priced one.
    source = rates.rate(quote.currency)
    target = rates.rate(currency)
    credit_rate = rates.rate(credit_currency)
    if not quote.priced:
        return Charge(False, currency, 0, discount_pct, 0, 0)
    kept = _HUNDRED - discount_pct
    with localcontext(_EXACT):
        # Each amount is built from the quote's exact total in one expression with a single division, and
        # to_nanos runs inside this context, so nothing is rounded before the nano.
        list_cost = quote.total * target / source
        cost = quote.total * target * kept / (source * _HUNDRED)
        credits = quote.total * credit_rate * kept / (source * _HUNDRED * credit_value)
        return Charge(True, currency, to_nanos(list_cost), discount_pct, to_nanos(cost), to_nanos(credits))
