"""The ``X-RateLimit-*`` headers (seed 001) of a metered response, from the quota engine's state."""

from __future__ import annotations

from meterline.quotas.engine import RateLimits


def rate_limit_headers(rates: RateLimits) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, window in (("RPM", rates.rpm), ("TPM", rates.tpm)):
        headers[f"X-RateLimit-Limit-{name}"] = str(window.limit)
        headers[f"X-RateLimit-Remaining-{name}"] = str(window.remaining)
        headers[f"X-RateLimit-Reset-{name}"] = str(window.reset_s)
    return headers
