"""The SDK's one exception tree: every answer that is not a success becomes one of these, carrying the
server's error envelope (``{"error": {type, code, message, param, request_id}}``, SPEC §5)::

    MeterlineError
     ├── APIConnectionError          no answer at all (refused, reset, timed out)
     ├── VerificationError           a receipt or chain that does not verify against the JWK set
     └── APIStatusError              the server answered with an error envelope
          ├── InvalidRequestError        400, 405, 413, 415, 422
          ├── AuthenticationError        401
          ├── PermissionDeniedError      403
          ├── NotFoundError              404
          ├── ConflictError              409
          ├── RateLimitError             429 rate_limit_exceeded
          │    └── QuotaExceededError    429 quota_exceeded, credits_exhausted, spend_cap_reached
          ├── InternalServerError        500
          ├── UpstreamError              502
          └── ServiceUnavailableError    503

Catch ``MeterlineError`` for everything, or a leaf for one case. The SDK's classes are its own: the
server's ``meterline.errors`` tree is never raised to a client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AuthenticationError",
    "ConflictError",
    "InternalServerError",
    "InvalidRequestError",
    "MeterlineError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UpstreamError",
    "VerificationError",
    "error_from_response",
]

# Refusals that a quota (an allowance of the period, credits, a spend cap) caused: waiting a minute rarely
# helps, unlike a per-minute rate limit.
QUOTA_CODES = frozenset({"quota_exceeded", "credits_exhausted", "spend_cap_reached"})


class MeterlineError(Exception):
    """Base of every error the SDK raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(MeterlineError):
    """The request got no HTTP answer (connection refused or reset, timeout)."""


class VerificationError(MeterlineError):
    """A receipt (or a receipt chain) failed local verification against the deployment's JWK set."""


class APIStatusError(MeterlineError):
    """The server answered an error envelope. ``body`` is the whole decoded answer (``/v1/events``
    refusals also carry the per-event ``data`` there)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str,
        type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.type = type
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after
        self.body: dict[str, Any] = dict(body or {})
        self.headers: dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        where = f" (param {self.param})" if self.param else ""
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"{self.status_code} {self.code}: {self.message}{where}{rid}"


class InvalidRequestError(APIStatusError):
    """400/422 (and 405, 413, 415): the request itself is wrong; retrying it unchanged cannot help."""


class AuthenticationError(APIStatusError):
    """401: missing, unknown, revoked or expired key or access token."""


class PermissionDeniedError(APIStatusError):
    """403: the credential is valid but its scope does not allow this."""


class NotFoundError(APIStatusError):
    """404: no such object (or not visible to this credential)."""


class ConflictError(APIStatusError):
    """409: e.g. an event id already recorded with a different body."""


class RateLimitError(APIStatusError):
    """429: a limit refused the request; ``retry_after`` says when trying again can succeed."""

    @property
    def limit(self) -> dict[str, Any] | None:
        """The limit that refused it (name, meter, window, max, ...), as the server described it."""
        error = self.body.get("error")
        found = error.get("limit") if isinstance(error, Mapping) else None
        return dict(found) if isinstance(found, Mapping) else None


class QuotaExceededError(RateLimitError):
    """429 for an allowance (``quota_exceeded``), credits (``credits_exhausted``) or a spend cap."""


class InternalServerError(APIStatusError):
    """500: the server failed; the envelope's request id finds it in the server's log."""


class UpstreamError(APIStatusError):
    """502: every upstream route of the model failed."""


class ServiceUnavailableError(APIStatusError):
    """503: the server cannot take the request now (e.g. its counter store is unreachable)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: InvalidRequestError,
    409: ConflictError,
    413: InvalidRequestError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitError,
    500: InternalServerError,
    502: UpstreamError,
    503: ServiceUnavailableError,
}


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the server sends delta-seconds); None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_from_response(
    status: int, body: object, headers: Mapping[str, str], fallback: str
) -> APIStatusError:
    """The typed error for an error answer. A body that is not the envelope (a proxy's HTML page) still
    yields an error of the status's class, with ``fallback`` (the start of the text) as its message."""
    envelope = body.get("error") if isinstance(body, Mapping) else None
    error: Mapping[str, Any] = envelope if isinstance(envelope, Mapping) else {}
    code = str(error.get("code") or ("internal" if status >= 500 else "invalid_request"))
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else InvalidRequestError)
    if cls is RateLimitError and code in QUOTA_CODES:
        cls = QuotaExceededError
    message = error.get("message")
    param, request_id, kind = error.get("param"), error.get("request_id"), error.get("type")
    return cls(
        str(message) if message else (fallback or f"HTTP {status}"),
        status_code=status,
        code=code,
        type=str(kind) if kind is not None else None,
        param=str(param) if param is not None else None,
        request_id=str(request_id) if request_id is not None else headers.get("x-request-id"),
        retry_after=retry_after_seconds(headers.get("retry-after")),
        body=body if isinstance(body, Mapping) else None,
        headers=headers,
    )
