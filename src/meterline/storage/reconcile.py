"""The ledger's projections recomputed from the ledger itself, in SQL, and compared or rewritten.

``usage_hourly``, ``usage_rollups``, ``usage_details`` and ``credit_usage`` are maintained in the settle
transaction (``metering.unit_of_work``, over ``SqlLedgerStore``); the ledger is the truth. Here each
projection is recomputed with one ``GROUP BY`` over the ledger (SQLite and PostgreSQL alike) and set
against what is stored:

* rollups: ``expected EXCEPT stored`` and ``stored EXCEPT expected`` in SQL, so only entries that differ
  ever leave the database, however big the ledger (the narrow rollups' billing-period entries: the
  ledger's day groups folded per period in Python, see ``usage_rollups.expected_periods``);
* credit usage: the ledger grouped by (organization, UTC day), each day then put in its billing period
  (the organization's anchor day, clamped to the month: see ``billing_period``) in Python, a few rows per
  organization and day. A billing period starts at midnight UTC, so a day never straddles two periods.
  Overage per row is what neither bucket paid: ``credits - monthly - bonus`` (``draw``).

Receipt chains are not reconciled here: ``meterline verify`` checks them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from meterline.clock import MICROS_PER_DAY, MICROS_PER_HOUR, from_micros, to_micros
from meterline.quotas.periods import billing_period
from meterline.storage import usage_details, usage_rollups
from meterline.storage.database import Database
from meterline.storage.tables import DETAIL_MEASURES, NARROW_MEASURES, ROLLUP_DIMENSIONS, ROLLUP_MEASURES

ROLLUP_KEY = ("hour", *ROLLUP_DIMENSIONS)
CREDIT_KEY = ("organization_id", "period_start_us")
CREDIT_MEASURES = ("monthly_nanos", "bonus_nanos", "overage_nanos")

# How each rollup measure folds from ledger columns (exactly ``rollup_deltas``).
_MEASURE_SQL = {
    "requests": "COUNT(*)",
    "units": "SUM(units)",
    "prompt_tokens": "SUM(prompt_tokens)",
    "completion_tokens": "SUM(completion_tokens)",
    "cache_read_tokens": "SUM(cache_read_tokens)",
    "cache_write_tokens": "SUM(cache_write_tokens)",
    "total_tokens": "SUM(total_tokens)",
    "audio_ms": "SUM(COALESCE(audio_ms, 0))",
    "cost_nanos": "SUM(cost_nanos)",
    "credits_nanos": "SUM(credits_nanos)",
}
_NULLABLE_DIMENSIONS = {"key_id", "identifier_id", "user_id", "model", "provider", "endpoint"}


def _dimension_sql(name: str) -> str:
    return f"COALESCE({name}, '')" if name in _NULLABLE_DIMENSIONS else name


# The rollups as the ledger says they are. CAST keeps PostgreSQL's SUM(bigint) (numeric) comparable.
EXPECTED_ROLLUPS_SQL = (
    f"SELECT created_at_us / {MICROS_PER_HOUR} AS hour, "
    + ", ".join(f"{_dimension_sql(d)} AS {d}" for d in ROLLUP_DIMENSIONS)
    + ", "
    + ", ".join(f"CAST({_MEASURE_SQL[m]} AS BIGINT) AS {m}" for m in ROLLUP_MEASURES)
    + " FROM ledger GROUP BY "
    + ", ".join(str(i) for i in range(1, len(ROLLUP_KEY) + 1))
)
_STORED_ROLLUPS_SQL = f"SELECT {', '.join((*ROLLUP_KEY, *ROLLUP_MEASURES))} FROM usage_hourly"
_ROLLUP_DIFF_SQL = (
    f"SELECT 'ledger', d.* FROM ({EXPECTED_ROLLUPS_SQL} EXCEPT {_STORED_ROLLUPS_SQL}) AS d "
    f"UNION ALL SELECT 'stored', s.* FROM ({_STORED_ROLLUPS_SQL} EXCEPT {EXPECTED_ROLLUPS_SQL}) AS s"
)
_REBUILD_ROLLUPS_SQL = (
    f"INSERT INTO usage_hourly ({', '.join((*ROLLUP_KEY, *ROLLUP_MEASURES))}) {EXPECTED_ROLLUPS_SQL}"
)
_CREDITS_BY_DAY_SQL = (
    f"SELECT organization_id, created_at_us / {MICROS_PER_DAY} AS day, "
    "CAST(SUM(credits_monthly_nanos) AS BIGINT), CAST(SUM(credits_bonus_nanos) AS BIGINT), "
    "CAST(SUM(credits_nanos - credits_monthly_nanos - credits_bonus_nanos) AS BIGINT) "
    "FROM ledger GROUP BY organization_id, created_at_us / " + str(MICROS_PER_DAY)
)
_STORED_CREDITS_SQL = (
    "SELECT organization_id, period_start_us, monthly_nanos, bonus_nanos, overage_nanos FROM credit_usage"
)


@dataclass(frozen=True, slots=True)
class Drift:
    """One projection entry that differs from the ledger. ``stored``/``ledger`` is None when missing."""

    table: str
    key: dict[str, Any]
    stored: dict[str, int] | None
    ledger: dict[str, int] | None

    @property
    def differing(self) -> list[str]:
        names = (self.stored or self.ledger or {}).keys()
        return [n for n in names if (self.stored or {}).get(n) != (self.ledger or {}).get(n)]

    def as_json(self) -> dict[str, Any]:
        return {"table": self.table, "key": self.key, "stored": self.stored, "ledger": self.ledger}


@dataclass
class Reconciliation:
    ledger_rows: int = 0
    rollups: list[Drift] = field(default_factory=list)
    narrow_rollups: list[Drift] = field(default_factory=list)
    details: list[Drift] = field(default_factory=list)
    credit_usage: list[Drift] = field(default_factory=list)
    rebuilt: bool = False
    rebuilt_rollups: int = 0
    rebuilt_narrow_rollups: int = 0
    rebuilt_details: int = 0
    rebuilt_credit_usage: int = 0
    # Usage set aside because it could not be settled (``metering.quarantine``): not drift — the ledger
    # and its projections agree without it — but usage an operator must settle or void.
    quarantined: int = 0

    @property
    def drift(self) -> list[Drift]:
        return [*self.rollups, *self.narrow_rollups, *self.details, *self.credit_usage]

    @property
    def ok(self) -> bool:
        return not self.drift

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ok": self.ok,
            "ledger_rows": self.ledger_rows,
            "drift": len(self.drift),
            "entries": [d.as_json() for d in self.drift],
            "quarantined": self.quarantined,
        }
        if self.rebuilt:
            data["rebuilt"] = {
                "usage_hourly": self.rebuilt_rollups,
                "usage_rollups": self.rebuilt_narrow_rollups,
                "usage_details": self.rebuilt_details,
                "credit_usage": self.rebuilt_credit_usage,
            }
        return data


def _pair(table: str, key_names: tuple[str, ...], measures: tuple[str, ...], rows: Any) -> list[Drift]:
    """Rows tagged 'ledger' or 'stored' (key + measures) paired by key into one ``Drift`` per key."""
    sides: dict[tuple[Any, ...], dict[str, dict[str, int]]] = {}
    width = len(key_names)
    for row in rows:
        side, values = row[0], tuple(row[1:])
        key = tuple(values[:width])
        sides.setdefault(key, {})[side] = {m: int(v) for m, v in zip(measures, values[width:], strict=True)}
    return [
        Drift(table, dict(zip(key_names, key, strict=True)), found.get("stored"), found.get("ledger"))
        for key, found in sorted(sides.items(), key=lambda item: tuple(map(str, item[0])))
    ]


def expected_credit_usage(
    conn: Connection, organization_id: str | None = None
) -> dict[tuple[str, int], tuple[int, int, int]]:
    """Per (organization, billing period start): (monthly, bonus, overage) drawn, from the ledger (of one
    organization, or all)."""
    anchors = {
        str(org): int(day)
        for org, day in conn.exec_driver_sql("SELECT id, billing_anchor_day FROM organizations")
    }
    periods: dict[tuple[str, int], list[int]] = {}
    starts: dict[tuple[int, int], int] = {}
    if organization_id is None:
        by_day = conn.exec_driver_sql(_CREDITS_BY_DAY_SQL)
    else:
        p = "?" if conn.dialect.name == "sqlite" else "%s"
        sql = _CREDITS_BY_DAY_SQL.replace(" GROUP BY ", f" WHERE organization_id = {p} GROUP BY ")
        by_day = conn.exec_driver_sql(sql, (organization_id,))
    for org, day, monthly, bonus, overage in by_day:
        anchor = anchors.get(org, 1)
        start = starts.get((int(day), anchor))
        if start is None:
            when = from_micros(int(day) * MICROS_PER_DAY)
            start = starts[(int(day), anchor)] = to_micros(billing_period(when, anchor).start)
        sums = periods.setdefault((str(org), start), [0, 0, 0])
        sums[0] += int(monthly)
        sums[1] += int(bonus)
        sums[2] += int(overage)
    return {key: (s[0], s[1], s[2]) for key, s in periods.items()}


def _compare(
    table: str,
    key_names: tuple[str, ...],
    measures: tuple[str, ...],
    stored: Mapping[tuple[Any, ...], Sequence[int]],
    expected: Mapping[tuple[Any, ...], Sequence[int]],
) -> list[Drift]:
    """A ``Drift`` per key whose stored measures differ from the ledger's (or exist on one side only)."""
    drift = []
    for key in sorted(expected.keys() | stored.keys(), key=lambda k: tuple(map(str, k))):
        have, want = stored.get(key), expected.get(key)
        if have is None or want is None or list(have) != list(want):
            drift.append(
                Drift(
                    table,
                    dict(zip(key_names, key, strict=True)),
                    None if have is None else dict(zip(measures, have, strict=True)),
                    None if want is None else dict(zip(measures, want, strict=True)),
                )
            )
    return drift


