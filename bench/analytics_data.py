"""Synthetic ledgers for ``bench/analytics.py``: N rows over 90 days up to now, as if settled by the app.

Tenants (organizations, workspaces with groups, keys, bonus grants) are created through Meterline's own
services; ledger rows are built as ``LedgerRow``s, their credits split with ``draw`` exactly as
``split_credits`` does (monthly first, then bonus, the rest overage), bulk-inserted with ``row_to_tuple``,
and their hourly rollups written from ``rollup_deltas`` — the functions the settle path uses. Rows are made
in time order, one UTC day at a time, so a day's rollup deltas are final (no later row shares an hour).

The spread: 20 organizations with a Zipf-like skew (the biggest has ~28 % of the rows), 5-50 workspaces
each in a few groups, 1-3 keys per workspace, thousands of users who each stick to a home workspace, key,
source and two favourite models (that is what keeps hourly rollups smaller than the ledger), ~15 models
of 5 providers, sources web/cli/api, 6 endpoints, weekdays busier than weekends, daytime busier than night.

PostgreSQL databases are filled from the SQLite file of the same size (COPY), so both hold the same rows.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterline.clock import MICROS_PER_HOUR, to_micros
from meterline.config import load_settings
from meterline.credits import draw
from meterline.metering.records import LedgerRow
from meterline.quotas.limits import UNLIMITED
from meterline.quotas.periods import billing_period
from meterline.services import build_services
from meterline.storage import usage_rollups
from meterline.storage.ledger_store import _COLUMNS, _SQLITE_ROLLUP_UPSERT, rollup_deltas, row_to_tuple

DAYS = 90
ORGS = 20
MODELS: list[tuple[str, str, int, int]] = [  # model, provider, $ per 1M input / output tokens x 1000
    ("gpt-4o-mini", "openai", 150, 600),
    ("gpt-4o", "openai", 2500, 10000),
    ("gpt-4.1", "openai", 2000, 8000),
    ("gpt-4.1-mini", "openai", 400, 1600),
    ("o3-mini", "openai", 1100, 4400),
    ("text-embedding-3-small", "openai", 20, 0),
    ("claude-3-5-haiku-20241022", "anthropic", 800, 4000),
    ("claude-sonnet-4-20250514", "anthropic", 3000, 15000),
    ("claude-opus-4-20250514", "anthropic", 15000, 75000),
    ("gemini-2.0-flash", "google", 100, 400),
    ("gemini-2.5-pro", "google", 1250, 10000),
    ("mistral-large-latest", "mistral", 2000, 6000),
    ("mistral-small-latest", "mistral", 200, 600),
    ("llama-3.3-70b", "groq", 590, 790),
    ("llama-3.1-8b", "groq", 50, 80),
]
MODEL_WEIGHTS = [30, 12, 8, 10, 4, 6, 10, 9, 1, 8, 3, 2, 3, 3, 2]
SOURCES = ["web", "cli", "api"]
ENDPOINTS = ["/chat", "/search", "/summarize", "/agent", "/embed", "/classify"]
GROUPS = ["eng", "research", "sales", "support", "data", "ops"]
# Relative load per UTC hour (daytime busier), per weekday (Mon..Sun).
HOURLY = [0.3, 0.25, 0.2, 0.2, 0.25, 0.35, 0.5, 0.8, 1.1, 1.3, 1.4, 1.4, 1.3, 1.4, 1.5, 1.5, 1.4, 1.2, 1.0,
          0.9, 0.8, 0.6, 0.5, 0.4]  # fmt: skip
WEEKDAY = [1.1, 1.15, 1.15, 1.1, 1.0, 0.45, 0.4]


@dataclass
class User:
    name: str
    workspace_id: str
    key: tuple[str, str, str]  # id, prefix, name
    source: str
    endpoints: tuple[str, str]
    models: tuple[int, int]
    weight: float


@dataclass
class Org:
    id: str
    terms: Any  # CreditTerms
    weight: float
    users: list[User]
    user_weights: list[float]

    def __post_init__(self) -> None:
        self.cumulative = list(itertools.accumulate(self.user_weights))
        self.total = self.cumulative[-1]

    def pick(self, rng: random.Random) -> User:
        return self.users[bisect.bisect(self.cumulative, rng.random() * self.total)]


def _sqlite_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # load only: the server reopens it with its own pragmas
    conn.execute("PRAGMA cache_size=-1500000")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def _tenants(database_url: str, scratch: Path, rng: random.Random) -> tuple[list[Org], dict[str, Any]]:
    """Organizations, workspaces, keys and grants through Meterline's services (so they are real)."""
    settings = load_settings(database_url=database_url, signing_key_file=str(scratch / "signing-key.json"))
    services = build_services(settings)
    orgs: list[Org] = []
    meta: dict[str, Any] = {"orgs": []}
    try:
        for i in range(ORGS):
            weight = 1 / (i + 1) ** 1.1
            plan = "enterprise" if i < 4 else "pro"
            org = services.tenancy.create_organization(
                f"Org {i:02d}", plan, billing_anchor_day=[1, 15, 31, 7][i % 4]
            )
            n_ws = max(5, min(50, round(50 * weight**0.6)))
            groups = GROUPS[: 2 + i % 5]
            workspaces = [
                services.tenancy.create_workspace(org.id, f"ws-{w:02d}", rng.choice(groups))
                for w in range(n_ws)
            ]
            keys: dict[str, list[tuple[str, str, str]]] = {}
            for ws in workspaces:
                for k in range(rng.randint(1, 3)):
                    new = services.tenancy.create_key(ws.id, f"key-{k}")
                    keys.setdefault(ws.id, []).append((new.key.id, new.key.key_prefix, new.key.name))
            org_key = services.tenancy.create_key(workspaces[0].id, "analytics", scope="organization")
            if i in (5, 9, 14):
                services.grant_credits(org.id, Decimal(20_000 * (i % 4 + 1)), "Referral")
            n_users = max(30, round(2500 * weight))
            users = []
            for u in range(n_users):
                ws = rng.choice(workspaces)
                models = (
                    rng.choices(range(len(MODELS)), MODEL_WEIGHTS)[0],
                    rng.choices(range(len(MODELS)), MODEL_WEIGHTS)[0],
                )
                users.append(
                    User(
                        name=f"user-{i:02d}-{u:05d}",
                        workspace_id=ws.id,
                        key=rng.choice(keys[ws.id]),
                        source=rng.choices(SOURCES, [5, 2, 3])[0],
                        endpoints=(rng.choice(ENDPOINTS), rng.choice(ENDPOINTS)),
                        models=models,
                        weight=rng.paretovariate(1.3),
                    )
                )
            orgs.append(
                Org(org.id, services.account_of(org).credits, weight, users, [u.weight for u in users])
            )
            meta["orgs"].append(
                {
                    "id": org.id,
                    "plan": plan,
                    "workspaces": n_ws,
                    "users": n_users,
                    "org_key": org_key.secret,
                    "workspace_ids": [ws.id for ws in workspaces],
                }
            )
    finally:
        services.close()
    return orgs, meta


