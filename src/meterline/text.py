"""The one rule for text that comes in: no NUL, no unpaired surrogate, bounded length.

PostgreSQL text cannot hold NUL (``psycopg.DataError``), and a lone surrogate is not UTF-8 at all: it
cannot be stored, logged or rendered as JSON. Either one, let through, fails a write long after the
request was accepted (a settle, a recovery at start-up). So every string from outside is checked once,
at the edge (``api.middleware``), and refused with the field it was found in; text that reaches the
settle path from elsewhere (an upstream's answer) is cleaned instead, since that usage already happened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

# Far above any id, name or label the API takes (those have tighter limits of their own); a bound so that
# no single string of a query or a stored field can be megabytes.
MAX_TEXT = 65_536
REPLACEMENT = "\ufffd"


def problem(value: str, max_length: int | None = MAX_TEXT) -> str | None:
    """Why ``value`` cannot be taken as text, or None."""
    if "\x00" in value:
        return "must not contain NUL characters (\\u0000)"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must not contain unpaired UTF-16 surrogates (e.g. \\ud800 alone)"
    if max_length is not None and len(value) > max_length:
        return f"must be at most {max_length} characters"
    return None


def find_problem(value: object, path: str = "", max_length: int | None = MAX_TEXT) -> tuple[str, str] | None:
    """The first string in a JSON value (keys too) that ``problem`` refuses: ``(path, reason)``.

    Paths read like the API's ``param``: ``events[0].metadata.note``."""
    if isinstance(value, str):
        reason = problem(value, max_length)
        return None if reason is None else (path, reason)
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{clean(str(key))}" if path else clean(str(key))
            if isinstance(key, str) and (reason := problem(key, max_length)) is not None:
                return where, f"key {reason}"
            found = find_problem(item, where, max_length)
            if found is not None:
                return found
        return None
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for index, item in enumerate(value):
            found = find_problem(item, f"{path}[{index}]", max_length)
            if found is not None:
                return found
    return None


def find_in_json(raw: bytes, max_length: int | None = MAX_TEXT) -> tuple[str, str] | None:
    """``find_problem`` over a JSON document, parsed leniently (the stdlib parser takes the unpaired
    surrogates that orjson refuses outright, so the field holding one can be named); None if not JSON."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return find_problem(value, max_length=max_length)


def clean(value: str) -> str:
    """``value`` with NULs removed and unpaired surrogates replaced by U+FFFD: storable anywhere."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # In a Python string every surrogate is unpaired (a valid pair is one code point already).
        return "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


def clean_json(value: object) -> object:
    """``clean`` applied to every string (and key) of a JSON value."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, Mapping):
        return {clean(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(item) for item in value]
    return value
