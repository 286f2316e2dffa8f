"""``UsageTracker``: what seed 001 has every developer write by hand (totals, cost, average tokens per
request, usage by model), priced by the server's own price book instead of a hard-coded dict, and able
to forward what it records to ``POST /v1/events``.

Invariants:
* money is ``Decimal``, each call's cost rounded to the nano once (as a ledger row's), totals are sums;
* every recorded call gets its event id when it is recorded and keeps it until the server has answered
  for it, so a batch that failed (timeout, 5xx, a lost answer) is resent with the same ids and the server
  counts each call once.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from meterline.config import PriceOverride
from meterline.money import from_nanos, to_nanos
from meterline.pricing import MeteredUsage, PriceBook
from meterline.sdk.errors import MeterlineError
from meterline.sdk.estimate import default_price_book
from meterline.sdk.ingest import Event, EventResult, EventsBatch
from meterline.sdk.usage_reading import ENDPOINT, MODALITY, read_usage

if TYPE_CHECKING:
    from meterline.sdk.client import Client

MAX_BATCH = 1000  # the server's limit per POST /v1/events


@dataclass(frozen=True, slots=True)
class TrackedCall:
    """One recorded call; ``estimated`` when the tokens were counted locally (a stream without usage)."""

    event_id: str
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost: Decimal
    priced: bool
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class ModelUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    priced: bool = True

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, call: TrackedCall) -> None:
        self.requests += 1
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.cost += call.cost
        self.priced = self.priced and call.priced


@dataclass(frozen=True, slots=True)
class UsageReport:
    total_requests: int
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int
    total_cost: Decimal
    currency: str
    avg_tokens_per_request: Decimal
    by_model: dict[str, ModelUsage]
    unpriced_models: list[str]

    def as_dict(self) -> dict[str, Any]:
        """Seed 001's ``report()`` keys, money still exact (format it where it is shown)."""
        return {
            "total_requests": self.total_requests,
            "total_tokens": self.total_tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_cost": self.total_cost,
            "currency": self.currency,
            "avg_tokens_per_request": self.avg_tokens_per_request,
            "by_model": {
                model: {"requests": u.requests, "tokens": u.tokens, "cost": u.cost, "priced": u.priced}
                for model, u in self.by_model.items()
            },
            "unpriced_models": self.unpriced_models,
        }


CURRENCY = "USD"  # the price database's; overrides given here are read in it too


def _price_book(prices: PriceBook | Mapping[str, Any] | None) -> PriceBook:
    if prices is None:
        return default_price_book()
    if isinstance(prices, PriceBook):
        return prices
    overrides = {name: PriceOverride.model_validate(dict(p)) for name, p in prices.items()}
    return PriceBook(overrides, CURRENCY)


