"""The pages' Jinja2 environment: templates from this package, every value escaped (autoescape on for
every template, whatever its extension), and the formatting filters."""

from __future__ import annotations

from decimal import Decimal
from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined

from meterline.dashboard import formatting


def _width(pct: Decimal | None) -> str:
    """A CSS width from a percentage, exact text clamped to 0-100 (never a float)."""
    if pct is None:
        return "0%"
    return f"{formatting.exact(min(max(pct, Decimal(0)), Decimal(100)))}%"


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("meterline.dashboard", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt name fails the test that renders it, not silently
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        amount=formatting.amount,
        short_amount=formatting.short_amount,
        number=formatting.number,
        percent=formatting.percent,
        days=formatting.days,
        exact=formatting.exact,
        width=_width,
    )
    return env


def render(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)
