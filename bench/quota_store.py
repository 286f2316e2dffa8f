"""Benchmark of the quota counter stores: reserve + settle pairs per second, and Redis round trips per
decision as Redis itself counts them.

Usage::

    .venv/bin/python bench/quota_store.py [--seconds 4] [--repeat 3] [--threads 1,8] [--skip-redis-benchmark]
        [--skip-cluster] [--skip-memory] [--skip-spread] [--pin] [--output FILE]

Each decision is what one API request costs the quota path: ``reserve`` of one hold with 6 lines (org
daily tokens, org monthly tokens, org requests-per-minute and tokens-per-minute rolling windows, key
daily calls, monthly credits in nanos), then ``settle`` with the actual amounts. All requests hit the
same organization (the hottest keys: the worst case for contention). The stores:

* ``MemoryCounterStore`` (in process, one lock);
* ``RedisCounterStore`` against a fresh ``redis-server`` started here (tests/servers.py), loopback.

For Redis, ``INFO`` is read before and after each run: ``total_commands_processed`` counts every command,
including those a script runs inside Redis, and ``commandstats`` tells the script calls (``EVALSHA``)
apart, so "round trips" = commands the client sent, "commands" = everything Redis executed.
``redis-benchmark`` then runs against the same server for scale (PING/SET/INCR with 1 and 50 clients),
and our script itself runs back to back (20,000 decisions pipelined: what one Redis serves when it is
the bottleneck, and its Redis time per call).

Prints a table and writes ``bench/results/quota_store.json`` (or ``--output``). Nothing is left running.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import redis

from machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests/servers.py (throwaway redis-server)

from meterline.quotas.counters import CounterStore, Hold, Line, Seed, Settlement  # noqa: E402
from meterline.quotas.memory import MemoryCounterStore  # noqa: E402
from meterline.storage.redis_counters import RedisCounterStore  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quota_store.json"
LEASE_US = 300_000_000
# What the client itself may send; every other command in commandstats ran inside the script.
CLIENT_COMMANDS = {"evalsha", "eval", "script|load", "client|setinfo", "hello", "ping", "select", "auth"}
CLIENT_COMMANDS.add("meterline.counters")  # the module's call (--module)
# A store call: the script's, or the module's (``--module``), whose Redis time is counted the same way.
CALLS = ("evalsha", "meterline.counters")


# -- the workload ---------------------------------------------------------------------------------


def _day_end(now: datetime) -> int:
    return int(datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp()) + 86_400


def _month_end(now: datetime) -> int:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def request_lines(org: str) -> tuple[Line, ...]:
    """One request's limits; maxima high enough that every decision is admitted."""
    now = datetime.now(UTC)
    day, month = _day_end(now), _month_end(now)
    return (
        Line(f"{org}|o|tokens|day", 1_500, 10**12, True, "fixed", day),
        Line(f"{org}|o|tokens|month", 1_500, 10**13, True, "fixed", month),
        Line(f"{org}|o|rpm", 1, 10**9, True, "rolling", 0),
        Line(f"{org}|o|tpm", 1_500, 10**12, True, "rolling", 0),
        Line(f"{org}|k|calls|day", 1, 10**9, True, "fixed", day),
        Line(f"{org}|o|credits|month", 2_500_000, 10**18, False, "fixed", month),  # nanos, overage allowed
    )


ACTUAL = (1_200, 1_200, 1, 1_200, 1, 2_000_000)


def seeds_for(lines: tuple[Line, ...]) -> list[Seed]:
    return [Seed(line.key, line.kind, line.reset_s) for line in lines]


def now_us() -> int:
    return time.time_ns() // 1_000


@dataclass
class Run:
    store: str
    threads: int
    seconds: float
    decisions: int
    refused: int
    decisions_per_s: float
    reserve_p50_us: float
    reserve_p99_us: float
    script_calls_per_decision: float | None = None
    round_trips_per_decision: float | None = None
    redis_commands_per_decision: float | None = None
    redis_script_us_per_decision: float | None = None  # time Redis spent running the script
    all_decisions_per_s: list[int] | None = None  # every run of the case, the median one reported


