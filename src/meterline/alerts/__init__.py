"""Usage alerts: thresholds, run-out projection, frequent refusals, unusual and unpriced usage; webhook
policy."""

from __future__ import annotations

from meterline.alerts.delivery import RETRY_SCHEDULE_S, new_secret, retry_delay
from meterline.alerts.destinations import check_url, is_public
from meterline.alerts.rules import (
    DEFAULT_THRESHOLDS,
    Alert,
    allowance_refused,
    crossed_thresholds,
    frequent_refusals,
    projected_run_out,
    refused_by_allowance,
    threshold_alert,
    unpriced_usage,
    unusual_trigger,
    unusual_usage,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "RETRY_SCHEDULE_S",
    "Alert",
    "allowance_refused",
    "check_url",
    "crossed_thresholds",
    "frequent_refusals",
    "is_public",
    "new_secret",
    "projected_run_out",
    "refused_by_allowance",
    "retry_delay",
    "threshold_alert",
    "unpriced_usage",
    "unusual_trigger",
    "unusual_usage",
]
