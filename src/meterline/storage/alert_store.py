"""Alerts in SQL: evaluated in the settle transaction (``metering.unit_of_work``), fired once through
the unique (organization, kind, threshold, period) index, each with its outbox rows in the same
transaction. See ``meterline.alerts`` for the rules and the invariants."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Connection

from meterline import ids
from meterline.alerts import (
    Alert,
    allowance_refused,
    crossed_thresholds,
    projected_run_out,
    threshold_alert,
    unpriced_usage,
    unusual_trigger,
    unusual_usage,
)
from meterline.alerts.kinds import PROJECTED_RUN_OUT, THRESHOLD
from meterline.alerts.rules import frequent_refusals
from meterline.clock import MICROS_PER_DAY, MICROS_PER_HOUR, Clock, from_micros, rfc3339, to_micros
from meterline.credits import CreditTerms
from meterline.metering.records import LedgerRow
from meterline.quotas.counters import CounterStore, CounterStoreUnavailable
from meterline.quotas.limits import NANOS_PER_WHOLE, UNLIMITED
from meterline.quotas.periods import billing_period
from meterline.storage.database import Database
from meterline.storage.driver_sql import fetch, fetch_together, pg_array, pg_columns
from meterline.storage.tenancy_store import thresholds_from_text
from meterline.storage.writer import after_commit

_BASELINE_DAYS = 7
_SEEN_MAX = 10_000
# How old a process's reading of today's usage may get before a settle reads it again: what other
# processes settled meanwhile is seen within this time (a process adds only its own settles).
_UNUSUAL_REREAD_US = 5 * 60 * 1_000_000
_DAY = timedelta(days=1)
_EXHAUSTED_RETRY_S = 30.0


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    thresholds: tuple[int, ...] = (50, 75, 80, 100)
    refusals_per_hour: int = 10
    unusual_factor: Decimal = Decimal(3)
    unusual_min_volume: int = 100  # whole credits (whole currency units for spend-cap organizations)


def _marker(conn: Connection) -> str:
    return "?" if conn.dialect.name == "sqlite" else "%s"


def _q(conn: Connection, sql: str) -> str:
    return sql.replace("{p}", _marker(conn))


_CREDITS_USED = (
    "SELECT monthly_nanos + bonus_nanos + overage_nanos FROM credit_usage "
    "WHERE organization_id = {p} AND period_start_us = {p}"
)
# Both read the organization's day entries of the narrow rollups (a few per day), written earlier in the
# same settle transaction. A billing period is whole days.
_SPENT = (
    "SELECT COALESCE(SUM(cost_nanos), 0) FROM usage_rollups WHERE organization_id = {p} "
    "AND workspace_id = '' AND dimension = 'source' AND grain = 'd' AND bucket >= {p} AND bucket < {p}"
)
_DAILY = (
    "SELECT bucket, COALESCE(SUM({measure}), 0) FROM usage_rollups WHERE organization_id = {p} "
    "AND workspace_id = '' AND dimension = 'source' AND grain = 'd' AND bucket >= {p} AND bucket < {p} "
    "GROUP BY bucket"
)
_THRESHOLDS = "SELECT alert_thresholds FROM organizations WHERE id = {p}"
# PostgreSQL: the same reads for every organization of a settle at once (one statement each, not one per
# organization).
_PG_THRESHOLDS = "SELECT id, alert_thresholds FROM organizations WHERE id = ANY(%s::text[])"
_PG_CREDITS_USED = (
    "SELECT u.org, c.monthly_nanos + c.bonus_nanos + c.overage_nanos "
    "FROM unnest(%s::text[], %s::bigint[]) AS u(org, period) "
    "JOIN credit_usage AS c ON c.organization_id = u.org AND c.period_start_us = u.period"
)
_PG_SPENT = (
    "SELECT u.org, (SELECT COALESCE(SUM(cost_nanos), 0) FROM usage_rollups WHERE organization_id = u.org "
    "AND workspace_id = '' AND dimension = 'source' AND grain = 'd' AND bucket >= u.first_day "
    "AND bucket < u.end_day) "
    "FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS u(org, first_day, end_day)"
)
_FIRED = "SELECT kind, threshold FROM alerts WHERE organization_id = {p} AND period_start_us = {p}"
_INSERT_ALERT = (
    "INSERT INTO alerts (id, organization_id, kind, threshold, period_start_us, message, details_json, "
    "created_at_us) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}) "
    "ON CONFLICT (organization_id, kind, threshold, period_start_us) DO NOTHING"
)
_ENDPOINTS = "SELECT id FROM webhook_endpoints WHERE organization_id = {p} AND disabled = {p}"
_INSERT_OUTBOX = (
    "INSERT INTO webhook_outbox (id, endpoint_id, alert_id, event_type, payload_json, attempts, "
    "next_attempt_at_us, created_at_us) VALUES ({p}, {p}, {p}, {p}, {p}, 0, {p}, {p})"
)
_ALERT_COLUMNS = "id, organization_id, kind, threshold, period_start_us, message, details_json, created_at_us"


def alert_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "alert",
        "organization_id": row.organization_id,
        "kind": row.kind,
        "threshold": row.threshold,
        "period_start": rfc3339(from_micros(row.period_start_us)),
        "message": row.message,
        "details": orjson.loads(row.details_json),
        "created_at": rfc3339(from_micros(row.created_at_us)),
    }


def fire(conn: Connection, organization_id: str, alert: Alert, now: datetime) -> bool:
    """Insert ``alert`` unless it already fired, and queue it for every enabled webhook endpoint."""
    alert_id = ids.prefixed("alert")
    now_us = to_micros(now)
    period_us = to_micros(alert.period_start)
    details = orjson.dumps(alert.details).decode()
    inserted = conn.exec_driver_sql(
        _q(conn, _INSERT_ALERT),
        (alert_id, organization_id, alert.kind, alert.threshold, period_us, alert.message, details, now_us),
    ).rowcount
    if inserted != 1:
        return False
    endpoints = [r[0] for r in conn.exec_driver_sql(_q(conn, _ENDPOINTS), (organization_id, False))]
    if endpoints:
        event_type = f"alert.{alert.kind}"
        row = _Row(
            alert_id, organization_id, alert.kind, alert.threshold, period_us, alert.message, details, now_us
        )
        payload = orjson.dumps(
            {"type": event_type, "timestamp": alert_json(row)["created_at"], "data": alert_json(row)}
        ).decode()
        conn.exec_driver_sql(
            _q(conn, _INSERT_OUTBOX),
            [(ids.prefixed("msg"), e, alert_id, event_type, payload, now_us, now_us) for e in endpoints],
        )
    return True


@dataclass(slots=True)
class _UnusualWatch:
    """What a process knows of an organization's usage today (UTC day ``day``, since the epoch), for the
    unusual-usage alert: the least usage that fires it (None: never today), today's usage as last read
    plus what this process settled since, and when it was read."""

    day: int
    trigger: int | None
    seen: int
    read_us: int
    fired: bool


@dataclass(frozen=True, slots=True)
class _AllowanceCheck:
    """An organization's allowance alerts to decide after a settle, and its two reads on SQLite (on
    PostgreSQL one statement of each kind reads every organization's)."""

    organization_id: str
    period: Any
    period_us: int
    allowance: int
    measure: str
    first_day: int  # the period's days, for spend
    end_day: int
    thresholds_query: tuple[str, tuple[Any, ...]]
    used_query: tuple[str, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class _Row:
    id: str
    organization_id: str
    kind: str
    threshold: int
    period_start_us: int
    message: str
    details_json: str
    created_at_us: int


class AlertEvaluator:
    """Decides and fires alerts. Per settle it costs nothing once every alert of the organization's
    period has fired (remembered in memory), otherwise one indexed read of the period's usage; the
    alerts table is read only when a rule says fire, and written only when one does. Unusual usage
    reads the day rollups only when today's usage, as this process knows it, reaches the trigger, or
    its reading is five minutes old."""

    def __init__(self, db: Database, clock: Clock, policy: AlertPolicy, counters: CounterStore) -> None:
        self._db = db
        self._clock = clock
        self.policy = policy
        self._counters = counters
        # (organization, period start) -> (kind, threshold) known to be committed. Filled only from
        # reads, never from our own inserts: a rolled-back settle must not hide an alert.
        self._fired: dict[str, tuple[int, set[tuple[str, int]]]] = {}
        self._unusual: dict[str, _UnusualWatch] = {}
        # Organization -> billing period start (µs) whose 100 % threshold the database has (refusals).
        self._exhausted: dict[str, int] = {}
        # Organization -> when to try again (monotonic s) after writing its 100 % threshold failed.
        self._exhausted_retry: dict[str, float] = {}
        # (organization, model, period start) whose unpriced-usage alert is committed (bounded).
        self._unpriced_seen: set[tuple[str, str, int]] = set()
        self._refusal_fired: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- at settle -------------------------------------------------------------------------------------
    def evaluate_in(
        self, conn: Connection, settled: Sequence[tuple[Sequence[LedgerRow], CreditTerms | None]]
    ) -> None:
        """The alerts of what one settle wrote: each organization's rows (one organization per entry)
        with its credit terms."""
        now = self._clock.now()
        checks: list[_AllowanceCheck] = []
        for rows, terms in settled:
            if not rows:
                continue
            self._evaluate_unpriced(conn, rows, 1 if terms is None else terms.billing_anchor_day, now)
            if terms is not None:
                check = self._allowance_check(conn, rows, terms)
                if check is not None:
                    checks.append(check)
        self._evaluate_allowances(conn, checks, now)
        for rows, terms in settled:
            if not rows or terms is None:
                continue
            spend = terms.spend_cap_nanos is not None
            unit = rows[-1].currency if spend else "credits"
            self._evaluate_unusual(
                conn, terms.organization_id, rows, now, "cost_nanos" if spend else "credits_nanos", unit
            )

    def _allowance_check(
        self, conn: Connection, rows: Sequence[LedgerRow], terms: CreditTerms
    ) -> _AllowanceCheck | None:
        """What to read to decide an organization's allowance alerts; None when it has no allowance."""
        if terms.spend_cap_nanos is not None:
            allowance, measure = terms.spend_cap_nanos, "spend"
        elif terms.monthly_allowance_nanos != UNLIMITED:
            allowance, measure = terms.monthly_allowance_nanos, "credits"
        else:
            return None
        if allowance <= 0:
            return None
        org_id = terms.organization_id
        period = billing_period(max(r.created_at for r in rows), terms.billing_anchor_day)
        period_us = to_micros(period.start)
        first_day, end_day = period_us // MICROS_PER_DAY, to_micros(period.end) // MICROS_PER_DAY
        if measure == "spend":
            used_query: tuple[str, tuple[Any, ...]] = (_q(conn, _SPENT), (org_id, first_day, end_day))
        else:
            used_query = (_q(conn, _CREDITS_USED), (org_id, period_us))
        thresholds_query = (_q(conn, _THRESHOLDS), (org_id,))
        return _AllowanceCheck(
            org_id, period, period_us, allowance, measure, first_day, end_day, thresholds_query, used_query
        )

    def _evaluate_allowances(
        self, conn: Connection, checks: Sequence[_AllowanceCheck], now: datetime
    ) -> None:
        # The thresholds are read in the transaction (a primary-key lookup), so a changed setting applies
        # to the next settle; on PostgreSQL with what the period has used, every organization's in one
        # round trip of one statement each (under the organizations' turns every other settle of them
        # waits for each round trip: ``driver_sql``). SQLite has no round trips: the use is read only
        # when an alert may be due.
        if not checks:
            return
        if conn.dialect.name == "sqlite":
            for check in checks:
                self._evaluate_allowance(conn, check, fetch(conn, *check.thresholds_query), None, now)
            return
        credits = [c for c in checks if c.measure == "credits"]
        spend = [c for c in checks if c.measure == "spend"]
        queries: list[tuple[str, tuple[Any, ...]]] = [
            (_PG_THRESHOLDS, (pg_array(c.organization_id for c in checks),))
        ]
        if credits:
            orgs, periods = (
                pg_array(c.organization_id for c in credits),
                pg_array(c.period_us for c in credits),
            )
            queries.append((_PG_CREDITS_USED, (orgs, periods)))
        if spend:
            days = [(c.organization_id, c.first_day, c.end_day) for c in spend]
            queries.append((_PG_SPENT, pg_columns(days)))
        found, *used_found = fetch_together(conn, queries)
        own = {str(org): thresholds for org, thresholds in found}
        used = {str(org): value for rows in used_found for org, value in rows}
        for check in checks:
            org = check.organization_id
            found_used = [(used[org],)] if org in used else []
            self._evaluate_allowance(conn, check, [(own[org],)] if org in own else [], found_used, now)

    def _evaluate_allowance(
        self,
        conn: Connection,
        check: _AllowanceCheck,
        found_own: list[tuple[Any, ...]],
        found_used: list[tuple[Any, ...]] | None,
        now: datetime,
    ) -> None:
        org_id, period, period_us, allowance, measure = (
            check.organization_id,
            check.period,
            check.period_us,
            check.allowance,
            check.measure,
        )
        cached = self._fired.get(org_id)
        known = cached[1] if cached is not None and cached[0] == period_us else set()
        own = thresholds_from_text(found_own[0][0] if found_own else None)
        thresholds = self.policy.thresholds if own is None else own
        wanted = {(THRESHOLD, t) for t in thresholds} | {(PROJECTED_RUN_OUT, 100)}
        if wanted <= known:
            return
        if found_used is None:
            found_used = fetch(conn, *check.used_query)
        used = int(found_used[0][0]) if found_used and found_used[0][0] is not None else 0
        fired_thresholds = {t for k, t in known if k == THRESHOLD}
        candidates: list[Alert] = [
            threshold_alert(t, used, allowance, period.start, period.end, measure)
            for t in crossed_thresholds(used, allowance, thresholds, fired_thresholds)
        ]
        if (PROJECTED_RUN_OUT, 100) not in known and period.start <= now < period.end:
            projected = projected_run_out(used, allowance, now, period.start, period.end)
            if projected is not None:
                candidates.append(projected)
        if not candidates:
            return
        committed = {(str(k), int(t)) for k, t in fetch(conn, _q(conn, _FIRED), (org_id, period_us))}
        for alert in candidates:
            if (alert.kind, alert.threshold) not in committed:
                fire(conn, org_id, alert, now)
        # Remembered once this transaction commits: alerts read or fired in a settle that is then rolled
        # back (a failed batch, a savepoint) must be looked at again.
        fired = committed | {(alert.kind, alert.threshold) for alert in candidates}
        after_commit(lambda: self._fired.__setitem__(org_id, (period_us, fired)))

    def _evaluate_unpriced(
        self, conn: Connection, rows: Sequence[LedgerRow], anchor_day: int, now: datetime
    ) -> None:
        """Once per organization, model and billing period: usage recorded at cost 0 for want of a price."""
        periods: dict[tuple[str, str, int], datetime] = {}
        for row in rows:
            if not row.priced and row.model:
                start = billing_period(row.created_at, anchor_day).start
                periods[(row.organization_id, row.model, to_micros(start))] = start
        for key in sorted(periods):
            if key in self._unpriced_seen:
                continue
            org_id, model, _ = key
            fire(conn, org_id, unpriced_usage(model, periods[key]), now)
            if len(self._unpriced_seen) >= _SEEN_MAX:
                after_commit(self._unpriced_seen.clear)
            after_commit(partial(self._unpriced_seen.add, key))

    def _evaluate_unusual(
        self, conn: Connection, org_id: str, rows: Sequence[LedgerRow], now: datetime, measure: str, unit: str
    ) -> None:
        """Decided on today's usage so far (the UTC day), at whichever settle brings it over the trigger:
        not only at an hour's first settle. Once a day (the alert's period is the day)."""
        now_us = to_micros(now)
        today = now_us // MICROS_PER_DAY
        watch = self._unusual.get(org_id)
        if watch is not None and watch.day == today and watch.fired:
            return  # the day's alert is out: nothing more to look at (the common case of a busy day)
        # This runs in every settle on the writer: compare datetimes, not one conversion per row.
        day_start = from_micros(today * MICROS_PER_DAY)
        day_end = day_start + _DAY
        added = sum(getattr(r, measure) for r in rows if day_start <= r.created_at < day_end)
        if watch is not None and watch.day == today:
            fresh = now_us - watch.read_us < _UNUSUAL_REREAD_US
            if fresh and (watch.trigger is None or watch.seen + added < watch.trigger):
                after_commit(partial(self._add_seen, org_id, today, added))
                return
        sql = _q(conn, _DAILY).replace("{measure}", measure)
        by_day = {int(d): int(v) for d, v in fetch(conn, sql, (org_id, today - _BASELINE_DAYS, today + 1))}
        previous = [by_day.get(d, 0) for d in range(today - _BASELINE_DAYS, today)]
        used = by_day.get(today, 0)
        min_volume = self.policy.unusual_min_volume * NANOS_PER_WHOLE
        alert = unusual_usage(
            used,
            previous,
            from_micros(today * MICROS_PER_DAY),
            factor=self.policy.unusual_factor,
            min_volume=min_volume,
            unit=unit,
        )
        if alert is not None:
            fire(conn, org_id, alert, now)  # or another process did: either way it has fired today
        trigger = unusual_trigger(previous, factor=self.policy.unusual_factor, min_volume=min_volume)
        # Remembered once this transaction commits (a rolled-back settle's usage was never there).
        watched = _UnusualWatch(today, trigger, used, now_us, fired=alert is not None)
        after_commit(partial(self._unusual.__setitem__, org_id, watched))

    def _add_seen(self, org_id: str, day: int, amount: int) -> None:
        watch = self._unusual.get(org_id)
        if watch is not None and watch.day == day:
            watch.seen += amount  # after the commit, on the writer thread that owns these records

    # -- quota refusals --------------------------------------------------------------------------------
    def note_refusal(self, org_id: str) -> None:
        """Count one quota refusal (an HTTP 429) of ``org_id``; fire the hourly alert at the N-th.

        Counted in the counter store, not the ledger: refusals are not usage, and a write per 429 would
        let a client that is being refused load the database. With Redis, every process of a deployment
        counts into one tally; the alert still fires once per organization and hour (``fire`` inserts it
        once, and each process asks at most once an hour)."""
        now = self._clock.now()
        now_us = to_micros(now)
        hour = now_us // MICROS_PER_HOUR
        try:
            count = self._counters.tally(f"{org_id}|refusals", now_us)
        except CounterStoreUnavailable:
            return  # the 429 stands; while the store is away its refusals go uncounted
        if count < self.policy.refusals_per_hour:
            return
        with self._lock:
            if self._refusal_fired.get(org_id) == hour:
                return
            self._refusal_fired[org_id] = hour
        alert = frequent_refusals(count, self.policy.refusals_per_hour, from_micros(hour * MICROS_PER_HOUR))
        if alert is not None:
            with self._db.write() as conn:
                fire(conn, org_id, alert, now)

    def note_exhausted(
        self, org_id: str, anchor_day: int, thresholds: Collection[int] | None, limit: Mapping[str, Any]
    ) -> None:
        """A request of ``org_id`` was refused by its period allowance (``limit``, the refusal's details,
        ``alerts.refused_by_allowance``): fire the 100 % threshold of the billing period, when the
        organization's thresholds include it. Blocked short of 100 % (0.9997 of 1), no settle crosses it.

        The database decides, once (the alert's unique index, with its outbox rows); the process then
        remembers that the period's 100 % threshold is there, so the refusals that follow cost no write
        (one insert per process and period at most, that finds it there)."""
        if 100 not in (self.policy.thresholds if thresholds is None else thresholds):
            return
        now = self._clock.now()
        period = billing_period(now, anchor_day)
        period_us = to_micros(period.start)
        if self._exhausted.get(org_id) == period_us:
            return
        if self._exhausted_retry.get(org_id, 0.0) > time.monotonic():
            return  # the last write failed: refusals keep coming, and must not each try again at once
        cached = self._fired.get(org_id)
        if cached is None or cached[0] != period_us or (THRESHOLD, 100) not in cached[1]:
            measure = "spend" if limit.get("meter") == "spend" else "credits"
            used, allowance, requested = (int(limit[name]) for name in ("consumed", "max", "requested"))
            alert = allowance_refused(used, allowance, requested, period.start, period.end, measure)
            try:
                with self._db.write() as conn:
                    fire(conn, org_id, alert, now)
            except Exception:
                self._exhausted_retry[org_id] = time.monotonic() + _EXHAUSTED_RETRY_S
                raise
        self._exhausted[org_id] = period_us

    # -- reads -----------------------------------------------------------------------------------------
    def list_alerts(self, org_id: str, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        with self._db.read() as conn:
            p = _marker(conn)
            total = int(
                conn.exec_driver_sql(
                    f"SELECT COUNT(*) FROM alerts WHERE organization_id = {p}", (org_id,)
                ).scalar_one()
            )
            rows = conn.exec_driver_sql(
                f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE organization_id = {p} "
                f"ORDER BY created_at_us DESC, id DESC LIMIT {p} OFFSET {p}",
                (org_id, limit, offset),
            )
            return [alert_json(r) for r in rows], total
