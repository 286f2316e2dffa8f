"""Offline estimates before a request is sent (seed 001 "Estimating Future Usage"), with the same
tokenizer and chat-format overheads the gateway reserves with (``meterline.gateway.tokens``) and the
same prices the server bills with (``meterline.pricing``). No network: the encodings and the price
database ship in installed packages."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meterline.gateway.tokens import count_tokens, encoding_name, estimate_prompt_tokens
from meterline.money import from_nanos, to_nanos
from meterline.pricing import MeteredUsage, PriceBook

DEFAULT_MODEL = "gpt-4o"


def estimate_tokens(text: str, model: str = DEFAULT_MODEL) -> int:
    """Tokens of ``text`` in ``model``'s encoding (o200k_base or cl100k_base), as plain text."""
    return count_tokens(text, model)


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What a chat request may cost at most: its prompt plus ``max_output_tokens`` of output.

    ``cost`` is rounded to the nano like a ledger row's; ``priced`` is False (and the cost 0) for a model
    the price database does not know and no override names.
    """

    model: str
    encoding: str
    estimated_input_tokens: int
    max_output_tokens: int
    estimated_total_tokens: int
    estimated_cost: Decimal
    currency: str
    priced: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "encoding": self.encoding,
            "estimated_input_tokens": self.estimated_input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "estimated_total_tokens": self.estimated_total_tokens,
            "estimated_cost": self.estimated_cost,
            "currency": self.currency,
            "priced": self.priced,
        }


def estimate_request_cost(
    messages: Sequence[Mapping[str, Any]],
    model: str = DEFAULT_MODEL,
    max_output_tokens: int = 500,
    *,
    provider: str | None = None,
    prices: PriceBook | None = None,
    at: datetime | None = None,
) -> RequestEstimate:
    """Estimate a chat request: every message's text plus OpenAI's chat-format overhead (3 tokens per
    message, 1 per ``name``, 3 priming the reply), tools and images counted as the gateway counts them."""
    if max_output_tokens < 0:
        raise ValueError("max_output_tokens must not be negative")
    prompt = estimate_prompt_tokens("chat", {"messages": list(messages)}, model)
    book = prices or default_price_book()
    usage = MeteredUsage(
        model=model, provider=provider, prompt_tokens=prompt, completion_tokens=max_output_tokens
    )
    quote = book.quote(usage, at or datetime.now(UTC))
    return RequestEstimate(
        model=model,
        encoding=encoding_name(model),
        estimated_input_tokens=prompt,
        max_output_tokens=max_output_tokens,
        estimated_total_tokens=prompt + max_output_tokens,
        estimated_cost=from_nanos(to_nanos(quote.total)),
        currency=quote.currency,
        priced=quote.priced,
    )


@functools.cache
def default_price_book() -> PriceBook:
    """The bundled price database with no operator overrides (prices in USD)."""
    return PriceBook({}, "USD")
