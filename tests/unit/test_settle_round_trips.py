"""PostgreSQL: a settle's round trips. From its organization's turn (a row lock) to its commit, every other
process's settles of that organization wait, and each round trip is a wait on the way back for the
writer thread (docs/benchmarks.md, "Fewer round trips under the organization's turn"). The turn, the
reads the settle decides on and the idempotency look-up go in one round trip, and the writes whose
answers nobody reads go with the next statement answered."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import ADMIN_KEY, in_one_batch
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.metering import UsageRecord, ingest
from meterline.quotas.gate import QuotaGate
from meterline.services import Services, build_services
from meterline.tenancy import Principal
from pg_trace import traced

OPEN_LIMITS = dict.fromkeys(
    ("daily_calls", "monthly_calls", "daily_tokens", "monthly_tokens", "rpm", "tpm"), -1
)
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def metered(pg_url: str, tmp_path: Path) -> Services:
    """Services on PostgreSQL with a plan whose events draw credits (1,000 a month, 0.01 USD a unit)."""
    config = load_settings(
        database_url=pg_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "key.json"),
        plans={"metered": {**OPEN_LIMITS, "monthly_credits": 1_000, "overage": "block"}},
        prices={"credit.use": {"per_unit": "0.01"}},
    )
    return build_services(config, clock=FrozenClock(START), migrate=False)


def gate_of(services: Services, subject: Any) -> QuotaGate:
    """The quota gate of one organization's requests."""
    return QuotaGate(services.quotas, lambda _row: subject)


def _under_turn(lines: list[str]) -> list[str]:
    """The trace from a settle's locking statement to its commit's answer."""
    turn = next(i for i, line in enumerate(lines) if "FOR UPDATE" in line)
    commit = next(i for i, line in enumerate(lines) if '"COMMIT"' in line and i > turn)
    answered = next(i for i, line in enumerate(lines) if "\tReadyForQuery\t" in line and i > commit)
    return lines[turn : answered + 1]


def test_a_settle_on_postgresql_takes_few_round_trips(pg_url: str, tmp_path: Path) -> None:
    services = metered(pg_url, tmp_path)
    try:
        org = services.tenancy.create_organization(f"Trips {uuid.uuid4().hex[:6]}", "metered")
        ws = services.tenancy.create_workspace(org.id, "W")
        subject = services.subject_of(org, Principal(org.id, ws.id, "workspace"))
        gate = QuotaGate(services.quotas, lambda _row: subject)

        def settle_one() -> None:
            record = UsageRecord(
                organization_id=org.id,
                workspace_id=ws.id,
                created_at=START,
                event="credit.use",
                units=3,
                idempotency_key=uuid.uuid4().hex,
                request_hash="x",
            )
            (outcome,) = ingest(services.settler, services.account_of(org), [record], gate)
            assert outcome.status == "accepted"
            assert outcome.row is not None
            assert outcome.row.credits_monthly_nanos == 3 * 10**9  # credits split: the reads were used

        settle_one()  # the first one: caches filled
        with traced(services.db.engine) as lines:
            settle_one()
        under_turn = _under_turn(lines)
        # The settle's writes went out under the turn: the ledger row, the rollups, the receipt and the
        # chain head (the credit draw is a prepared statement, named, not quoted: its row is read below).
        for table in ("ledger", "usage_rollups", "receipts"):
            assert any(f"INTO {table} " in line for line in under_turn), table
        # Round trips from the turn to the commit (libpq: one ReadyForQuery each): the turn with its
        # reads and the idempotency look-up; the ledger insert with the credit draw; the rollups and the
        # receipt with the alerts' reads; the commit. With a round trip each, there were eleven.
        assert sum(1 for line in under_turn if "\tReadyForQuery\t" in line) == 4, "\n".join(under_turn)
        with services.db.read() as conn:
            drawn = conn.exec_driver_sql(
                "SELECT monthly_nanos FROM credit_usage WHERE organization_id = %s", (org.id,)
            ).scalar()
        assert drawn == 6 * 10**9
    finally:
        services.close()


