"""One error tree for the whole product. No HTTP here: ``api.errors`` maps codes to status codes.

MeterlineError                    code
├── InvalidRequest                invalid_request
│   └── PayloadTooLarge           payload_too_large
├── Unauthorized                  unauthorized
├── Forbidden                     forbidden
├── NotFound                      not_found
├── Conflict                      conflict
├── LimitExceeded                 quota_exceeded | rate_limit_exceeded | credits_exhausted | spend_cap_reached
├── UpstreamError                 upstream_error
├── ServiceUnavailable            service_unavailable
└── ConfigError                   config_error (raised at start-up, never to a client)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class MeterlineError(Exception):
    code = "internal"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(MeterlineError):
    code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"


class Unauthorized(MeterlineError):
    code = "unauthorized"


class Forbidden(MeterlineError):
    code = "forbidden"


class NotFound(MeterlineError):
    code = "not_found"


class Conflict(MeterlineError):
    code = "conflict"


class LimitExceeded(MeterlineError):
    """A block limit would be exceeded. ``code`` names which kind; ``retry_after`` is in seconds."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retry_after: int,
        limit: str | None = None,
        details: Mapping[str, Any] | None = None,
        rate_limits: object = None,
    ) -> None:
        super().__init__(message, param=limit)
        self.code = code
        self.retry_after = retry_after
        # Which limit refused, for the error body; and the rate-limit state for the response headers.
        self.details = dict(details) if details else None
        self.rate_limits = rate_limits


class UpstreamError(MeterlineError):
    code = "upstream_error"


class ServiceUnavailable(MeterlineError):
    code = "service_unavailable"


class ConfigError(MeterlineError):
    code = "config_error"


def unpriced_refusal(model: str) -> Forbidden:
    """A plan with ``unpriced = "block"`` refuses a model the price book has no price for."""
    return Forbidden(
        f"model {model!r} has no price, and this organization's plan refuses unpriced usage "
        '(unpriced = "block"): use a priced model, or ask the operator to price it',
        param="model",
    )