@dataclass
class UsageTracker:
    """Record usage, get a report; optionally forward each call as an event to a Meterline server.

    ``prices`` overrides the bundled price database per model (``{"my-model": {"input": "0.30",
    "output": "1.20"}}``, per million tokens, in USD like the database). With ``client``, recorded calls are
    queued as events and sent in batches of ``batch_size`` (and by ``flush()``). Forward only usage the
    server has not metered itself: calls through the Meterline gateway are already in its ledger.
    """

    prices: PriceBook | Mapping[str, Any] | None = None
    client: Client | None = None
    batch_size: int = 100
    source: str = "sdk"
    identifier_id: str | None = None
    user_id: str | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    keep_calls: int = 1000
    pending: list[Event] = field(default_factory=list, init=False)
    rejected: list[EventResult] = field(default_factory=list, init=False)
    last_error: MeterlineError | None = field(default=None, init=False)
    _by_model: dict[str, ModelUsage] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        # The most recent calls, for inspection; totals never depend on it (it is bounded).
        self.calls: deque[TrackedCall] = deque(maxlen=self.keep_calls)
        self._book = _price_book(self.prices)

    def record(
        self,
        usage: object,
        *,
        model: str | None = None,
        provider: str | None = None,
        endpoint: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        estimated: bool = False,
    ) -> TrackedCall:
        """Record a response (or its ``usage``) of any OpenAI-compatible API or Anthropic messages.
        ``model`` is needed for a bare ``usage`` object; for a response it defaults to the response's."""
        found = read_usage(usage)
        if found is None:
            raise ValueError(f"no token usage in {type(usage).__name__}")
        model = model or found.model
        provider = provider or found.provider
        tokens = found.tokens
        detail = tokens.detail
        at = self.clock()
        metered = MeteredUsage(
            model=model,
            provider=provider,
            prompt_tokens=tokens.prompt_tokens,
            completion_tokens=tokens.completion_tokens,
            cache_read_tokens=tokens.cache_read_tokens,
            cache_write_tokens=tokens.cache_write_tokens,
            **detail.priced(),
        )
        quote = self._book.quote(metered, at)
        if not quote.priced and provider is None and found.kind != "messages":
            # Some OpenAI models (embeddings, say) are found only under their provider; an OpenAI-shaped
            # answer names none, so OpenAI is the guess when the name alone finds nothing.
            quote = self._book.quote(replace(metered, provider="openai"), at)
        call = TrackedCall(
            event_id=f"sdk_{uuid.uuid4().hex}",
            model=model,
            prompt_tokens=tokens.prompt_tokens,
            completion_tokens=tokens.completion_tokens,
            cache_read_tokens=tokens.cache_read_tokens,
            cache_write_tokens=tokens.cache_write_tokens,
            cost=from_nanos(to_nanos(quote.total)),
            priced=quote.priced,
            estimated=estimated,
        )
        event = Event(
            id=call.event_id,
            model=model,
            provider=provider,
            modality=MODALITY[found.kind],
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            cache_read_tokens=call.cache_read_tokens,
            cache_write_tokens=call.cache_write_tokens,
            identifier_id=self.identifier_id,
            user_id=self.user_id,
            source=self.source,
            endpoint=endpoint or ENDPOINT[found.kind],
            metadata={**(metadata or {}), **({"estimated": True} if estimated else {})} or None,
            timestamp=at,
            **detail.parts(),
        )
        with self._lock:
            self._by_model.setdefault(model or "(unknown)", ModelUsage()).add(call)
            self.calls.append(call)
            if self.client is not None:
                self.pending.append(event)
            full = self.client is not None and len(self.pending) >= self.batch_size
        if full:
            self._flush_quietly()
        return call

    def report(self) -> UsageReport:
        with self._lock:
            by_model = {m: ModelUsage(**_fields(u)) for m, u in self._by_model.items()}
        requests = sum(u.requests for u in by_model.values())
        prompt = sum(u.prompt_tokens for u in by_model.values())
        completion = sum(u.completion_tokens for u in by_model.values())
        total = prompt + completion
        return UsageReport(
            total_requests=requests,
            total_tokens=total,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_cost=sum((u.cost for u in by_model.values()), Decimal(0)),
            currency=CURRENCY,
            avg_tokens_per_request=Decimal(total) / Decimal(max(requests, 1)),
            by_model=by_model,
            unpriced_models=sorted(m for m, u in by_model.items() if not u.priced),
        )

    def reset(self) -> None:
        """Forget the totals (pending events are kept: they are still owed to the server)."""
        with self._lock:
            self._by_model.clear()
            self.calls.clear()

    # -- forwarding -----------------------------------------------------------------------------------
    def flush(self) -> list[EventsBatch]:
        """Send every pending event, in batches. An event leaves the queue once the server has answered
        for it (accepted, duplicate, or rejected — rejected ones are kept in ``rejected``); on an error
        the rest stays queued, to be resent with the same ids, and the error is raised."""
        if self.client is None:
            return []
        answers: list[EventsBatch] = []
        while True:
            with self._lock:
                batch = list(self.pending[: self.batch_size])
            if not batch:
                return answers
            answer = self.client.send_events(batch)
            answers.append(answer)
            with self._lock:
                sent = {e.id for e in batch}
                self.pending = [e for e in self.pending if e.id not in sent]
                self.rejected.extend(r for r in answer.data if not r.accepted)

    def _flush_quietly(self) -> None:
        # Called from record(): the caller's own request succeeded, so a metering outage must not turn it
        # into a failure. The events stay queued; the next flush resends them.
        try:
            self.flush()
            self.last_error = None
        except MeterlineError as exc:
            self.last_error = exc


def _fields(usage: ModelUsage) -> dict[str, Any]:
    return {
        "requests": usage.requests,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost": usage.cost,
        "priced": usage.priced,
    }
