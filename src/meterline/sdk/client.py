"""``Client``: the synchronous client of every public Meterline endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from meterline.receipts import ChainReport
from meterline.sdk import calls
from meterline.sdk.access import AlertPage, ServedModel, TokenPair, WebhookEndpoint
from meterline.sdk.analytics import Breakdown, BreakdownRow, Timeseries
from meterline.sdk.calls import BreakdownBy, Call, Range, Time
from meterline.sdk.errors import APIConnectionError, APIStatusError
from meterline.sdk.ingest import Event, EventsBatch, Reservation, Settlement
from meterline.sdk.ledger import EventsPage, History, LedgerEntry, LedgerPage, UsageEvent
from meterline.sdk.receipts import ChainCheck, Receipt, ReceiptPage, verify_receipt
from meterline.sdk.summary import UsageSummary
from meterline.sdk.transport import (
    Connection,
    RetryPolicy,
    connection_error,
    decode,
    raise_for_error,
    request_options,
)
from meterline.signing import VerifyingKeys

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ChainVerification:
    """The organization's receipt chain checked locally: ``report.ok``, or its first broken link."""

    organization_id: str | None
    report: ChainReport

    @property
    def ok(self) -> bool:
        return self.report.ok


def next_ledger_filters(filters: dict[str, Any], page: LedgerPage) -> dict[str, Any]:
    """Rows arriving while the ledger is paged would shift the offsets: pin ``end`` to the newest row
    of the first page, so later pages see the same rows."""
    if "end" not in filters and page.data:
        return {**filters, "end": page.data[0].created_at}
    return filters


