"""The API flavors the gateway proxies and the token usage it measures for each request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meterline.metering.records import NO_DETAIL, UsageVector

# chat = /v1/chat/completions, completions = /v1/completions, embeddings = /v1/embeddings,
# responses = /v1/responses, transcriptions = /v1/audio/transcriptions (all OpenAI-compatible),
# messages = Anthropic's /v1/messages.
Api = Literal["chat", "completions", "embeddings", "responses", "messages", "transcriptions"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one request, in the project's convention (see ``meterline.metering.records``).

    ``prompt_tokens`` counts ALL input tokens, cache reads and cache writes included, whatever the
    provider's own convention (Anthropic reports them apart; ``usage.py`` adds them back).
    ``cache_read_tokens + cache_write_tokens <= prompt_tokens`` always holds for values built here, and
    ``detail`` (the rest of the usage vector) keeps the nesting ``metering.records.UsageVector`` states.
    """

    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    detail: UsageVector = NO_DETAIL

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