def _credit_drift(conn: Connection) -> list[Drift]:
    stored = {
        (str(r[0]), int(r[1])): (int(r[2]), int(r[3]), int(r[4]))
        for r in conn.exec_driver_sql(_STORED_CREDITS_SQL)
    }
    return _compare("credit_usage", CREDIT_KEY, CREDIT_MEASURES, stored, expected_credit_usage(conn))


def _narrow_drift(conn: Connection) -> list[Drift]:
    key, measures = usage_rollups.KEY, NARROW_MEASURES
    drift = _pair("usage_rollups", key, measures, conn.exec_driver_sql(usage_rollups.DIFF_SQL))
    stored, expected = usage_rollups.stored_periods(conn), usage_rollups.expected_periods(conn)
    return drift + _compare("usage_rollups", key, measures, stored, expected)


def rewrite_credit_usage(conn: Connection, organization_id: str | None = None) -> int:
    """``credit_usage`` (of one organization, or all) rewritten from the ledger; the count of entries."""
    credits = expected_credit_usage(conn, organization_id)
    p = "?" if conn.dialect.name == "sqlite" else "%s"
    if organization_id is None:
        conn.exec_driver_sql("DELETE FROM credit_usage")
    else:
        conn.exec_driver_sql(f"DELETE FROM credit_usage WHERE organization_id = {p}", (organization_id,))
    if credits:
        conn.exec_driver_sql(
            "INSERT INTO credit_usage (organization_id, period_start_us, monthly_nanos, bonus_nanos, "
            f"overage_nanos) VALUES ({p}, {p}, {p}, {p}, {p})",
            [(org, start, *sums) for (org, start), sums in sorted(credits.items())],
        )
    return len(credits)