class Client:
    """Usage, ledger, analytics, receipts, events, reservations, tokens and alerts over HTTP.

    ``base_url`` and ``api_key`` default to ``$METERLINE_URL`` and ``$METERLINE_API_KEY``. Errors are
    raised as ``meterline.sdk.errors`` classes; 429/503 answers are retried per ``retry`` (``sleep`` is
    how the client waits, replaceable in tests). Use it as a context manager, or ``close()`` it.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        workspace_id: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.connection = Connection.resolve(base_url, api_key, workspace_id)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._owned = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._keys: VerifyingKeys | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._http.close()

    # -- plumbing -----------------------------------------------------------------------------------
    def _request(self, call: Call[Any]) -> httpx.Request:
        return self._http.build_request(**request_options(self.connection, call))

    def _attempts(self, call: Call[Any], send: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return send()
            except (APIStatusError, APIConnectionError) as exc:
                wait = self.retry.delay(attempt, exc, call.idempotent)
                if wait is None:
                    raise
            self._sleep(wait)
            attempt += 1

    def call(self, call: Call[T]) -> T:
        """Send ``call`` (with retries) and read its answer."""

        def send() -> T:
            try:
                response = self._http.send(self._request(call))
            except httpx.HTTPError as exc:
                raise connection_error(exc, self.connection.base_url) from None
            return call.parse(decode(response.status_code, response.content, response.headers))

        return self._attempts(call, send)

    # -- usage --------------------------------------------------------------------------------------
    def usage(self, identifier_id: str | None = None) -> UsageSummary:
        """``GET /v1/usage``: plan, primary meter, daily/monthly tokens and calls, limits, credits,
        spend and forecast of the caller's scope."""
        return self.call(calls.usage(identifier_id))

    def history(self, days: int = 30, identifier_id: str | None = None) -> History:
        return self.call(calls.history(days, identifier_id))

    def events(self, page: int = 1, per_page: int = 20) -> EventsPage:
        return self.call(calls.events(page, per_page))

    def iter_events(self, per_page: int = 100) -> Iterator[UsageEvent]:
        """Every billable event, newest first, fetching pages as needed."""
        page = 1
        while True:
            result = self.events(page, per_page)
            yield from result.data
            if not result.pagination.has_more:
                return
            page += 1

    def ledger(
        self,
        limit: int = 100,
        offset: int = 0,
        *,
        start: Time | None = None,
        end: Time | None = None,
        model: str | None = None,
        key_prefix: str | None = None,
        identifier_id: str | None = None,
        modality: str | None = None,
        provider: str | None = None,
    ) -> LedgerPage:
        filters = calls.ledger_filters(start, end, model, key_prefix, identifier_id, modality, provider)
        return self.call(calls.ledger(limit, offset, filters))

    def iter_ledger(self, page_size: int = 1000, **filters: Any) -> Iterator[LedgerEntry]:
        """Every ledger row matching ``filters`` (those of ``ledger``), newest first, page by page."""
        where = calls.ledger_filters(**filters)
        offset = 0
        while True:
            page = self.call(calls.ledger(page_size, offset, where))
            where = next_ledger_filters(where, page)
            yield from page.data
            if not page.has_more or not page.data:
                return
            offset += len(page.data)

    def timeseries(
        self, range: Range = "7d", by: str = "source", identifier_id: str | None = None
    ) -> Timeseries:
        return self.call(calls.timeseries(range, by, identifier_id))

    def breakdown(
        self,
        by: BreakdownBy,
        *,
        range: Range | None = None,
        start: Time | None = None,
        end: Time | None = None,
        limit: int = 10,
        offset: int = 0,
        identifier_id: str | None = None,
    ) -> Breakdown:
        return self.call(
            calls.breakdown(
                by,
                range_=range,
                start=start,
                end=end,
                limit=limit,
                offset=offset,
                identifier_id=identifier_id,
            )
        )

    def iter_breakdown(self, by: BreakdownBy, page_size: int = 100, **options: Any) -> Iterator[BreakdownRow]:
        """Every ranked row ("Show More" until the end)."""
        offset = 0
        while True:
            page = self.breakdown(by, limit=page_size, offset=offset, **options)
            yield from page.data
            if not page.has_more or not page.data:
                return
            offset += len(page.data)

    # -- CSV export ---------------------------------------------------------------------------------
    def iter_export(self, *, chunk_size: int = 65_536, **filters: Any) -> Iterator[bytes]:
        """The ledger as CSV (oldest first), streamed in chunks; the filters of ``ledger``, and ``format``:
        ``"ledger"`` (the default) or ``"focus"`` (FOCUS 1.2 columns for FinOps tools)."""
        export_format = filters.pop("format", "ledger")
        call = calls.export(calls.ledger_filters(**filters), export_format)

        def open_stream() -> httpx.Response:
            try:
                response = self._http.send(self._request(call), stream=True)
            except httpx.HTTPError as exc:
                raise connection_error(exc, self.connection.base_url) from None
            if response.status_code >= 400:
                content = response.read()
                response.close()
                raise_for_error(response.status_code, content, response.headers)
            return response

        response = self._attempts(call, open_stream)
        try:
            yield from response.iter_bytes(chunk_size)
        except httpx.HTTPError as exc:
            raise connection_error(exc, self.connection.base_url) from None
        finally:
            response.close()

    def export_csv(
        self,
        destination: str | Path | IO[bytes],
        *,
        on_chunk: Callable[[bytes], None] | None = None,
        **filters: Any,
    ) -> int:
        """Write the CSV export to a path or binary file; returns the bytes written."""
        if isinstance(destination, str | Path):
            with Path(destination).open("wb") as file:
                return self.export_csv(file, on_chunk=on_chunk, **filters)
        written = 0
        for chunk in self.iter_export(**filters):
            destination.write(chunk)
            written += len(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
        return written

    # -- the gateway --------------------------------------------------------------------------------
    def models(self) -> list[ServedModel]:
        """``GET /v1/models``: the models the gateway's routes serve (``GET /v1/models`` in the README)."""
        return self.call(calls.models())

    # -- receipts -----------------------------------------------------------------------------------
    def jwks(self) -> dict[str, Any]:
        return self.call(calls.jwks())

    def verifying_keys(self, *, refresh: bool = False) -> VerifyingKeys:
        """The deployment's public keys (``/.well-known/jwks.json``), fetched once and kept."""
        if self._keys is None or refresh:
            self._keys = VerifyingKeys.from_jwks(self.jwks())
        return self._keys

    def receipt(self, receipt_id: str, *, verify: bool = True) -> Receipt:
        """One receipt; verified locally against the JWK set unless ``verify=False`` (a key the cached
        set does not know makes it fetch the set again once: keys rotate)."""
        found = self.call(calls.receipt(receipt_id))
        return self.verify_receipt(found) if verify else found

    def verify_receipt(self, receipt: Receipt) -> Receipt:
        keys = self.verifying_keys()
        if receipt.kid is not None and receipt.kid not in keys:
            keys = self.verifying_keys(refresh=True)
        return verify_receipt(receipt, keys)

    def receipts(self, after_seq: int = 0, limit: int = 100) -> ReceiptPage:
        """A page of the organization's receipt chain (needs an organization-scoped key)."""
        return self.call(calls.receipts(after_seq, limit))

    def iter_receipts(self, after_seq: int = 0, page_size: int = 1000) -> Iterator[Receipt]:
        while True:
            page = self.receipts(after_seq, page_size)
            yield from page.data
            if not page.has_more or page.next_after_seq is None:
                return
            after_seq = page.next_after_seq

    def verify_chain(
        self, *, page_size: int = 1000, on_progress: Callable[[int], None] | None = None
    ) -> ChainVerification:
        """Fetch the whole chain and check every signature, link and ``seq`` against the JWK set."""
        check = ChainCheck(self.verifying_keys(refresh=True))
        after, head = 0, None
        while True:
            page = self.receipts(after, page_size)
            head = page.head
            if not check.feed(page):
                break
            if on_progress is not None:
                on_progress(len(page.data))
            if not page.has_more or page.next_after_seq is None:
                break
            after = page.next_after_seq
        return ChainVerification(check.organization_id, check.finish(head))

    # -- writing usage ------------------------------------------------------------------------------
    def send_events(
        self, events: Iterable[Event | Mapping[str, Any]], *, receipts: bool | None = None
    ) -> EventsBatch:
        """``POST /v1/events``: up to 1000 events. Resending the same events is counted once."""
        return self.call(calls.send_events(events, receipts))

    def reserve(self, *, receipts: bool | None = None, **fields: Any) -> Reservation:
        """Hold an estimate (``model``, ``prompt_tokens``, ``completion_tokens``, ``units``, ...)."""
        return self.call(calls.reserve(fields, receipts))

    def settle(self, reservation_id: str, **actual: Any) -> Settlement:
        return self.call(calls.settle(reservation_id, actual))

    def release(self, reservation_id: str) -> Reservation:
        return self.call(calls.release(reservation_id))

    # -- identifier tokens --------------------------------------------------------------------------
    def issue_token(
        self,
        identifier_id: str,
        *,
        limits: Mapping[str, int | Decimal | str] | None = None,
        expires_in: int | None = None,
        workspace_id: str | None = None,
    ) -> TokenPair:
        return self.call(calls.issue_token(identifier_id, limits, expires_in, workspace_id))

    def refresh_token(self, refresh_token: str) -> TokenPair:
        return self.call(calls.refresh_token(refresh_token))

    # -- alerts -------------------------------------------------------------------------------------
    def alerts(self, limit: int = 50, offset: int = 0) -> AlertPage:
        return self.call(calls.alerts(limit, offset))

    def create_webhook(self, url: str, description: str | None = None) -> WebhookEndpoint:
        return self.call(calls.create_webhook(url, description))

    def webhooks(self) -> list[WebhookEndpoint]:
        return self.call(calls.webhooks())

    def delete_webhook(self, endpoint_id: str) -> None:
        self.call(calls.delete_webhook(endpoint_id))

    def health(self) -> dict[str, Any]:
        return self.call(calls.health())