def drive(
    store: CounterStore, org: str, threads: int, seconds: float, spread: bool = False
) -> tuple[int, int, float, list[float]]:
    """Reserve + settle in ``threads`` threads for ``seconds``: (decisions, refused, elapsed, latencies).
    ``spread``: each thread decides for its own organization (on a cluster, spread over the masters)."""
    orgs = [f"{org}{t}" if spread else org for t in range(threads)]
    for name in sorted(set(orgs)):
        store.seed(seeds_for(request_lines(name)), now_us())
    counts = [0] * threads
    refused = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(t: int) -> None:
        group = orgs[t]
        lines = request_lines(group)
        start.wait()
        i = 0
        clock, lat = time.perf_counter, latencies[t]
        while not stop.is_set():
            i += 1
            hold_id = f"{group}-{t}-{i}"
            begin = clock()
            verdict = store.reserve([Hold(hold_id, lines, now_us() + LEASE_US, group)], now_us())[0]
            lat.append(clock() - begin)
            if verdict.admitted:
                store.settle([Settlement(hold_id, ACTUAL, group)], now_us())
            else:
                refused[t] += 1
            counts[t] = i

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    return sum(counts), sum(refused), elapsed, [x for lat in latencies for x in lat]


def measure(
    name: str, store: CounterStore, org: str, threads: int, seconds: float, spread: bool = False
) -> Run:
    decisions, refused, elapsed, latencies = drive(store, org, threads, seconds, spread)
    cuts = statistics.quantiles(latencies, n=100)
    return Run(
        store=name,
        threads=threads,
        seconds=round(elapsed, 3),
        decisions=decisions,
        refused=refused,
        decisions_per_s=decisions / elapsed,
        reserve_p50_us=cuts[49] * 1e6,
        reserve_p99_us=cuts[98] * 1e6,
    )


# -- Redis ----------------------------------------------------------------------------------------


def redis_counts(clients: list[redis.Redis]) -> tuple[int, dict[str, int], int]:
    """(commands processed, calls per command, microseconds Redis spent in EVALSHA), summed over the
    masters among ``clients`` (a replica's commands are its master's, replayed)."""
    total, script_us = 0, 0
    calls: dict[str, int] = {}
    for client in clients:
        info = client.info("all")
        if info.get("role") != "master":
            continue
        for key, value in info.items():
            if key.startswith("cmdstat_"):
                name = key.removeprefix("cmdstat_")
                calls[name] = calls.get(name, 0) + int(value["calls"])
        script_us += sum(int(info.get(f"cmdstat_{call}", {}).get("usec", 0)) for call in CALLS)
        total += int(info["total_commands_processed"])
    return total, calls, script_us


def measure_redis(
    url: str,
    threads: int,
    seconds: float,
    warmup: float,
    ports: list[int] | None = None,
    spread: bool = False,
) -> Run:
    """``ports``: a cluster's nodes (``url`` is then a ``redis+cluster://`` URL)."""
    name = "redis cluster" if ports else "redis"
    store = RedisCounterStore(url, prefix=f"bench{threads}{'s' if spread else ''}:")
    watchers = [redis.Redis(port=port) for port in ports] if ports else [redis.Redis.from_url(url)]
    try:
        drive(store, "warm", threads, warmup, spread)  # connections, script load
        store.flush()
        total0, calls0, script_us0 = redis_counts(watchers)
        run = measure(
            name + (", an organization per thread" if spread else ""), store, "org", threads, seconds, spread
        )
        store.flush()  # the last settlements, so that every decision's traffic is counted
        total1, calls1, script_us1 = redis_counts(watchers)
    finally:
        store.close()
        for watcher in watchers:
            watcher.close()
    delta = {name: calls1.get(name, 0) - calls0.get(name, 0) for name in calls1}
    sent = sum(n for name, n in delta.items() if name in CLIENT_COMMANDS)
    run.script_calls_per_decision = sum(delta.get(call, 0) for call in CALLS) / run.decisions
    run.round_trips_per_decision = sent / run.decisions
    run.redis_commands_per_decision = (total1 - total0 - delta.get("info", 0) * len(watchers)) / run.decisions
    run.redis_script_us_per_decision = (script_us1 - script_us0) / run.decisions
    return run


def redis_benchmark(port: int) -> list[dict[str, Any]]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return []
    base = [binary, "-h", "127.0.0.1", "-p", str(port), "-q"]
    figures: list[dict[str, Any]] = []

    def run(label: str, clients: int, args: list[str]) -> None:
        out = subprocess.run(
            [*base, "-c", str(clients), *args], capture_output=True, text=True, timeout=300, check=True
        ).stdout
        for line in out.replace("\r", "\n").splitlines():
            found = re.match(r"^(.+?): ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?", line.strip())
            if found:
                name, per_s = label or found.group(1), float(found.group(2))
                p50 = float(found.group(3)) if found.group(3) else None
                figures.append({"what": name, "clients": clients, "per_s": per_s, "p50_ms": p50})
                print(f"  redis-benchmark {name}, {clients} client(s): {per_s:,.0f}/s", flush=True)

    for clients in (1, 50):
        run("", clients, ["-n", "100000", "-t", "ping,set,incr"])
    return figures


