"""Pricing: what a usage row costs and what an organization is charged for it.

``PriceBook.quote`` resolves an exact Decimal price (operator override > bundled genai-prices database >
unpriced); ``charge_for`` converts it to the organization's currency, applies its discount and prices it
in credits, rounding each amount to integer nanos exactly once.
"""

from meterline.pricing.charge import Charge, CurrencyRates, charge_for
from meterline.pricing.price_book import PriceBook, Quote, QuoteSource
from meterline.pricing.usage import MeteredUsage

__all__ = ["Charge", "CurrencyRates", "MeteredUsage", "PriceBook", "Quote", "QuoteSource", "charge_for"]
