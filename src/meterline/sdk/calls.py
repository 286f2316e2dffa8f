"""Every endpoint as a ``Call``: the request to send and how to read its answer. ``Client`` and
``AsyncClient`` only execute calls, so the two can never disagree about an endpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

from meterline.sdk._json import rfc3339
from meterline.sdk.access import AlertPage, ServedModel, TokenPair, WebhookEndpoint
from meterline.sdk.analytics import Breakdown, Timeseries
from meterline.sdk.ingest import Event, EventsBatch, Reservation, Settlement
from meterline.sdk.ledger import EventsPage, History, LedgerPage
from meterline.sdk.receipts import Receipt, ReceiptPage
from meterline.sdk.summary import UsageSummary

T = TypeVar("T")
Range = Literal["24h", "7d", "30d"]
BreakdownBy = Literal["workspace", "workspace_group", "user", "model", "endpoint", "key"]
Time = datetime | str


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, Any] = field(default_factory=dict)
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # Whether sending it twice is harmless, so that a lost answer (connection reset) may be retried. A
    # refusal (429/503) writes nothing, so those are retried whatever this says.
    idempotent: bool = True


def _params(**values: Any) -> dict[str, Any]:
    return {k: _wire(v) for k, v in values.items() if v is not None}


def _wire(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _segment(value: str) -> str:
    return quote(value, safe="")


def usage(identifier_id: str | None = None) -> Call[UsageSummary]:
    return Call("GET", "/v1/usage", UsageSummary.from_json, _params(identifier_id=identifier_id))


def history(days: int = 30, identifier_id: str | None = None) -> Call[History]:
    return Call(
        "GET", "/v1/usage/history", History.from_json, _params(days=days, identifier_id=identifier_id)
    )


def events(page: int = 1, per_page: int = 20) -> Call[EventsPage]:
    return Call("GET", "/v1/usage/events", EventsPage.from_json, _params(page=page, per_page=per_page))


def ledger_filters(
    start: Time | None = None,
    end: Time | None = None,
    model: str | None = None,
    key_prefix: str | None = None,
    identifier_id: str | None = None,
    modality: str | None = None,
    provider: str | None = None,
) -> dict[str, Any]:
    return _params(
        start=start,
        end=end,
        model=model,
        key_prefix=key_prefix,
        identifier_id=identifier_id,
        modality=modality,
        provider=provider,
    )


def ledger(limit: int, offset: int, filters: Mapping[str, Any]) -> Call[LedgerPage]:
    return Call(
        "GET", "/v1/usage/ledger", LedgerPage.from_json, {**filters, "limit": limit, "offset": offset}
    )


def export(filters: Mapping[str, Any], export_format: str = "ledger") -> Call[None]:
    """``format``: ``ledger`` (Meterline's columns) or ``focus`` (the FinOps Foundation's FOCUS columns)."""
    params = dict(filters)
    if export_format != "ledger":
        params["format"] = export_format
    return Call("GET", "/v1/usage/export.csv", lambda _: None, params)


def timeseries(
    range_: Range = "7d", by: str = "source", identifier_id: str | None = None
) -> Call[Timeseries]:
    params = _params(range=range_, by=by, identifier_id=identifier_id)
    return Call("GET", "/v1/usage/timeseries", Timeseries.from_json, params)


def breakdown(
    by: BreakdownBy,
    *,
    range_: Range | None = None,
    start: Time | None = None,
    end: Time | None = None,
    limit: int = 10,
    offset: int = 0,
    identifier_id: str | None = None,
) -> Call[Breakdown]:
    params = _params(
        by=by, range=range_, start=start, end=end, limit=limit, offset=offset, identifier_id=identifier_id
    )
    return Call("GET", "/v1/usage/breakdown", Breakdown.from_json, params)


def receipt(receipt_id: str) -> Call[Receipt]:
    return Call("GET", f"/v1/receipts/{_segment(receipt_id)}", Receipt.from_json)


def receipts(after_seq: int = 0, limit: int = 100) -> Call[ReceiptPage]:
    return Call("GET", "/v1/receipts", ReceiptPage.from_json, _params(after_seq=after_seq, limit=limit))


def models() -> Call[list[ServedModel]]:
    return Call("GET", "/v1/models", lambda data: [ServedModel.from_json(m) for m in data["data"]])


def jwks() -> Call[dict[str, Any]]:
    return Call("GET", "/.well-known/jwks.json", dict)


def send_events(
    batch: Iterable[Event | Mapping[str, Any]], receipts: bool | None = None
) -> Call[EventsBatch]:
    body = {"events": [e.to_json() if isinstance(e, Event) else dict(e) for e in batch]}
    # Every event carries its own id and the server counts an id once: resending the batch is safe.
    return Call("POST", "/v1/events", EventsBatch.from_json, body=body, headers=_receipt_header(receipts))


def _receipt_header(receipts: bool | None) -> dict[str, str]:
    return {} if receipts is None else {"X-Meterline-Receipt": "true" if receipts else "false"}


def reserve(fields: Mapping[str, Any], receipts: bool | None = None) -> Call[Reservation]:
    body = {k: v for k, v in fields.items() if v is not None}
    headers = _receipt_header(receipts)
    return Call(
        "POST", "/v1/reservations", Reservation.from_json, body=body, headers=headers, idempotent=False
    )


def settle(reservation_id: str, fields: Mapping[str, Any]) -> Call[Settlement]:
    body = {k: v for k, v in fields.items() if v is not None}
    # Settling again answers the same row: safe to resend.
    return Call(
        "POST", f"/v1/reservations/{_segment(reservation_id)}/settle", Settlement.from_json, body=body
    )


def release(reservation_id: str) -> Call[Reservation]:
    # Releasing again answers 404 (the hold is gone): not resent after a lost answer.
    path = f"/v1/reservations/{_segment(reservation_id)}/release"
    return Call("POST", path, Reservation.from_json, idempotent=False)


def issue_token(
    identifier_id: str,
    limits: Mapping[str, int | Decimal | str] | None = None,
    expires_in: int | None = None,
    workspace_id: str | None = None,
) -> Call[TokenPair]:
    body: dict[str, Any] = {"identifier_id": identifier_id}
    if limits is not None:
        body["limits"] = dict(limits)
    if expires_in is not None:
        body["expires_in"] = expires_in
    headers = {"X-Workspace-Id": workspace_id} if workspace_id else {}
    return Call("POST", "/v1/token", TokenPair.from_json, body=body, headers=headers, idempotent=False)


def refresh_token(token: str) -> Call[TokenPair]:
    # Never resent blindly: a refresh token presented twice revokes its whole family.
    body = {"refresh_token": token}
    return Call("POST", "/v1/token/refresh", TokenPair.from_json, body=body, idempotent=False)


def alerts(limit: int = 50, offset: int = 0) -> Call[AlertPage]:
    return Call("GET", "/v1/alerts", AlertPage.from_json, _params(limit=limit, offset=offset))


def create_webhook(url: str, description: str | None = None) -> Call[WebhookEndpoint]:
    body = {"url": url, **({"description": description} if description is not None else {})}
    return Call("POST", "/v1/alerts/webhooks", WebhookEndpoint.from_json, body=body, idempotent=False)


def webhooks() -> Call[list[WebhookEndpoint]]:
    return Call(
        "GET", "/v1/alerts/webhooks", lambda data: [WebhookEndpoint.from_json(w) for w in data["data"]]
    )


def delete_webhook(endpoint_id: str) -> Call[None]:
    path = f"/v1/alerts/webhooks/{_segment(endpoint_id)}"
    return Call("DELETE", path, lambda _: None, idempotent=False)


def health() -> Call[dict[str, Any]]:
    return Call("GET", "/healthz", dict)