def _day_counts(total: int, first_day: datetime) -> list[int]:
    weights = [WEEKDAY[(first_day + timedelta(days=d)).weekday()] for d in range(DAYS)]
    scale = total / sum(weights)
    counts = [int(w * scale) for w in weights]
    counts[-1] += total - sum(counts)
    return counts


def _rows_for_day(
    day: datetime, count: int, orgs: list[Org], rng: random.Random, now: datetime, serial: list[int]
) -> list[LedgerRow]:
    seconds = [rng.random() for _ in range(count)]
    hours = rng.choices(range(24), HOURLY, k=count)
    moments = sorted(h * 3600 + s * 3600 for h, s in zip(hours, seconds, strict=True))
    org_picks = rng.choices(orgs, [o.weight for o in orgs], k=count)
    rows: list[LedgerRow] = []
    for offset, org in zip(moments, org_picks, strict=True):
        created = day + timedelta(seconds=offset)
        if created > now:  # today: squeezed into the part of the day that has happened
            created = day + (now - day) * (offset / 86_400)
        user = org.pick(rng)
        model, provider, price_in, price_out = MODELS[
            user.models[0] if rng.random() < 0.8 else user.models[1]
        ]
        embedding = model.startswith("text-embedding")
        prompt = int(rng.lognormvariate(6.5, 1.0)) + 1
        completion = 0 if embedding else int(rng.lognormvariate(5.3, 0.9))
        cache_read = prompt // 2 if rng.random() < 0.3 else 0
        # price_* is $ per 1M tokens x 1000, so nanos per token = price_* (1e9 / 1e6 / 1000).
        cost = prompt * price_in + completion * price_out
        serial[0] += 1
        api = user.source == "api"
        rows.append(
            LedgerRow(
                id=str(uuid.uuid4()),
                organization_id=org.id,
                workspace_id=user.workspace_id,
                key_id=user.key[0],
                key_prefix=user.key[1],
                key_name=user.key[2],
                identifier_id=None,
                user_id=user.name,
                source=user.source,
                endpoint=user.endpoints[0] if rng.random() < 0.7 else user.endpoints[1],
                event="llm.request",
                units=1,
                run_id=None,
                metadata=None,
                model=model,
                modality="embedding" if embedding else "chat",
                provider=provider,
                region=None,
                billing_unit="token",
                audio_ms=None,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cache_read_tokens=cache_read,
                cache_write_tokens=0,
                total_tokens=prompt + completion,
                currency="USD",
                list_cost_nanos=cost,
                discount_applied_pct=0,
                cost_nanos=cost,
                credits_nanos=cost * 100,  # credit_value 0.01 USD
                priced=True,
                overage=False,
                failover=False,
                receipt_id=None,
                idempotency_key=f"ev-{serial[0]}" if api else None,
                request_hash=None,
                created_at=created,
                recorded_at=created + timedelta(milliseconds=rng.randint(5, 900)),
            )
        )
    return rows


