"""Old names of SDK result fields, kept as read-only aliases that warn.

Every result is named as the JSON API names it (``data``, ``totals.credits``, ``pagination.total``...),
so what the API reference says is what the code reads. Names the SDK used before that alignment still
work, with a ``DeprecationWarning`` saying what to use instead."""

from __future__ import annotations

import warnings
from typing import Any


def renamed(old: str, new: str) -> Any:
    """A read-only property ``old`` returning the attribute path ``new`` (dotted for nested objects; an
    absent object on the way gives None), with a ``DeprecationWarning`` at the caller's line."""
    path = new.split(".")

    def read(self: object) -> Any:
        warnings.warn(
            f"{type(self).__name__}.{old} is deprecated, use .{new} (the API's name)",
            DeprecationWarning,
            stacklevel=2,
        )
        value: Any = self
        for name in path:
            value = None if value is None else getattr(value, name)
        return value

    return property(read, doc=f"Deprecated: use ``{new}``.")
