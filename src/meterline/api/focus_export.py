"""Ledger rows in the FinOps Foundation's FOCUS format (``GET /v1/usage/export.csv?format=focus``,
``meterline export --format focus``), for finance tools that read cloud bills.

One line per ledger row: every line is one request or event as it was billed, so the file's sums equal
``/v1/usage`` exactly, and a line leads back to its row and receipt (``x_LedgerRowId``,
``x_ReceiptId``). The FOCUS 1.2 columns that apply are filled; the ones about commitments, capacity
reservations and invoices are present and empty (FOCUS wants every column, nullable ones empty).

* Money and quantities are exact decimal text, always with a decimal point (``12.0``), in the
  organization's currency: ``BilledCost`` = ``EffectiveCost`` =
  ``ContractedCost`` is what was charged (after the organization's discount), ``ListCost`` before it.
* A line is priced per request: ``PricingQuantity`` 1 ``Requests`` at ``ListUnitPrice`` = ``ListCost`` and
  ``ContractedUnitPrice`` = the cost, because a request's tokens are priced at several rates (input,
  output, cache reads and writes, ...) and no single token price times the tokens is its cost; what was
  consumed is ``ConsumedQuantity`` (tokens, seconds of audio, or an event's units).
* The charge period is the UTC hour of the request; the billing period is the organization's.
* The account is the organization (``BillingAccount*``), the sub-account and resource its workspace.
* Tags: Meterline's own under the ``meterline/`` prefix (FOCUS wants a provider's tags prefixed), the
  row's ``metadata`` (the client's own tags) as they were sent.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import orjson

from meterline.api.csv_export import neutralized
from meterline.metering.records import LedgerRow
from meterline.money import format_nanos
from meterline.quotas.periods import billing_period
from meterline.tenancy import Organization

FOCUS_VERSION = "1.2"
INVOICE_ISSUER = "Meterline"
COLUMNS = (
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingAccountType",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "CapacityReservationId",
    "CapacityReservationStatus",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "CommitmentDiscountUnit",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceId",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingCurrency",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceDetails",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "SubAccountType",
    "Tags",
    "x_LedgerRowId",
    "x_ReceiptId",
    "x_Credits",
    "x_Overage",
)
_ROWS_PER_CHUNK = 200
_HOUR = timedelta(hours=1)


def _decimal(text: str) -> str:
    """Exact decimal text with a decimal point: a column of whole numbers is still read as decimals by
    tools that infer types from the text (pandas, and the FinOps Foundation's validator with it)."""
    return text if "." in text else f"{text}.0"


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity(row: LedgerRow) -> tuple[str, str, str]:
    """(quantity, unit, meter): what the row consumed, in the unit it was billed by."""
    if row.audio_seconds is not None:
        return format(row.audio_seconds, "f"), "Seconds", "Audio"
    if row.model is None:
        return str(row.units), row.event, "Events"
    return str(row.total_tokens), "Tokens", "Tokens"


def _description(row: LedgerRow) -> str:
    if row.model is None:
        return f"{row.units} {row.event}"
    if row.audio_seconds is not None:
        return f"{row.model}: {format(row.audio_seconds, 'f')} s of audio"
    parts = [f"{row.prompt_tokens} input", f"{row.completion_tokens} output"]
    if row.cache_read_tokens:
        parts.append(f"{row.cache_read_tokens} cache read")
    if row.cache_write_tokens:
        parts.append(f"{row.cache_write_tokens} cache write")
    return f"{row.model}: {', '.join(parts)} tokens"


def _tags(row: LedgerRow) -> str:
    own = {
        "endpoint": row.endpoint,
        "source": row.source,
        "user_id": row.user_id,
        "identifier_id": row.identifier_id,
        "key_prefix": row.key_prefix,
        "run_id": row.run_id,
    }
    tags: dict[str, str] = {}
    for key, value in (row.metadata or {}).items():
        tags[str(key)] = value if isinstance(value, str) else orjson.dumps(value).decode()
    tags.update({f"meterline/{k}": v for k, v in own.items() if v})
    return orjson.dumps(tags).decode()


def cells(row: LedgerRow, org: Organization, workspaces: Mapping[str, str]) -> list[Any]:
    text = neutralized
    period = billing_period(row.created_at, org.billing_anchor_day)
    hour = row.created_at.replace(minute=0, second=0, microsecond=0)
    quantity, unit, meter = _quantity(row)
    quantity = _decimal(quantity)
    cost = _decimal(format_nanos(row.cost_nanos))
    list_cost = _decimal(format_nanos(row.list_cost_nanos))
    workspace = text(workspaces.get(row.workspace_id))
    provider = text(row.provider) or INVOICE_ISSUER
    sku = text(row.model) or text(row.event)
    return [
        "",  # AvailabilityZone
        cost,
        org.id,
        text(org.name),
        "Organization",
        row.currency,
        _time(period.end),
        _time(period.start),
        "",  # CapacityReservationId
        "",  # CapacityReservationStatus
        "Usage",
        "",  # ChargeClass: no corrections in an append-only ledger's own rows
        text(_description(row)),
        "Usage-Based",
        _time(hour + _HOUR),
        _time(hour),
        "",  # CommitmentDiscountCategory
        "",  # CommitmentDiscountId
        "",  # CommitmentDiscountName
        "",  # CommitmentDiscountQuantity
        "",  # CommitmentDiscountStatus
        "",  # CommitmentDiscountType
        "",  # CommitmentDiscountUnit
        quantity,
        text(unit),
        cost,  # ContractedCost: the organization's discount is its contract
        cost,  # ContractedUnitPrice: of one request
        cost,  # EffectiveCost: no commitments to amortize
        "",  # InvoiceId
        INVOICE_ISSUER,
        list_cost,
        list_cost,  # ListUnitPrice: of one request
        "Standard",
        row.currency,
        "1.0",  # PricingQuantity
        "Requests",
        provider,
        provider,
        text(row.region),
        text(row.region),
        row.workspace_id,
        workspace,  # ResourceName
        "Workspace",
        "AI and Machine Learning",
        f"{provider} API" if row.model is not None else f"{INVOICE_ISSUER} events",
        "Generative AI",
        sku,
        meter,
        "",  # SkuPriceDetails
        f"{provider}/{sku}",
        row.workspace_id,
        workspace,  # SubAccountName
        "Workspace",
        _tags(row),
        row.id,
        row.receipt_id or "",
        _decimal(format_nanos(row.credits_nanos)),
        "true" if row.overage else "false",
    ]


def focus_chunks(
    rows: Iterable[LedgerRow], org: Organization, workspaces: Mapping[str, str]
) -> Iterator[bytes]:
    """The header, then the lines a few hundred at a time; ``workspaces``: names by id."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for count, row in enumerate(rows, start=1):
        writer.writerow(cells(row, org, workspaces))
        if count % _ROWS_PER_CHUNK == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()
