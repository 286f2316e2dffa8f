"""Redis time of the counter script's body per decision, without round trips or the noise of a client:
the body runs ``--iterations`` times inside one ``EVAL`` (timed with ``TIME``), on the request that
``bench/quota_store.py`` sends for a decision (one finish of the previous hold and one 6-line
reservation: 2 fixed-window hashes, 2 rolling windows, the holds hash). Best of ``--repeat``.

Usage::

    .venv/bin/python bench/redis_script_loop.py [SCRIPT.lua] [--iterations 2000] [--repeat 5]

SCRIPT defaults to ``src/meterline/storage/redis_counters.lua``. To time one phase, pass a copy with
that phase cut out (``do return 'x' end`` before it) or stubbed, and subtract (docs/benchmarks.md,
"MessagePack and inline number checks"). It starts its own ``redis-server`` and leaves nothing running.
The loop adds the cost of one closure per iteration (~0.1 µs); the call itself (~5.6 µs on this VM:
``EVALSHA`` with 5 keys and the request) is not in the figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgpack
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import start_redis  # noqa: E402

SCRIPT = ROOT / "src" / "meterline" / "storage" / "redis_counters.lua"
NOW = 1_796_450_133
DAY_END, MONTH_END = 1_796_515_200, 1_798_761_600
KEYS = [
    "p:{org}h", f"p:{{org}}f:{DAY_END}", f"p:{{org}}f:{MONTH_END}",
    "p:{org}r:org|o|rpm", "p:{org}r:org|o|tpm",
]  # fmt: skip
COUNTERS = [
    2, "org|o|tokens|day", DAY_END, 3, "org|o|tokens|month", MONTH_END, 4, 0, 0, 5, 0, 0,
    2, "org|k|calls|day", DAY_END, 3, "org|o|credits|month", MONTH_END,
]  # fmt: skip


def request(batch: int) -> list[object]:
    """``batch`` decisions in one call: each finishes its hold of the previous iteration and reserves
    a new one. Hold ids are of fixed width (``C<j>000000``, ``P<j>000000``): the harness rewrites them
    inside the packed request, per iteration."""
    finishes = [
        [
            1, f"P{j}000000", NOW, [1200, 1200, 1, 1200, 1, 2_000_000],
            1, 1500, 2, 1500, 3, 1, 4, 1500, 5, 1, 6, 2_500_000,
        ]
        for j in range(batch)
    ]  # fmt: skip
    holds = [
        [
            1, f"C{j}000000", 2,
            1, 1500, 10**12, 1, 2, 1500, 10**13, 1, 3, 1, 10**9, 1,
            4, 1500, 10**12, 1, 5, 1, 10**9, 1, 6, 2_500_000, str(10**18), 0,
        ]
        for j in range(batch)
    ]  # fmt: skip
    return [NOW, f"{NOW}008563", COUNTERS, finishes, 0, holds, 0, 0, 0, 0]


SEEDS = [[1, 0, 90000], [2, 0, 90000], [3], [4], [5, 0, 90000], [6, 0, 90000]]
SEED = [NOW, f"{NOW}000000", COUNTERS, 0, SEEDS, 0, 0, 0, 0, 0]
RECORD = b'[1796450433008562,1796450133,[["org|o|tokens|day","f","1500","1000000000000",1,1796515200]]]'

HARNESS = """
local N = tonumber(ARGV[3])
local requests = {}
for it = 1, N do
  local request = string.gsub(ARGV[1], 'C(%d)000000', function(j)
    return 'C' .. j .. string.format('%06d', it)
  end)
  requests[it] = string.gsub(request, 'P(%d)000000', function(j)
    return 'C' .. j .. string.format('%06d', it - 1)
  end)
end
local record = ARGV[2]
local last
local t0 = redis.call('TIME')
for it = 1, N do
  local ARGV = {requests[it], record}
  last = (function()
BODY
  end)()
end
local t1 = redis.call('TIME')
return {(t1[1] - t0[1]) * 1000000 + (t1[2] - t0[2]), last}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("script", nargs="?", default=str(SCRIPT))
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--batch", type=int, default=1, help="decisions per call (as when they wait together)"
    )
    parser.add_argument(
        "--full-minute",
        action="store_true",
        help="the rolling windows hold a bucket for each of the last 60 seconds (as under steady load)",
    )
    args = parser.parse_args(argv)
    text = Path(args.script).read_text(encoding="utf-8")
    body = text.split("\n", 1)[1] if text.startswith("#!") else text
    harness = HARNESS.replace("BODY", body)
    server = start_redis()
    try:
        client = redis.Redis.from_url(server.url)
        figures = []
        for _ in range(args.repeat):
            client.flushall()
            # Seeded by the repository's script: a cut-down copy may not write what it seeds.
            client.eval(SCRIPT.read_text(encoding="utf-8"), len(KEYS), *KEYS, msgpack.packb(SEED), RECORD)
            if args.full_minute:  # what a minute of steady traffic leaves: a bucket per second
                for key in KEYS[3:]:
                    buckets = {str(NOW - s): 1500 for s in range(1, 60)}
                    total = int(client.hget(key, "t") or 0) + 1500 * len(buckets)
                    client.hset(key, mapping={**buckets, "o": NOW - 59, "t": total})
            packed = msgpack.packb(request(args.batch))
            elapsed_us, last = client.eval(harness, len(KEYS), *KEYS, packed, RECORD, args.iterations)
            # The verdicts are one flat list, each after its length: {7, 1, overage, ...} for an admission.
            flat = msgpack.unpackb(last)[0] if isinstance(last, bytes) else 0
            kinds = []
            at = 0
            while flat and at < len(flat):
                kinds.append(flat[at + 1])
                at += 1 + flat[at]
            if kinds != [1] * args.batch:
                raise SystemExit(f"the last call did not admit every reservation ({kinds}): not a decision")
            figures.append(int(elapsed_us) / args.iterations / args.batch)
        client.close()
    finally:
        server.stop()
    runs = ", ".join(f"{x:.1f}" for x in figures)
    print(
        f"{args.script}, {args.batch} decision(s) a call: {min(figures):.1f} µs per decision in the loop "
        f"(best of {args.repeat}: {runs})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
