"""Redis time of the counter script's body per decision, without round trips or the noise of a client:
the body runs ``--iterations`` times inside one ``EVAL`` (timed with ``TIME``), on the call the store
sends for a decision of ``bench/quota_store.py`` (one finish of the previous hold and one 6-line
reservation: 4 fixed windows and 2 rolling ones of one organization), captured from the store itself.
Best of ``--repeat``.

Usage::

    .venv/bin/python bench/redis_script_loop.py [SCRIPT.lua] [--iterations 2000] [--repeat 5]

SCRIPT defaults to ``src/meterline/storage/redis_counters.lua``. To time one phase, pass a copy with
that phase cut out (``do return 'x' end`` before it) or stubbed, and subtract (docs/benchmarks.md,
"MessagePack and inline number checks"). It starts its own ``redis-server`` and leaves nothing running.
The loop adds the cost of one closure per iteration (~0.1 µs); the call itself (``EVALSHA`` with its
keys and the request, a few µs) is not in the figure.
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

from meterline.quotas.counters import Seed  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from quota_store import captured_call, request_lines  # noqa: E402

SCRIPT = ROOT / "src" / "meterline" / "storage" / "redis_counters.lua"
NOW = 1_796_450_133  # the script reads the caller's clock only: a fixed one keeps every run alike
NOW_US = NOW * 1_000_000 + 8_563


def capture(url: str, batch: int, full_minute: bool) -> tuple[list[bytes], bytes, list[bytes]]:
    """Seeds the counters as the store does, then captures the call the store sends for ``batch``
    decisions (each the finish of the previous hold and a 6-line reservation, as in
    ``bench/quota_store.py``): its keys, request and records. Hold ids are of fixed width
    (``P<j>000000`` before, ``C<j>000000`` now): the harness rewrites them per iteration."""
    # ``--full-minute``: what a minute of steady traffic leaves, a bucket in each of the last 60 s
    buckets = tuple((NOW - s, 1_500) for s in range(1, 60)) if full_minute else ()
    seeds = [
        Seed(ln.key, ln.kind, ln.reset_s, buckets=buckets if ln.kind == "rolling" else ())
        for ln in request_lines("org")
    ]
    before = [f"P{j}000000" for j in range(batch)]
    now = [f"C{j}000000" for j in range(batch)]
    command = captured_call(url, "p:", "org", seeds, before, now, NOW_US)
    count = int(command[2])
    keys = [k.encode() if isinstance(k, str) else k for k in command[3 : 3 + count]]
    request, records = command[3 + count], list(command[4 + count :])
    finishes, holds = msgpack.unpackb(request)[4], msgpack.unpackb(request)[6]
    if not (finishes and holds and len(finishes) == len(holds) == batch):
        raise SystemExit("the captured call is not a finish and a reservation per decision")
    return keys, request, records


HARNESS = """
local N = tonumber(ARGV[2])
local requests = {}
for it = 1, N do
  local request = string.gsub(ARGV[1], 'C(%d)000000', function(j)
    return 'C' .. j .. string.format('%06d', it)
  end)
  requests[it] = string.gsub(request, 'P(%d)000000', function(j)
    return 'C' .. j .. string.format('%06d', it - 1)
  end)
end
local records = {}
for j = 4, #ARGV do records[#records + 1] = ARGV[j] end
local last
local t0 = redis.call('TIME')
for it = 1, N do
  local ARGV = {requests[it], unpack(records)}
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
            keys, packed, records = capture(server.url, args.batch, args.full_minute)
            elapsed_us, last = client.eval(harness, len(keys), *keys, packed, args.iterations, b"", *records)
            # The verdicts are one flat list, each after its length: {14, 1, overage, ...} admits 6 lines.
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
