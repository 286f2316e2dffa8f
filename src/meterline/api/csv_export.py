"""Ledger rows as CSV (``GET /v1/usage/export.csv``): exact money text, safe to open in a spreadsheet.

Spreadsheet programs run a cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return as a
formula, so every free-text field a caller could have supplied gets a leading single quote (OWASP "CSV
injection"). Numbers and money are written by us and left as they are, so sums stay exact.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from meterline.clock import rfc3339
from meterline.metering.records import VECTOR_COUNTS, LedgerRow
from meterline.money import format_nanos

COLUMNS = (
    "id",
    "created_at",
    "organization_id",
    "workspace_id",
    "key_prefix",
    "key_name",
    "identifier_id",
    "user_id",
    "source",
    "endpoint",
    "event",
    "units",
    "run_id",
    "model",
    "modality",
    "provider",
    "region",
    "billing_unit",
    "audio_seconds",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "total_tokens",
    "currency",
    "list_cost",
    "discount_applied_pct",
    "cost",
    "credits",
    "credits_monthly",
    "credits_bonus",
    "priced",
    "overage",
    "failover",
    "receipt_id",
    "event_id",
    "metadata",
    # The usage vector, appended so that the columns before keep their places.
    *VECTOR_COUNTS,
    "service_tier",
    "batch",
)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_ROWS_PER_CHUNK = 200


def neutralized(text: str | None) -> str:
    """Free text as a cell that a spreadsheet shows instead of evaluating."""
    if text is None:
        return ""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _flag(value: bool) -> str:
    return "true" if value else "false"


def cells(row: LedgerRow) -> list[Any]:
    text = neutralized
    audio = row.audio_seconds
    return [
        row.id,
        rfc3339(row.created_at),
        row.organization_id,
        row.workspace_id,
        text(row.key_prefix),
        text(row.key_name),
        text(row.identifier_id),
        text(row.user_id),
        text(row.source),
        text(row.endpoint),
        text(row.event),
        row.units,
        text(row.run_id),
        text(row.model),
        text(row.modality),
        text(row.provider),
        text(row.region),
        row.billing_unit,
        "" if audio is None else format(audio, "f"),
        row.prompt_tokens,
        row.completion_tokens,
        row.cache_read_tokens,
        row.cache_write_tokens,
        row.total_tokens,
        row.currency,
        format_nanos(row.list_cost_nanos),
        row.discount_applied_pct,
        format_nanos(row.cost_nanos),
        format_nanos(row.credits_nanos),
        format_nanos(row.credits_monthly_nanos),
        format_nanos(row.credits_bonus_nanos),
        _flag(row.priced),
        _flag(row.overage),
        _flag(row.failover),
        row.receipt_id or "",
        text(row.idempotency_key),
        "" if row.metadata is None else text(orjson.dumps(row.metadata).decode()),
        *(getattr(row.usage, name) for name in VECTOR_COUNTS),
        text(row.usage.service_tier),
        _flag(row.usage.batch),
    ]


def csv_chunks(rows: Iterable[LedgerRow]) -> Iterator[bytes]:
    """The header, then the rows a few hundred at a time (fewer, larger writes than one per row)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for count, row in enumerate(rows, start=1):
        writer.writerow(cells(row))
        if count % _ROWS_PER_CHUNK == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()
