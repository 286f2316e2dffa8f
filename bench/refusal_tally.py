"""What counting a quota refusal costs: a refused reservation alone, and the same refusal followed by the
``tally`` that feeds the "rate limits exceeded frequently" alert, side by side on each counter store.

Usage::

    .venv/bin/python bench/refusal_tally.py [--calls 5000] [--repeat 5]

A 429 costs the quota path one ``reserve`` (refused: the org's daily calls are used up) and then one
``tally``; on Redis each is one script call. Runs alternate (refusal, refusal + tally, ...) so that a
noisy machine slows both alike; the median of ``--repeat`` runs is reported, in microseconds per 429.
Redis is a throwaway ``redis-server`` on loopback (tests/servers.py). Nothing is left running.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests/servers.py (throwaway redis-server)

from meterline.quotas.counters import CounterStore, Hold, Line, Seed  # noqa: E402
from meterline.quotas.memory import MemoryCounterStore  # noqa: E402
from meterline.storage.redis_counters import RedisCounterStore  # noqa: E402

DAY_END_S = 2_000_000_000


def refused(store: CounterStore, now_us: int, index: int) -> None:
    line = Line("org:calls:day", 1, 1, True, "fixed", DAY_END_S)
    (verdict,) = store.reserve([Hold(f"h{index}", (line,), now_us + 30_000_000)], now_us)
    assert not verdict.admitted


def per_call_us(first: int, calls: int, step: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for index in range(first, first + calls):
        step(index)
    return (time.perf_counter() - start) / calls * 1e6


def measure(store: CounterStore, calls: int, repeat: int) -> tuple[float, float]:
    now = time.time_ns() // 1_000
    store.seed([Seed("org:calls:day", "fixed", DAY_END_S, used=1)], now)

    def alone(index: int) -> None:
        refused(store, now, index)

    def counted(index: int) -> int:
        refused(store, now, index)
        return store.tally("refusals:org", now + index)

    runs: list[tuple[float, float]] = []
    for run in range(repeat):
        first = run * 2 * calls  # hold ids never repeat
        runs.append((per_call_us(first, calls, alone), per_call_us(first + calls, calls, counted)))
    return statistics.median(a for a, _ in runs), statistics.median(c for _, c in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    from tests.servers import start_redis

    server = start_redis()
    try:
        print("| store | refused reserve (µs) | refused reserve + tally (µs) | ratio |")
        print("|---|---:|---:|---:|")
        for name, store in (("memory", MemoryCounterStore()), ("redis", RedisCounterStore(server.url))):
            try:
                alone, with_tally = measure(store, args.calls, args.repeat)
            finally:
                store.close()
            print(f"| {name} | {alone:.1f} | {with_tally:.1f} | {with_tally / alone:.2f}x |")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
