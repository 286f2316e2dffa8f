"""Time is injected: production uses ``SystemClock``; tests move a ``FrozenClock`` instead of sleeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def now_us(self) -> int:
        """``to_micros(now())`` without building a datetime (hot paths: the quota engine)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def now_us(self) -> int:
        return time.time_ns() // 1_000  # the clock ``now`` reads, floored to a microsecond as it is


class FrozenClock:
    def __init__(self, at: datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("FrozenClock needs an aware datetime")
        self._at = at

    def now(self) -> datetime:
        return self._at

    def now_us(self) -> int:
        return to_micros(self._at)

    def set(self, at: datetime) -> None:
        self._at = at

    def advance(self, **delta: float) -> None:
        self._at += timedelta(**delta)


def to_micros(at: datetime) -> int:
    """Storage form of a timestamp: integer microseconds since the Unix epoch, UTC (exact: no float)."""
    if at.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return (at - EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def rfc3339(at: datetime) -> str:
    """RFC 3339 UTC with a Z, seconds precision unless there are microseconds."""
    if at.utcoffset():
        at = at.astimezone(UTC)
    # isoformat is several times faster than strftime, and this runs once per rendered row.
    return at.replace(tzinfo=None).isoformat() + "Z"


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
MICROS_PER_HOUR = 3_600_000_000
MICROS_PER_DAY = 86_400_000_000
