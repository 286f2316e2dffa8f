"""What one billable row consumed, in the units prices are quoted in."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from meterline.errors import InvalidRequest

_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "requests",
    "units",
)


@dataclass(frozen=True, slots=True)
class MeteredUsage:
    """Usage of one request or custom event.

    ``prompt_tokens`` counts *all* input tokens, cache reads and cache writes included (the OpenAI and
    genai-prices convention); the cache fields say how many of those were cached, so they are priced once.
    ``units`` is the quantity of a custom billable ``event`` such as ``case.execute``.
    """

    model: str | None
    provider: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    audio_seconds: Decimal | None = None
    requests: int = 1
    units: int = 0
    event: str = "llm.request"

    def __post_init__(self) -> None:
        # Counts may come from an upstream response or a client-reported event: refuse nonsense here so a
        # negative count can never turn into a negative charge further down.
        for name in _COUNTS:
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise InvalidRequest(f"{name} must be a non-negative integer, got {value!r}", param=name)
        seconds = self.audio_seconds
        if seconds is not None and (
            not isinstance(seconds, Decimal) or not seconds.is_finite() or seconds < 0
        ):
            # A float here would already be inexact, so it is refused rather than converted.
            raise InvalidRequest(
                f"audio_seconds must be a finite non-negative Decimal, got {seconds!r}", param="audio_seconds"
            )
