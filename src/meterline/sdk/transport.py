"""What the sync and async clients share around HTTP: configuration, retries and reading answers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from meterline import __version__
from meterline.sdk import _json
from meterline.sdk.calls import Call
from meterline.sdk.errors import APIConnectionError, APIStatusError, MeterlineError, error_from_response

DEFAULT_URL = "http://127.0.0.1:8080"
RETRYABLE_STATUS = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries: at most ``max_retries`` more attempts after the first.

    A 429 or 503 is retried after its ``Retry-After`` when the server gives one no longer than
    ``max_retry_after`` (a quota that resets next month is raised at once, not waited for), else after an
    exponential backoff. A request that got no answer is retried only when resending it is harmless.
    """

    max_retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, error: MeterlineError, idempotent: bool) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to raise ``error`` now."""
        if attempt >= self.max_retries:
            return None
        backoff: float = min(self.backoff * 2.0**attempt, self.max_backoff)
        if isinstance(error, APIStatusError):
            if error.status_code not in RETRYABLE_STATUS:
                return None
            if error.retry_after is None:
                return backoff
            return error.retry_after if error.retry_after <= self.max_retry_after else None
        if isinstance(error, APIConnectionError) and idempotent:
            return backoff
        return None


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the server is and who is calling: options first, then ``METERLINE_URL`` and
    ``METERLINE_API_KEY``."""

    base_url: str
    api_key: str | None
    workspace_id: str | None = None

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, workspace_id: str | None) -> Connection:
        url = base_url or os.environ.get("METERLINE_URL") or DEFAULT_URL
        key = api_key if api_key is not None else os.environ.get("METERLINE_API_KEY")
        return cls(url.rstrip("/"), key or None, workspace_id)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"meterline-python/{__version__}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.workspace_id:
            headers["X-Workspace-Id"] = self.workspace_id
        return headers


def request_options(connection: Connection, call: Call[Any]) -> dict[str, Any]:
    """What ``build_request`` of httpx's sync and async clients takes for ``call``."""
    headers = connection.headers()
    if call.body is not None:
        headers["Content-Type"] = "application/json"
    return {
        "method": call.method,
        "url": connection.base_url + call.path,
        "params": call.params or None,
        "content": None if call.body is None else _json.dumps(call.body),
        "headers": {**headers, **call.headers},
    }


def connection_error(exc: httpx.HTTPError, url: str) -> APIConnectionError:
    return APIConnectionError(f"no answer from {url}: {type(exc).__name__}: {exc}")


def raise_for_error(status: int, content: bytes, headers: httpx.Headers) -> None:
    if status < 400:
        return
    text = content.decode("utf-8", "replace")
    try:
        body = _json.loads(content) if content else None
    except ValueError:
        body = None
    raise error_from_response(status, body, _lower(headers), text[:200])


def decode(status: int, content: bytes, headers: httpx.Headers) -> Any:
    """The JSON of a success, exactly (decimals stay ``Decimal``); the typed error of a failure."""
    raise_for_error(status, content, headers)
    if not content:
        return None
    try:
        return _json.loads(content)
    except ValueError:
        raise MeterlineError(f"expected JSON, got {content[:80]!r}") from None


def _lower(headers: httpx.Headers) -> Mapping[str, str]:
    return {k.lower(): v for k, v in headers.items()}
