"""The single settle path: usage record -> price -> ledger row + rollups, in one transaction.

The gateway and the events API both end here, so a token costs the same whichever way it arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from meterline import ids, text
from meterline.clock import Clock
from meterline.credits import CreditTerms
from meterline.metering.records import LLM_REQUEST, LedgerRow, UsageRecord
from meterline.metering.store import AppendResult, LedgerStore
from meterline.pricing import CurrencyRates, MeteredUsage, PriceBook, charge_for


@dataclass(frozen=True, slots=True)
class Account:
    """The billing facts of the organization a record belongs to."""

    organization_id: str
    currency: str
    discount_pct: int
    credits: CreditTerms | None = None


def modality_of(record: UsageRecord) -> str:
    if record.modality:
        return record.modality
    if record.audio_seconds is not None:
        return "transcription"
    endpoint = record.endpoint or ""
    if "embedding" in endpoint or (record.model or "").startswith("text-embedding"):
        return "embedding"
    if record.event != LLM_REQUEST:
        return "event"
    return "chat"


_TEXT_FIELDS = (
    "model",
    "provider",
    "region",
    "modality",
    "key_prefix",
    "key_name",
    "identifier_id",
    "user_id",
    "source",
    "endpoint",
    "run_id",
    "event",
    "idempotency_key",
)


def storable(record: UsageRecord) -> UsageRecord:
    """``record`` with any text no database can store cleaned (``meterline.text.clean``).

    The edge refuses such text from clients; this is for text from elsewhere (an upstream's answer, a
    reservation written before the edge rule), whose usage happened and must be recorded, not lost."""
    changes: dict[str, object] = {}
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if value is not None and text.problem(value, None) is not None:
            changes[name] = text.clean(value)
    if record.metadata and text.find_problem(record.metadata, max_length=None) is not None:
        changes["metadata"] = text.clean_json(record.metadata)
    return replace(record, **changes) if changes else record  # type: ignore[arg-type]


def billing_unit_of(record: UsageRecord) -> str:
    if record.audio_seconds is not None:
        return "audio_second"
    if record.event != LLM_REQUEST and not (record.prompt_tokens or record.completion_tokens):
        return "unit"
    return "token"


class Settler:
    def __init__(
        self,
        store: LedgerStore,
        prices: PriceBook,
        rates: CurrencyRates,
        *,
        credit_value: Decimal,
        credit_currency: str,
        clock: Clock,
    ) -> None:
        self._store = store
        self._prices = prices
        self._rates = rates
        self._credit_value = credit_value
        self._credit_currency = credit_currency
        self._clock = clock

    def price(self, record: UsageRecord, account: Account, recorded_at: datetime | None = None) -> LedgerRow:
        """The ledger row for ``record``: pure computation, nothing written."""
        record = storable(record)
        detail = record.usage
        usage = MeteredUsage(
            model=record.model,
            provider=record.provider,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cache_read_tokens=record.cache_read_tokens,
            cache_write_tokens=record.cache_write_tokens,
            audio_seconds=record.audio_seconds,
            **detail.priced(),
            requests=1,
            units=record.units,
            event=record.event,
        )
        quote = self._prices.quote(usage, record.created_at)
        charge = charge_for(
            quote,
            currency=account.currency,
            discount_pct=account.discount_pct,
            rates=self._rates,
            credit_value=self._credit_value,
            credit_currency=self._credit_currency,
        )
        audio_ms = None if record.audio_seconds is None else int(record.audio_seconds * 1000)
        return LedgerRow(
            id=ids.ledger_id(),
            organization_id=record.organization_id,
            workspace_id=record.workspace_id,
            key_id=record.key_id,
            key_prefix=record.key_prefix,
            key_name=record.key_name,
            identifier_id=record.identifier_id,
            user_id=record.user_id,
            source=record.source,
            endpoint=record.endpoint,
            event=record.event,
            units=record.units,
            run_id=record.run_id,
            metadata=record.metadata,
            model=record.model,
            modality=modality_of(record),
            provider=record.provider or quote.provider,
            region=record.region,
            billing_unit=billing_unit_of(record),
            audio_ms=audio_ms,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cache_read_tokens=record.cache_read_tokens,
            cache_write_tokens=record.cache_write_tokens,
            total_tokens=record.prompt_tokens + record.completion_tokens,
            currency=charge.currency,
            list_cost_nanos=charge.list_cost_nanos,
            discount_applied_pct=charge.discount_pct,
            cost_nanos=charge.cost_nanos,
            credits_nanos=charge.credits_nanos,
            priced=charge.priced,
            overage=record.overage,
            failover=record.failover,
            receipt_id=record.receipt_id or (ids.receipt_id() if record.receipt else None),
            idempotency_key=record.idempotency_key,
            request_hash=record.request_hash,
            created_at=record.created_at,
            recorded_at=recorded_at or self._clock.now(),
            usage=detail,
        )

    def price_all(self, records: Sequence[UsageRecord], account: Account) -> list[LedgerRow]:
        if any(r.organization_id != account.organization_id for r in records):
            raise ValueError("settle() takes the records of one organization at a time")
        now = self._clock.now()
        return [self.price(r, account, now) for r in records]

    def append(
        self,
        rows: Sequence[LedgerRow],
        account: Account,
        *,
        settles: Sequence[str] = (),
        admitted: Callable[[], Sequence[LedgerRow]] | None = None,
    ) -> AppendResult:
        """Append priced rows atomically: rows, rollups and credit buckets, or none. ``settles`` names
        durable reservations that these rows end (deleted in the same transaction); ``admitted``, asked
        in the write, which of ``rows`` to write (``LedgerStore.append``)."""
        return self._store.append(rows, account.credits, settles=settles, admitted=admitted)

    def submit(
        self, rows: Sequence[LedgerRow], account: Account, *, settles: Sequence[str] = ()
    ) -> Future[AppendResult]:
        """``append``, queued: the future is answered once the rows are committed."""
        return self._store.submit(rows, account.credits, settles=settles)

    def settle(self, records: Sequence[UsageRecord], account: Account) -> AppendResult:
        """Price and append ``records`` (one organization) atomically: all rows and rollups, or none."""
        return self.append(self.price_all(records, account), account)

    def stored(self, account: Account, keys: Sequence[str]) -> Mapping[str, LedgerRow]:
        """Rows already in the ledger for these idempotency keys."""
        return self._store.lookup(account.organization_id, keys) if keys else {}
