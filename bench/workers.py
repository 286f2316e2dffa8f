"""Benchmark for ``meterline serve --workers N``: requests/s with 1 and 2 workers, on SQLite (counters in
the database) and on PostgreSQL + Redis (counters in Redis). Target: 2 workers >= 1.6x 1 worker.

Usage::

    .venv/bin/python bench/workers.py [--seconds 6] [--rounds 2] [--skip-postgres] [--client python|wrk]
        [--organizations 1] [--postgres-delay-ms 0] [--upstream canned|fake]

For each deployment, 1 and 2 workers alternate (``--rounds`` times each, order rotating), each on a fresh
database and a fresh ``meterline serve`` (a plan whose block limits are far away, so every request is
decided on real counters: calls, tokens, credits). Two closed loops of 64 keep-alive clients run
against it, ``--seconds`` each after a 1 s ramp:

* ``gateway``: ``POST /v1/chat/completions`` (non-streamed, ``max_tokens`` 16) to one upstream in its
  own process: by default ``bench/canned_upstream.py``, which answers every request with the bytes
  ``meterline.testing.FakeUpstream`` answered it once (~17 µs of CPU a request against the fake's
  130 to 190, which on two vCPUs would take a tenth of the machine from the workers measured);
  ``--upstream fake`` puts the fake itself there;
* ``events``: ``POST /v1/events`` with one event per request (each its own settle).

Every answer must be a 200; the figure is completed requests/s. The load client (``bench/
gateway_client.py``) shares the 2 vCPUs with the servers, so the ceiling for 2 workers is below 2x
here. ``--client wrk`` runs the same loops with ``wrk`` (C, Debian's package: ``apt-get install wrk``;
64 connections, one thread), which leaves the servers more of the machine. ``--organizations N``
sends the requests round N organizations (one key each) instead of one. ``--postgres-delay-ms N``
puts PostgreSQL behind ``bench/delay_proxy.py`` (N ms each way: a database across a network). It prints
a table, then the CPU per request of what shares the machine with the server (the fake upstream, ``wrk``,
PostgreSQL, Redis; the Python client is this process and is not counted), and writes
``bench/results/workers-<date>[-wrk][-<n>-organizations][-pg-<n>ms].json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.canned_upstream import CannedUpstream, record  # noqa: E402
from bench.gateway import Server, cpu_seconds, free_port, machine, request_body  # noqa: E402
from bench.gateway_client import Client, Endpoint  # noqa: E402
from tests.servers import children, listening, port_accepts  # noqa: E402

from meterline.testing.fake_upstream import FakeUpstream  # noqa: E402

Upstream = FakeUpstream | CannedUpstream

HOST = "127.0.0.1"
UPSTREAM_KEY = "sk-bench-workers-0123456789abcdef"
RESULTS = ROOT / "bench" / "results"
CLIENTS = 64
FAR = 10**12  # limits nobody reaches: every request is decided on them all the same
PLAN = (
    "[plans.bench]\n"
    f"rpm = {FAR}\ntpm = {FAR}\ndaily_tokens = {FAR}\nmonthly_tokens = {FAR}\n"
    f'daily_calls = {FAR}\nmonthly_calls = {FAR}\nmonthly_credits = {FAR}\noverage = "block"\n'
)


@contextmanager
def meterline(
    database_url: str,
    redis_url: str | None,
    workers: int,
    fake: Upstream,
    counters: str = "auto",
    organizations: int = 1,
) -> Iterator[str]:
    """A ``meterline serve --workers N`` with ``organizations`` organizations, each with a workspace and
    a key; yields "port keys pid" (the keys joined by commas)."""
    work = Path(tempfile.mkdtemp(prefix="meterline-workers-"))
    admin_key = secrets.token_hex(16)
    config = work / "meterline.toml"
    config.write_text(
        f'database_url = "{database_url}"\n'
        + (f'redis_url = "{redis_url}"\n' if redis_url else "")
        + f'counters = "{counters}"\nadmin_key = "{admin_key}"\n'
        + f'signing_key_file = "{work / "key.json"}"\naccess_log = "off"\n\n'
        f'[[upstreams]]\nname = "fake"\nprovider = "openai"\nbase_url = "{fake.url}"\n'
        f'api_key = "{UPSTREAM_KEY}"\nmodels = ["*"]\n\n' + PLAN
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    command = [
        str(ROOT / ".venv" / "bin" / "meterline"),
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    server = Server("meterline", command, env, work, port)
    try:
        server.wait_ready("/readyz")
        all_serving(port, workers)
        base = f"http://{HOST}:{port}"
        admin = {"Authorization": f"Bearer {admin_key}"}
        with httpx.Client(base_url=base, headers=admin, timeout=30) as http:
            keys = []
            for n in range(organizations):
                org = http.post(
                    "/v1/admin/organizations", json={"name": f"Bench {n}", "plan": "bench"}
                ).json()
                ws = http.post(
                    "/v1/admin/workspaces", json={"organization_id": org["id"], "name": "W"}
                ).json()
                keys.append(
                    http.post("/v1/admin/keys", json={"workspace_id": ws["id"], "name": "K"}).json()["key"]
                )
        yield f"{port} {','.join(keys)} {server.pid}"
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def all_serving(port: int, workers: int) -> None:
    """Wait until every worker listens and answers. ``/readyz`` answered once is one worker; a load client
    keeps the connections it opens first, and a worker still starting then would be left out of the whole
    run (a 2-worker gateway round once ran at one worker's rate, the machine 58 % busy)."""
    deadline = time.monotonic() + 60
    while listening(port) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{listening(port)} of {workers} workers listen on port {port}")
        time.sleep(0.05)
    # Fresh connections, spread by the kernel over the workers' sockets: each is answered once its
    # worker serves.
    for _ in range(16 * workers):
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=60) as http:
            http.get("/readyz").raise_for_status()


