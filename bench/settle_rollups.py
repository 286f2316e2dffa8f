"""What the narrow rollups cost a settle: one-row ledger appends (the gateway's case) on a SQLite file, with
the narrow rollups written as in production and with their upsert skipped, interleaved in rounds so both
sides see the same machine load. Prints mean µs per append and the ratio.

    .venv/bin/python bench/settle_rollups.py [--appends 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meterline.metering.records import LedgerRow
from meterline.storage import usage_rollups
from meterline.storage.database import Database
from meterline.storage.ledger_store import SqlLedgerStore
from meterline.storage.migrate import upgrade

BASE = LedgerRow(
    id="", organization_id="org_bench", workspace_id="ws_bench", key_id="key_bench", key_prefix="ml_live_x",
    key_name="bench", identifier_id=None, user_id="user-1", source="api", endpoint="/v1/chat/completions",
    event="chat", units=1, run_id=None, metadata=None, model="gpt-4o-mini", modality="text",
    provider="openai", region=None, billing_unit="token", audio_ms=None, prompt_tokens=120,
    completion_tokens=40, cache_read_tokens=0, cache_write_tokens=0, total_tokens=160, currency="USD",
    list_cost_nanos=42_000, discount_applied_pct=0, cost_nanos=42_000, credits_nanos=4_200_000, priced=True,
    overage=False, failover=False, receipt_id=None, idempotency_key=None, request_hash=None,
    created_at=datetime(2026, 11, 1, tzinfo=UTC), recorded_at=datetime(2026, 11, 1, tzinfo=UTC),
    credits_monthly_nanos=0, credits_bonus_nanos=0,
)  # fmt: skip


def _appends(store: SqlLedgerStore, n: int, start: int) -> float:
    begun = time.perf_counter()
    for i in range(start, start + n):
        at = BASE.created_at + timedelta(seconds=7 * i)
        store.append([replace(BASE, id=f"row-{i}", user_id=f"user-{i % 50}", created_at=at, recorded_at=at)])
    return (time.perf_counter() - begun) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    real: Callable[..., Any] = usage_rollups.deltas
    results: dict[str, list[float]] = {"with narrow rollups": [], "without": []}
    with tempfile.TemporaryDirectory() as scratch:
        stores = {}
        for name in results:
            db = Database(f"sqlite:///{Path(scratch) / name.replace(' ', '-')}.db")
            upgrade(db)
            stores[name] = SqlLedgerStore(db)
        for r in range(args.rounds):
            for name, store in stores.items():
                # Without: no entries computed, so none written (the settle path's own code otherwise).
                usage_rollups.deltas = real if name != "without" else (lambda rows, anchor_day: [])
                results[name].append(_appends(store, args.appends, r * args.appends))
        usage_rollups.deltas = real
    means = {name: sorted(v)[len(v) // 2] for name, v in results.items()}
    for name, mean in means.items():
        print(f"{name:<22} {mean:8.1f} µs per one-row append (median of {args.rounds} rounds)")
    print(f"ratio: {means['with narrow rollups'] / means['without']:.2f}")


if __name__ == "__main__":
    main()
