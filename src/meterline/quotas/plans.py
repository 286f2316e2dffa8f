"""Plans (tiers): named sets of limits, a credit allowance and an overage policy (SPEC §2).

The shipped tiers come from seeds 000-003; operators override or add plans in config. ``-1`` means
unlimited everywhere (seed 003), and every enterprise limit is unlimited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from meterline.config import PlanConfig
from meterline.quotas.limits import NANOS_PER_WHOLE, Limit

UNLIMITED = -1
Overage = Literal["block", "overage"]
Disconnect = Literal["bill_generated", "void"]
Unpriced = Literal["record", "block"]


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    daily_tokens: int
    monthly_tokens: int
    daily_calls: int
    monthly_calls: int
    rpm: int
    tpm: int
    monthly_credits: int
    overage: Overage
    discount_pct: int = 0
    # Limits beyond the named ones: custom event meters (``units:case.execute``), other scopes, spend.
    limits: tuple[Limit, ...] = ()
    # Gateway: a stream is ended (with an error event) once the organization's credits run out.
    stream_cutoff: bool = False
    # Gateway: a stream the client left is billed for what was generated until then, or voided (a row
    # at zero usage, saying so).
    disconnect: Disconnect = "bill_generated"
    # Usage of a model the price book has no price for: recorded at cost 0 (an ``unpriced_usage`` alert
    # says so), or refused (403) before it happens.
    unpriced: Unpriced = "record"
    # The meter ``GET /v1/usage`` reports at the top level (seed 003); None: ``default_primary_meter``.
    primary_meter: str | None = None

    @property
    def meter(self) -> str:
        """The plan's primary meter: what it is sold by (tokens, calls or ``units:<event>``)."""
        return self.primary_meter or default_primary_meter(self)


def default_primary_meter(plan: Plan) -> str:
    """Tokens, unless the plan limits no tokens and names extra limits: then the first extra limit's
    meter that counts something (a plan sold by cases, ``units:case.execute``, reports cases)."""
    named = (plan.daily_tokens, plan.monthly_tokens, plan.tpm)
    limits_tokens = any(v != UNLIMITED for v in named) or any(
        limit.meter == "tokens" and not limit.unlimited for limit in plan.limits
    )
    if not limits_tokens:
        for limit in plan.limits:
            if not limit.unlimited and (limit.meter == "calls" or limit.meter.startswith("units:")):
                return limit.meter
    return "tokens"


DEFAULT_PLANS: Mapping[str, Plan] = {
    "free": Plan("free", 50_000, 500_000, 100, 1_000, 100, 1_000_000, 500, "block"),
    "pro": Plan("pro", 5_000_000, 50_000_000, 10_000, 100_000, 1_000, 10_000_000, 50_000, "overage"),
    "enterprise": Plan(
        "enterprise", UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED, "overage"
    ),
}

# A plan defined only in config starts from these (a closed, blocking plan) and sets what it needs.
_BLANK = Plan("", 0, 0, 0, 0, 0, 0, 0, "block")


def build_plans(configured: Mapping[str, PlanConfig]) -> dict[str, Plan]:
    """The default tiers with the operator's overrides applied and extra plans added."""
    plans = dict(DEFAULT_PLANS)
    for name, config in configured.items():
        base = plans.get(name, replace(_BLANK, name=name))
        changes = {k: v for k, v in config.model_dump(exclude={"limits"}).items() if v is not None}
        if config.limits is not None:
            changes["limits"] = tuple(
                Limit(
                    c.meter,
                    c.window,
                    c.scope,
                    c.max * NANOS_PER_WHOLE if c.meter in ("credits", "spend") and c.max >= 0 else c.max,
                    c.policy,
                    c.name or f"{c.window}_{c.meter}",
                )
                for c in config.limits
            )
        plans[name] = replace(base, **changes)
    return plans


def remaining(limit: int, used: int) -> int:
    """Seed 003: remaining = limit - usage, never below 0; -1 when the limit is -1 (unlimited)."""
    if limit == UNLIMITED:
        return UNLIMITED
    return max(limit - used, 0)
