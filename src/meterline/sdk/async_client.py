"""``AsyncClient``: the same endpoints as ``Client``, for asyncio code. Both execute the calls of
``meterline.sdk.calls``; only the waiting differs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx

from meterline.sdk import calls
from meterline.sdk.access import AlertPage, ServedModel, TokenPair, WebhookEndpoint
from meterline.sdk.analytics import Breakdown, BreakdownRow, Timeseries
from meterline.sdk.calls import BreakdownBy, Call, Range, Time
from meterline.sdk.client import ChainVerification, next_ledger_filters
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


class AsyncClient:
    """See ``Client``; every method is a coroutine and the iterators are async iterators."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        workspace_id: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.connection = Connection.resolve(base_url, api_key, workspace_id)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._owned = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._keys: VerifyingKeys | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    # -- plumbing -----------------------------------------------------------------------------------
    async def _attempts(self, call: Call[Any], send: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await send()
            except (APIStatusError, APIConnectionError) as exc:
                wait = self.retry.delay(attempt, exc, call.idempotent)
                if wait is None:
                    raise
            await self._sleep(wait)
            attempt += 1

    async def call(self, call: Call[T]) -> T:
        async def send() -> T:
            try:
                response = await self._http.send(
                    self._http.build_request(**request_options(self.connection, call))
                )
            except httpx.HTTPError as exc:
                raise connection_error(exc, self.connection.base_url) from None
            return call.parse(decode(response.status_code, response.content, response.headers))

        return await self._attempts(call, send)

    # -- usage --------------------------------------------------------------------------------------
    async def usage(self, identifier_id: str | None = None) -> UsageSummary:
        return await self.call(calls.usage(identifier_id))

    async def history(self, days: int = 30, identifier_id: str | None = None) -> History:
        return await self.call(calls.history(days, identifier_id))

    async def events(self, page: int = 1, per_page: int = 20) -> EventsPage:
        return await self.call(calls.events(page, per_page))

    async def iter_events(self, per_page: int = 100) -> AsyncIterator[UsageEvent]:
        page = 1
        while True:
            result = await self.events(page, per_page)
            for event in result.data:
                yield event
            if not result.pagination.has_more:
                return
            page += 1

    async def ledger(
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
        return await self.call(calls.ledger(limit, offset, filters))

    async def iter_ledger(self, page_size: int = 1000, **filters: Any) -> AsyncIterator[LedgerEntry]:
        where = calls.ledger_filters(**filters)
        offset = 0
        while True:
            page = await self.call(calls.ledger(page_size, offset, where))
            where = next_ledger_filters(where, page)
            for row in page.data:
                yield row
            if not page.has_more or not page.data:
                return
            offset += len(page.data)

    async def timeseries(
        self, range: Range = "7d", by: str = "source", identifier_id: str | None = None
    ) -> Timeseries:
        return await self.call(calls.timeseries(range, by, identifier_id))

    async def breakdown(
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
        return await self.call(
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

    async def iter_breakdown(
        self, by: BreakdownBy, page_size: int = 100, **options: Any
    ) -> AsyncIterator[BreakdownRow]:
        offset = 0
        while True:
            page = await self.breakdown(by, limit=page_size, offset=offset, **options)
            for row in page.data:
                yield row
            if not page.has_more or not page.data:
                return
            offset += len(page.data)

    async def iter_export(self, **filters: Any) -> AsyncIterator[bytes]:
        export_format = filters.pop("format", "ledger")
        call = calls.export(calls.ledger_filters(**filters), export_format)

        async def open_stream() -> httpx.Response:
            request = self._http.build_request(**request_options(self.connection, call))
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise connection_error(exc, self.connection.base_url) from None
            if response.status_code >= 400:
                content = await response.aread()
                await response.aclose()
                raise_for_error(response.status_code, content, response.headers)
            return response

        response = await self._attempts(call, open_stream)
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise connection_error(exc, self.connection.base_url) from None
        finally:
            await response.aclose()

    async def export_csv(self, destination: str | Path, **filters: Any) -> int:
        written = 0
        with Path(destination).open("wb") as file:
            async for chunk in self.iter_export(**filters):
                file.write(chunk)
                written += len(chunk)
        return written

    # -- the gateway --------------------------------------------------------------------------------
    async def models(self) -> list[ServedModel]:
        """``GET /v1/models``: the models the gateway's routes serve (``GET /v1/models`` in the README)."""
        return await self.call(calls.models())

    # -- receipts -----------------------------------------------------------------------------------
    async def jwks(self) -> dict[str, Any]:
        return await self.call(calls.jwks())

    async def verifying_keys(self, *, refresh: bool = False) -> VerifyingKeys:
        if self._keys is None or refresh:
            self._keys = VerifyingKeys.from_jwks(await self.jwks())
        return self._keys

    async def receipt(self, receipt_id: str, *, verify: bool = True) -> Receipt:
        found = await self.call(calls.receipt(receipt_id))
        if not verify:
            return found
        keys = await self.verifying_keys()
        if found.kid is not None and found.kid not in keys:
            keys = await self.verifying_keys(refresh=True)
        return verify_receipt(found, keys)

    async def receipts(self, after_seq: int = 0, limit: int = 100) -> ReceiptPage:
        return await self.call(calls.receipts(after_seq, limit))

    async def verify_chain(self, *, page_size: int = 1000) -> ChainVerification:
        check = ChainCheck(await self.verifying_keys(refresh=True))
        after, head = 0, None
        while True:
            page = await self.receipts(after, page_size)
            head = page.head
            if not check.feed(page) or not page.has_more or page.next_after_seq is None:
                break
            after = page.next_after_seq
        return ChainVerification(check.organization_id, check.finish(head))

    # -- writing usage ------------------------------------------------------------------------------
    async def send_events(
        self, events: Iterable[Event | Mapping[str, Any]], *, receipts: bool | None = None
    ) -> EventsBatch:
        return await self.call(calls.send_events(events, receipts))

    async def reserve(self, *, receipts: bool | None = None, **fields: Any) -> Reservation:
        return await self.call(calls.reserve(fields, receipts))

    async def settle(self, reservation_id: str, **actual: Any) -> Settlement:
        return await self.call(calls.settle(reservation_id, actual))

    async def release(self, reservation_id: str) -> Reservation:
        return await self.call(calls.release(reservation_id))

    # -- identifier tokens and alerts ---------------------------------------------------------------
    async def issue_token(
        self,
        identifier_id: str,
        *,
        limits: Mapping[str, int | Decimal | str] | None = None,
        expires_in: int | None = None,
        workspace_id: str | None = None,
    ) -> TokenPair:
        return await self.call(calls.issue_token(identifier_id, limits, expires_in, workspace_id))

    async def refresh_token(self, refresh_token: str) -> TokenPair:
        return await self.call(calls.refresh_token(refresh_token))

    async def alerts(self, limit: int = 50, offset: int = 0) -> AlertPage:
        return await self.call(calls.alerts(limit, offset))

    async def create_webhook(self, url: str, description: str | None = None) -> WebhookEndpoint:
        return await self.call(calls.create_webhook(url, description))

    async def webhooks(self) -> list[WebhookEndpoint]:
        return await self.call(calls.webhooks())

    async def delete_webhook(self, endpoint_id: str) -> None:
        await self.call(calls.delete_webhook(endpoint_id))
