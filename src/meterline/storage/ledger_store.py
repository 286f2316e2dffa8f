"""SQL implementation of ``meterline.metering.LedgerStore``: ledger rows and their rollups together."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from sqlalchemy import Connection, select

from meterline.clock import MICROS_PER_HOUR, from_micros, to_micros
from meterline.credits import CreditTerms
from meterline.metering import unit_of_work
from meterline.metering.records import NO_DETAIL, VECTOR_COUNTS, LedgerRow, UsageVector
from meterline.metering.store import AppendResult
from meterline.receipts import GENESIS, ChainHead, Notary, Receipt
from meterline.storage import credit_store, usage_details, usage_rollups
from meterline.storage.database import Database
from meterline.storage.driver_sql import (
    fetch,
    fetch_one,
    fetch_together,
    pg_array,
    pg_columns,
    run,
    run_many,
    send,
    sending,
)
from meterline.storage.first_statistics import FirstStatistics
from meterline.storage.read_together import ReadTogether
from meterline.storage.tables import ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ledger, receipts
from meterline.storage.writer import Together, wait

# Column order of the bulk insert; ``seq`` is assigned by the database.
_COLUMNS = tuple(c.name for c in ledger.columns if c.name != "seq")


def _pg_array_type(column: Any) -> str:
    python_type = column.type.python_type
    return {str: "text", int: "bigint", bool: "boolean"}[python_type]


# PostgreSQL's bulk insert: ``unnest`` over one array per column, but the usage vector's counts (never
# NULL) travel as one array, row after row, taken by each row's ordinal: psycopg keeps a statement's
# parsed form only up to 50 parameters and 4,096 bytes (a unit test holds this one to that), and the
# ledger has 51 columns (parsed again at every settle unit, ~110 µs of the client's work: docs/
# benchmarks.md, "One read of a kept value at a time; the settle's PostgreSQL parameters made cheap").
_COUNTS = slice(_COLUMNS.index(VECTOR_COUNTS[0]), _COLUMNS.index(VECTOR_COUNTS[0]) + len(VECTOR_COUNTS))
if _COLUMNS[_COUNTS] != VECTOR_COUNTS:
    raise RuntimeError("the ledger's usage vector counts are not one run of columns")
_EACH = _COLUMNS[: _COUNTS.start] + _COLUMNS[_COUNTS.stop :]
_PG_UNNEST_INSERT = (
    f"INSERT INTO ledger ({', '.join(_COLUMNS)}) SELECT "
    + ", ".join(
        f"counts.v[(u.ordinal - 1) * {len(VECTOR_COUNTS)} + {VECTOR_COUNTS.index(name) + 1}]"
        if name in VECTOR_COUNTS
        else f"u.{name}"
        for name in _COLUMNS
    )
    + " FROM unnest("
    + ", ".join(f"%s::{_pg_array_type(ledger.c[name])}[]" for name in _EACH)
    + f") WITH ORDINALITY AS u({', '.join(_EACH)}, ordinal), (SELECT %s::bigint[] AS v) AS counts"
    + " ON CONFLICT (organization_id, idempotency_key) DO NOTHING"
)


_SELECT_COLUMNS = ", ".join(f"ledger.{c.name}" for c in ledger.columns)
_SQLITE_SELECT_BY_KEYS = (
    f"SELECT {_SELECT_COLUMNS} FROM ledger WHERE organization_id = ? AND idempotency_key IN"
)
_SQLITE_KEYS_STORED = "SELECT idempotency_key FROM ledger WHERE organization_id = ? AND idempotency_key IN"
_PG_KEYS_STORED = (
    "SELECT wanted.key FROM unnest(%s::text[]) AS wanted(key) "
    "JOIN ledger ON ledger.organization_id = %s AND ledger.idempotency_key = wanted.key"
)
_PG_SELECT_BY_KEYS = (
    f"SELECT {_SELECT_COLUMNS} FROM unnest(%s::text[]) AS wanted(key) "
    "JOIN ledger ON ledger.organization_id = %s AND ledger.idempotency_key = wanted.key"
)


def row_to_tuple(row: LedgerRow) -> tuple[Any, ...]:
    """A ledger row as insert parameters, in ``_COLUMNS`` order (the hot path: no dicts, no ORM)."""
    return (
        row.id,
        row.organization_id,
        row.workspace_id,
        row.key_id,
        row.key_prefix,
        row.key_name,
        row.identifier_id,
        row.user_id,
        row.source,
        row.endpoint,
        row.event,
        row.units,
        row.run_id,
        None if row.metadata is None else orjson.dumps(row.metadata).decode(),
        row.model,
        row.modality,
        row.provider,
        row.region,
        row.billing_unit,
        row.audio_ms,
        row.prompt_tokens,
        row.completion_tokens,
        row.cache_read_tokens,
        row.cache_write_tokens,
        row.total_tokens,
        row.currency,
        row.list_cost_nanos,
        row.discount_applied_pct,
        row.cost_nanos,
        row.credits_nanos,
        row.priced,
        row.overage,
        row.failover,
        row.receipt_id,
        row.idempotency_key,
        row.request_hash,
        to_micros(row.created_at),
        to_micros(row.recorded_at),
        row.credits_monthly_nanos,
        row.credits_bonus_nanos,
        *_vector_values(row.usage),
    )


def _vector_values(usage: UsageVector) -> tuple[Any, ...]:
    if usage is NO_DETAIL:
        return _NO_DETAIL_VALUES
    return (*(getattr(usage, name) for name in VECTOR_COUNTS), usage.service_tier, usage.batch)


_NO_DETAIL_VALUES = (*(0 for _ in VECTOR_COUNTS), None, False)


def _vector_of(r: Any) -> UsageVector:
    counts = {name: getattr(r, name) for name in VECTOR_COUNTS}
    if not any(counts.values()) and r.service_tier is None and not r.batch:
        return NO_DETAIL
    return UsageVector(**counts, service_tier=r.service_tier, batch=bool(r.batch))


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
        credits_monthly_nanos=r.credits_monthly_nanos,
        credits_bonus_nanos=r.credits_bonus_nanos,
        usage=_vector_of(r),
    )


_ROLLUP_COLUMNS = ("hour", *ROLLUP_DIMENSIONS, *ROLLUP_MEASURES)
_ROLLUP_CONFLICT = f"ON CONFLICT (hour, {', '.join(ROLLUP_DIMENSIONS)}) DO UPDATE SET " + ", ".join(
    f"{m} = usage_hourly.{m} + excluded.{m}" for m in ROLLUP_MEASURES
)
_SQLITE_ROLLUP_UPSERT = (
    f"INSERT INTO usage_hourly ({', '.join(_ROLLUP_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_ROLLUP_COLUMNS))}) {_ROLLUP_CONFLICT}"
)
_PG_ROLLUP_UPSERT = (
    f"INSERT INTO usage_hourly ({', '.join(_ROLLUP_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(
        ["%s::bigint[]"] + ["%s::text[]"] * len(ROLLUP_DIMENSIONS) + ["%s::bigint[]"] * len(ROLLUP_MEASURES)
    )
    + ") "
    + _ROLLUP_CONFLICT
)


def rollup_deltas(rows: Sequence[LedgerRow]) -> list[tuple[Any, ...]]:
    """Ledger rows folded into one delta per (hour, dimensions), in ``_ROLLUP_COLUMNS`` order.

    Sorted by key: concurrent transactions then lock the rollup rows they share in the same order, so
    they queue instead of deadlocking (PostgreSQL has no single writer).
    """
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        key = (
            to_micros(r.created_at) // MICROS_PER_HOUR,
            r.organization_id,
            r.workspace_id,
            r.key_id or "",
            r.identifier_id or "",
            r.user_id or "",
            r.model or "",
            r.provider or "",
            r.endpoint or "",
            r.source,
            r.event,
        )
        sums = buckets.get(key)
        if sums is None:
            sums = buckets[key] = [0] * len(ROLLUP_MEASURES)
        sums[0] += 1
        sums[1] += r.units
        sums[2] += r.prompt_tokens
        sums[3] += r.completion_tokens
        sums[4] += r.cache_read_tokens
        sums[5] += r.cache_write_tokens
        sums[6] += r.total_tokens
        sums[7] += r.audio_ms or 0
        sums[8] += r.cost_nanos
        sums[9] += r.credits_nanos
    return [(*key, *buckets[key]) for key in sorted(buckets)]


_RECEIPT_COLUMNS = tuple(c.name for c in receipts.columns)
_SQLITE_RECEIPT_INSERT = (
    f"INSERT INTO receipts ({', '.join(_RECEIPT_COLUMNS)}) VALUES ({', '.join('?' * len(_RECEIPT_COLUMNS))})"
)
_CHAIN_UPSERT = (
    "INSERT INTO receipt_chains (organization_id, seq, head_hash) VALUES ({p}, {p}, {p}) "
    "ON CONFLICT (organization_id) DO UPDATE SET seq = excluded.seq, head_hash = excluded.head_hash"
)
# PostgreSQL: the receipts and the new heads in one statement (a data-modifying CTE), one round trip.
_PG_RECEIPTS_AND_HEADS = (
    f"WITH written AS (INSERT INTO receipts ({', '.join(_RECEIPT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"%s::{_pg_array_type(receipts.c[name])}[]" for name in _RECEIPT_COLUMNS)
    + ")) INSERT INTO receipt_chains (organization_id, seq, head_hash) "
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[]) "
    "ON CONFLICT (organization_id) DO UPDATE SET seq = excluded.seq, head_hash = excluded.head_hash"
)
_CHAIN_HEAD = "SELECT seq, head_hash FROM receipt_chains WHERE organization_id = {p}"
_SQLITE_ANCHOR_DAY = "SELECT billing_anchor_day FROM organizations WHERE id = ?"
# PostgreSQL: the organizations' turns (their rows locked until the transaction ends: their settles queue,
# in every process; locked in id order, as the rows come out of the sort, so two transactions that want
# some of the same organizations queue instead of deadlocking; by code point, as the writer orders a
# batch that runs again one organization at a time), and their billing anchor days.
_PG_TURNS = (
    'SELECT id, billing_anchor_day FROM organizations WHERE id = ANY(%s::text[]) ORDER BY id COLLATE "C" '
    "FOR UPDATE"
)
# Then, in one round trip, what the settle decides on, per organization: credits granted, credits drawn
# per period, the receipt chain's head. Each round trip under the lock is one that every other settle of
# the organization waits for (docs/benchmarks.md, "fewer round trips under the organization's lock").
# Not in the locking statement itself: a statement that waited for the lock sees the locked row as it is
# now, but every other table as it was when the statement began, before the settle it waited for.
_PG_AFTER_TURNS = (
    "SELECT o.org, "
    "(SELECT COALESCE(SUM(credits_nanos), 0) FROM credit_grants WHERE organization_id = o.org), "
    "(SELECT array_agg(ARRAY[period_start_us, monthly_nanos, bonus_nanos, overage_nanos]) "
    "FROM credit_usage WHERE organization_id = o.org), "
    "chain.seq, chain.head_hash "
    "FROM unnest(%s::text[]) AS o(org) LEFT JOIN receipt_chains AS chain ON chain.organization_id = o.org"
)
# Which (organization, idempotency key) pairs are stored, for several organizations at once.
_PG_PAIRS_STORED = (
    "SELECT wanted.org, wanted.key FROM unnest(%s::text[], %s::text[]) AS wanted(org, key) "
    "JOIN ledger ON ledger.organization_id = wanted.org AND ledger.idempotency_key = wanted.key"
)
_PG_END_RESERVATIONS = "DELETE FROM reservations WHERE id = ANY(%s::text[]) RETURNING id"
_SQLITE_END_RESERVATIONS = "DELETE FROM reservations WHERE id IN ({}) RETURNING id"


def _receipt_tuple(r: Receipt) -> tuple[Any, ...]:
    return (r.id, r.organization_id, r.workspace_id, r.ledger_id, r.seq, r.prev_hash, r.jws, r.created_at_us)


_LEDGER = "ledger"
_LAST = "\U0010ffff"  # sorts after every organization id


@dataclass(frozen=True, slots=True)
class _Append:
    rows: Sequence[LedgerRow]
    credits: CreditTerms | None
    settles: Sequence[str]
    admitted: Callable[[], Sequence[LedgerRow]] | None = None
    # What the rows came with (overage, monthly and bonus credits): the job marks them, and it may run
    # twice (the writer runs a batch again when a job beside it failed), each time from these.
    marks: tuple[tuple[bool, int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        marks = tuple((r.overage, r.credits_monthly_nanos, r.credits_bonus_nanos) for r in self.rows)
        object.__setattr__(self, "marks", marks)

    def organization(self) -> str:
        return self.rows[0].organization_id if self.rows else ""

    def to_write(self) -> Sequence[LedgerRow]:
        """The rows to write, asked in the writer's job (``admitted``: those the reservations queued
        before this append admitted), marked as they came."""
        for row, (overage, monthly, bonus) in zip(self.rows, self.marks, strict=True):
            row.overage, row.credits_monthly_nanos, row.credits_bonus_nanos = overage, monthly, bonus
        return self.rows if self.admitted is None else self.admitted()


def _rounds(appends: Sequence[_Append], to_write: Sequence[Sequence[LedgerRow]]) -> list[list[list[int]]]:
    """Appends (by index) grouped into shares, one per organization, in settles run one after the other:
    the appends of an organization with equal credit terms are one share; another terms' (changed
    between two appends of one batch) go to the next settle. Nearly always one settle."""
    rounds: list[dict[str, tuple[CreditTerms | None, list[int]]]] = []
    for i, (append, rows) in enumerate(zip(appends, to_write, strict=True)):
        org = rows[0].organization_id if rows else ""
        for shares in rounds:
            found = shares.get(org)
            if found is None:
                shares[org] = (append.credits, [i])
                break
            if found[0] == append.credits:
                found[1].append(i)
                break
        else:
            rounds.append({org: (append.credits, [i])})
    return [[merged for _, merged in shares.values()] for shares in rounds]


def _part_of(rows: Sequence[LedgerRow], result: AppendResult) -> AppendResult:
    """One append's part of its share's result: its rows written (by identity, not id: two appends may
    carry rows with one id, two settles of one reservation); a key another append of the share wrote
    first is "existing" for this one, not for that one."""
    written = {id(row) for row in result.written}
    mine = [row for row in rows if id(row) in written]
    mine_keys = {row.idempotency_key for row in mine}
    existing = {
        row.idempotency_key: result.existing[row.idempotency_key]
        for row in rows
        if row.idempotency_key is not None
        and row.idempotency_key in result.existing
        and row.idempotency_key not in mine_keys
    }
    return AppendResult(written=mine, existing=existing)


class AlertHook(Protocol):
    def evaluate_in(
        self, conn: Connection, settled: Sequence[tuple[Sequence[LedgerRow], CreditTerms | None]]
    ) -> None: ...


class SqlLedgerStore:
    """``notary`` signs a receipt for every newly written row that carries a ``receipt_id``, in the same
    transaction (without one, no receipts are made: tools that load ledger rows only). ``alerts``
    evaluates usage alerts after the rows, rollups and credit split, also in that transaction, so an
    alert and the usage that fired it commit or roll back together."""

    def __init__(self, db: Database, notary: Notary | None = None, alerts: AlertHook | None = None) -> None:
        self._db = db
        self._notary = notary
        self._alerts = alerts
        self._first_statistics = FirstStatistics(db)
        self._lookups: ReadTogether[tuple[str, Sequence[str]], dict[str, LedgerRow]] = ReadTogether(
            self._lookup_all
        )
        p = "?" if db.is_sqlite else "%s"
        self._chain_head_sql = _CHAIN_HEAD.format(p=p)
        self._chain_upsert_sql = _CHAIN_UPSERT.format(p=p)
        self._insert_sql = (
            f"INSERT INTO ledger ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            "ON CONFLICT (organization_id, idempotency_key) DO NOTHING"
        )

    def _insert_multirow(self, conn: Connection, rows: Sequence[LedgerRow]) -> int:
        """PostgreSQL: psycopg's executemany sends one statement per row, and a multi-row VALUES is
        re-parsed on every call; ``unnest`` over one array per column (the usage vector's counts in one
        array, taken by each row's ordinal) is one small cached statement."""
        values = [row_to_tuple(row) for row in rows]
        columns = pg_columns(v[: _COUNTS.start] + v[_COUNTS.stop :] for v in values)
        counts = pg_array([count for v in values for count in v[_COUNTS]])
        return run(conn, _PG_UNNEST_INSERT, (*columns, counts))

    def append(
        self,
        rows: Sequence[LedgerRow],
        credits: CreditTerms | None = None,
        *,
        settles: Sequence[str] = (),
        admitted: Callable[[], Sequence[LedgerRow]] | None = None,
    ) -> AppendResult:
        if not rows and not settles:
            return AppendResult(written=[], existing={})
        return wait(self.submit(rows, credits, settles=settles, admitted=admitted))

    def submit(
        self,
        rows: Sequence[LedgerRow],
        credits: CreditTerms | None = None,
        *,
        settles: Sequence[str] = (),
        admitted: Callable[[], Sequence[LedgerRow]] | None = None,
    ) -> Future[AppendResult]:
        """``append``, queued to the database's writer: the future is answered once the rows are
        committed. Appends queued together are written as one settle (``_append_together``), one share
        per organization; if it fails, it runs again one organization at a time (``storage.writer``)."""
        append = _Append(rows, credits, settles, admitted)
        together = Together(_LEDGER, append, self._append_together, part=_Append.organization)
        # Ordered by organization: the batch's merged settle runs where its first one is, after the
        # counter calls (order "") whose verdicts its rows wait for, even when it ends reservations only.
        order = rows[0].organization_id if rows else _LAST
        return self._db.writer.submit_together(together, rows=len(rows), order=order)

    def _append_together(self, conn: Connection, appends: list[_Append]) -> list[AppendResult]:
        """Appends queued together as one settle (``unit_of_work.settle_together``): one turn-taking,
        one idempotency look-up, one insert, one rollup upsert, one stretch of receipts, whatever their
        organizations; each organization's appends merged into its share. Then each append's part."""
        if len(appends) == 1:
            only = appends[0]
            share = unit_of_work.Share(only.to_write(), only.credits, only.settles)
            return self._settle(conn, [share])
        to_write = [append.to_write() for append in appends]
        answers: list[AppendResult | None] = [None] * len(appends)
        for rounds in _rounds(appends, to_write):
            shares = [
                unit_of_work.Share(
                    [row for i in merged for row in to_write[i]],
                    appends[merged[0]].credits,
                    [reservation for i in merged for reservation in appends[i].settles],
                )
                for merged in rounds
            ]
            for merged, result in zip(rounds, self._settle(conn, shares), strict=True):
                for i in merged:
                    answers[i] = result if len(merged) == 1 else _part_of(to_write[i], result)
        return [answer for answer in answers if answer is not None]

    def _settle(self, conn: Connection, shares: list[unit_of_work.Share]) -> list[AppendResult]:
        # PostgreSQL: the writes whose answers nobody reads go with the next statement answered; what is
        # left goes as the block ends, after ``settle_together`` returned. If that fails, the rows keep
        # the marks the settle gave them: the batch fails, and a run again starts from ``_Append.marks``.
        with sending(conn):
            results = unit_of_work.settle_together(_SettleSql(self, conn), shares, notary=self._notary)
        self._first_statistics.wrote(sum(len(result.written) for result in results))
        return results

    def lookup(self, organization_id: str, keys: Sequence[str]) -> dict[str, LedgerRow]:
        """Stored rows by idempotency key; concurrent look-ups are read together (``read_together``)."""
        return self._lookups.ask((organization_id, keys))

    def _lookup_all(self, asked: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, LedgerRow]]:
        """Several look-ups in one read: one statement per organization, one transaction."""
        by_org: dict[str, dict[str, None]] = {}
        for org_id, keys in asked:
            by_org.setdefault(org_id, {}).update(dict.fromkeys(keys))
        with self._db.read() as conn:
            found = {org: self._existing(conn, [(org, key) for key in keys]) for org, keys in by_org.items()}
        if len(asked) == 1:
            return [found[asked[0][0]]]
        return [{key: found[org_id][key] for key in keys if key in found[org_id]} for org_id, keys in asked]

    def _present(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            query = select(ledger.c.id).where(ledger.c.id.in_(ids[start : start + 500]))
            found.update(conn.execute(query).scalars())
        return found

    def _existing(
        self, conn: Connection, keys: Sequence[tuple[str, str | None]], stored: list[str] | None = None
    ) -> dict[str, LedgerRow]:
        """Stored rows for (organization, idempotency key) pairs of one organization, by the unique index
        (``stored``: which of the keys are stored, when already read)."""
        if not keys:
            return {}
        org_id = keys[0][0]
        # Most look-ups find nothing (a new event, a first settle): the keys alone first, a narrow
        # statement straight to the driver; whole rows only for the keys found.
        wanted = self._stored_keys(conn, org_id, [key for _, key in keys]) if stored is None else stored
        if not wanted:
            return {}
        if not self._db.is_sqlite:
            # One array parameter keeps the statement short and cached; joining it (rather than
            # `= ANY(array)`, a linear search per row when the planner picks a scan) is never quadratic.
            rows = conn.exec_driver_sql(_PG_SELECT_BY_KEYS, (pg_array(wanted), org_id))
            return {r.idempotency_key: row_from_db(r) for r in rows}
        found: dict[str, LedgerRow] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            sql = f"{_SQLITE_SELECT_BY_KEYS} ({', '.join('?' * len(chunk))})"
            found.update(
                (r.idempotency_key, row_from_db(r)) for r in conn.exec_driver_sql(sql, (org_id, *chunk))
            )
        return found

    def _stored_keys(self, conn: Connection, org_id: str, keys: list[str | None]) -> list[str]:
        if not self._db.is_sqlite:
            return [str(k) for (k,) in fetch(conn, _PG_KEYS_STORED, (pg_array(keys), org_id))]
        found: list[str] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            sql = f"{_SQLITE_KEYS_STORED} ({', '.join('?' * len(chunk))})"
            found += [str(k) for (k,) in fetch(conn, sql, (org_id, *chunk))]
        return found

    def _add_to_rollups(
        self, conn: Connection, rows: Sequence[LedgerRow], anchor_days: Mapping[str, int]
    ) -> None:
        by_org: dict[str, list[LedgerRow]] = {}
        for row in rows:
            by_org.setdefault(row.organization_id, []).append(row)
        # Each organization's entries are sorted, and lead with its id: in organization order, all are.
        entries = [
            entry for org in sorted(by_org) for entry in usage_rollups.deltas(by_org[org], anchor_days[org])
        ]
        usage_rollups.upsert(conn, entries)
        usage_details.upsert(conn, usage_details.deltas(rows))
        deltas = rollup_deltas(rows)
        if self._db.is_sqlite:
            run_many(conn, _SQLITE_ROLLUP_UPSERT, deltas)
        else:
            send(conn, _PG_ROLLUP_UPSERT, pg_columns(deltas))


class _SettleSql:
    """``metering.unit_of_work.SettleTransaction`` in SQL, on one connection inside its transaction. The
    statements that run on every settle go straight to the driver: SQLAlchemy's per-statement and
    per-row parameter work cost more than they do."""

    def __init__(self, store: SqlLedgerStore, conn: Connection) -> None:
        self._store = store
        self._conn = conn
        self._sqlite = store._db.is_sqlite
        # PostgreSQL, per organization whose turn this transaction took (``lock``): what was read with
        # it (credits drawn and bonus left, the chain head) for the steps, and which of the keys it was
        # told of are stored.
        self._read: dict[str, tuple[tuple[Mapping[int, int], int], ChainHead]] = {}
        self._keys: dict[str, tuple[Sequence[str], list[str]]] = {}

    def lock(self, turns: Mapping[str, Sequence[str]]) -> Mapping[str, int]:
        # The anchor day is read in the transaction, not taken from the (cached) credit terms: an anchor
        # change recomputes the period entries in its own transaction, and every settle after it must
        # use the new day. Rows of an organization that is not (or no longer) stored (loaders, tests):
        # periods by the 1st.
        if self._sqlite:  # one writer at a time: the turn is the transaction itself
            anchors = {}
            for organization_id in turns:
                day = fetch_one(self._conn, _SQLITE_ANCHOR_DAY, (organization_id,))
                anchors[organization_id] = 1 if day is None else int(day[0])
            return anchors
        # The turns, what the settle decides on and which keys are stored, in one round trip: each round
        # trip under the turns is one every other settle of those organizations waits for (driver_sql).
        # Pipelined behind the locking statement, the reads run once it has the locks, each with a
        # snapshot of its own (read committed): they see what the settles they waited for wrote.
        organizations = list(turns)
        queries: list[tuple[str, Any]] = [
            (_PG_TURNS, (pg_array(organizations),)),
            (_PG_AFTER_TURNS, (pg_array(organizations),)),
        ]
        pairs = [(org, key) for org, keys in turns.items() for key in keys]
        if pairs:
            queries.append(
                (_PG_PAIRS_STORED, (pg_array([o for o, _ in pairs]), pg_array([k for _, k in pairs])))
            )
        locked, after, *stored = fetch_together(self._conn, queries)
        for org, granted, periods, seq, head_hash in after:
            drawn = {int(start): (int(m), int(b), int(o)) for start, m, b, o in periods or ()}
            head = GENESIS if seq is None else ChainHead(int(seq), head_hash)
            self._read[org] = (credit_store.drawn_and_left(drawn, int(granted)), head)
        found: dict[str, list[str]] = {org: [] for org, keys in turns.items() if keys}
        for org, key in stored[0] if stored else ():
            found[org].append(str(key))
        self._keys = {org: (turns[org], keys) for org, keys in found.items()}
        anchors = dict.fromkeys(organizations, 1)
        anchors.update((org, int(day)) for org, day in locked)
        return anchors

    def stored(self, organization_id: str, keys: Sequence[str]) -> dict[str, LedgerRow]:
        pairs = [(organization_id, key) for key in keys]
        # Read once: a later look-up (a race at insert) reads again.
        told = self._keys.pop(organization_id, None)
        if told is not None and told[0] == keys:
            return self._store._existing(self._conn, pairs, told[1])
        return self._store._existing(self._conn, pairs)

    def credits_drawn(self, organization_id: str) -> tuple[Mapping[int, int], int]:
        read = self._read.get(organization_id)
        if read is not None:
            return read[0]
        return credit_store.credits_drawn(self._conn, organization_id)

    def add_credit_draws(self, draws: Sequence[tuple[str, int, int, int, int]]) -> None:
        credit_store.add_credit_draws(self._conn, draws)

    def insert(self, rows: Sequence[LedgerRow]) -> set[str]:
        # ON CONFLICT covers a concurrent request that wrote the same key since the look-up: the unique
        # index decides, and the rows it refused are told apart by id.
        conn = self._conn
        if self._sqlite:
            inserted = run_many(conn, self._store._insert_sql, [row_to_tuple(r) for r in rows])
        else:
            inserted = self._store._insert_multirow(conn, rows)
        ids = [row.id for row in rows]
        return set(ids) if inserted == len(rows) else self._store._present(conn, ids)

    def add_to_rollups(self, rows: Sequence[LedgerRow], anchor_days: Mapping[str, int]) -> None:
        self._store._add_to_rollups(self._conn, rows, anchor_days)

    def chain_head(self, organization_id: str) -> ChainHead:
        read = self._read.get(organization_id)
        if read is not None:
            return read[1]
        found = fetch_one(self._conn, self._store._chain_head_sql, (organization_id,))
        return GENESIS if found is None else ChainHead(int(found[0]), found[1])

    def add_receipts(self, signed: Sequence[Receipt], heads: Mapping[str, ChainHead]) -> None:
        chains = [(org, head.seq, head.hash) for org, head in heads.items()]
        conn = self._conn
        if not self._sqlite:
            # The receipts and the new heads in one statement (a data-modifying CTE), one round trip.
            columns = pg_columns(map(_receipt_tuple, signed))
            send(conn, _PG_RECEIPTS_AND_HEADS, (*columns, *pg_columns(chains)))
            return
        if len(signed) == 1:
            run(conn, _SQLITE_RECEIPT_INSERT, _receipt_tuple(signed[0]))
        else:
            run_many(conn, _SQLITE_RECEIPT_INSERT, [_receipt_tuple(r) for r in signed])
        run_many(conn, self._store._chain_upsert_sql, chains)

    def evaluate_alerts(self, settled: Sequence[tuple[Sequence[LedgerRow], CreditTerms | None]]) -> None:
        if self._store._alerts is not None:
            self._store._alerts.evaluate_in(self._conn, settled)

    def end_reservations(self, reservation_ids: Sequence[str]) -> set[str]:
        if not self._sqlite:
            # One array: one statement text (kept parsed) whatever the count.
            return {str(r) for (r,) in fetch(self._conn, _PG_END_RESERVATIONS, (pg_array(reservation_ids),))}
        ended: set[str] = set()
        for start in range(0, len(reservation_ids), 500):
            chunk = reservation_ids[start : start + 500]
            sql = _SQLITE_END_RESERVATIONS.format(", ".join("?" * len(chunk)))
            ended.update(str(r) for (r,) in fetch(self._conn, sql, tuple(chunk)))
        return ended
