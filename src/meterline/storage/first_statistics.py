"""PostgreSQL statistics for the settle path's tables, taken once they hold their first rows.

The tables a settle reads start empty, and PostgreSQL plans for a table it has never analyzed as if
each organization had a row or two: the idempotency look-up (``ledger`` by organization and key) then
runs on the unique index by organization alone, or on the (organization, time) index, and filters
every row of the organization. Measured on a new database (``docs/benchmarks.md``, "Statistics for a
new PostgreSQL database"): 1.1 ms per look-up at 1,500 rows of one organization, 2.6 ms at 3,000,
growing with the ledger, against 0.02 ms through both columns of the unique index once analyzed.
Autovacuum analyzes a table only on its next round (``autovacuum_naptime``, a minute by default) after
50 rows have changed, so every new deployment, and every benchmark on a new database, started on that
plan.

``FirstStatistics.wrote(rows)`` is told how many rows a settle wrote, in the writer's transaction;
once ``after_rows`` have been written by this process, it analyzes (after that commit, on a thread and
a connection of its own) whichever of ``TABLES`` has no statistics, once per process. Autovacuum keeps
the statistics from then on. A failure (a role that may not analyze, a table locked for more than a
second) is logged and not retried: the settle it follows has committed, and autovacuum still comes.
"""

from __future__ import annotations

import logging
import threading

from meterline.storage.database import Database
from meterline.storage.writer import after_commit

log = logging.getLogger(__name__)

# Read by organization on every settle: the ledger (idempotency), the hourly rollup (alerts' sums),
# the reservations a settle ends, the credit periods.
TABLES = ("ledger", "usage_hourly", "usage_rollups", "reservations", "credit_usage")
# A table another session holds (autovacuum, a migration) is left to autovacuum, not waited for.
_LOCK_TIMEOUT = "1s"

# Whether the statistics exist, not when they were last taken: PostgreSQL forgets ``last_analyze`` after
# an unclean stop or a failover, and analyzing a large ledger again then would be wasted. (A table
# analyzed while empty has none either: analyzing it again is free.)
_WITHOUT_STATISTICS = (
    "SELECT name FROM unnest(%s::text[]) AS wanted(name) WHERE NOT EXISTS "
    "(SELECT 1 FROM pg_stats WHERE schemaname = current_schema() AND tablename = wanted.name)"
)


class FirstStatistics:
    def __init__(self, db: Database, *, after_rows: int = 100) -> None:
        self._db = db
        self._after_rows = after_rows
        self._written = 0
        self._due = not db.is_sqlite  # SQLite plans these look-ups by its indexes without statistics
        self._lock = threading.Lock()

    def wrote(self, rows: int) -> None:
        """``rows`` were written in the transaction now running: analyze after it commits, if this
        brings this process to ``after_rows``. (Counted again if that transaction rolls back: the writer
        runs a failed merged settle again, job by job, and those count too.)"""
        if not self._due or rows <= 0:
            return
        with self._lock:
            self._written += rows
            if self._written < self._after_rows:
                return
        after_commit(self._once)

    def _once(self) -> None:
        with self._lock:
            if not self._due:
                return
            self._due = False
        # On a thread of its own: the writer's next batches do not wait for a connection or for the
        # tables' locks (autovacuum or another process may be analyzing them).
        threading.Thread(target=self._analyze, name="meterline-statistics", daemon=True).start()

    def _analyze(self) -> None:
        try:
            with self._db.engine.connect() as conn:
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                lacking = set(conn.exec_driver_sql(_WITHOUT_STATISTICS, (list(TABLES),)).scalars())
                if lacking:
                    # Names from our own list (only filtered by the catalog's answer): nothing from outside.
                    conn.exec_driver_sql(f"ANALYZE {', '.join(t for t in TABLES if t in lacking)}")
                conn.commit()
        except Exception:
            log.warning("could not analyze the new tables (autovacuum will)", exc_info=True)


__all__ = ["TABLES", "FirstStatistics"]
