"""Benchmark of the quota engine as a request uses it: ``QuotaEngine.reserve`` (place every applicable
limit of the caller, reserve atomically) then ``QuotaEngine.settle`` with the actual amounts.

Usage::

    .venv/bin/python bench/quota_engine.py [--seconds 3] [--threads 1,4] [--no-redis]

The caller is a free-plan organization calling with a key that has its own daily-calls limit: eight
counters per decision (daily/monthly tokens and calls, RPM, TPM, monthly credits, the key's daily calls).
Counters are loaded from a real SQLite ledger on first use (once), as in the server. Stores: the
in-process ``memory://`` store, and ``redis://`` against a throwaway ``redis-server`` on loopback, where
Redis's own ``INFO commandstats`` gives the round trips per decision.

Prints a table and writes ``bench/results/quota_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from meterline.clock import SystemClock  # noqa: E402
from meterline.quotas import DEFAULT_PLANS  # noqa: E402
from meterline.quotas.counters import CounterStore  # noqa: E402
from meterline.quotas.engine import QuotaEngine, Subject, amounts_of  # noqa: E402
from meterline.quotas.memory import MemoryCounterStore  # noqa: E402
from meterline.storage.database import Database  # noqa: E402
from meterline.storage.migrate import upgrade  # noqa: E402
from meterline.storage.quota_source import SqlUsageSource  # noqa: E402
from meterline.storage.redis_counters import RedisCounterStore  # noqa: E402
from servers import start_redis  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quota_engine.json"
BIG = 10**12  # limits that never refuse during the run, so every decision is a full reserve + settle


def subject(index: int) -> Subject:
    plan = DEFAULT_PLANS["free"]
    # The free plan's limits, raised so that a long run never hits them; the work per decision is the same.
    plan = replace(
        plan,
        daily_tokens=BIG,
        monthly_tokens=BIG,
        daily_calls=BIG,
        monthly_calls=BIG,
        rpm=BIG,
        tpm=BIG,
        monthly_credits=10**9,
    )
    return Subject(
        organization_id=f"org_bench{index}",
        plan=plan,
        billing_anchor_day=1,
        workspace_id=f"ws_bench{index}",
        key_id=f"key_bench{index}",
        key_limits={"daily_calls": BIG},
    )


def run(engine: QuotaEngine, threads: int, seconds: float, batch: int = 1) -> dict[str, float]:
    amounts = amounts_of(
        tokens=1200, credits_nanos=3_000_000, cost_nanos=30_000, event="llm.request", units=1
    )
    actual = amounts_of(tokens=900, credits_nanos=2_000_000, cost_nanos=20_000, event="llm.request", units=1)
    counts = [0] * threads
    stop = threading.Event()

    def worker(slot: int) -> None:
        who = subject(slot % 2)  # two organizations: some contention, as in a real server
        done = 0
        while not stop.is_set():
            if batch == 1:
                for _ in range(100):
                    reservation = engine.reserve(who, amounts)
                    engine.settle([(reservation, actual)])
                done += 100
            else:  # as POST /v1/events decides a batch: one reserve_many, one settle
                outcomes = engine.reserve_many([(who, amounts, None)] * batch)
                engine.settle([(r, actual) for r in outcomes if not isinstance(r, Exception)])
                done += batch
        counts[slot] = done

    # Warm up: load every counter from the ledger once.
    for slot in range(2):
        engine.settle([(engine.reserve(subject(slot), amounts), actual)])
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    return {"decisions": sum(counts), "seconds": elapsed, "per_second": sum(counts) / elapsed}


def redis_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_evalsha"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--batches", default="1,100", help="decisions per reserve_many call")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
    db = Database(f"sqlite:///{workdir / 'bench.db'}")
    upgrade(db)
    source = SqlUsageSource(db)
    results: list[dict[str, Any]] = []

    for batch in batches:
        for threads in thread_counts:
            engine = QuotaEngine(MemoryCounterStore(), source, SystemClock())
            figures = run(engine, threads, args.seconds, batch)
            results.append({"store": "memory", "threads": threads, "batch": batch, **figures})

    if not args.no_redis:
        server = start_redis()
        try:
            client = redis.Redis.from_url(server.url)
            for batch in batches:
                for threads in thread_counts:
                    client.flushall()
                    store: CounterStore = RedisCounterStore(server.url)
                    engine = QuotaEngine(store, source, SystemClock())
                    before_calls = redis_calls(client)
                    figures = run(engine, threads, args.seconds, batch)
                    store.close()
                    calls = redis_calls(client) - before_calls
                    results.append(
                        {
                            "store": "redis",
                            "threads": threads,
                            "batch": batch,
                            **figures,
                            "round_trips": calls,
                            "round_trips_per_decision": calls / figures["decisions"],
                        }
                    )
            client.close()
        finally:
            server.stop()
    db.dispose()

    print(f"{'store':<8} {'batch':>5} {'threads':>7} {'decisions/s':>12} {'round trips/decision':>21}")
    for r in results:
        trips = r.get("round_trips_per_decision")
        print(
            f"{r['store']:<8} {r['batch']:>5} {r['threads']:>7} {r['per_second']:>12,.0f} "
            f"{'' if trips is None else f'{trips:.3f}':>21}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
