"""The one error envelope (SPEC §5), and the only place that maps error codes to HTTP statuses.

Every failure a client can cause answers ``{"error": {type, code, message, param, request_id}}`` with a
4xx; anything unexpected answers 500 ``internal`` without a stack trace (the trace goes to the log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

from meterline import text
from meterline.alerts import refused_by_allowance
from meterline.api.responses import JSON
from meterline.errors import LimitExceeded, MeterlineError, ServiceUnavailable
from meterline.gateway.ratelimit import rate_limit_headers
from meterline.quotas.engine import RateLimits
from meterline.storage.outage import OutageLog, is_outage

log = logging.getLogger("meterline.api")
# Seconds a client is asked to wait when a dependency (database, Redis) is down.
OUTAGE_RETRY_AFTER_S = 2
outages = OutageLog()

STATUS = {
    "invalid_request": 400,
    "payload_too_large": 413,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "unsupported_media_type": 415,
    "quota_exceeded": 429,
    "rate_limit_exceeded": 429,
    "credits_exhausted": 429,
    "spend_cap_reached": 429,
    "upstream_error": 502,
    "service_unavailable": 503,
    "internal": 500,
}
# OpenAI SDKs read ``type``; these follow OpenAI's own names where one exists.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
}
_CODE_FOR_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def envelope(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    error_extra: dict[str, Any] | None = None,
) -> JSON:
    body: dict[str, Any] = {
        "error": {
            "type": TYPES.get(status, "api_error"),
            "code": code,
            # Messages may quote what the client sent: cleaned, so the envelope always renders.
            "message": text.clean(message),
            "param": None if param is None else text.clean(param),
            "request_id": request_id,
            **(error_extra or {}),
        }
    }
    if extra:
        body.update(extra)
    return JSON(body, status_code=status, headers=headers)


def first_problem(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """The first pydantic error as ``"param: message"`` and the param (its location, dotted)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str | None]:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        reason = (errors[0].get("ctx") or {}).get("error", "cannot parse")
        return 400, f"malformed JSON body: {reason}", None
    message, param = first_problem(errors)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return 422, f"{message}{more}", param


def count_refusal(request: Request, refusals: Sequence[LimitExceeded] = ()) -> None:
    """A quota refusal (429) of the authenticated organization, for the "rate limits exceeded
    frequently" alert; and, when one of ``refusals`` is its used-up allowance, for the 100 % threshold
    (``note_exhausted``). Never fails the response it is counted for."""
    org_id = getattr(request.state, "organization_id", None)
    if org_id is None:
        return
    try:
        request.app.state.services.alerts.note_refusal(org_id)
    except Exception:
        log.exception("counting a quota refusal failed")
    note_exhausted(request, refusals)


def note_exhausted(request: Request, refusals: Sequence[LimitExceeded]) -> None:
    """Refusals by the organization's period allowance (credits or spend cap) fire its 100 % threshold
    alert: blocked short of 100 %, no settle would. Once per period; a refusal after that costs no
    write (``AlertEvaluator.note_exhausted``). Never fails the response."""
    org_id = getattr(request.state, "organization_id", None)
    refusal = next((r for r in refusals if refused_by_allowance(r.details)), None)
    if org_id is None or refusal is None or refusal.details is None:
        return
    services = request.app.state.services
    try:
        org = services.tenancy.get_organization(org_id)  # cached: the refused request just read it
        services.alerts.note_exhausted(org_id, org.billing_anchor_day, org.alert_thresholds, refusal.details)
    except Exception:
        log.exception("firing the alert of a used-up allowance failed")


def report_failure(what: str, exc: BaseException, *, answered: bool = False) -> bool:
    """Log a failure: an outage goes into its episode (one line at each end, ``storage.outage``; counted
    when ``answered``: a request was answered 503 for it), anything else with its traceback. True for an
    outage."""
    if is_outage(exc):
        outages.failed(exc, answered=answered)
        return True
    log.error("%s failed", what, exc_info=exc)
    return False


def unexpected_error(scope: Scope, exc: Exception, request_id: str | None, *, answered: bool = True) -> JSON:
    """Anything no handler took: 503 with ``Retry-After`` when a dependency is down (one log line per
    outage, see ``storage.outage``; ``answered``: the 503 is sent, the response had not started), else
    500 ``internal`` with the traceback in the log only."""
    if report_failure(f"{scope.get('method')} {scope.get('path')}", exc, answered=answered):
        return envelope(
            503,
            "service_unavailable",
            "a dependency of the service (its database or counter store) is unavailable; "
            "nothing was recorded for this request; retry after a delay",
            request_id=request_id,
            headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S)},
        )
    return envelope(500, "internal", "internal error; retry after a delay", request_id=request_id)


def domain_error(request: Request, exc: MeterlineError) -> JSON:
    status = STATUS.get(exc.code, 400)
    if isinstance(exc, ServiceUnavailable) and is_outage(exc):
        outages.failed(exc, answered=True)  # the counter store out of reach: into its outage's count
    if not isinstance(exc, LimitExceeded):
        retry = {"Retry-After": str(OUTAGE_RETRY_AFTER_S)} if status == 503 else None
        return envelope(
            status, exc.code, exc.message, param=exc.param, request_id=request_id_of(request), headers=retry
        )
    count_refusal(request, [exc])
    headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc.rate_limits, RateLimits):
        headers.update(rate_limit_headers(exc.rate_limits))
    return envelope(
        status,
        exc.code,
        exc.message,
        param=exc.param,
        request_id=request_id_of(request),
        headers=headers,
        error_extra={"limit": exc.details} if exc.details else None,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MeterlineError)
    async def _domain(request: Request, exc: MeterlineError) -> Response:
        return domain_error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        status, message, param = _describe_validation(exc)
        return envelope(status, "invalid_request", message, param=param, request_id=request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _CODE_FOR_STATUS.get(exc.status_code, "invalid_request")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        headers = dict(exc.headers) if exc.headers else None
        return envelope(exc.status_code, code, message, request_id=request_id_of(request), headers=headers)

    # Any other exception is answered by ``api.middleware.RequestContext`` (``unexpected_error``).
