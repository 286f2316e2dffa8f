"""Benchmark for SPEC §10, analytics: history, time series, breakdowns and the summary in <= 20 ms p50 on a
10-million-row ledger, flat from 100k to 10M; beside each, a plain ``GROUP BY`` over the ledger answering
the same question (the anchor to beat), in the same run, on SQLite and PostgreSQL. Plus the server's RSS.

Usage::

    .venv/bin/python bench/analytics.py [--sizes 100k,1m,10m] [--requests 200] [--skip-postgres]
                                        [--scratch /var/tmp/meterline-bench-analytics]

One run does, per backend and ledger size:

* makes sure the database exists (``bench/analytics_data.py`` generates it once into ``--scratch``: SQLite
  files, and a PostgreSQL cluster kept there between runs, filled from the SQLite file by COPY); on the
  100k databases it runs ``meterline reconcile`` to show they look exactly as if settled by the app;
* starts ``meterline serve`` on it (a real process) and, with an organization key of the biggest
  organization, sends each request ``--requests`` times after 20 warm-up requests, one at a time over a
  keep-alive client (capped at ``--budget`` seconds per endpoint: slow endpoints get fewer samples, the
  count is reported); endpoints that answer 404 (not built yet) are reported as missing;
* times the plain ``GROUP BY`` over ``ledger`` for the same question in-process with the DB driver
  (``sqlite3`` / ``psycopg``), up to 20 times or 15 s;
* reads the server's VmRSS from /proc after the run.

It prints one table per backend and writes ``bench/results/analytics.json``. The servers are stopped at
the end; the generated databases stay in ``--scratch`` (delete it to regenerate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "bench"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))  # tests/servers.py (PostgreSQL helpers), bench/analytics_data.py

from analytics_data import copy_to_postgres, generate_sqlite, load_meta, save_meta  # noqa: E402
from meterline.clock import to_micros  # noqa: E402
from meterline.quotas.periods import billing_period  # noqa: E402
from meterline.storage.database import Database  # noqa: E402
from meterline.storage.migrate import is_up_to_date, upgrade  # noqa: E402

HOST = "127.0.0.1"
SIZES = {"100k": 100_000, "1m": 1_000_000, "10m": 10_000_000}
RESULTS = ROOT / "bench" / "results" / "analytics.json"
METERLINE = str(Path(sys.executable).with_name("meterline"))
WARMUP = 20
TARGET_MS = 20.0
DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000

ENDPOINTS: list[tuple[str, str]] = [
    ("summary", "/v1/usage"),
    ("history 30d", "/v1/usage/history"),
    ("timeseries 24h", "/v1/usage/timeseries?range=24h"),
    ("timeseries 7d", "/v1/usage/timeseries?range=7d"),
    ("timeseries 30d", "/v1/usage/timeseries?range=30d"),
    *((f"breakdown {by}", f"/v1/usage/breakdown?by={by}") for by in
      ("workspace", "workspace_group", "user", "model", "endpoint", "key")),
    # Rolling ranges instead of the billing period: 30 whole days, and 24 hours (hours only).
    ("breakdown user 30d", "/v1/usage/breakdown?by=user&range=30d"),
    ("breakdown user 24h", "/v1/usage/breakdown?by=user&range=24h"),
]  # fmt: skip

# The anchor for each endpoint: the same question as one plain GROUP BY over the ledger, for the biggest
# organization. {p} is the driver's parameter marker; parameters come from ``anchor_params``.
_SUMS = "COUNT(*), SUM(total_tokens), SUM(cost_nanos), SUM(credits_nanos)"
ANCHORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "summary": (
        f"SELECT CASE WHEN created_at_us >= {{p}} THEN 1 ELSE 0 END AS today, {_SUMS} FROM ledger "
        "WHERE organization_id = {p} AND created_at_us >= {p} GROUP BY 1",
        ("today", "org", "period"),
    ),
    "history 30d": (
        f"SELECT created_at_us / {DAY_US} AS day, {_SUMS} FROM ledger "
        "WHERE organization_id = {p} AND created_at_us >= {p} GROUP BY 1",
        ("org", "days30"),
    ),
    "timeseries 24h": (
        f"SELECT created_at_us / {HOUR_US} AS bucket, source, {_SUMS} FROM ledger "
        "WHERE organization_id = {p} AND created_at_us >= {p} GROUP BY 1, 2",
        ("org", "hours24"),
    ),
    "timeseries 7d": (
        f"SELECT created_at_us / {DAY_US} AS bucket, source, {_SUMS} FROM ledger "
        "WHERE organization_id = {p} AND created_at_us >= {p} GROUP BY 1, 2",
        ("org", "days7"),
    ),
    "timeseries 30d": (
        f"SELECT created_at_us / {7 * DAY_US} AS bucket, source, {_SUMS} FROM ledger "
        "WHERE organization_id = {p} AND created_at_us >= {p} GROUP BY 1, 2",
        ("org", "days30"),
    ),
    **{
        f"breakdown {by}": (
            f"SELECT {column}, {_SUMS} FROM ledger WHERE organization_id = {{p}} AND created_at_us >= {{p}} "
            "GROUP BY 1 ORDER BY 5 DESC",
            ("org", "period"),
        )
        for by, column in (
            ("workspace", "workspace_id"),
            ("user", "user_id"),
            ("model", "model"),
            ("endpoint", "endpoint"),
            ("key", "key_id"),
        )
    },
    **{
        f"breakdown user {name}": (
            f"SELECT user_id, {_SUMS} FROM ledger WHERE organization_id = {{p}} AND created_at_us >= {{p}} "
            "GROUP BY 1 ORDER BY 5 DESC",
            ("org", start),
        )
        for name, start in (("30d", "days30"), ("24h", "hours24"))
    },
    "breakdown workspace_group": (
        "SELECT w.group_name, COUNT(*), SUM(l.total_tokens), SUM(l.cost_nanos), SUM(l.credits_nanos) "
        "FROM ledger l JOIN workspaces w ON w.id = l.workspace_id "
        "WHERE l.organization_id = {p} AND l.created_at_us >= {p} GROUP BY 1 ORDER BY 5 DESC",
        ("org", "period"),
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- PostgreSQL: a cluster kept in the scratch directory between runs ----------------------------------------
class PersistentPostgres:
    """Like ``tests/servers.start_postgres`` (same durability-off settings, run as the postgres user when
    we are root), but the data directory survives ``stop()`` so generated databases are reused."""

    def __init__(self, root: Path) -> None:
        from tests.servers import _find_pg_bin, _pg_system_user

        self.root, self.bin = root, _find_pg_bin()
        account = _pg_system_user()
        self.run_as = account.pw_name if account else None
        self.data, self.sock, self.log = root / "data", root / "sock", root / "postgres.log"
        if not (self.data / "PG_VERSION").exists():
            shutil.rmtree(root, ignore_errors=True)
            self.sock.mkdir(parents=True)
            if account:
                for path in (root, self.sock):
                    os.chown(path, account.pw_uid, account.pw_gid)
            self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "--encoding=UTF8",
                      "--locale=C", "--no-sync", "--no-instructions")  # fmt: skip
        self.port = 0

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=self.root, timeout=300, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        from tests.servers import free_port

        self.port = free_port()
        options = (
            f"-p {self.port} -k {self.sock} -c listen_addresses={HOST} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
            "-c shared_buffers=1GB -c max_wal_size=8GB"
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "120"
        )

    def stop(self) -> None:
        if self.port:
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
            self.port = 0

    def url(self, database: str) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def exists(self, database: str) -> bool:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            return (
                conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
                is not None
            )

    def recreate(self, database: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{database}"')


# -- data ----------------------------------------------------------------------------------------------------
def ensure_sqlite(scratch: Path, label: str) -> tuple[Path, dict[str, Any]]:
    path, meta_path = scratch / f"sqlite-{label}.db", scratch / f"sqlite-{label}.json"
    meta = load_meta(meta_path)
    if meta is None or not path.exists():
        part = scratch / f"sqlite-{label}.partial.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{part}{suffix}").unlink(missing_ok=True)
        log(f"generating {SIZES[label]:,} ledger rows into {path} …")
        meta = generate_sqlite(part, SIZES[label], scratch, progress=log)
        part.rename(path)
        save_meta(meta_path, meta)
    migrate(f"sqlite:///{path}")
    return path, meta


def migrate(url: str) -> None:
    """Bring a cached database to the current schema (a new projection is filled from its ledger)."""
    db = Database(url)
    try:
        if not is_up_to_date(db):
            log(f"migrating {url.rsplit('/', 1)[-1]} to the current schema …")
            started = time.perf_counter()
            upgrade(db)
            log(f"  migrated in {time.perf_counter() - started:.0f} s")
    finally:
        db.dispose()


def ensure_postgres(pg: PersistentPostgres, scratch: Path, label: str, sqlite_path: Path) -> str:
    database = f"analytics_{label}"
    marker = scratch / f"pg-{label}.json"
    if not (marker.exists() and pg.exists(database)):
        log(f"copying {sqlite_path.name} into PostgreSQL database {database} …")
        pg.recreate(database)
        db = Database(pg.url(database))
        upgrade(db)
        db.dispose()
        copy_to_postgres(sqlite_path, pg.url(database), progress=log)
        marker.write_text(json.dumps({"from": sqlite_path.name}), encoding="utf-8")
    migrate(pg.url(database))
    return pg.url(database)


def reconcile_drift(url: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    result = subprocess.run(
        [METERLINE, "reconcile", "--json", "--database-url", url],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    drift: int = json.loads(result.stdout)["drift"]
    return drift


# -- the server ----------------------------------------------------------------------------------------------
class Server:
    def __init__(self, url: str, scratch: Path, log_path: Path) -> None:
        from tests.servers import free_port

        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
        env["METERLINE_SIGNING_KEY_FILE"] = str(scratch / "signing-key.json")
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [METERLINE, "serve", "--database-url", url, "--port", str(self.port)],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.base = f"http://{HOST}:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meterline serve exited; see {log_path}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"meterline serve did not come up; see {log_path}")
            time.sleep(0.1)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(p95 * 1000, 2),
        "n": len(ordered),
    }


def time_endpoint(client: httpx.Client, path: str, requests: int, budget: float) -> dict[str, Any]:
    first = client.get(path)
    if first.status_code == 404:
        return {"missing": True}
    if first.status_code != 200:
        return {"error": f"{first.status_code} {first.text[:200]}"}
    for _ in range(WARMUP):
        client.get(path)
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < requests and (len(samples) < 5 or time.perf_counter() < deadline):
        started = time.perf_counter()
        response = client.get(path)
        samples.append(time.perf_counter() - started)
        if response.status_code != 200:
            return {"error": f"{response.status_code} {response.text[:200]}"}
    return percentiles(samples)


def anchor_params(meta: dict[str, Any], org: dict[str, Any], now: datetime) -> dict[str, Any]:
    today = datetime.combine(now.date(), datetime.min.time(), tzinfo=UTC)
    return {
        "org": org["id"],
        "today": to_micros(today),
        "period": to_micros(billing_period(now, org["anchor_day"]).start),
        "days30": to_micros(today - timedelta(days=29)),
        "days7": to_micros(today - timedelta(days=6)),
        "hours24": to_micros(now - timedelta(hours=24)),
    }


Execute = Callable[[str, tuple[Any, ...]], Any]


def time_anchor(
    execute: Execute, name: str, params: dict[str, Any], marker: str, budget: float = 15.0
) -> dict[str, Any]:
    sql, names = ANCHORS[name]
    args = tuple(params[n] for n in names)
    statement = sql.replace("{p}", marker)
    execute(statement, args)  # warm
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < 20 and (len(samples) < 3 or time.perf_counter() < deadline):
        started = time.perf_counter()
        execute(statement, args)
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def sqlite_executor(path: Path) -> tuple[Callable[[str, tuple[Any, ...]], Any], Callable[[], None]]:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")

    def execute(sql: str, args: tuple[Any, ...]) -> Any:
        return conn.execute(sql, args).fetchall()

    return execute, conn.close


def pg_executor(url: str) -> tuple[Callable[[str, tuple[Any, ...]], Any], Callable[[], None]]:
    import psycopg

    conn = psycopg.connect(url, autocommit=True)

    def execute(sql: str, args: tuple[Any, ...]) -> Any:
        return conn.execute(sql, args).fetchall()

    return execute, conn.close


def measure(backend: str, label: str, url: str, executor: Any, meta: dict[str, Any], args: argparse.Namespace,
            scratch: Path) -> dict[str, Any]:  # fmt: skip
    biggest = meta["orgs"][0]
    server = Server(url, scratch, scratch / f"serve-{backend}-{label}.log")
    execute, close = executor
    result: dict[str, Any] = {"rows": meta["rows"], "rollups": meta.get("rollups"), "endpoints": {}}
    try:
        now = datetime.now(UTC)
        anchor_day = execute(
            "SELECT billing_anchor_day FROM organizations WHERE id = "
            + ("?" if backend == "sqlite" else "%s"),
            (biggest["id"],),
        )[0][0]
        params = anchor_params(meta, {**biggest, "anchor_day": anchor_day}, now)
        result["narrow_rollups"] = execute("SELECT COUNT(*) FROM usage_rollups", ())[0][0]
        result["org_rows"] = execute(
            "SELECT COUNT(*) FROM ledger WHERE organization_id = " + ("?" if backend == "sqlite" else "%s"),
            (biggest["id"],),
        )[0][0]
        headers = {"Authorization": f"Bearer {biggest['org_key']}"}
        with httpx.Client(base_url=server.base, headers=headers, timeout=120) as client:
            for name, path in ENDPOINTS:
                api = time_endpoint(client, path, args.requests, args.budget)
                anchor = time_anchor(execute, name, params, "?" if backend == "sqlite" else "%s")
                result["endpoints"][name] = {"api": api, "group_by": anchor}
                log(f"  {backend} {label} {name:<28} api {fmt(api):<22} GROUP BY {fmt(anchor)}")
        result["rss_mib"] = round(server.rss_mib(), 1)
        result["loadavg_after"] = list(os.getloadavg())
        result["measured_at"] = datetime.now(UTC).isoformat()
    finally:
        server.stop()
        close()
    return result


def fmt(figures: dict[str, Any]) -> str:
    if figures.get("missing"):
        return "missing (404)"
    if "error" in figures:
        return "error"
    return f"{figures['p50_ms']:.1f} / {figures['p95_ms']:.1f} ms"


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def report(summary: dict[str, Any]) -> None:
    for backend, by_size in summary["backends"].items():
        sizes = list(by_size)
        print(f"\n{backend}: p50 / p95 ms (API via meterline serve | plain GROUP BY over ledger)")
        print(f"{'endpoint':<28}" + "".join(f"{s + ' API':>22}{s + ' GROUP BY':>22}" for s in sizes))
        for name, _ in ENDPOINTS:
            cells = ""
            for size in sizes:
                entry = by_size[size]["endpoints"].get(name, {})
                cells += (
                    f"{fmt(entry.get('api', {'error': 1})):>22}{fmt(entry.get('group_by', {'error': 1})):>22}"
                )
            print(f"{name:<28}{cells}")
        print("server RSS after the run: " + ", ".join(f"{s} {by_size[s].get('rss_mib')} MiB" for s in sizes))
        print(
            "ledger rows / rollup rows / biggest org's rows: "
            + ", ".join(
                f"{s} {by_size[s]['rows']:,} / {by_size[s]['rollups']:,} / {by_size[s]['org_rows']:,}"
                for s in sizes
            )
        )
    print(f"\nmachine: {summary['machine']}")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100k,1m,10m", help="comma-separated: 100k, 1m, 10m")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--budget", type=float, default=15.0, help="seconds per endpoint at most")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="drop sizes measured by earlier runs")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(os.environ.get("METERLINE_BENCH_SCRATCH", "/var/tmp/meterline-bench-analytics")),
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    scratch: Path = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    scratch.chmod(0o755)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    summary: dict[str, Any] = {"machine": machine(), "started": datetime.now(UTC).isoformat(), "backends": {}}
    files = {label: ensure_sqlite(scratch, label) for label in sizes}
    pg: PersistentPostgres | None = None
    try:
        if not args.skip_sqlite:
            summary["backends"]["sqlite"] = {}
            for label in sizes:
                path, meta = files[label]
                url = f"sqlite:///{path}"
                entry = measure("sqlite", label, url, sqlite_executor(path), meta, args, scratch)
                if label == "100k":
                    entry["reconcile_drift"] = reconcile_drift(url)
                summary["backends"]["sqlite"][label] = entry
        if not args.skip_postgres:
            pg = PersistentPostgres(scratch / "pg")
            pg.start()
            summary["backends"]["postgresql"] = {}
            for label in sizes:
                path, meta = files[label]
                url = ensure_postgres(pg, scratch, label, path)
                entry = measure("postgresql", label, url, pg_executor(url), meta, args, scratch)
                if label == "100k":
                    entry["reconcile_drift"] = reconcile_drift(url)
                summary["backends"]["postgresql"][label] = entry
    finally:
        if pg is not None:
            pg.stop()
    if not args.fresh and RESULTS.exists():
        # Sizes measured by earlier runs (e.g. 10m on its own) stay, each with its own machine load.
        earlier = json.loads(RESULTS.read_text(encoding="utf-8"))
        for backend, by_size in earlier.get("backends", {}).items():
            for label, entry in by_size.items():
                summary["backends"].setdefault(backend, {}).setdefault(label, entry)
        for backend in summary["backends"]:
            ordered = sorted(summary["backends"][backend].items(), key=lambda item: SIZES[item[0]])
            summary["backends"][backend] = dict(ordered)
    report(summary)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