@contextmanager
def _snapshot(db: Database) -> Iterator[Connection]:
    """One consistent snapshot: the ledger and its projections are read as of the same instant (settles
    write all three in one transaction). SQLite's read transaction already is one in WAL mode."""
    if db.is_sqlite:
        with db.read() as conn:
            yield conn
        return
    with db.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        yield conn


def _check(conn: Connection, result: Reconciliation) -> None:
    result.ledger_rows = int(conn.exec_driver_sql("SELECT COUNT(*) FROM ledger").scalar_one())
    result.rollups = _pair(
        "usage_hourly", ROLLUP_KEY, ROLLUP_MEASURES, conn.exec_driver_sql(_ROLLUP_DIFF_SQL)
    )
    result.narrow_rollups = _narrow_drift(conn)
    result.details = _pair(
        "usage_details", usage_details.KEY, DETAIL_MEASURES, conn.exec_driver_sql(usage_details.DIFF_SQL)
    )
    result.credit_usage = _credit_drift(conn)
    result.quarantined = int(
        conn.exec_driver_sql("SELECT COUNT(*) FROM quarantine WHERE resolution IS NULL").scalar_one()
    )


def reconcile(db: Database) -> Reconciliation:
    """Every rollup and credit-usage entry that differs from the ledger (none: no drift)."""
    result = Reconciliation()
    with _snapshot(db) as conn:
        _check(conn, result)
    return result


def rebuild(db: Database) -> Reconciliation:
    """Rewrite every projection from the ledger in one transaction, then check them again.

    On PostgreSQL the projections are locked against concurrent settles first (SHARE ROW EXCLUSIVE
    conflicts with their upserts): a settle already past its upsert is waited for, and its ledger rows are
    then visible to the rebuild; a later one waits and adds its deltas on top of the rebuilt rows."""
    result = Reconciliation(rebuilt=True)
    with db.write() as conn:
        if not db.is_sqlite:
            conn.exec_driver_sql(
                # In the order a settle writes them: a settle holding one waits for none of the others.
                "LOCK TABLE credit_usage, usage_rollups, usage_details, usage_hourly "
                "IN SHARE ROW EXCLUSIVE MODE"
            )
        conn.exec_driver_sql("DELETE FROM usage_hourly")
        result.rebuilt_rollups = int(conn.exec_driver_sql(_REBUILD_ROLLUPS_SQL).rowcount)
        result.rebuilt_narrow_rollups = usage_rollups.rebuild(conn)
        result.rebuilt_details = usage_details.rebuild(conn)
        result.rebuilt_credit_usage = rewrite_credit_usage(conn)
    with _snapshot(db) as conn:
        _check(conn, result)
    return result


__all__ = ["Drift", "Reconciliation", "expected_credit_usage", "rebuild", "reconcile", "rewrite_credit_usage"]
