"""Limits: ``(meter, window, scope, max, policy)`` (SPEC §2), and the named limits of plans, keys and
identifiers (``daily_tokens``, ``rpm``, ...).

A limit says how much of one meter may be consumed in one window by one scope. ``max == -1`` is
unlimited. ``block`` refuses the request that would exceed ``max``; ``overage`` admits it and marks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

UNLIMITED = -1

Window = Literal["minute", "day", "period"]
Scope = Literal["organization", "workspace", "key", "identifier"]
Policy = Literal["block", "overage"]
# tokens | calls | credits | spend | units:<event>
Meter = str

BASE_METERS = ("tokens", "calls", "credits", "spend")
WINDOWS: tuple[Window, ...] = ("minute", "day", "period")
SCOPES: tuple[Scope, ...] = ("organization", "workspace", "key", "identifier")

# The named limits that keys, identifiers (seed 000 ``limits``) and plans use: name -> (meter, window).
# Credits are whole credits here; the engine counts them in nanos like all money.
NAMED_LIMITS: Mapping[str, tuple[Meter, Window]] = {
    "daily_tokens": ("tokens", "day"),
    "monthly_tokens": ("tokens", "period"),
    "daily_calls": ("calls", "day"),
    "monthly_calls": ("calls", "period"),
    "rpm": ("calls", "minute"),
    "tpm": ("tokens", "minute"),
    "daily_credits": ("credits", "day"),
    "monthly_credits": ("credits", "period"),
    # Money of the organization's currency spent in the billing period (a key's own spend cap).
    "spend_cap": ("spend", "period"),
}
LIMIT_NAMES = tuple(NAMED_LIMITS)
MAX_LIMIT = 10**15
# Limits on credits are set in whole credits and counted in nanos.
NANOS_PER_WHOLE = 1_000_000_000
# Named limits held in nanos already: an amount of money may have cents ("25.50"). Their maximum is
# MAX_LIMIT nanos too (1,000,000 currency units).
NANOS_LIMITS = frozenset({"spend_cap"})


def check_named_limits(limits: Mapping[str, int]) -> dict[str, int]:
    """Validate a ``{name: max}`` mapping (keys, identifiers): known names, integers, -1 or more. The
    limits of ``NANOS_LIMITS`` are nanos of money (the API takes them as decimal amounts)."""
    checked: dict[str, int] = {}
    for name, value in limits.items():
        if name not in NAMED_LIMITS:
            raise ValueError(f"unknown limit {name!r}; known limits: {', '.join(LIMIT_NAMES)}")
        if isinstance(value, bool) or not isinstance(value, int) or not UNLIMITED <= value <= MAX_LIMIT:
            raise ValueError(f"limit {name!r} must be an integer from -1 (unlimited) to {MAX_LIMIT}")
        checked[name] = value
    return checked


@dataclass(frozen=True, slots=True)
class Limit:
    meter: Meter
    window: Window
    scope: Scope
    max: int
    policy: Policy = "block"
    # Where the limit comes from, for error messages and /v1/usage: "plan", "key", "identifier", ...
    name: str = ""

    @property
    def unlimited(self) -> bool:
        return self.max == UNLIMITED
