"""Alert kinds, as stored and as sent in webhook payloads (``type`` = ``alert.<kind>``)."""

from __future__ import annotations

THRESHOLD = "usage_threshold"
PROJECTED_RUN_OUT = "projected_run_out"
RATE_LIMITED = "rate_limits_exceeded_frequently"
UNUSUAL_USAGE = "unusual_usage"
# Usage that could not be settled was quarantined for an operator (at most one alert a day).
QUARANTINED = "usage_quarantined"
# Usage of a model the price book has no price for was recorded at cost 0 (once per model and period).
UNPRICED = "unpriced_usage"

ALL = (THRESHOLD, PROJECTED_RUN_OUT, RATE_LIMITED, UNUSUAL_USAGE, QUARANTINED, UNPRICED)
