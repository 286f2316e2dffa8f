"""SQL implementation of ``meterline.metering.LedgerStore``: ledger rows and hourly rollups together."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from meterline.clock import MICROS_PER_HOUR, from_micros, to_micros
from meterline.metering.records import LedgerRow
from meterline.metering.store import AppendResult
from meterline.storage.database import Database
from meterline.storage.tables import ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ledger, usage_hourly


def row_to_values(row: LedgerRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "organization_id": row.organization_id,
        "workspace_id": row.workspace_id,
        "key_id": row.key_id,
        "key_prefix": row.key_prefix,
        "key_name": row.key_name,
        "identifier_id": row.identifier_id,
        "user_id": row.user_id,
        "source": row.source,
        "endpoint": row.endpoint,
        "event": row.event,
        "units": row.units,
        "run_id": row.run_id,
        "metadata_json": None if row.metadata is None else json.dumps(row.metadata, separators=(",", ":")),
        "model": row.model,
        "modality": row.modality,
        "provider": row.provider,
        "region": row.region,
        "billing_unit": row.billing_unit,
        "audio_ms": row.audio_ms,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cache_read_tokens": row.cache_read_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        "total_tokens": row.total_tokens,
        "currency": row.currency,
        "list_cost_nanos": row.list_cost_nanos,
        "discount_applied_pct": row.discount_applied_pct,
        "cost_nanos": row.cost_nanos,
        "credits_nanos": row.credits_nanos,
        "priced": row.priced,
        "overage": row.overage,
        "failover": row.failover,
        "receipt_id": row.receipt_id,
        "idempotency_key": row.idempotency_key,
        "request_hash": row.request_hash,
        "created_at_us": to_micros(row.created_at),
        "recorded_at_us": to_micros(row.recorded_at),
    }


def row_from_db(r: Any) -> LedgerRow:
    return LedgerRow(
        id=r.id,
        organization_id=r.organization_id,
        workspace_id=r.workspace_id,
        key_id=r.key_id,
        key_prefix=r.key_prefix,
        key_name=r.key_name,
        identifier_id=r.identifier_id,
        user_id=r.user_id,
        source=r.source,
        endpoint=r.endpoint,
        event=r.event,
        units=r.units,
        run_id=r.run_id,
        metadata=None if r.metadata_json is None else json.loads(r.metadata_json),
        model=r.model,
        modality=r.modality,
        provider=r.provider,
        region=r.region,
        billing_unit=r.billing_unit,
        audio_ms=r.audio_ms,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        cache_read_tokens=r.cache_read_tokens,
        cache_write_tokens=r.cache_write_tokens,
        total_tokens=r.total_tokens,
        currency=r.currency,
        list_cost_nanos=r.list_cost_nanos,
        discount_applied_pct=r.discount_applied_pct,
        cost_nanos=r.cost_nanos,
        credits_nanos=r.credits_nanos,
        priced=bool(r.priced),
        overage=bool(r.overage),
        failover=bool(r.failover),
        receipt_id=r.receipt_id,
        idempotency_key=r.idempotency_key,
        request_hash=r.request_hash,
        created_at=from_micros(r.created_at_us),
        recorded_at=from_micros(r.recorded_at_us),
    )


def rollup_deltas(values: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ledger rows folded into one delta per (hour, dimensions): a batch touches few rollup rows."""
    buckets: dict[tuple[Any, ...], dict[str, Any]] = {}
    for v in values:
        key = (v["created_at_us"] // MICROS_PER_HOUR, *((v[d] or "") for d in ROLLUP_DIMENSIONS))
        bucket = buckets.get(key)
        if bucket is None:
            bucket = {"hour": key[0], **dict(zip(ROLLUP_DIMENSIONS, key[1:], strict=True))}
            bucket.update(dict.fromkeys(ROLLUP_MEASURES, 0))
            buckets[key] = bucket
        bucket["requests"] += 1
        for measure in ROLLUP_MEASURES[1:]:
            bucket[measure] += v[measure] or 0
    return list(buckets.values())


class SqlLedgerStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert_dialect = sqlite.insert if db.is_sqlite else postgresql.insert

    def append(self, rows: Sequence[LedgerRow]) -> AppendResult:
        if not rows:
            return AppendResult(written=[], existing={})
        with self._db.write() as conn:
            return self.append_in(conn, rows)

    def append_in(self, conn: Connection, rows: Sequence[LedgerRow]) -> AppendResult:
        """``append`` inside a transaction the caller owns (so other writes can share it)."""
        org_ids = {r.organization_id for r in rows}
        keyed = [r for r in rows if r.idempotency_key is not None]
        existing: dict[str, LedgerRow] = {}
        if keyed:
            existing = self._existing(conn, [(r.organization_id, r.idempotency_key) for r in keyed])
        to_write = [r for r in rows if r.idempotency_key is None or r.idempotency_key not in existing]
        if len(org_ids) > 1 and keyed:
            raise ValueError("idempotent appends take one organization at a time")
        plain = [row_to_values(r) for r in to_write if r.idempotency_key is None]
        unique = [row_to_values(r) for r in to_write if r.idempotency_key is not None]
        if plain:
            conn.execute(insert(ledger), plain)
        written_values = list(plain)
        if unique:
            # A concurrent request may have written the same key since the look-up above (PostgreSQL
            # has no single writer); the unique index decides, and the loser reads the winner's row.
            stmt = (
                self._insert_dialect(ledger)
                .on_conflict_do_nothing(index_elements=["organization_id", "idempotency_key"])
                .returning(ledger.c.idempotency_key)
            )
            inserted = {r.idempotency_key for r in conn.execute(stmt, unique)}
            raced = [v for v in unique if v["idempotency_key"] not in inserted]
            if raced:
                existing.update(
                    self._existing(conn, [(v["organization_id"], v["idempotency_key"]) for v in raced])
                )
            written_values.extend(v for v in unique if v["idempotency_key"] in inserted)
        if written_values:
            self._add_to_rollups(conn, written_values)
        written_ids = {v["id"] for v in written_values}
        return AppendResult(written=[r for r in to_write if r.id in written_ids], existing=existing)

    def _existing(self, conn: Connection, keys: Sequence[tuple[str, str | None]]) -> dict[str, LedgerRow]:
        found: dict[str, LedgerRow] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            query = select(ledger).where(
                tuple_(ledger.c.organization_id, ledger.c.idempotency_key).in_(chunk)
            )
            for r in conn.execute(query):
                found[r.idempotency_key] = row_from_db(r)
        return found

    def _add_to_rollups(self, conn: Connection, values: Sequence[dict[str, Any]]) -> None:
        stmt = self._insert_dialect(usage_hourly)
        stmt = stmt.on_conflict_do_update(
            index_elements=["hour", *ROLLUP_DIMENSIONS],
            set_={m: usage_hourly.c[m] + stmt.excluded[m] for m in ROLLUP_MEASURES},
        )
        conn.execute(stmt, rollup_deltas(values))
