"""Reading the API's JSON exactly: numbers with a fraction become ``Decimal`` (never ``float``), money
strings become ``Decimal``, RFC 3339 strings become aware datetimes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

Json = dict[str, Any]


def loads(data: bytes | str) -> Any:
    """JSON with every non-integer number read as ``Decimal``: ``0.000009274`` stays exact."""
    return json.loads(data, parse_float=Decimal)


def dumps(value: object) -> bytes:
    return json.dumps(value, default=_default, separators=(",", ":")).encode()


def _default(value: object) -> object:
    if isinstance(value, Decimal):
        # The server's schemas take money and durations as decimal strings (a float is inexact).
        return str(value)
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def rfc3339(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("times sent to Meterline must be timezone-aware (UTC)")
    return at.isoformat().replace("+00:00", "Z")


def dec(value: object) -> Decimal:
    """A money/credits amount: the server writes exact decimal strings or numbers; ``-1`` is unlimited."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return Decimal(value)
        except InvalidOperation:
            pass
    raise ValueError(f"expected a decimal amount, got {value!r}")


def opt_dec(value: object) -> Decimal | None:
    return None if value is None else dec(value)


def time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 time, got {value!r}")
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def opt_time(value: object) -> datetime | None:
    return None if value is None else time(value)


def obj(value: object) -> Json:
    return dict(value) if isinstance(value, Mapping) else {}


def opt_str(value: object) -> str | None:
    return None if value is None else str(value)
