"""JSON responses rendered with orjson (fast, and strict about what it accepts)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from starlette.responses import JSONResponse

from meterline.text import clean_json


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def dumps(content: Any) -> bytes:
    try:
        return orjson.dumps(content, default=_default)
    except orjson.JSONEncodeError:
        # A string that is not UTF-8 (an unpaired surrogate) must not turn an answer into a 500.
        return orjson.dumps(clean_json(content), default=_default)


class JSON(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