async def closed_loop(
    port: int, keys: Sequence[str], path: str, bodies: Sequence[bytes], seconds: float
) -> float:
    """Completed requests/s of ``CLIENTS`` keep-alive clients, after a 1 s ramp; every answer a 200.
    Client i sends with key i modulo the keys (one organization each)."""
    endpoints = [Endpoint(HOST, port, path, {"Authorization": f"Bearer {key}"}) for key in keys]
    clients: list[Client] = list(
        await asyncio.gather(*(endpoints[i % len(endpoints)].connect() for i in range(CLIENTS)))
    )
    start = time.perf_counter()
    measure_from, deadline = start + 1.0, start + 1.0 + seconds
    done = 0
    failures: list[str] = []

    async def worker(client: Client, index: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            endpoint = endpoints[index % len(endpoints)]
            result = await client.send(endpoint.request(bodies[(index * 7919 + n) % len(bodies)]))
            if result.status != 200:
                failures.append(f"{result.status}: {b''.join(result.body)[:200]!r}")
            elif result.start >= measure_from:
                done += 1

    try:
        await asyncio.gather(*(worker(c, i) for i, c in enumerate(clients)))
    finally:
        for client in clients:
            client.close()
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    return done / seconds


# wrk's per-request script for events: each request its own event id (each a settle, never a duplicate).
# Requests go round the keys (KEYS: a Lua list), one organization each.
_WRK_EVENTS = """
local keys, n = KEYS, 0
request = function()
  n = n + 1
  local headers = {["Content-Type"] = "application/json",
                   ["Authorization"] = "Bearer " .. keys[n % #keys + 1]}
  return wrk.format("POST", nil, headers, '{"events":[{"id":"RUN-' .. n .. '","model":"gpt-4o-mini",'
    .. '"prompt_tokens":100,"completion_tokens":20}]}')
end
"""
_WRK_BODY = """
local keys, n, body = KEYS, 0, BODY
request = function()
  n = n + 1
  local headers = {["Content-Type"] = "application/json",
                   ["Authorization"] = "Bearer " .. keys[n % #keys + 1]}
  return wrk.format("POST", nil, headers, body)
end
"""


def wrk_loop(port: int, keys: Sequence[str], path: str, body: bytes | None, seconds: float) -> float:
    """Completed requests/s of ``CLIENTS`` wrk connections (``body`` None: one new event per request)."""
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("--client wrk needs wrk (Debian: apt-get install wrk)")
    if body is None:
        script = _WRK_EVENTS.replace("RUN", secrets.token_hex(4))
    else:
        script = _WRK_BODY.replace("BODY", json.dumps(body.decode()))
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as file:
        file.write(script.replace("KEYS", "{" + ", ".join(json.dumps(k) for k in keys) + "}"))
        file.flush()
        out = subprocess.run(
            [
                binary,
                "-t1",
                f"-c{CLIENTS}",
                f"-d{seconds:.0f}s",
                "-s",
                file.name,
                f"http://{HOST}:{port}{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if failed:
        raise RuntimeError(f"{failed.group(1)} failed requests:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return float(found.group(1))


def event_bodies(count: int) -> list[bytes]:
    """One event per request, each its own id (so each is a settle, never a duplicate)."""
    run = secrets.token_hex(4)
    return [
        json.dumps(
            {
                "events": [
                    {
                        "id": f"{run}-{i}",
                        "model": "gpt-4o-mini",
                        "prompt_tokens": 100,
                        "completion_tokens": 20,
                    }
                ]
            }
        ).encode()
        for i in range(count)
    ]


def measure(
    database_url: str,
    redis_url: str | None,
    workers: int,
    fake: Upstream,
    seconds: float,
    counters: str,
    client: str = "python",
    organizations: int = 1,
) -> dict[str, float]:
    with meterline(database_url, redis_url, workers, fake, counters, organizations) as handle:
        port_text, key_text, pid_text = handle.split(" ")
        keys = key_text.split(",")
        port, pid = int(port_text), int(pid_text)
        figures: dict[str, float] = {}
        for load, path, bodies in (
            ("gateway", "/v1/chat/completions", [request_body(stream=False, max_tokens=16)]),
            ("events", "/v1/events", event_bodies(400_000 if client == "python" else 1)),
        ):
            before, busy_before = server_cpu(pid), machine_busy()
            others_before = others_cpu(fake)
            started = time.perf_counter()
            if client == "wrk":
                figures[load] = wrk_loop(port, keys, path, bodies[0] if load == "gateway" else None, seconds)
            else:
                figures[load] = uvloop.run(closed_loop(port, keys, path, bodies, seconds))
            elapsed = time.perf_counter() - started
            busy, total = (a - b for a, b in zip(machine_busy(), busy_before, strict=True))
            # How busy the whole machine was (servers, fake upstream, load client): 1.0 = every core.
            figures[f"{load}_machine_busy"] = busy / total
            # Server CPU (every worker) per request, over the whole loop (its ramp included).
            requests = figures[load] * elapsed
            figures[f"{load}_cpu_us"] = (server_cpu(pid) - before) / requests * 1e6
            # What shares the cores with it: the fake upstream, the load client (``wrk``; the Python
            # client is this process), PostgreSQL and Redis (their processes now: sessions that ended
            # during the loop are not counted).
            for part, seconds_now in others_cpu(fake).items():
                figures[f"{load}_{part}_cpu_us"] = (seconds_now - others_before[part]) / requests * 1e6
    return figures


def others_cpu(fake: Upstream) -> dict[str, float]:
    """CPU seconds so far of what runs beside the server: the fake upstream, the load client's
    subprocesses (``wrk``, counted once each has ended), PostgreSQL's and Redis' processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ended children: wrk (and earlier servers)
    named = {"postgres": 0.0, "redis-server": 0.0}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in named:
                named[comm] += cpu_seconds(int(entry.name))
    return {
        "upstream": cpu_seconds(fake.process.pid),
        "client": usage.ru_utime + usage.ru_stime,
        "postgres": named["postgres"],
        "redis": named["redis-server"],
    }


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of every core so far (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def server_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the workers), so far."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


@contextmanager
def upstream(kind: str) -> Iterator[Upstream]:
    """The gateway's upstream: the fake, or the canned server answering what the fake answered once."""
    with FakeUpstream.start(api_key=UPSTREAM_KEY, history=16) as fake:
        if kind == "fake":
            yield fake
            return
        answer = record(fake.url, UPSTREAM_KEY, request_body(stream=False, max_tokens=16))
    scratch = Path(tempfile.mkdtemp(prefix="meterline-canned-"))
    try:
        with CannedUpstream.start(free_port(), answer, UPSTREAM_KEY, scratch) as canned:
            yield canned
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per loop")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each worker count, alternated")
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--counters", default="auto", choices=("auto", "database"), help="database: for 1 worker too"
    )
    parser.add_argument(
        "--client", default="python", choices=("python", "wrk"), help="the load generator (wrk: C, lighter)"
    )
    parser.add_argument(
        "--organizations",
        type=int,
        default=1,
        help="requests go round this many organizations (one key each)",
    )
    parser.add_argument(
        "--postgres-delay-ms",
        type=int,
        default=0,
        help="PostgreSQL behind a proxy delaying each direction this long (whole ms)",
    )
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL + Redis only")
    parser.add_argument(
        "--upstream",
        default="canned",
        choices=("canned", "fake"),
        help="the gateway's upstream: one recorded answer (bench/canned_upstream.py), or the fake itself",
    )
    parser.add_argument("--output", type=Path, help="write the results here (default: bench/results/...)")
    args = parser.parse_args(argv)
    deployments: list[tuple[str, Any]] = [] if args.skip_sqlite else [("sqlite", None)]
    stack: list[Any] = []
    proxy: subprocess.Popen[bytes] | None = None
    if not args.skip_postgres:
        from tests.servers import start_postgres, start_redis

        pg, rd = start_postgres(), start_redis()
        stack += [pg, rd]
        deployments.append(("postgresql+redis", (pg, rd)))
        if args.postgres_delay_ms:
            proxy_port = free_port()
            proxy = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "delay_proxy.py"), str(proxy_port), str(pg.port),
                 str(args.postgres_delay_ms)]
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while not port_accepts(proxy_port):
                if time.monotonic() > deadline:
                    raise RuntimeError("bench/delay_proxy.py did not start listening")
                time.sleep(0.05)
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    try:
        with upstream(args.upstream) as fake:
            for name, servers in deployments:
                results[name] = {1: [], 2: []}
                for rnd in range(args.rounds):
                    for workers in (1, 2) if rnd % 2 == 0 else (2, 1):
                        if servers is None:
                            scratch = Path(tempfile.mkdtemp(prefix="meterline-workers-db-"))
                            url, redis_url = f"sqlite:///{scratch / 'm.db'}", None
                        else:
                            pg, rd = servers
                            url = pg.create_database(f"workers_{rnd}_{workers}_{secrets.token_hex(3)}")
                            if proxy is not None:
                                url = url.replace(f":{pg.port}/", f":{proxy_port}/")
                            redis_url = rd.url
                            import redis as redis_client

                            flushed = redis_client.Redis.from_url(redis_url)
                            flushed.flushall()
                            flushed.close()
                        figures = measure(
                            url,
                            redis_url,
                            workers,
                            fake,
                            args.seconds,
                            args.counters,
                            args.client,
                            args.organizations,
                        )
                        results[name][workers].append(figures)
                        gateway, events = figures["gateway"], figures["events"]
                        print(
                            f"  {name:17} {workers} worker(s), round {rnd + 1}: gateway {gateway:,.0f}/s "
                            f"({figures['gateway_cpu_us']:,.0f} µs CPU, machine "
                            f"{figures['gateway_machine_busy']:.0%} busy), events {events:,.0f}/s "
                            f"({figures['events_cpu_us']:,.0f} µs CPU, machine "
                            f"{figures['events_machine_busy']:.0%} busy)",
                            flush=True,
                        )
                        if servers is None:
                            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if proxy is not None:
            proxy.kill()
        for server in stack:
            server.stop()
    summary: dict[str, Any] = {
        "machine": machine(),
        "at": datetime.now(UTC).isoformat(),
        "seconds": args.seconds,
        "client": args.client,
        "organizations": args.organizations,
        "postgres_delay_ms": args.postgres_delay_ms,
        "upstream": args.upstream,
    }
    rows = []
    for name, by_workers in results.items():
        for load in ("gateway", "events"):
            one = statistics.median(r[load] for r in by_workers[1])
            two = statistics.median(r[load] for r in by_workers[2])
            summary[f"{name} {load}"] = {"1": one, "2": two, "ratio": two / one}
            cpu_one = statistics.median(r[f"{load}_cpu_us"] for r in by_workers[1])
            cpu_two = statistics.median(r[f"{load}_cpu_us"] for r in by_workers[2])
            summary[f"{name} {load}"] |= {"cpu_us_1": cpu_one, "cpu_us_2": cpu_two}
            rows.append(
                f"| {name} | {load} | {one:,.0f} | {two:,.0f} | x{two / one:.2f} "
                f"| {cpu_one:,.0f} | {cpu_two:,.0f} |"
            )
    print(
        "\n| deployment | load | 1 worker (req/s) | 2 workers (req/s) | 2 / 1 "
        "| CPU/req, 1 (µs) | CPU/req, 2 (µs) |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    print("\n".join(rows))
    print(
        "\nCPU per request beside the server (µs, medians; 1 worker → 2): the fake upstream, the load "
        "client, PostgreSQL, Redis\n\n| deployment | load | upstream | client | PostgreSQL | Redis |"
    )
    print("|---|---|--:|--:|--:|--:|")
    for name, by_workers in results.items():
        for load in ("gateway", "events"):
            cells = []
            for part in ("upstream", "client", "postgres", "redis"):
                one, two = (
                    statistics.median(r.get(f"{load}_{part}_cpu_us", 0.0) for r in by_workers[count])
                    for count in (1, 2)
                )
                cells.append(f"{one:,.0f} → {two:,.0f}")
            print(f"| {name} | {load} | {' | '.join(cells)} |")
    RESULTS.mkdir(exist_ok=True)
    suffix = (
        ("-wrk" if args.client == "wrk" else "")
        + (f"-{args.organizations}-organizations" if args.organizations > 1 else "")
        + (f"-pg-{args.postgres_delay_ms}ms" if args.postgres_delay_ms else "")
    )
    out = args.output or RESULTS / f"workers-{datetime.now(UTC).date()}{suffix}.json"
    out.write_text(
        json.dumps(
            {"runs": {k: {str(w): v for w, v in r.items()} for k, r in results.items()}, **summary}, indent=2
        )
    )
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
