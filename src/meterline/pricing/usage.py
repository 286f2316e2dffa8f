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
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "cache_audio_read_tokens",
    "output_audio_tokens",
    "reasoning_tokens",
    "web_searches",
    "requests",
    "units",
)

# Each count and the genai-prices unit it is priced as. The detail counts are parts of the four main ones
# (genai-prices' own nesting): a 1-hour cache write is also a cache write, an audio input token also an
# input token, reasoning and audio output tokens are also completion tokens.
GENAI_UNITS = (
    ("prompt_tokens", "input_tokens"),
    ("completion_tokens", "output_tokens"),
    ("cache_read_tokens", "cache_read_tokens"),
    ("cache_write_tokens", "cache_write_tokens"),
    ("cache_write_1h_tokens", "cache_write_1h_tokens"),
    ("input_audio_tokens", "input_audio_tokens"),
    ("cache_audio_read_tokens", "cache_audio_read_tokens"),
    ("output_audio_tokens", "output_audio_tokens"),
    ("reasoning_tokens", "output_reasoning_tokens"),
    ("web_searches", "web_searches"),
)


@dataclass(frozen=True, slots=True)
class MeteredUsage:
    """Usage of one request or custom event.

    ``prompt_tokens`` counts *all* input tokens, cache reads and cache writes included (the OpenAI and
    genai-prices convention); the cache fields say how many of those were cached, so they are priced once.
    ``units`` is the quantity of a custom billable ``event`` such as ``case.execute``.

    The detail counts are parts of the main ones, never added to them (``consistency`` says what breaks
    that): ``cache_write_1h_tokens`` of ``cache_write_tokens``; ``input_audio_tokens`` of
    ``prompt_tokens``; ``cache_audio_read_tokens`` of both ``cache_read_tokens`` and
    ``input_audio_tokens``; ``output_audio_tokens`` and ``reasoning_tokens`` (apart) of
    ``completion_tokens``. ``web_searches`` are server-side search calls, billed per call.
    """

    model: str | None
    provider: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    audio_seconds: Decimal | None = None
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    cache_audio_read_tokens: int = 0
    output_audio_tokens: int = 0
    reasoning_tokens: int = 0
    web_searches: int = 0
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


def consistency(
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cache_read_tokens: int,
    cache_write_tokens: int,
    cache_write_1h_tokens: int = 0,
    input_audio_tokens: int = 0,
    cache_audio_read_tokens: int = 0,
    output_audio_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> tuple[str, str] | None:
    """The first way these counts break the nesting (see ``MeteredUsage``), as (field, what to fix), or
    None. The events API answers it as a 422; the gateway never builds such counts."""
    if cache_read_tokens + cache_write_tokens > prompt_tokens:
        return (
            "prompt_tokens",
            "cache_read_tokens + cache_write_tokens must not exceed prompt_tokens (which includes them)",
        )
    if cache_write_1h_tokens > cache_write_tokens:
        return (
            "cache_write_1h_tokens",
            "cache_write_1h_tokens must not exceed cache_write_tokens (which includes them)",
        )
    if cache_audio_read_tokens > min(cache_read_tokens, input_audio_tokens):
        return (
            "cache_audio_read_tokens",
            "cache_audio_read_tokens must not exceed cache_read_tokens or input_audio_tokens "
            "(both include them)",
        )
    if input_audio_tokens - cache_audio_read_tokens + cache_read_tokens + cache_write_tokens > prompt_tokens:
        return (
            "input_audio_tokens",
            "input_audio_tokens not read from the cache, with cache_read_tokens and cache_write_tokens, "
            "must not exceed prompt_tokens (which includes them all)",
        )
    if reasoning_tokens + output_audio_tokens > completion_tokens:
        return (
            "completion_tokens",
            "reasoning_tokens + output_audio_tokens must not exceed completion_tokens (which includes them)",
        )
    return None
