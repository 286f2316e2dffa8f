"""Where Meterline's time goes per gateway request: py-spy raw stacks summarised for bench/gateway.py.

py-spy's raw format (``--format raw --threads``) is one line per distinct stack:
``thread (TID): NAME;func (pkg/file.py:LINE);...;leaf (pkg/file.py:LINE) COUNT``. Only samples of
threads that were running are recorded (py-spy leaves idle threads out), so shares are shares of the
server's CPU time, not of wall-clock latency.

Three views:

* **phases**: each sample goes to the first phase (in the order of :data:`PHASES`) one of whose
  patterns matches a frame anywhere in its stack, so a SQLite write inside the settle counts as
  "settle", and the event loop's own work is what is left at the end;
* **packages**: the package of the leaf frame (self time: uvicorn, starlette, sqlalchemy, sqlite3 ...;
  meterline's own code as ``meterline.<subpackage>``);
* **functions**: the leaf functions with the most self time, and meterline's functions with the most
  inclusive time.
"""

from __future__ import annotations

import collections
from typing import Any

# Meterline's request-path packages (not meterline/cli, which is on every stack of the main thread).
_PACKAGES = ("api", "gateway", "metering", "quotas", "storage", "tenancy", "pricing", "receipts")
_MODULES = ("money.py", "ids.py", "clock.py", "services.py")
MET_CODE = tuple(f"meterline/{p}/" for p in _PACKAGES) + tuple(f"meterline/{m}" for m in _MODULES)

# (phase, patterns): a pattern "pkg/" matches a frame whose file is in that package directory; any other
# pattern matches a function name exactly or as a ``Class.method`` suffix.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("authentication (key look-up, get_principal)", ("get_principal",)),
    ("prompt tokenizer (estimate)", ("bpe_openai/", "meterline/gateway/tokens.py", "tiktoken/")),
    ("request JSON parse/validate (wire.parse_json_request)", ("parse_json_request",)),
    ("routing (RouteTable.routes_for)", ("RouteTable.routes_for",)),
    ("quota reserve (Exchanges.reserve, reserve_soon)", ("Exchanges.reserve", "Exchanges.reserve_soon")),
    ("receipt signing", ("meterline/receipts/", "meterline/signing.py", "joserfc/", "cryptography/")),
    (
        "settle and the writer thread (price, ledger row, durable reservations, commit)",
        ("Exchanges.settle", "Exchanges.settle_soon", "Writer._loop"),
    ),
    ("release (Exchanges.release)", ("Exchanges.release",)),
    (
        "upstream HTTP client (aiohttp or httpx: send, read)",
        ("aiohttp/", "yarl/", "multidict/", "httpx/", "httpcore/", "h11/", "Upstreams.open"),
    ),
    ("answer rewrite (wire.read_answer)", ("read_answer",)),
    ("stream relay (SSE parse, StreamMeter)", ("Relay._stream", "SSEParser.feed", "StreamMeter.observe")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    # The stdlib's logging frames only: AccessLog.__call__ is around every request.
    ("logging (access log)", ("logging/",)),
    ("thread-pool hand-off (anyio worker threads, in_thread)", ("anyio/", "run_in_threadpool", "in_thread")),
    ("response headers/body building (gateway)", ("_metered_headers", "rate_limit_headers", "_complete")),
    ("other Meterline code (relay, middleware)", MET_CODE),
    ("FastAPI/Starlette (routing, middleware, request/response)", ("starlette/", "fastapi/")),
    ("uvicorn, httptools, event loop (uvloop: I/O, callbacks in C)", ("",)),
)


def _parse_frame(frame: str) -> tuple[str, str]:
    """``func (pkg/file.py:12)`` -> (``func``, ``pkg/file.py``)."""
    name, _, where = frame.partition(" (")
    return name, where.rsplit(":", 1)[0].rstrip(")")


def _matches(pattern: str, name: str, path: str) -> bool:
    if pattern == "":
        return True
    if pattern.endswith("/") or pattern.endswith(".py"):
        return path.startswith(pattern) or f"/{pattern}" in path
    return name == pattern or name.endswith("." + pattern)


