"""Credits: terms, draws, balances and the split of a settle (see README.md)."""

from meterline.credits.balance import CreditBalance
from meterline.credits.split import split
from meterline.credits.terms import CreditTerms, Draw, draw

__all__ = ["CreditBalance", "CreditTerms", "Draw", "draw", "split"]
