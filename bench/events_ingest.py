"""Benchmark for SPEC §10, ingestion: batched ``POST /v1/events`` into SQLite at >= 50 % of the rate of a
bare ``executemany`` into the same table on the same machine; plus events/s on PostgreSQL.

Usage::

    .venv/bin/python bench/events_ingest.py [--events N] [--batch 1000] [--skip-postgres] [--profile]

One run does, per backend (SQLite, and PostgreSQL unless --skip-postgres):

* starts a real ``meterline`` server (uvicorn, one process, the same settings as ``meterline serve``)
  in a subprocess on a fresh database, and waits for ``GET /healthz``;
* creates an organization (plan ``enterprise``), a workspace and a key through the admin API;
* sends N events in batches over keep-alive ``httpx`` clients (1 client, then 2 concurrent clients,
  each on a fresh server and database) and measures events/s end to end (request bodies are encoded
  before the clock starts; every response is parsed and checked);
* baselines: the same ledger rows the server wrote, copied by a bare driver connection with the server's
  pragmas, ``executemany`` + one commit per batch into a fresh database migrated to the same schema
  (and once more with the hourly-rollup upsert the server also does in each transaction).

It prints a table, the SQLite ratio API / bare executemany (target >= 0.5) and the machine, and writes
``bench/results/events_ingest.json``. Nothing is left running; temporary directories are removed.

``--profile`` adds one more SQLite pass (not part of the figures) with ``py-spy`` attached to the server
(``pip install py-spy``) and prints (and records in the JSON) where the server's time goes;
``--profile-stacks FILE`` keeps py-spy's raw stacks.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import orjson

from machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests/servers.py (throwaway PostgreSQL)

from meterline.clock import MICROS_PER_HOUR  # noqa: E402
from meterline.storage.database import Database  # noqa: E402
from meterline.storage.migrate import upgrade  # noqa: E402
from meterline.storage.tables import ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ledger  # noqa: E402

HOST = "127.0.0.1"
ADMIN_KEY = "bench-" + uuid.uuid4().hex  # per run; never a well-known default
RESULTS = ROOT / "bench" / "results" / "events_ingest.json"
TARGET_RATIO = 0.5
WARMUP_EVENTS = 1000  # one batch before the clock starts (imports, caches, connection pool)
WARMUP_PREFIX = "warmup-"
SERVER_START_TIMEOUT = 60.0
MAX_RETRIES = 5  # per batch, on 5xx ("internal error; retry after a delay"), with exponential back-off
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Detected)\b.*$", re.MULTILINE)

# Every ledger column the server writes (``seq`` is the rowid, assigned by the database).
LEDGER_COLUMNS: tuple[str, ...] = tuple(c.name for c in ledger.columns if c.name != "seq")

USERS = [f"user-{i:03d}" for i in range(40)]
SOURCES = ["api", "batch", "playground"]
ENDPOINTS = ["/v1/chat/completions", "/v1/responses"]


# --------------------------------------------------------------------------- results


@dataclass
class Measurement:
    backend: str  # "sqlite" | "postgresql"
    method: str  # "api" | "executemany" | "executemany+rollup"
    clients: int
    rows: int
    seconds: float
    retries: int = 0  # batches answered 5xx and sent again (events are idempotent by id)
    server_errors: list[str] = field(default_factory=list)  # distinct exceptions in the server log
    failed: str | None = None  # why the run produced no figure
    rate: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.rate = self.rows / self.seconds if self.seconds > 0 and self.failed is None else 0.0


@dataclass
class ApiRun:
    seconds: float
    retries: int
    server_errors: list[str]


# --------------------------------------------------------------------------- events


def make_events(n: int, *, prefix: str, seed: int) -> list[dict[str, Any]]:
    """``n`` realistic usage events, timestamps spread over the last three hours."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    events: list[dict[str, Any]] = []
    for i in range(n):
        prompt = rng.randint(50, 4000)
        event: dict[str, Any] = {
            "id": f"{prefix}{i:08d}",
            "model": "gpt-4o-mini",
            "provider": "openai",
            "prompt_tokens": prompt,
            "completion_tokens": rng.randint(10, 1200),
            "user_id": rng.choice(USERS),
            "source": rng.choice(SOURCES),
            "endpoint": rng.choice(ENDPOINTS),
            "timestamp": (now - timedelta(seconds=rng.uniform(60, 3 * 3600))).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            ),
        }
        if i % 3 == 0:
            event["cache_read_tokens"] = rng.randint(0, prompt // 2)
        if i % 4 == 0:
            event["metadata"] = {"feature": rng.choice(["search", "chat", "summarize"]), "attempt": 1}
        events.append(event)
    return events


def encode_batches(events: Sequence[dict[str, Any]], batch: int) -> list[tuple[int, bytes]]:
    return [
        (len(events[i : i + batch]), orjson.dumps({"events": events[i : i + batch]}))
        for i in range(0, len(events), batch)
    ]


# --------------------------------------------------------------------------- server


def serve(port: int) -> None:
    """Launcher run in the subprocess: settings from METERLINE_* (database_url, admin_key)."""
    import uvicorn

    from meterline.api.app import create_app
    from meterline.config import load_settings

    settings = load_settings()
    # As ``meterline serve``: the collector tuned once the application has started.
    application = create_app(settings, tune_collector=True)
    uvicorn.run(application, host=HOST, port=port, log_level="warning", access_log=False)


class Server:
    """A ``meterline`` server in a subprocess (this file with ``--serve``), stopped by ``stop()``."""

    def __init__(self, database_url: str, log_dir: Path) -> None:
        from tests.servers import free_port

        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
        env.update(METERLINE_DATABASE_URL=database_url, METERLINE_ADMIN_KEY=ADMIN_KEY)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        return
                time.sleep(0.05)
        raise RuntimeError(f"server not healthy after {SERVER_START_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


@contextlib.contextmanager
def running_server(database_url: str, log_dir: Path) -> Iterator[Server]:
    server = Server(database_url, log_dir)
    try:
        server.wait_healthy()
        yield server
    except BaseException:
        server.stop()
        print(f"server log ({database_url.split(':', 1)[0]}):\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def provision(base_url: str) -> str:
    """Organization (enterprise plan), workspace and key through the admin API; returns the key."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as admin:
        org = _created(admin.post("/v1/admin/organizations", json={"name": "Bench", "plan": "enterprise"}))
        ws_body = {"organization_id": org["id"], "name": "Bench"}
        ws = _created(admin.post("/v1/admin/workspaces", json=ws_body))
        key = _created(admin.post("/v1/admin/keys", json={"workspace_id": ws["id"], "name": "bench"}))
    secret: str = key["key"]
    return secret


def _created(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 201:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text}")
    body: dict[str, Any] = response.json()
    return body


def _send(client: httpx.Client, batches: Sequence[tuple[int, bytes]]) -> int:
    """POST each batch, retrying 5xx answers like a well-behaved client; number of retries."""
    retries = 0
    for count, body in batches:
        for attempt in range(MAX_RETRIES + 1):
            response = client.post("/v1/events", content=body)
            if response.status_code < 500 or attempt == MAX_RETRIES:
                break
            retries += 1
            time.sleep(0.05 * 2**attempt)
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/events: {response.status_code} {response.text[:500]}")
        answer = orjson.loads(response.content)
        if answer["accepted"] != count or answer["duplicates"] or answer["rejected"]:
            raise RuntimeError(
                f"POST /v1/events: expected {count} new events accepted, got accepted={answer['accepted']} "
                f"duplicates={answer['duplicates']} rejected={answer['rejected']}: {answer['data'][:2]}"
            )
    return retries


def post_all(
    base_url: str, key: str, batches: Sequence[tuple[int, bytes]], clients: int
) -> tuple[float, int]:
    """Send ``batches`` over ``clients`` keep-alive connections (one thread each); wall seconds, retries."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    pool = [httpx.Client(base_url=base_url, headers=headers, timeout=120.0) for _ in range(clients)]
    try:
        for client in pool:  # open the connection before the clock starts
            client.get("/healthz").raise_for_status()
        shares = [batches[i::clients] for i in range(clients)]
        errors: list[BaseException] = []
        retries: list[int] = []

        def worker(client: httpx.Client, share: Sequence[tuple[int, bytes]]) -> None:
            try:
                retries.append(_send(client, share))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(c, s)) for c, s in zip(pool, shares, strict=True)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        return elapsed, sum(retries)
    finally:
        for client in pool:
            client.close()


# --------------------------------------------------------------------------- ledger rows


def migrated(url: str) -> None:
    db = Database(url)
    try:
        upgrade(db)
    finally:
        db.dispose()


def sqlite_connect(path: Path) -> sqlite3.Connection:
    """A bare connection with the server's pragmas (meterline.storage.database) and explicit BEGIN."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def sqlite_ledger_rows(path: Path) -> list[tuple[Any, ...]]:
    """The ledger rows the server wrote (without the warm-up batch), in insertion order."""
    conn = sqlite3.connect(path)
    try:
        cols = ", ".join(LEDGER_COLUMNS)
        sql = f"SELECT {cols} FROM ledger WHERE idempotency_key NOT LIKE ? ORDER BY seq"
        return list(conn.execute(sql, (WARMUP_PREFIX + "%",)))
    finally:
        conn.close()


def chunks(rows: Sequence[tuple[Any, ...]], size: int) -> list[Sequence[tuple[Any, ...]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def ledger_insert_sql(placeholder: str) -> str:
    values = ", ".join([placeholder] * len(LEDGER_COLUMNS))
    return f"INSERT INTO ledger ({', '.join(LEDGER_COLUMNS)}) VALUES ({values})"


def rollup_upsert_sql(placeholder: str) -> str:
    cols = ("hour", *ROLLUP_DIMENSIONS, *ROLLUP_MEASURES)
    updates = ", ".join(f"{m} = usage_hourly.{m} + excluded.{m}" for m in ROLLUP_MEASURES)
    return (
        f"INSERT INTO usage_hourly ({', '.join(cols)}) VALUES ({', '.join([placeholder] * len(cols))}) "
        f"ON CONFLICT (hour, {', '.join(ROLLUP_DIMENSIONS)}) DO UPDATE SET {updates}"
    )


def rollup_params(batch: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One batch of ledger rows folded into one delta per (hour, dimensions), as the server does it
    ('' for a missing dimension, ``requests`` counts rows); positional parameters of rollup_upsert_sql."""
    index = {name: i for i, name in enumerate(LEDGER_COLUMNS)}
    dims = [index[d] for d in ROLLUP_DIMENSIONS]
    measures = [index[m] for m in ROLLUP_MEASURES[1:]]
    created = index["created_at_us"]
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for row in batch:
        key = (row[created] // MICROS_PER_HOUR, *(row[i] or "" for i in dims))
        sums = buckets.setdefault(key, [0] * len(ROLLUP_MEASURES))
        sums[0] += 1
        for j, i in enumerate(measures, start=1):
            sums[j] += row[i] or 0
    return [(*key, *sums) for key, sums in buckets.items()]


def sqlite_executemany(
    path: Path, rows: Sequence[tuple[Any, ...]], batch: int, *, with_rollup: bool
) -> float:
    """Bare ``executemany`` into a fresh, migrated SQLite file, one transaction per batch; seconds."""
    migrated(f"sqlite:///{path}")
    insert = ledger_insert_sql("?")
    upsert = rollup_upsert_sql("?")
    batches = chunks(rows, batch)
    # Rollup deltas are folded before the clock starts: this baseline is the SQL floor, not Python.
    deltas = [rollup_params(b) for b in batches] if with_rollup else []
    conn = sqlite_connect(path)
    try:
        start = time.perf_counter()
        for i, part in enumerate(batches):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, part)
            if with_rollup:
                conn.executemany(upsert, deltas[i])
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        (count,) = conn.execute("SELECT count(*) FROM ledger").fetchone()
        if count != len(rows):
            raise RuntimeError(f"baseline wrote {count} rows, expected {len(rows)}")
        return elapsed
    finally:
        conn.close()


def count_sqlite_ledger(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        (count,) = conn.execute("SELECT count(*) FROM ledger").fetchone()
        return int(count)
    finally:
        conn.close()


def _pg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def pg_ledger_rows(url: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(_pg_conninfo(url)) as conn:
        cols = ", ".join(LEDGER_COLUMNS)
        sql = f"SELECT {cols} FROM ledger WHERE idempotency_key NOT LIKE %s ORDER BY seq"
        return list(conn.execute(sql, (WARMUP_PREFIX + "%",)).fetchall())


def pg_executemany(url: str, rows: Sequence[tuple[Any, ...]], batch: int) -> float:
    """Bare psycopg ``executemany`` (pipelined) into a fresh migrated database; seconds."""
    import psycopg

    migrated(url)
    insert = ledger_insert_sql("%s")
    with psycopg.connect(_pg_conninfo(url)) as conn:
        start = time.perf_counter()
        for part in chunks(rows, batch):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(insert, part)
        return time.perf_counter() - start


def count_pg_ledger(url: str) -> int:
    import psycopg

    with psycopg.connect(_pg_conninfo(url)) as conn:
        row = conn.execute("SELECT count(*) FROM ledger").fetchone()
        return int(row[0]) if row else 0


# --------------------------------------------------------------------------- profile

# Phases of the server's time, by the first rule (in this order) whose frame name appears in a stack.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idempotency look-up (SELECT existing event ids)", ("SqlLedgerStore._existing",)),
    ("rollup upsert (fold + INSERT ... ON CONFLICT DO UPDATE)", ("SqlLedgerStore._add_to_rollups",)),
    ("ledger row -> insert parameters", ("row_to_values", "row_to_tuple")),
    ("commit (WAL write)", ("Transaction.commit",)),
    ("transaction start (BEGIN IMMEDIATE)", ("Connection.begin",)),
    ("organization look-up", ("TenancyService.get_organization",)),
    ("ledger INSERT (incl. SQLAlchemy/driver overhead)", ("SqlLedgerStore.append_in",)),
    ("pricing (Settler.price: quote, charge, uuid4, LedgerRow)", ("Settler.price",)),
    ("fingerprint (canonical JSON + sha256)", ("fingerprint",)),
    ("UsageRecord building (_record)", ("_record",)),
    ("EventIn.model_validate per event", ("BaseModel.model_validate",)),
    ("model_dump(mode=json) per event", ("BaseModel.model_dump",)),
    ("response building (format_nanos, rfc3339, dicts)", ("format_nanos", "rfc3339", "JSONResponse")),
    ("authentication (key look-up)", ("get_principal",)),
    ("other work in post_events / ingest", ("post_events",)),
    ("threadpool hand-off, GIL waits (worker thread)", ("WorkerThread.run",)),
    ("request body: JSON parse (Request.json)", ("Request.json",)),
    ("request body: EventsBatchIn validation", ("request_body_to_args",)),
    ("HTTP server, event loop, routing (uvicorn, Starlette)", ("",)),
)


def _phase(frames: Sequence[str]) -> str:
    names = [f.split(" (", 1)[0] for f in frames]
    for phase, patterns in PHASES:
        if any(p == "" or name == p or name.startswith(p + ".") for p in patterns for name in names):
            return phase
    return PHASES[-1][0]


def summarize_stacks(path: Path) -> dict[str, Any]:
    """py-spy raw output (``thread;frame;frame N`` lines) grouped into PHASES; sample counts."""
    phases: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(":", 1)[-1].strip()
        threads["worker thread" if "worker" in thread.lower() else "event loop thread"] += int(count)
        phases[_phase(frames[1:])] += int(count)
    total = sum(phases.values())
    return {
        "samples": total,
        "threads": dict(threads),
        "phases": [
            {"phase": k, "samples": n, "share": n / total if total else 0.0} for k, n in phases.most_common()
        ],
    }


def profile_sqlite(work: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """One more SQLite API pass (1 client) with py-spy sampling the server; phase summary or None."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("  profile: py-spy not found (.venv/bin/pip install py-spy); skipped")
        return None
    n = min(args.profile_events, args.events)
    batches = encode_batches(make_events(n, prefix=f"prof-{uuid.uuid4().hex[:8]}-", seed=7), args.batch)
    stacks: Path = args.profile_stacks or work / "profile.pyspy.txt"
    stacks.parent.mkdir(parents=True, exist_ok=True)
    with running_server(f"sqlite:///{work / 'profile.db'}", work) as server:
        key = provision(server.base_url)
        warmup = encode_batches(make_events(WARMUP_EVENTS, prefix=WARMUP_PREFIX, seed=1), WARMUP_EVENTS)
        post_all(server.base_url, key, warmup, 1)
        cmd = [spy, "record", "--pid", str(server.pid), "--format", "raw", "--rate", "250", "--threads"]
        recorder = subprocess.Popen(
            [*cmd, "-o", str(stacks)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(1.0)  # py-spy attaches
            if recorder.poll() is not None:
                error = recorder.stderr.read() if recorder.stderr else ""
                print(f"  profile: py-spy failed: {error[-300:]}")
                return None
            seconds, _ = post_all(server.base_url, key, batches, 1)
        finally:
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    recorder.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    recorder.kill()
                    recorder.communicate()
    if not stacks.exists():
        print("  profile: py-spy wrote no output; skipped")
        return None
    summary = summarize_stacks(stacks)
    summary.update(
        events=n,
        events_per_second_under_profiler=n / seconds,
        stacks_file=str(stacks) if args.profile_stacks else None,
    )
    return summary


def print_profile(profile: dict[str, Any]) -> None:
    print(
        f"\nserver profile (py-spy, SQLite, 1 client, {profile['events']} events, "
        f"{profile['events_per_second_under_profiler']:,.0f} events/s while sampled; "
        f"{profile['samples']} samples, {profile['threads']}):"
    )
    for p in profile["phases"]:
        print(f"  {100 * p['share']:5.1f}%  {p['phase']}")


# --------------------------------------------------------------------------- runs


def server_errors(log: str) -> list[str]:
    """Distinct exception lines (``pkg.SomeError: message``) of a server log, shortened."""
    return sorted({line[:200] for line in _EXCEPTION_LINE.findall(log)})


def api_run(database_url: str, log_dir: Path, batches: Sequence[tuple[int, bytes]], clients: int) -> ApiRun:
    """One fresh server on ``database_url``: provision, warm up, send ``batches``."""
    with running_server(database_url, log_dir) as server:
        key = provision(server.base_url)
        warmup = encode_batches(make_events(WARMUP_EVENTS, prefix=WARMUP_PREFIX, seed=1), WARMUP_EVENTS)
        post_all(server.base_url, key, warmup, 1)
        seconds, retries = post_all(server.base_url, key, batches, clients)
    return ApiRun(seconds, retries, server_errors(server.log_tail(10_000)))


def measure_api(
    backend: str, url: str, work: Path, batches: Sequence[tuple[int, bytes]], clients: int, events: int
) -> Measurement:
    """An API run as a Measurement; a failed run (e.g. 5xx after all retries) is recorded, not raised."""
    try:
        result = api_run(url, work, batches, clients)
    except RuntimeError as exc:
        print(f"  {backend} api, {clients} client(s): FAILED: {str(exc)[:300]}", flush=True)
        return Measurement(backend, "api", clients, events, 0.0, failed=str(exc)[:500])
    if backend == "sqlite":
        written = count_sqlite_ledger(Path(url.removeprefix("sqlite:///"))) - WARMUP_EVENTS
    else:
        written = count_pg_ledger(url) - WARMUP_EVENTS
    if written != events:
        raise RuntimeError(f"{backend}: {written} ledger rows written, expected {events}")
    m = Measurement(backend, "api", clients, events, result.seconds, result.retries, result.server_errors)
    note = f" ({m.retries} batches retried after 5xx: {m.server_errors})" if m.retries else ""
    print(f"  {backend} api, {clients} client(s): {m.rate:,.0f} events/s{note}", flush=True)
    return m


def src_digest() -> str:
    """SHA-256 (first 16 hex) over src/meterline/**/*.py: which code these figures were measured on."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "meterline").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def machine() -> dict[str, Any]:
    import sqlalchemy
    import uvicorn

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "uvicorn": uvicorn.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    digest_at_start = src_digest()
    events = make_events(args.events, prefix=f"evt-{uuid.uuid4().hex[:8]}-", seed=42)
    batches = encode_batches(events, args.batch)
    client_counts: list[int] = args.clients
    results: list[Measurement] = []
    info = machine()
    print(
        f"machine: {info['nproc']} CPU ({info['cpu']}), Python {info['python']}, SQLite {info['sqlite']}\n"
        f"{args.events} events in batches of {args.batch}"
        f" ({len(batches[0][1]) / 1024:.0f} KiB per request body)",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp:
        work = Path(tmp)
        # --- SQLite: API
        first_db: Path | None = None
        for clients in client_counts:
            db = work / f"api-{clients}.db"
            results.append(measure_api("sqlite", f"sqlite:///{db}", work, batches, clients, args.events))
            if results[-1].failed is None:
                first_db = first_db or db
        if first_db is None:
            raise RuntimeError("no SQLite API run succeeded; nothing to compare")

        # --- SQLite: bare executemany of the very rows the server wrote (median of --repeats runs)
        rows = sqlite_ledger_rows(first_db)
        for with_rollup in (False, True):
            method = "executemany+rollup" if with_rollup else "executemany"
            runs = []
            for r in range(args.repeats):
                path = work / f"bare-{int(with_rollup)}-{r}.db"
                runs.append(sqlite_executemany(path, rows, args.batch, with_rollup=with_rollup))
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            results.append(Measurement("sqlite", method, 1, len(rows), statistics.median(runs)))
            rates = ", ".join(f"{len(rows) / t:,.0f}" for t in runs)
            print(f"  sqlite  {method}: {results[-1].rate:,.0f} rows/s (median of {rates})", flush=True)

        # --- PostgreSQL
        if not args.skip_postgres:
            from tests.servers import start_postgres

            pg = start_postgres()
            try:
                first_url: str | None = None
                for clients in client_counts:
                    url = pg.create_database(f"bench_api_{clients}")
                    results.append(measure_api("postgresql", url, work, batches, clients, args.events))
                    if results[-1].failed is None:
                        first_url = first_url or url
                if first_url is not None:
                    pg_rows = pg_ledger_rows(first_url)
                    seconds = pg_executemany(pg.create_database("bench_bare"), pg_rows, args.batch)
                    results.append(Measurement("postgresql", "executemany", 1, len(pg_rows), seconds))
                    print(f"  postgresql executemany: {results[-1].rate:,.0f} rows/s", flush=True)
            finally:
                pg.stop()

        profile = profile_sqlite(work, args) if args.profile else None

    def rate(backend: str, method: str, clients: int = 1) -> float:
        for m in results:
            if (m.backend, m.method, m.clients) == (backend, method, clients):
                return m.rate
        return 0.0

    bare = rate("sqlite", "executemany")
    best_api = max(rate("sqlite", "api", c) for c in client_counts)
    return {
        "benchmark": "events_ingest",
        "spec": "SPEC §10: batched POST /v1/events into SQLite >= 50 % of a bare executemany",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": info,
        "events": args.events,
        "batch": args.batch,
        "warmup_events": WARMUP_EVENTS,
        "baseline_repeats": args.repeats,
        "src_digest": digest_at_start,
        "src_changed_during_run": src_digest() != digest_at_start,
        "results": [asdict(m) for m in results],
        "ratio": {
            "api_1_client_vs_executemany": rate("sqlite", "api", 1) / bare if bare else None,
            "api_best_vs_executemany": best_api / bare if bare else None,
            "api_1_client_vs_executemany_rollup": (
                rate("sqlite", "api", 1) / rate("sqlite", "executemany+rollup")
                if rate("sqlite", "executemany+rollup")
                else None
            ),
            "target": TARGET_RATIO,
        },
        "server_profile": profile,
    }


def report(summary: dict[str, Any]) -> None:
    unit = {"api": "events/s", "executemany": "rows/s", "executemany+rollup": "rows/s"}
    print()
    print(f"{'backend':<11} {'method':<20} {'clients':>7} {'rows':>8} {'seconds':>8} {'rate':>12}")
    print("-" * 72)
    for m in summary["results"]:
        if m["failed"]:
            print(f"{m['backend']:<11} {m['method']:<20} {m['clients']:>7} {m['rows']:>8}   FAILED")
            continue
        retried = f"  ({m['retries']} batches retried after 5xx)" if m["retries"] else ""
        print(
            f"{m['backend']:<11} {m['method']:<20} {m['clients']:>7} {m['rows']:>8} "
            f"{m['seconds']:>8.2f} {m['rate']:>10,.0f} {unit[m['method']]}{retried}"
        )
    for error in sorted({e for m in summary["results"] for e in m["server_errors"]}):
        print(f"server error seen: {error}")
    ratio = summary["ratio"]
    one = ratio["api_1_client_vs_executemany"]
    best = ratio["api_best_vs_executemany"]
    verdict = "PASS" if best is not None and best >= TARGET_RATIO else "FAIL"
    print("-" * 72)
    print(
        f"SQLite API / bare executemany: {one:.3f} (1 client), {best:.3f} (best)"
        f"  target >= {TARGET_RATIO}  {verdict}"
    )
    with_rollup = ratio["api_1_client_vs_executemany_rollup"]
    if with_rollup is not None:
        print(f"SQLite API / (executemany + rollup upsert): {with_rollup:.3f}")
    if summary.get("server_profile"):
        print_profile(summary["server_profile"])
    if summary["src_changed_during_run"]:
        print("WARNING: src/meterline changed while the benchmark ran; runs may have measured different code")
    m = summary["machine"]
    print(f"machine: nproc={m['nproc']}, CPU {m['cpu']}, Python {m['python']}, SQLite {m['sqlite']}")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000, help="events per run (default 100000)")
    parser.add_argument("--batch", type=int, default=1000, help="events per request (max 1000)")
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2],
        help="comma-separated concurrent client counts (default 1,2)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="bare executemany runs, median (default 3)")
    parser.add_argument(
        "--profile", action="store_true", help="extra SQLite pass with py-spy on the server; prints phases"
    )
    parser.add_argument(
        "--profile-events", type=int, default=30_000, help="events in the profiled pass (default 30000)"
    )
    parser.add_argument(
        "--profile-stacks", type=Path, help="keep py-spy's raw stacks in this file (default: discarded)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is None and not (1 <= args.batch <= 1000 and args.events >= args.batch):
        parser.error("--batch must be 1..1000 and --events at least --batch")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind: servers stopped and temp dirs removed by the finally blocks


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    summary = run(args)
    report(summary)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