class CreditSplitter:
    """``split_credits`` over rows in time order, with the balances held in memory."""

    def __init__(self, granted: dict[str, int]) -> None:
        self.bonus_left = dict(granted)
        self.usage: dict[tuple[str, int], list[int]] = {}

    def split(self, rows: list[LedgerRow], terms_of: dict[str, Any]) -> None:
        starts: dict[tuple[int, int], int] = {}
        for row in rows:
            terms = terms_of[row.organization_id]
            day = to_micros(row.created_at) // 86_400_000_000
            start = starts.get((day, terms.billing_anchor_day))
            if start is None:
                start = to_micros(billing_period(row.created_at, terms.billing_anchor_day).start)
                starts[(day, terms.billing_anchor_day)] = start
            usage = self.usage.setdefault((row.organization_id, start), [0, 0, 0])
            bonus_left = (
                0
                if terms.monthly_allowance_nanos == UNLIMITED
                else self.bonus_left.get(row.organization_id, 0)
            )
            share = draw(
                row.credits_nanos,
                allowance=terms.monthly_allowance_nanos,
                monthly_used=usage[0],
                bonus_left=bonus_left,
            )
            row.credits_monthly_nanos = share.monthly
            row.credits_bonus_nanos = share.bonus
            if share.overage and terms.enforced:
                row.overage = True
            if share.bonus:
                self.bonus_left[row.organization_id] = bonus_left - share.bonus
            usage[0] += share.monthly
            usage[1] += share.bonus
            usage[2] += share.overage