def test_a_batch_of_several_organizations_settles_in_the_round_trips_of_one(
    pg_url: str, tmp_path: Path
) -> None:
    """Settles of several organizations queued together are one settle: their turns, reads and look-ups
    in one round trip, one insert, one write of rollups and receipts (per organization, each round trip
    was paid again: 13 for four organizations)."""
    services = metered(pg_url, tmp_path)
    db = services.db
    try:
        tenants = []
        for n in range(4):
            org = services.tenancy.create_organization(f"Batch {n} {uuid.uuid4().hex[:6]}", "metered")
            ws = services.tenancy.create_workspace(org.id, "W")
            subject = services.subject_of(org, Principal(org.id, ws.id, "workspace"))
            tenants.append((org, ws, gate_of(services, subject)))

        def settle_one(n: int) -> None:
            org, ws, gate = tenants[n]
            record = UsageRecord(
                organization_id=org.id,
                workspace_id=ws.id,
                created_at=START,
                event="credit.use",
                units=3 + n,
                idempotency_key=uuid.uuid4().hex,
                request_hash="x",
            )
            (outcome,) = ingest(services.settler, services.account_of(org), [record], gate)
            assert outcome.status == "accepted"
            assert outcome.row is not None
            assert outcome.row.credits_monthly_nanos == (3 + n) * 10**9

        for n in range(4):
            settle_one(n)  # the first ones: caches filled

        with traced(services.db.engine) as lines:
            in_one_batch(services, 4, settle_one)
        under_turn = _under_turn(lines)
        assert sum(1 for line in under_turn if "FOR UPDATE" in line) == 1
        assert sum(1 for line in under_turn if "INTO ledger " in line) == 1
        assert sum(1 for line in under_turn if "\tReadyForQuery\t" in line) == 4, "\n".join(under_turn)
        # And as many statements as one organization's settle: none is repeated per organization.
        with traced(services.db.engine) as alone:
            settle_one(0)
        statements = [
            sum(1 for line in trace if "\tBind\t" in line) for trace in (_under_turn(alone), under_turn)
        ]
        assert statements[0] == statements[1], "\n".join(under_turn)
        # Each organization's books: its receipts chain, its credits drawn.
        with db.read() as conn:
            for n, (org, _ws, _gate) in enumerate(tenants):
                drawn = conn.exec_driver_sql(
                    "SELECT monthly_nanos FROM credit_usage WHERE organization_id = %s", (org.id,)
                ).scalar()
                settles = 3 if n == 0 else 2  # the first organization's once more, alone
                assert drawn == settles * (3 + n) * 10**9
                seqs = conn.exec_driver_sql(
                    "SELECT seq FROM receipts WHERE organization_id = %s ORDER BY seq", (org.id,)
                ).scalars()
                head = conn.exec_driver_sql(
                    "SELECT seq FROM receipt_chains WHERE organization_id = %s", (org.id,)
                ).scalar()
                assert (list(seqs), head) == (list(range(1, settles + 1)), settles)
    finally:
        services.close()


def test_the_hot_paths_bulk_statements_stay_within_what_psycopg_keeps_parsed() -> None:
    # psycopg parses a statement again at every execution past 50 parameters or 4,096 bytes: the ledger's
    # insert (51 columns) was, at every settle unit, until its usage counts went as one array.
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH, MAX_CACHED_STATEMENT_PARAMS

    from meterline.storage import (
        alert_store,
        credit_store,
        ledger_store,
        reservation_store,
        sql_counters,
        usage_details,
        usage_rollups,
    )

    statements = {
        "ledger insert": ledger_store._PG_UNNEST_INSERT,
        "hourly rollups": ledger_store._PG_ROLLUP_UPSERT,
        "receipts and heads": ledger_store._PG_RECEIPTS_AND_HEADS,
        "turns": ledger_store._PG_TURNS,
        "after the turns": ledger_store._PG_AFTER_TURNS,
        "pairs stored": ledger_store._PG_PAIRS_STORED,
        "keys stored": ledger_store._PG_KEYS_STORED,
        "reservations ended": ledger_store._PG_END_RESERVATIONS,
        "credit draws": credit_store._PG_UPSERT,
        "thresholds": alert_store._PG_THRESHOLDS,
        "credits used": alert_store._PG_CREDITS_USED,
        "spent": alert_store._PG_SPENT,
        "rows by keys": ledger_store._PG_SELECT_BY_KEYS,
        "rollups": usage_rollups.PG_UPSERT,
        "usage details": usage_details._PG_UPSERT_MANY,
        "durable reservations": reservation_store._PG_INSERT_MANY,
        "stream progress": reservation_store._PG_PROGRESS_MANY,
        "fixed counters": sql_counters._PG_FIXED,
        "horizons": sql_counters._PG_HORIZONS,
        "one-second buckets": sql_counters._PG_SECONDS,
        "holds ended": sql_counters._PG_HOLDS_GONE,
        "holds made": sql_counters._PG_HOLDS_NEW,
    }
    for name, sql in statements.items():
        assert sql.count("%s") <= MAX_CACHED_STATEMENT_PARAMS, name
        assert len(sql.encode()) <= MAX_CACHED_STATEMENT_LENGTH, name