def captured_call(
    url: str, prefix: str, group: str, seeds: list[Seed], before: list[str], now: list[str], at_us: int
) -> tuple[Any, ...]:
    """The script call the store sends for decisions of ``group`` (6 lines each, ``request_lines``):
    the finish of each hold of ``before`` (reserved and settled first) and the reservation of each of
    ``now``. ``EVALSHA``, the script's SHA-1, the key count, the keys, the request, the records."""
    lines = request_lines(group)
    # No flusher in between: the finishes must ride with the reservations (one decision each).
    store = RedisCounterStore(url, prefix=prefix, flush_interval_s=3600)
    sent: list[tuple[Any, ...]] = []
    try:
        store.seed(seeds, at_us)
        made = store.reserve([Hold(hold_id, lines, at_us + LEASE_US, group) for hold_id in before], at_us)
        if not all(verdict.admitted for verdict in made):
            raise RuntimeError("the holds to finish were not admitted")
        store.settle([Settlement(hold_id, ACTUAL, group) for hold_id in before], at_us)
        send = store._send_command

        def record(*command: Any) -> Any:
            sent.append(command)
            return send(*command)

        store._send_command = record  # type: ignore[assignment]
        made = store.reserve([Hold(hold_id, lines, at_us + LEASE_US, group) for hold_id in now], at_us)
        store._send_command = send  # type: ignore[assignment]
        if not all(verdict.admitted for verdict in made):
            raise RuntimeError("the captured reservations were not admitted")
    finally:
        store.close()
    return sent[-1]


def script_back_to_back(port: int, calls: int = 20_000) -> list[dict[str, Any]]:
    """Our script when Redis runs calls back to back (pipelined, 500 at a time): what one Redis serves
    when it is the bottleneck. Each call is one decision as the store sends it: the finish of the
    previous hold and a 6-line reservation. The request is MessagePack (binary), so it cannot go on
    ``redis-benchmark``'s command line; redis-py pipelines it instead."""
    url = f"redis://127.0.0.1:{port}/0"
    command = captured_call(url, "rb:", "rb", seeds_for(request_lines("rb")), ["rb-0"], ["rb-1"], now_us())
    count = int(command[2])
    keys, request, rest = command[3 : 3 + count], msgpack.unpackb(command[3 + count]), command[4 + count :]
    finishes, holds = request[4], request[6]  # the request: [n, u, g, c, f, s, h, l, d, x, t]
    if not (finishes and holds):
        raise RuntimeError("the captured call is not one finish and one reservation")
    packed = []
    for i in range(calls):
        finishes[0][1], holds[0][1] = f"rb-p{i - 1}", f"rb-p{i}"
        packed.append(msgpack.packb(request))
    client = redis.Redis(port=port)
    stat = f"cmdstat_{str(command[0]).lower()}"  # the script's EVALSHA, or the module's command
    try:
        before = client.info("commandstats")[stat]
        started = time.perf_counter()
        for first in range(0, calls, 500):
            pipe = client.pipeline(transaction=False)
            for body in packed[first : first + 500]:
                pipe.execute_command(command[0], command[1], count, *keys, body, *rest)
            pipe.execute()
        elapsed = time.perf_counter() - started
        after = client.info("commandstats")[stat]
    finally:
        client.close()
    script_us = (after["usec"] - before["usec"]) / (after["calls"] - before["calls"])
    print(
        f"  our script back to back (pipelined): {calls / elapsed:,.0f} decisions/s, "
        f"{script_us:.1f} µs of Redis time each",
        flush=True,
    )
    return [
        {
            "what": f"{command[0]} (finish + 6-line reserve), pipelined",
            "clients": 1,
            "per_s": calls / elapsed,
            "p50_ms": None,
            "redis_us_per_call": script_us,
        }
    ]


# -- the report -----------------------------------------------------------------------------------