def generate_sqlite(
    path: Path, rows: int, scratch: Path, *, seed: int = 7, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Create ``path`` (migrated by the services) with ``rows`` ledger rows; returns the metadata."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0)
    first_day = datetime.combine((now - timedelta(days=DAYS - 1)).date(), datetime.min.time(), tzinfo=UTC)
    orgs, meta = _tenants(f"sqlite:///{path}", scratch, rng)
    conn = _sqlite_connect(path)
    granted = {
        str(org): int(total)
        for org, total in conn.execute(
            "SELECT organization_id, SUM(credits_nanos) FROM credit_grants GROUP BY organization_id"
        )
    }
    splitter = CreditSplitter(granted)
    terms_of = {o.id: o.terms for o in orgs}
    ledger_sql = f"INSERT INTO ledger ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    # The settle path's own upsert: rows are made day by day, so deltas of one hour never span batches.
    rollup_sql = _SQLITE_ROLLUP_UPSERT
    serial = [0]
    started = time.perf_counter()
    rollups = 0
    for d, count in enumerate(_day_counts(rows, first_day)):
        day = first_day + timedelta(days=d)
        batch = _rows_for_day(day, count, orgs, rng, now, serial)
        splitter.split(batch, terms_of)
        deltas = rollup_deltas(batch)
        by_org: dict[str, list[LedgerRow]] = {}
        for r in batch:
            by_org.setdefault(r.organization_id, []).append(r)
        narrow = [
            entry
            for org_id, org_rows in by_org.items()
            for entry in usage_rollups.deltas(org_rows, terms_of[org_id].billing_anchor_day)
        ]
        conn.execute("BEGIN")
        conn.executemany(ledger_sql, [row_to_tuple(r) for r in batch])
        conn.executemany(rollup_sql, deltas)
        conn.executemany(usage_rollups.SQLITE_UPSERT, narrow)
        conn.execute("COMMIT")
        rollups += len(deltas)
        if d % 10 == 9 or d == DAYS - 1:
            elapsed = time.perf_counter() - started
            progress(
                f"  {path.name}: day {d + 1}/{DAYS}, {serial[0]:,} rows, {rollups:,} rollups, {elapsed:.0f} s"
            )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO credit_usage (organization_id, period_start_us, monthly_nanos, bonus_nanos, "
        "overage_nanos) VALUES (?, ?, ?, ?, ?)",
        [(org, start, *sums) for (org, start), sums in sorted(splitter.usage.items())],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    meta.update(
        rows=serial[0],
        rollups=rollups,
        generated_at=now.isoformat(),
        seconds=round(time.perf_counter() - started, 1),
        hour_of_now=to_micros(now) // MICROS_PER_HOUR,
    )
    return meta


# Tables copied to PostgreSQL, in foreign-key order (everything the generator wrote).
COPIED_TABLES = [
    "organizations",
    "workspaces",
    "api_keys",
    "credit_grants",
    "credit_usage",
    "ledger",
    "usage_hourly",
    "usage_rollups",
]


def _sqlite_rows(path: Path, table: str, columns: list[str]) -> Iterator[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        cursor = conn.execute(f"SELECT {', '.join(columns)} FROM {table}")
        while chunk := cursor.fetchmany(20_000):
            yield from chunk
    finally:
        conn.close()


def copy_to_postgres(sqlite_path: Path, pg_url: str, progress: Callable[[str], None] = print) -> None:
    """Fill a migrated PostgreSQL database with every row of the generated SQLite file (COPY), then
    VACUUM ANALYZE (what autovacuum would have done on a database this old)."""
    import psycopg

    from meterline.storage.tables import metadata

    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        for table in COPIED_TABLES:
            columns = [
                c.name for c in metadata.tables[table].columns if not (table == "ledger" and c.name == "seq")
            ]
            booleans = {c.name for c in metadata.tables[table].columns if c.type.python_type is bool}
            started = time.perf_counter()
            n = 0
            with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                flags = [i for i, c in enumerate(columns) if c in booleans]
                for row in _sqlite_rows(sqlite_path, table, columns):
                    if flags:
                        row = list(row)
                        for i in flags:
                            if row[i] is not None:
                                row[i] = bool(row[i])
                    copy.write_row(row)
                    n += 1
            conn.commit()
            progress(f"  COPY {table}: {n:,} rows, {time.perf_counter() - started:.0f} s")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        progress(f"  VACUUM ANALYZE: {time.perf_counter() - started:.0f} s")


def save_meta(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_meta(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


__all__ = ["copy_to_postgres", "generate_sqlite", "load_meta", "save_meta"]