def _package(path: str) -> str:
    if path.startswith("<frozen"):
        return "python (frozen stdlib)"
    parts = path.split("/")
    if parts[0] == "meterline" and len(parts) > 2:
        return f"meterline.{parts[1]}"
    if parts[0] == "meterline":
        return "meterline"
    return parts[0].removesuffix(".py")


def parse(raw: str) -> list[tuple[str, list[tuple[str, str]], int]]:
    stacks = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = parts[0].split(":", 1)[-1].strip()
        stacks.append((thread, [_parse_frame(f) for f in parts[1:]], int(count)))
    return stacks


def profile_summary(raw: str, top: int = 25) -> dict[str, Any]:
    stacks = parse(raw)
    total = sum(n for _, _, n in stacks) or 1
    threads: collections.Counter[str] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    phase_packages: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    packages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for thread, frames, n in stacks:
        threads["event loop (MainThread)" if thread == "MainThread" else "worker threads"] += n
        phase = PHASES[-1][0]
        for label, patterns in PHASES:
            if any(_matches(p, name, path) for p in patterns for name, path in frames):
                phase = label
                break
        phases[phase] += n
        if frames:
            leaf_name, leaf_path = frames[-1]
            package = _package(leaf_path)
            packages[package] += n
            phase_packages[phase][package] += n
            leaves[f"{leaf_name} ({leaf_path})"] += n
        for name, path in {(name, path) for name, path in frames if path.startswith("meterline/")}:
            inclusive[f"{name} ({path})"] += n

    def share(counter: collections.Counter[str], limit: int | None = None) -> list[dict[str, Any]]:
        return [{"name": k, "samples": v, "share": v / total} for k, v in counter.most_common(limit)]

    return {
        "samples": total,
        "threads": dict(threads),
        "phases": [
            {
                "phase": k,
                "samples": v,
                "share": v / total,
                "leaf_packages": {p: c / total for p, c in phase_packages[k].most_common(4)},
            }
            for k, v in phases.most_common()
        ],
        "packages": share(packages, top),
        "self_functions": share(leaves, top),
        "meterline_inclusive": share(inclusive, top),
    }


def print_profile(profile: dict[str, Any]) -> None:
    n = profile.get("requests_per_pass")
    print(f"\nMeterline profile: sequential ({n} requests per pass), concurrent and streamed load")
    for kind in ("sequential", "concurrent", "streams"):
        rate = profile.get(f"{kind}_requests_per_second_unprofiled") or 0
        for thread, cpu in (profile.get(f"{kind}_cpu_us_per_request_by_thread") or {}).items():
            print(
                f"  {kind} ({rate:,.0f} req/s unprofiled), CPU per request, {thread}: "
                f"{cpu['user']:,.0f} µs user + {cpu['system']:,.0f} µs system"
            )
    for name, summary in profile.get("passes", {}).items():
        what = "threads holding the GIL (Python work)" if "gil" in name else "all running threads"
        print(
            f"  py-spy, {summary.get('load')} load, {what}: {summary['samples']} samples, "
            f"{summary['threads']}, "
            f"{summary.get('requests_per_second_under_profiler') or 0:,.0f} req/s while sampled"
        )
        print("    by phase (first match in the stack; [leaf packages]):")
        for p in summary["phases"]:
            if p["share"] < 0.003:
                continue
            inside = ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["leaf_packages"].items() if v >= 0.002)
            print(f"      {100 * p['share']:5.1f}%  {p['phase']}  [{inside}]")
        print(
            "    self time by package: "
            + ", ".join(f"{p['name']} {100 * p['share']:.1f}%" for p in summary["packages"][:12])
        )
        print("    top self functions:")
        for p in summary["self_functions"][:12]:
            print(f"      {100 * p['share']:5.1f}%  {p['name']}")
    if profile.get("flamegraph"):
        print(f"  flame graph: {profile['flamegraph']}")