def machine(redis_version: str) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "redis_py": redis.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def src_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "meterline").rglob("*")):
        if path.suffix in (".py", ".lua"):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def table(runs: list[Run]) -> str:
    rows = [
        "| store  | threads | decisions/s | reserve p50 / p99 (µs) | script calls / decision "
        "| round trips / decision | Redis commands / decision | Redis µs / decision |",
        "|--------|--------:|------------:|-----------------------:|------------------------:"
        "|-----------------------:|--------------------------:|--------------------:|",
    ]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in runs:
        latency = f"{r.reserve_p50_us:.0f} / {r.reserve_p99_us:.0f}"
        rows.append(
            f"| {r.store:<6} | {r.threads:>7} | {r.decisions_per_s:>11,.0f} | {latency:>22} "
            f"| {fmt(r.script_calls_per_decision):>23} | {fmt(r.round_trips_per_decision):>22} "
            f"| {fmt(r.redis_commands_per_decision):>25} | {fmt(r.redis_script_us_per_decision):>19} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per case")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median run is reported")
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--skip-redis-benchmark", action="store_true")
    parser.add_argument("--skip-cluster", action="store_true", help="no 3-master Redis Cluster case")
    parser.add_argument(
        "--pin", action="store_true", help="Redis alone on the last CPU (as on a host of its own)"
    )
    parser.add_argument("--skip-memory", action="store_true", help="no in-process store case")
    parser.add_argument("--skip-spread", action="store_true", help="no organization-per-thread case")
    parser.add_argument(
        "--module",
        action="store_true",
        help="Redis and the cluster's nodes with Meterline's module (storage/redis_module.py builds it)",
    )
    parser.add_argument(
        "--redis-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a redis-server option for every Redis started (e.g. hash-max-listpack-entries=0); repeatable",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"(default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.pin and not args.skip_cluster:
        parser.error("--pin needs --skip-cluster (the cluster's nodes would share the pinned CPU)")
    thread_counts = [int(x) for x in args.threads.split(",")]

    from tests.servers import start_redis, start_redis_cluster

    redis_args: list[str] = []
    for option in args.redis_option:
        name, _, value = option.partition("=")
        redis_args += [f"--{name}", value]
    if args.module:
        import tempfile

        from meterline.storage.redis_module import build

        module = build(Path(tempfile.mkdtemp(prefix="meterline-bench-module-")) / "meterline_counters.so")
        redis_args = ["--loadmodule", str(module)]
    server = start_redis(args=redis_args)
    cluster = None if args.skip_cluster else start_redis_cluster(args=redis_args)
    if args.pin:
        # Redis' main thread (which runs every command and script) alone on one CPU: what the store costs
        # Redis when no client shares its core. The threads this process starts later inherit its mask.
        cpus = sorted(os.sched_getaffinity(0))
        assert server._process is not None
        assert len(cpus) > 1, "--pin needs two CPUs"
        os.sched_setaffinity(server._process.pid, {cpus[-1]})
        os.sched_setaffinity(0, set(cpus[:-1]))
    try:
        probe = redis.Redis.from_url(server.url)
        version = str(probe.info("server")["redis_version"])
        probe.close()
        info = machine(version)
        digest = src_digest()
        print(
            f"machine: nproc={info['nproc']}, CPU {info['cpu']}, Python {info['python']}, "
            f"redis-server {version}, redis-py {info['redis_py']}",
            flush=True,
        )
        runs: list[Run] = []
        cases: list[tuple[str, Callable[[int], Run]]] = []
        if not args.skip_memory:
            cases.append(
                ("memory", lambda n: measure("memory", MemoryCounterStore(), "org", n, args.seconds))
            )
        cases.append(("redis", lambda n: measure_redis(server.url, n, args.seconds, args.warmup)))
        if not args.skip_spread:
            cases.append(
                ("redis", lambda n: measure_redis(server.url, n, args.seconds, args.warmup, spread=True))
            )
        if cluster is not None:
            ports = cluster.ports
            cases.append(
                (
                    "cluster",
                    lambda n: measure_redis(cluster.url, n, args.seconds, args.warmup, ports, spread=True),
                )
            )
        for name, case in cases:
            for threads in thread_counts:
                tries = sorted((case(threads) for _ in range(args.repeat)), key=lambda r: r.decisions_per_s)
                run = tries[len(tries) // 2]
                run.all_decisions_per_s = [round(t.decisions_per_s) for t in tries]
                runs.append(run)
                extra = (
                    f", {run.round_trips_per_decision:.3f} round trips/decision"
                    if run.round_trips_per_decision is not None
                    else ""
                )
                rate = f"{run.decisions_per_s:,.0f} decisions/s (runs: {run.all_decisions_per_s})"
                print(f"  {name}, {threads} thread(s): {rate}{extra}", flush=True)
        bench = script_back_to_back(server.port)
        if not args.skip_redis_benchmark:
            bench = redis_benchmark(server.port) + bench
    finally:
        server.stop()
        if cluster is not None:
            cluster.stop()

    print()
    print(table(runs))
    if bench:
        print()
        print("| same server | clients | requests/s | p50 (ms) | Redis µs / call |")
        print("|---|--:|--:|--:|--:|")
        for b in bench:
            script_us = f"{b['redis_us_per_call']:.1f}" if "redis_us_per_call" in b else "-"
            print(
                f"| {b['what']} | {b['clients']} | {b['per_s']:,.0f} | {b['p50_ms'] or '-'} | {script_us} |"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "quota_store",
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "lines_per_hold": 6,
                "seconds_per_case": args.seconds,
                "repeat": args.repeat,
                "redis_pinned": args.pin,
                "machine": info,
                "src_digest": digest,
                "runs": [asdict(r) for r in runs],
                "redis_benchmark": bench,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
