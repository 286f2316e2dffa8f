"""Quota races against real `meterline serve` processes over real HTTP: hundreds of concurrent requests
(two-phase reservations and plain events) on one block limit must admit exactly what the limit allows,
refuse the rest with a 429 ``quota_exceeded`` envelope, never answer 5xx, and leave the ledger, the
usage summary and the limit counters (settled + reserved) in agreement once every request is done.

Deployments: SQLite + in-process counters (one process), PostgreSQL + in-process counters (one
process), PostgreSQL + Redis with two processes sharing both (requests spread across the processes, and
half the reservations settled on the process that did not make them), and ``serve --workers N`` (N
processes behind one port): 2 and 4 workers on SQLite (counters in the database), on PostgreSQL + Redis
and on PostgreSQL + Redis Cluster, with chat completions through the gateway (to the fake upstream).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import assert_envelope
from meterline.testing.fake_upstream import FakeUpstream
from servers import MeterlineServer as Server

pytestmark = pytest.mark.slow

ADMIN_KEY = "ml_admin_races_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MODEL = "race-model"
OPEN = {
    "daily_tokens": -1,
    "monthly_tokens": -1,
    "daily_calls": -1,
    "monthly_calls": -1,
    "rpm": -1,
    "tpm": -1,
    "monthly_credits": -1,
}
REQUESTS = 240
THREADS = 64
CALLS_LIMIT = 60
TOKENS_LIMIT = 1500
DEPLOYMENTS = [
    "sqlite-memory",
    "postgres-memory",
    "postgres-redis-2proc",
    "sqlite-2workers",
    "postgres-4workers",
    "postgres-redis-2workers",
]


# -- real server processes ----------------------------------------------------------------------------
def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(
    path: Path, settings: dict[str, Any], plans: dict[str, dict[str, Any]], extra: str = ""
) -> Path:
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    for name, limits in plans.items():
        lines += ["", f"[plans.{name}]", *(f"{k} = {toml_value(v)}" for k, v in limits.items())]
    # Per million tokens: every row has a cost, so the money path runs under the race too.
    lines += ["", f'[prices."{MODEL}"]', 'input = "1.50"', 'output = "6.00"']
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@dataclass
class Deployment:
    name: str
    bases: list[str]
    servers: list[Server]


@pytest.fixture(params=DEPLOYMENTS)
def deploy(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[dict[str, Any]], Deployment]]:
    """``deploy(plan_limits)``: the deployment of this parameter, with plan ``race`` set to the limits."""
    with deployments(request, tmp_path, request.param) as start:
        yield start


@contextmanager
def deployments(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, extra: str = ""
) -> Iterator[Callable[[dict[str, Any]], Deployment]]:
    """``kind`` is ``<database>[-<counters>]-<N>proc`` or ``-<N>workers``; ``extra`` is more config."""
    servers: list[Server] = []
    dropped: list[Callable[[], None]] = []

    def start(limits: dict[str, Any]) -> Deployment:
        settings: dict[str, Any] = {
            "admin_key": ADMIN_KEY,
            "signing_key_file": str(tmp_path / "signing-key.json"),
        }
        processes, args = 1, ()
        if kind.endswith("workers"):
            # One `meterline serve --workers N`: N processes behind one port, counters in the database
            # (or in Redis, when it is configured).
            args = ("--workers", kind.rsplit("-", 1)[1].removesuffix("workers"))
        if kind.startswith("sqlite"):
            settings["database_url"] = f"sqlite:///{tmp_path / 'meterline.db'}"
        else:
            pg = request.getfixturevalue("pg_server")
            name = f"races_{uuid.uuid4().hex[:12]}"
            settings["database_url"] = pg.create_database(name)
            dropped.append(lambda: pg.drop_database(name))
            # "-module": a Redis (Cluster) with Meterline's module loaded
            module = "-module-" in kind
            if kind.startswith("postgres-redis"):
                settings["redis_url"] = request.getfixturevalue(
                    "redis_module_url_clean" if module else "redis_url_clean"
                )
            if kind.startswith("postgres-cluster"):
                settings["redis_url"] = request.getfixturevalue(
                    "redis_cluster_module_url_clean" if module else "redis_cluster_url_clean"
                )
            if kind == "postgres-redis-2proc":
                processes = 2
        config = write_config(tmp_path / "meterline.toml", settings, {"race": {**OPEN, **limits}}, extra)
        # One after the other: the first migrates the database and writes the signing key.
        for index in range(processes):
            servers.append(Server(config, tmp_path, f"server-{index}", args))
            servers[-1].start()
        return Deployment(kind, [s.base for s in servers], servers)

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        for drop in dropped:
            drop()


# -- HTTP ---------------------------------------------------------------------------------------------
def make_tenant(base: str) -> dict[str, str]:
    with httpx.Client(base_url=base, headers=ADMIN, timeout=30) as admin:
        org = admin.post("/v1/admin/organizations", json={"name": "Racers", "plan": "race"})
        assert org.status_code == 201, org.text
        ws = admin.post("/v1/admin/workspaces", json={"organization_id": org.json()["id"], "name": "Main"})
        assert ws.status_code == 201, ws.text
        key = admin.post("/v1/admin/keys", json={"workspace_id": ws.json()["id"], "name": "Racer"})
        assert key.status_code == 201, key.text
    return {"Authorization": f"Bearer {key.json()['key']}"}


@dataclass
class Job:
    index: int
    kind: str  # "reservation", "event" or "gateway" (a chat completion to the fake upstream)
    base: str  # where the reservation (or event) goes
    settle_base: str  # where the reservation is settled
    prompt: int
    completion: int
    actual_completion: int  # settled with this (estimate's prompt tokens kept)


@dataclass
class Outcome:
    job: Job
    first: httpx.Response
    settle: httpx.Response | None = None

    @property
    def admitted(self) -> bool:
        return self.first.status_code == (201 if self.job.kind == "reservation" else 200)

    @property
    def actual_tokens(self) -> int:
        if self.job.kind == "gateway":
            tokens: int = self.first.json()["usage"]["total_tokens"]
            return tokens
        if self.job.kind == "event":
            return self.job.prompt + self.job.completion
        return self.job.prompt + self.job.actual_completion


def plan_jobs(
    bases: Sequence[str], rng: random.Random, count: int = REQUESTS, kinds: Sequence[str] = ()
) -> list[Job]:
    """Three reservations to an event by default; ``kinds`` in turn when given."""
    jobs = []
    for index in range(count):
        tokens = rng.randint(1, 50)
        prompt = tokens // 2
        completion = tokens - prompt  # >= 1, so the actual can be smaller
        # With two processes: spread over both, and about half the reservations are settled by the
        # process that did not make them.
        base, settle_base = rng.choice(bases), rng.choice(bases)
        kind = kinds[index % len(kinds)] if kinds else "event" if index % 4 == 3 else "reservation"
        jobs.append(Job(index, kind, base, settle_base, prompt, completion, rng.randint(0, completion - 1)))
    return jobs


def run_jobs(jobs: Sequence[Job], headers: dict[str, str], threads: int = THREADS) -> list[Outcome]:
    """Every job at once, from ``threads`` threads (each with its own keep-alive httpx client)."""
    local = threading.local()
    clients: list[httpx.Client] = []
    clients_lock = threading.Lock()
    go = threading.Event()

    def client() -> httpx.Client:
        found: httpx.Client | None = getattr(local, "client", None)
        if found is None:
            found = local.client = httpx.Client(headers=headers, timeout=60)
            with clients_lock:
                clients.append(found)
        return found

    def run(job: Job) -> Outcome:
        http = client()
        go.wait()
        if job.kind == "event":
            event = {
                "id": f"evt-{job.index}-{uuid.uuid4().hex[:8]}",
                "model": MODEL,
                "prompt_tokens": job.prompt,
                "completion_tokens": job.completion,
            }
            return Outcome(job, http.post(f"{job.base}/v1/events", json={"events": [event]}))
        if job.kind == "gateway":
            chat = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "race " * job.prompt}],
                "max_tokens": job.completion,
            }
            return Outcome(job, http.post(f"{job.base}/v1/chat/completions", json=chat))
        held = http.post(
            f"{job.base}/v1/reservations",
            json={"model": MODEL, "prompt_tokens": job.prompt, "completion_tokens": job.completion},
        )
        outcome = Outcome(job, held)
        if held.status_code == 201:
            outcome.settle = http.post(
                f"{job.settle_base}/v1/reservations/{held.json()['id']}/settle",
                json={"completion_tokens": job.actual_completion},
            )
        return outcome

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(run, job) for job in jobs]
            time.sleep(0.2)  # let the first wave of threads line up behind `go`
            go.set()
            return [future.result(timeout=120) for future in futures]
    finally:
        go.set()
        for each in clients:
            each.close()


def check_answers(outcomes: Sequence[Outcome], limit_name: str) -> list[Outcome]:
    """Every answer is an admission (then settled once) or a 429 quota_exceeded envelope; no 5xx."""
    statuses = sorted({(o.job.kind, o.first.status_code) for o in outcomes})
    assert all(o.first.status_code < 500 for o in outcomes), statuses
    admitted = []
    for outcome in outcomes:
        first = outcome.first
        if outcome.admitted:
            admitted.append(outcome)
            if outcome.job.kind == "gateway":
                assert first.json()["choices"], first.text
                continue
            if outcome.job.kind == "event":
                body = first.json()
                assert (body["accepted"], body["duplicates"]) == (1, 0), body
                continue
            settle = outcome.settle
            assert settle is not None
            assert settle.status_code == 200, settle.text
            settled = settle.json()
            assert settled["id"] == first.json()["id"]
            assert settled["status"] == "settled"
            assert (settled["duplicate"], settled["recovered"]) == (False, False), settled
            assert settled["total_tokens"] == outcome.actual_tokens, (settled, outcome.job)
            continue
        error = assert_envelope(first, 429, "quota_exceeded")
        assert error["limit"]["name"] == limit_name, error
        assert int(first.headers["retry-after"]) >= 1
        assert outcome.settle is None
    return admitted


def ledger_rows(base: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        params = {"limit": 1000, "offset": len(rows)}
        page = httpx.get(f"{base}/v1/usage/ledger", params=params, headers=headers, timeout=30)
        assert page.status_code == 200, page.text
        body = page.json()
        rows += body["data"]
        if len(rows) >= body["total_count"] or not body["data"]:
            assert len(rows) == body["total_count"]
            return rows


def usage_of(base: str, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/usage", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def limit_named(usage: dict[str, Any], name: str) -> dict[str, Any]:
    found = [limit for limit in usage["limits"] if limit["name"] == name]
    assert len(found) == 1, usage["limits"]
    return found[0]


def check_no_server_errors(deployment: Deployment) -> None:
    for server in deployment.servers:
        text = server.log_path.read_text(errors="replace")
        assert "Traceback" not in text, server.log()


# -- the races ----------------------------------------------------------------------------------------
def test_a_daily_calls_limit_admits_exactly_its_maximum_under_concurrency(
    deploy: Callable[[dict[str, Any]], Deployment],
) -> None:
    deployment = deploy({"daily_calls": CALLS_LIMIT, "overage": "block"})
    headers = make_tenant(deployment.bases[0])
    jobs = plan_jobs(deployment.bases, random.Random(1))
    assert len(jobs) >= 200
    assert sum(j.kind == "event" for j in jobs) >= 50

    outcomes = run_jobs(jobs, headers)

    admitted = check_answers(outcomes, "daily_calls")
    assert len(admitted) == CALLS_LIMIT, sorted({(o.job.kind, o.first.status_code) for o in outcomes})
    assert len(outcomes) - len(admitted) == REQUESTS - CALLS_LIMIT
    reservation_ids = {o.first.json()["id"] for o in admitted if o.job.kind == "reservation"}
    expected_tokens = sum(o.actual_tokens for o in admitted)

    for base in deployment.bases:  # every process sees the same ledger and the same counters
        rows = ledger_rows(base, headers)
        assert len(rows) == CALLS_LIMIT
        assert len({r["id"] for r in rows}) == CALLS_LIMIT
        assert reservation_ids <= {r["id"] for r in rows}
        assert sum(r["total_tokens"] for r in rows) == expected_tokens
        assert not any((r["metadata"] or {}).get("meterline.recovered") for r in rows)
        usage = usage_of(base, headers)
        assert usage["daily"]["calls"]["usage"] == CALLS_LIMIT
        assert usage["daily"]["tokens"]["usage"] == expected_tokens
        calls = limit_named(usage, "daily_calls")
        # `used` is settled + reserved: every hold is gone, only the settled calls remain.
        assert (calls["max"], calls["used"], calls["remaining"]) == (CALLS_LIMIT, CALLS_LIMIT, 0), calls
        # The limit stays shut on every process.
        again = httpx.post(f"{base}/v1/reservations", json={"prompt_tokens": 1}, headers=headers, timeout=30)
        assert_envelope(again, 429, "quota_exceeded")
    reconciled = httpx.get(f"{deployment.bases[0]}/v1/admin/reconcile", headers=ADMIN, timeout=60).json()
    assert reconciled["ok"], reconciled
    check_no_server_errors(deployment)


def test_a_daily_tokens_limit_is_never_exceeded_and_counters_match_the_ledger(
    deploy: Callable[[dict[str, Any]], Deployment],
) -> None:
    deployment = deploy({"daily_tokens": TOKENS_LIMIT, "overage": "block"})
    headers = make_tenant(deployment.bases[0])
    jobs = plan_jobs(deployment.bases, random.Random(2))
    # Far more than the limit is asked for: the limit is reached while requests keep coming.
    assert sum(j.prompt + j.completion for j in jobs) > 3 * TOKENS_LIMIT

    outcomes = run_jobs(jobs, headers)

    admitted = check_answers(outcomes, "daily_tokens")
    assert len(admitted) < len(outcomes), "the token limit was never reached"
    settled_tokens = sum(o.actual_tokens for o in admitted)
    assert settled_tokens <= TOKENS_LIMIT

    for base in deployment.bases:
        rows = ledger_rows(base, headers)
        assert len(rows) == len(admitted)
        ledger_tokens = sum(r["total_tokens"] for r in rows)
        assert ledger_tokens == settled_tokens
        usage = usage_of(base, headers)
        assert usage["daily"]["tokens"]["usage"] == ledger_tokens
        assert usage["daily"]["calls"]["usage"] == len(admitted)
        tokens = limit_named(usage, "daily_tokens")
        assert tokens["max"] == TOKENS_LIMIT
        assert tokens["used"] == ledger_tokens, tokens  # no hold left behind
        assert tokens["remaining"] == TOKENS_LIMIT - ledger_tokens
    check_no_server_errors(deployment)


# -- serve --workers: N processes behind one port -----------------------------------------------------
WORKER_DEPLOYMENTS = [
    "sqlite-2workers",
    "sqlite-4workers",
    "postgres-redis-2workers",
    "postgres-redis-4workers",
    "postgres-cluster-2workers",
    "postgres-cluster-4workers",
    "postgres-redis-module-2workers",
    "postgres-cluster-module-4workers",
]
WORKER_REQUESTS = 500
WORKER_THREADS = 100
WORKER_CALLS_LIMIT = 150
UPSTREAM_KEY = "sk-upstream-races-0123456789"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.mark.parametrize("kind", WORKER_DEPLOYMENTS)
def test_workers_admit_exactly_the_limit_over_the_gateway_and_events(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream, kind: str
) -> None:
    """500 requests at once, chat completions through the gateway and events, spread by the kernel over
    the workers of one port: a block limit admits exactly its maximum, on SQLite (counters in the
    database), PostgreSQL + Redis and PostgreSQL + Redis Cluster (with Meterline's module and without)."""
    extra = (
        f'\n[[upstreams]]\nname = "fake"\nprovider = "openai"\nbase_url = "{upstream.url}"\n'
        f'api_key = "{UPSTREAM_KEY}"\nmodels = ["*"]\n'
    )
    with deployments(request, tmp_path, kind, extra) as start:
        deployment = start({"daily_calls": WORKER_CALLS_LIMIT, "overage": "block"})
        (base,) = deployment.bases
        headers = make_tenant(base)
        jobs = plan_jobs([base], random.Random(3), WORKER_REQUESTS, kinds=("gateway", "event"))

        outcomes = run_jobs(jobs, headers, WORKER_THREADS)

        admitted = check_answers(outcomes, "daily_calls")
        statuses = sorted({(o.job.kind, o.first.status_code) for o in outcomes})
        assert len(admitted) == WORKER_CALLS_LIMIT, statuses
        assert {o.job.kind for o in admitted} == {"gateway", "event"}
        rows = ledger_rows(base, headers)
        assert len(rows) == WORKER_CALLS_LIMIT
        tokens = sum(o.actual_tokens for o in admitted)
        assert sum(r["total_tokens"] for r in rows) == tokens
        for _ in range(4):  # each read may be answered by another worker: every one agrees
            usage = usage_of(base, headers)
            assert (usage["daily"]["calls"]["usage"], usage["daily"]["tokens"]["usage"]) == (
                WORKER_CALLS_LIMIT,
                tokens,
            )
            calls = limit_named(usage, "daily_calls")
            assert (calls["used"], calls["remaining"]) == (WORKER_CALLS_LIMIT, 0), calls
        reconciled = httpx.get(f"{base}/v1/admin/reconcile", headers=ADMIN, timeout=60).json()
        assert reconciled["ok"], reconciled
        check_no_server_errors(deployment)
        logs = "".join(server.log_path.read_text(errors="replace") for server in deployment.servers)
        if "-module-" in kind:  # every worker decided with the module's command, never the script
            assert "with Meterline's Redis module\n" in logs
            assert "counting with the script" not in logs
        elif kind.startswith(("postgres-redis", "postgres-cluster")):  # the start-up line says how to have it
            assert (
                "with the script (no Meterline module loaded there: meterline redis-module builds one)"
                in logs
            )
