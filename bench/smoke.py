"""Benchmark guard (issue 14): a short run of the hot-path benchmarks, one table, compared with
``bench/baseline.json``.

Usage::

    .venv/bin/python bench/smoke.py                     # measure, compare with the baseline
    .venv/bin/python bench/smoke.py --update-baseline   # measure, compare, then write the baseline

It runs, one after the other (never two at once), each as a subprocess:

* ``bench/events_ingest.py --events 100000 --skip-postgres --clients 1``: SQLite API ÷ bare
  ``executemany`` of the same rows (the SPEC's ingestion figure, at 100k events);
* ``bench/gateway.py --targets direct,meterline`` with short phases: Meterline's requests/s at 64
  clients ÷ the bare fake upstream's own (direct), and the server's CPU per sequential request and per
  stream (200 concurrent streams of 16 pieces);
* the quota engine as ``bench/quota_engine.py`` drives it (``QuotaEngine.reserve`` + ``settle``, memory
  counter store, one thread, one process): decisions/s, median of a few short runs;
* ``bench/workers.py --skip-postgres --client wrk`` with two short rounds: requests/s of 2 workers ÷ 1
  on SQLite (medians), gateway (against ``bench/canned_upstream.py`` since ``bed086d``, the fake before)
  and events (needs ``wrk``: ``make bench-smoke`` installs Debian's);
* ``bench/quota_store.py`` on one Redis, one organization, one thread: the script's Redis time per lone
  decision (``INFO commandstats``) in the run of median decisions/s of three short ones; then the same
  with Meterline's Redis module loaded (``--module``).

Then it prints one table — figure, now, baseline, change, mark — where a figure more than 15 % worse
than the baseline in its bad direction is marked WORSE (ratios, throughput share and decisions/s: higher
is better; CPU µs: lower is better). It reports and never fails: the exit status is 0 whatever the
figures (a missing or unreadable baseline is said so). ``--update-baseline`` writes ``bench/baseline.json``:
the figures, the machine, the date, ``git rev-parse HEAD`` and a digest of the code measured.

The figures are noisy on a shared 2-vCPU VM (±10-30 % run to run); confirm a WORSE mark by alternating
the old and the new commit in one session, e.g. ``git worktree add /tmp/old <commit>`` then
``PYTHONPATH=/tmp/old/src .venv/bin/python bench/smoke.py`` (the code actually imported is reported).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from machine import host

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BASELINE = BENCH / "baseline.json"
THRESHOLD = 0.15  # more than this fraction worse than the baseline: WORSE

# Settings of each phase, kept short so that the whole run stays within ~4 minutes on 2 vCPUs.
INGEST_ARGS = ["--events", "100000", "--batch", "1000", "--skip-postgres", "--clients", "1", "--repeats", "3"]
GATEWAY_ARGS = [
    "--targets", "direct,meterline",
    "--requests", "1600", "--rounds", "4", "--warmup", "100",
    "--stream-seconds", "6", "--stream-rounds", "2",
    "--throughput-seconds", "5", "--ramp", "1",
]  # fmt: skip
QUOTA_SECONDS, QUOTA_RUNS = 3.0, 5
# Two short rounds of 1 and 2 workers on SQLite (wrk: the load client takes little of the two vCPUs), then the
# Redis store's lone decisions: what issue 16 measures, short.
WORKERS_ARGS = ["--skip-postgres", "--client", "wrk", "--seconds", "3", "--rounds", "2"]
REDIS_ARGS = [
    "--seconds", "2", "--repeat", "3", "--threads", "1",
    "--skip-cluster", "--skip-memory", "--skip-spread", "--skip-redis-benchmark",
]  # fmt: skip
SETTINGS = {
    "events_ingest": INGEST_ARGS,
    "gateway": GATEWAY_ARGS,
    "quota_engine": {"seconds": QUOTA_SECONDS, "runs": QUOTA_RUNS, "threads": 1, "batch": 1},
    "workers": WORKERS_ARGS,
    "quota_store_redis": REDIS_ARGS,
    "quota_store_redis_module": [*REDIS_ARGS, "--module"],
}
PHASE_TIMEOUT_S = 420  # only against a hung phase; the budget is the total wall time printed at the end


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    higher_is_better: bool
    digits: int  # decimals shown


FIGURES = (
    Figure("ingest_ratio", "ingestion: SQLite API ÷ bare executemany (100k events, 1 client)", True, 3),
    Figure("gateway_throughput_share", "gateway: requests/s ÷ direct's at 64 clients", True, 4),
    Figure("gateway_cpu_us_per_request", "gateway: server CPU per request, sequential (µs)", False, 0),
    Figure("gateway_cpu_us_per_stream", "gateway: server CPU per stream, 200 streams (µs)", False, 0),
    Figure("quota_decisions_per_s", "quota engine: reserve+settle decisions/s (memory, 1 thread)", True, 0),
    Figure("workers_gateway_ratio", "workers: SQLite gateway requests/s, 2 workers ÷ 1", True, 2),
    Figure("workers_events_ratio", "workers: SQLite events requests/s, 2 workers ÷ 1", True, 2),
    Figure("redis_us_per_decision", "Redis: script µs per lone decision (6 lines)", False, 1),
    Figure("redis_module_us_per_decision", "Redis: module µs per lone decision (6 lines)", False, 1),
)


# -- phases ---------------------------------------------------------------------------------------


class PhaseFailed(Exception):
    pass


def run_phase(name: str, command: list[str], log: Path) -> float:
    """Run one benchmark as a subprocess, its output into ``log``; seconds taken. Raises PhaseFailed."""
    print(f"  {name} ...", end="", flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=PHASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:  # timeout, Ctrl-C or SIGTERM: let the benchmark clean up
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    seconds = time.monotonic() - started
    print(f" {seconds:.0f} s", flush=True)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        why = f"timed out after {PHASE_TIMEOUT_S} s" if code is None else f"exit status {code}"
        raise PhaseFailed(f"{name}: {why}; last lines of its output:\n{tail}")
    return seconds


def ingestion(work: Path) -> tuple[dict[str, float], dict[str, Any]]:
    output = work / "events_ingest.json"
    cmd = [sys.executable, str(BENCH / "events_ingest.py"), *INGEST_ARGS, "--output", str(output)]
    run_phase("ingestion (events_ingest.py, SQLite, 100k events)", cmd, work / "events_ingest.log")
    data = json.loads(output.read_text())
    rates = {(r["method"], r["clients"]): r for r in data["results"] if r["backend"] == "sqlite"}
    failed = [f"{r['method']}: {r['failed']}" for r in rates.values() if r.get("failed")]
    if failed:
        raise PhaseFailed(f"ingestion: {'; '.join(failed)}")
    details = {
        "api_events_per_s": rates[("api", 1)]["rate"],
        "executemany_rows_per_s": rates[("executemany", 1)]["rate"],
        "api_retries": rates[("api", 1)]["retries"],
    }
    return {"ingest_ratio": data["ratio"]["api_1_client_vs_executemany"]}, details


def gateway(work: Path) -> tuple[dict[str, float], dict[str, Any]]:
    output = work / "gateway.json"
    cmd = [sys.executable, str(BENCH / "gateway.py"), *GATEWAY_ARGS, "--output", str(output)]
    run_phase("gateway (gateway.py, direct and meterline)", cmd, work / "gateway.log")
    results = json.loads(output.read_text())["results"]
    meterline_rps = results["throughput"]["meterline"]["requests_per_second"]
    direct_rps = results["throughput"]["direct"]["requests_per_second"]
    errors = {
        w: results[w]["meterline"].get("errors") for w in results if results[w]["meterline"].get("errors")
    }
    figures = {
        "gateway_throughput_share": meterline_rps / direct_rps,
        "gateway_cpu_us_per_request": results["sequential"]["meterline"]["server_cpu_us_per_request"],
        "gateway_cpu_us_per_stream": results["streams"]["meterline"]["server_cpu_us_per_request"],
    }
    details = {
        "meterline_requests_per_s_64_clients": meterline_rps,
        "direct_requests_per_s_64_clients": direct_rps,
        "meterline_streams_per_s": results["streams"]["meterline"]["requests_per_second"],
        "errors": errors,
    }
    return figures, details


def quota(work: Path) -> tuple[dict[str, float], dict[str, Any]]:
    output = work / "quota_engine.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--quota-engine", str(output)]
    name = f"quota engine (quota_engine.py's loop, {QUOTA_RUNS} runs of {QUOTA_SECONDS:g} s)"
    run_phase(name, cmd, work / "quota.log")
    runs = json.loads(output.read_text())["decisions_per_s"]
    return {"quota_decisions_per_s": statistics.median(runs)}, {"quota_runs_decisions_per_s": runs}


def quota_engine_child(output: Path) -> None:
    """The subprocess of the quota phase: ``bench/quota_engine.py``'s own loop and caller, memory store,
    one thread, one decision per call; a fresh engine per run. (quota_engine.py's ``main`` always writes
    the committed ``bench/results/quota_engine.json``, so its parts are used directly.)"""
    sys.path.insert(0, str(BENCH))
    import quota_engine as qe
    from meterline.clock import SystemClock
    from meterline.quotas.engine import QuotaEngine
    from meterline.quotas.memory import MemoryCounterStore
    from meterline.storage.database import Database
    from meterline.storage.migrate import upgrade
    from meterline.storage.quota_source import SqlUsageSource

    with tempfile.TemporaryDirectory(prefix="meterline-smoke-quota-") as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'quota.db'}")
        upgrade(db)
        source = SqlUsageSource(db)
        runs = []
        for _ in range(QUOTA_RUNS):
            engine = QuotaEngine(MemoryCounterStore(), source, SystemClock())
            runs.append(round(qe.run(engine, 1, QUOTA_SECONDS, 1)["per_second"]))
        db.dispose()
    output.write_text(json.dumps({"decisions_per_s": runs}) + "\n")


def workers(work: Path) -> tuple[dict[str, float], dict[str, Any]]:
    output = work / "workers.json"
    cmd = [sys.executable, str(BENCH / "workers.py"), *WORKERS_ARGS, "--output", str(output)]
    run_phase("workers (workers.py, SQLite, 1 and 2 workers, wrk)", cmd, work / "workers.log")
    data = json.loads(output.read_text())
    gateway, events = data["sqlite gateway"], data["sqlite events"]
    figures = {"workers_gateway_ratio": gateway["ratio"], "workers_events_ratio": events["ratio"]}
    details = {
        "workers_gateway_requests_per_s": {"1": gateway["1"], "2": gateway["2"]},
        "workers_events_requests_per_s": {"1": events["1"], "2": events["2"]},
    }
    return figures, details


def redis_decisions(work: Path) -> tuple[dict[str, float], dict[str, Any]]:
    figures: dict[str, float] = {}
    details: dict[str, Any] = {}
    # The script, then Meterline's module in another Redis (quota_store.py --module builds and loads it).
    for name, more, key in (("", [], "redis"), ("_module", ["--module"], "redis_module")):
        output = work / f"quota_store{name}.json"
        cmd = [sys.executable, str(BENCH / "quota_store.py"), *REDIS_ARGS, *more, "--output", str(output)]
        label = (
            f"Redis store{' with the module' if more else ''} (quota_store.py, one organization, 1 thread)"
        )
        run_phase(label, cmd, work / f"quota_store{name}.log")
        runs = json.loads(output.read_text())["runs"]
        (lone,) = [r for r in runs if r["store"] == "redis" and r["threads"] == 1]
        details[f"{key}_decisions_per_s"] = lone["decisions_per_s"]
        details[f"{key}_runs_decisions_per_s"] = lone["all_decisions_per_s"]
        figures[f"{key}_us_per_decision"] = lone["redis_script_us_per_decision"]
    return figures, details


PHASES: tuple[Callable[[Path], tuple[dict[str, float], dict[str, Any]]], ...] = (
    ingestion,
    gateway,
    quota,
    workers,
    redis_decisions,
)


# -- what was measured where ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return host()


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def measured_code() -> dict[str, Any]:
    """The ``meterline`` package the benchmarks import (PYTHONPATH may point elsewhere than src/) and a
    digest of its sources, as the other benchmarks compute it for src/meterline."""
    found = subprocess.run(
        [sys.executable, "-c", "import meterline, pathlib; print(pathlib.Path(meterline.__file__).parent)"],
        cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(),
    )  # fmt: skip
    package = Path(found.stdout.strip() or ROOT / "src" / "meterline")
    digest = hashlib.sha256()
    base = package.parent.parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes())
    dirty = git("status", "--porcelain", "--", "src")
    return {
        "package": str(package),
        "src_digest": digest.hexdigest()[:16],
        "src_uncommitted_changes": bool(dirty),
    }


# -- the table ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def compare(figure: Figure, now: float | None, base: float | None) -> tuple[str, str]:
    """(change, mark) of ``now`` against ``base``."""
    if now is None or base is None or base == 0:
        return "", ("" if now is not None else "not measured")
    change = now / base - 1
    worse = -change if figure.higher_is_better else change
    mark = "WORSE" if worse > THRESHOLD else "better" if worse < -THRESHOLD else ""
    return f"{change:+.1%}", mark


def table(figures: dict[str, float | None], base: dict[str, Any] | None) -> str:
    rows = [("figure", "now", "baseline", "change", "mark")]
    for f in FIGURES:
        b = None if base is None else base.get(f.key)
        rows.append(
            (f.label, fmt(figures.get(f.key), f.digits), fmt(b, f.digits), *compare(f, figures.get(f.key), b))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    rule = ["-" * (widths[0] + 2), *("-" * (w + 1) + ":" for w in widths[1:4]), "-" * (widths[4] + 2)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True))]
        lines.append("| " + " | ".join([*cells, row[4].ljust(widths[4])]) + " |")
    lines.insert(1, "|" + "|".join(rule) + "|")
    return "\n".join(lines)


def read_baseline(path: Path) -> tuple[dict[str, Any] | None, str]:
    if not path.exists():
        return None, f"NO BASELINE: {path} does not exist (create it with --update-baseline)"
    try:
        data = json.loads(path.read_text())
        figures = data["figures"]
        assert isinstance(figures, dict)
    except (OSError, ValueError, KeyError, AssertionError) as exc:
        return None, f"BASELINE UNREADABLE: {path}: {exc!r} (rewrite it with --update-baseline)"
    head = (data.get("git_head") or "?")[:12]
    m = data.get("machine", {})
    note = (
        f"baseline: {data.get('date', '?')}, git {head}, code {data.get('code', {}).get('src_digest', '?')}, "
        f"nproc={m.get('nproc')}, {m.get('cpu')}, Python {m.get('python')}, SQLite {m.get('sqlite')}"
    )
    return data, note


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through run_phase, which stops the running benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--update-baseline", action="store_true", help=f"write the figures to {BASELINE}")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help=f"(default {BASELINE})")
    parser.add_argument("--keep", type=Path, help="keep the benchmarks' JSON and logs in this directory")
    parser.add_argument("--quota-engine", type=Path, help=argparse.SUPPRESS)  # the quota phase's child
    args = parser.parse_args(argv)
    if args.quota_engine is not None:
        quota_engine_child(args.quota_engine)
        return 0
    signal.signal(signal.SIGTERM, _terminate)

    started = time.monotonic()
    when = datetime.now(UTC)
    info = machine()
    code = measured_code()
    head = git("rev-parse", "HEAD")
    load_start = os.getloadavg()
    dirty = " + uncommitted changes in src/" if code["src_uncommitted_changes"] else ""
    print(
        f"benchmark guard: git {(head or '?')[:12]}{dirty}"
        f", code {code['src_digest']} ({code['package']})\n"
        f"machine: nproc={info['nproc']}, {info['cpu']}, Python {info['python']}, SQLite {info['sqlite']}, "
        f"load {load_start[0]:.2f}",
        flush=True,
    )
    figures: dict[str, float | None] = {f.key: None for f in FIGURES}
    details: dict[str, Any] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meterline-smoke-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for phase in PHASES:
            try:
                got, more = phase(work)
            except PhaseFailed as exc:
                failures.append(str(exc))
                continue
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
                failures.append(f"{phase.__name__}: could not read its results: {exc!r}")
                continue
            figures.update(got)
            details.update(more)
    load_end = os.getloadavg()
    wall = time.monotonic() - started

    base, note = read_baseline(args.baseline)
    print()
    print(table(figures, None if base is None else base["figures"]))
    print()
    print(note)
    if base is not None:
        b = base.get("machine", {})
        if (b.get("nproc"), b.get("cpu")) != (info["nproc"], info["cpu"]):
            print("NOTE: the baseline was measured on another machine; the comparison means little.")
        measured = base.get("settings", {})
        other = [phase for phase, settings in SETTINGS.items() if measured.get(phase) != settings]
        if other:
            print(f"NOTE: the baseline measured {', '.join(other)} with other settings (or not): rewrite it.")
    print(
        f"ingestion: API {fmt(details.get('api_events_per_s'), 0)} events/s, bare executemany "
        f"{fmt(details.get('executemany_rows_per_s'), 0)} rows/s; gateway at 64 clients: meterline "
        f"{fmt(details.get('meterline_requests_per_s_64_clients'), 0)} requests/s, direct "
        f"{fmt(details.get('direct_requests_per_s_64_clients'), 0)}; "
        f"quota engine runs: {details.get('quota_runs_decisions_per_s')} decisions/s"
    )
    if "workers_events_requests_per_s" in details:
        g, e = details["workers_gateway_requests_per_s"], details["workers_events_requests_per_s"]
        print(
            f"workers (requests/s, 1 → 2): gateway {fmt(g['1'], 0)} → {fmt(g['2'], 0)}, "
            f"events {fmt(e['1'], 0)} → {fmt(e['2'], 0)}"
        )
    if "redis_decisions_per_s" in details:
        print(
            f"Redis, lone decisions: {fmt(details['redis_decisions_per_s'], 0)}/s with the script, "
            f"{fmt(details.get('redis_module_decisions_per_s'), 0)}/s with the module"
        )
    if details.get("errors"):
        print(f"gateway errors: {details['errors']}")
    print(
        f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; wall time {wall:.0f} s"
    )
    print(
        f"WORSE = more than {THRESHOLD:.0%} worse than the baseline. Noisy on a shared VM: confirm a WORSE "
        "by alternating the old and the new commit (docs/benchmarks.md, Benchmark guard)."
    )
    for failure in failures:
        print(f"PHASE FAILED: {failure}")

    if args.update_baseline:
        if failures:
            print(f"baseline NOT written: {len(failures)} phase(s) failed")
        else:
            record = {
                "benchmark": "smoke",
                "date": when.isoformat(timespec="seconds"),
                "git_head": head,
                "code": code,
                "machine": info,
                "loadavg": [round(load_start[0], 2), round(load_end[0], 2)],
                "wall_seconds": round(wall),
                "settings": SETTINGS,
                "figures": {f.key: figures[f.key] for f in FIGURES},
                "details": details,
            }
            args.baseline.write_text(json.dumps(record, indent=2) + "\n")
            print(f"baseline written: {args.baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
