"""Plans, limits and windows. Enforcement (reserve/settle against counters) builds on these."""

from meterline.quotas.periods import Period, billing_period, utc_day
from meterline.quotas.plans import DEFAULT_PLANS, UNLIMITED, Plan, build_plans, remaining

__all__ = [
    "DEFAULT_PLANS",
    "UNLIMITED",
    "Period",
    "Plan",
    "billing_period",
    "build_plans",
    "remaining",
    "utc_day",
]
