"""Benchmark for SPEC §10, gateway: added latency over calling the upstream directly (p50 <= 1 ms
sequential, p99 <= 5 ms at 200 concurrent streams, one process) and lower than LiteLLM's proxy measured
on the same fake upstream in the same run.

Usage::

    .venv/bin/python bench/gateway.py [--quick] [--profile] [--targets direct,meterline,litellm]

(``make bench-gateway`` creates LiteLLM's own venv ``bench/.venv-litellm`` first and runs this.)

One run starts ONE fake upstream (``meterline.testing.FakeUpstream``, one process on loopback) and three
targets in front of it, and measures them one after the other, interleaved in rounds:

* ``direct``: the client talks to the fake itself;
* ``meterline``: ``meterline serve`` (one process, SQLite in a temporary directory, an ``enterprise``
  organization, workspace and key made through the admin API, upstream ``fake`` for every model);
* ``litellm``: ``litellm --config bench/litellm.yaml --num_workers 1`` from ``bench/.venv-litellm``
  (LiteLLM 1.80.0, offline: local cost map, no telemetry, no database; its uvicorn access log is off,
  as Meterline's is).

Workloads (every request ``POST /v1/chat/completions``, model ``gpt-4o-mini``, one user message,
``max_tokens`` 16, so the fake answers 16 one-token pieces; streams ask for
``stream_options.include_usage``):

1. **sequential**: one keep-alive connection, non-streamed, N requests per target (after a warm-up),
   split into rounds whose target order rotates; latency = time to last byte.
2. **streams**: 200 connections, each a client running streamed completions back to back for a fixed
   time (closed loop); time to first body byte (TTFB) and to last byte per stream. Requests started
   during the first ``--ramp`` seconds are not counted.
3. **throughput**: 64 connections running non-streamed completions back to back; completed requests/s.

"Added" is the target's percentile minus the direct percentile of the same run. The client is a
lean asyncio + httptools client on uvloop (``bench/gateway_client.py``), identical for all targets; it
shares the machine's cores with the servers. Each response is checked (status 200, a complete body;
every 50th response and all warm-up responses fully parsed: 16 pieces, usage). The CPU time each
server process used per request (``/proc/PID/stat``) is recorded too: it is far less noisy than
wall-clock latency on a shared VM.

It prints a markdown table and writes ``bench/results/gateway-<date>.json`` (``-quick`` for
``--quick``). ``--profile`` adds a pass (not part of the figures) with ``py-spy`` sampling Meterline
under the sequential load: a flame graph ``bench/results/gateway-profile.svg`` and a breakdown of
where its time goes (printed and in the JSON). Nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from gateway_client import Client, Endpoint, Result  # noqa: E402
from gateway_profile import profile_summary  # noqa: E402
from machine import cpu_model  # noqa: E402
from meterline.testing import PIECE, FakeUpstream  # noqa: E402

T = TypeVar("T")
HOST = "127.0.0.1"
UPSTREAM_KEY = "sk-bench-upstream"
MODEL = "gpt-4o-mini"
LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_CONFIG = BENCH / "litellm.yaml"
RESULTS = BENCH / "results"
START_TIMEOUT = 120.0
TARGETS = ("direct", "meterline", "litellm")
CHECK_EVERY = 50  # fully parse every 50th response of a timed run
CLK_TCK = os.sysconf("SC_CLK_TCK")

SPEC = {
    "sequential_added_p50_ms": 1.0,
    "streams_added_p99_ms": 5.0,
    "text": "SPEC §10: added latency over direct p50 <= 1 ms sequential, p99 <= 5 ms at 200 concurrent "
    "streams on one process, and lower than LiteLLM's proxy on the same fake upstream in the same run",
}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Server:
    """A server subprocess with its log in ``work``; ``stop()`` ends it (and nothing else)."""

    def __init__(self, name: str, command: Sequence[str], env: dict[str, str], work: Path, port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = work / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                list(command),
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(base_url=f"http://{HOST}:{self.port}", timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(path).status_code == 200:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
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


@dataclass
class Target:
    name: str
    endpoint: Endpoint | None = None
    pid: int | None = None  # the server process between client and fake (None for direct)
    available: bool = False
    reason: str | None = None  # why not available
    version: str | None = None


# An OTLP/HTTP sink for ``--otel``: answers 200 to every export and keeps nothing.
_OTLP_SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    def _ok(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    do_GET = do_POST = _ok
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def start_otlp_sink(work: Path, servers: list[Server]) -> str:
    port = free_port()
    server = Server("otlp-sink", [sys.executable, "-c", _OTLP_SINK, str(port)], dict(os.environ), work, port)
    servers.append(server)
    server.wait_ready("/")
    return f"http://{HOST}:{port}"


def start_meterline(
    fake: FakeUpstream, work: Path, servers: list[Server], otel_endpoint: str | None = None
) -> Target:
    target = Target("meterline", version=_version("meterline"))
    admin_key = secrets.token_hex(16)  # 32 characters, new for each run
    config = work / "meterline.toml"
    otel = "" if otel_endpoint is None else f'otel_endpoint = "{otel_endpoint}"\n'
    config.write_text(
        f'database_url = "sqlite:///{work / "meterline.db"}"\n'
        f'admin_key = "{admin_key}"\n'
        f'signing_key_file = "{work / "key.json"}"\n{otel}\n'
        "[[upstreams]]\n"
        'name = "fake"\n'
        'provider = "openai"\n'
        f'base_url = "{fake.url}"\n'
        f'api_key = "{UPSTREAM_KEY}"\n'
        'models = ["*"]\n'
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
    ]
    server = Server("meterline", command, env, work, port)
    servers.append(server)
    server.wait_ready("/healthz")
    base = f"http://{HOST}:{port}"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as admin:
        org = _created(admin.post("/v1/admin/organizations", json={"name": "Bench", "plan": "enterprise"}))
        ws = _created(admin.post("/v1/admin/workspaces", json={"organization_id": org["id"], "name": "Main"}))
        key = _created(admin.post("/v1/admin/keys", json={"workspace_id": ws["id"], "name": "bench"}))
    target.endpoint = Endpoint(HOST, port, "/v1/chat/completions", {"Authorization": f"Bearer {key['key']}"})
    target.pid = server.pid
    return _probe(target, base, server)


def start_litellm(fake: FakeUpstream, work: Path, servers: list[Server]) -> Target:
    target = Target("litellm")
    litellm = LITELLM_VENV / "bin" / "litellm"
    if not litellm.exists():
        target.reason = f"{litellm} not found (make bench-gateway creates it)"
        return target
    target.version = _litellm_version()
    log_config = work / "litellm-logging.json"  # uvicorn's access log off, as for Meterline
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
                "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
                "loggers": {
                    "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                    "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                },
            }
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM_", "DATABASE_URL", "OPENAI_"))}
    env.update(
        BENCH_UPSTREAM_URL=fake.url,
        BENCH_UPSTREAM_KEY=UPSTREAM_KEY,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no price download at start
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
        NO_PROXY="*",
    )
    command = [
        str(litellm),
        "--config",
        str(LITELLM_CONFIG),
        "--host",
        HOST,
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--log_config",
        str(log_config),
    ]
    server = Server("litellm", command, env, work, port)
    servers.append(server)
    server.wait_ready("/health/liveliness")
    target.endpoint = Endpoint(HOST, port, "/v1/chat/completions", {"Authorization": "Bearer sk-anything"})
    target.pid = server.pid
    return _probe(target, f"http://{HOST}:{port}", server)


def _probe(target: Target, base: str, server: Server) -> Target:
    """Is the chat completions route there and answering through the fake?"""
    assert target.endpoint is not None
    body = request_body(stream=False, max_tokens=4)
    headers = {**target.endpoint.headers, "Content-Type": "application/json"}
    headers.pop("Host")
    try:
        response = httpx.post(f"{base}/v1/chat/completions", content=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        target.reason = f"POST /v1/chat/completions: {exc!r}"
        return target
    if response.status_code != 200:
        target.reason = f"POST /v1/chat/completions: {response.status_code} {response.text[:300]}"
        return target
    problem = check_body([response.content], stream=False, max_tokens=4)
    if problem:
        target.reason = f"POST /v1/chat/completions: {problem}: {response.text[:300]}"
        return target
    target.available = True
    return target


def _created(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 201:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _litellm_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'), m.version('uvicorn'))"
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    litellm, uvicorn = out.stdout.split()
    return f"{litellm} (uvicorn {uvicorn})"


# --------------------------------------------------------------------------- requests and checks


def request_body(*, stream: bool, max_tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something short about benchmarks."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def check_body(body: list[bytes], *, stream: bool, max_tokens: int) -> str | None:
    """None if the answer is complete and right (max_tokens pieces, usage), else what is wrong."""
    data = b"".join(body)
    try:
        if not stream:
            answer = orjson.loads(data)
            content = answer["choices"][0]["message"]["content"]
            if content != PIECE * max_tokens:
                return f"content {content[:40]!r} is not {max_tokens} pieces"
            if answer["usage"]["completion_tokens"] != max_tokens:
                return f"usage {answer['usage']}"
            return None
        events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
        if not events or events[-1].strip() != b"[DONE]":
            return "stream does not end with data: [DONE]"
        pieces, usage = [], None
        for raw in events[:-1]:
            event = orjson.loads(raw)
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    pieces.append(text)
            usage = event.get("usage") or usage
        if "".join(pieces) != PIECE * max_tokens:
            return f"stream content {''.join(pieces)[:40]!r} is not {max_tokens} pieces"
        if not usage or usage.get("completion_tokens") != max_tokens:
            return f"stream usage {usage}"
        return None
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return f"unparsable answer ({exc!r}): {data[:200]!r}"


def quick_check(result: Result, stream: bool) -> str | None:
    """Cheap checks done on every response: status and a complete body."""
    if result.status != 200:
        return f"HTTP {result.status}: {b''.join(result.body)[:200]!r}"
    if stream:
        tail = b"".join(result.body[-2:])
        if not tail.rstrip().endswith(b"data: [DONE]"):
            return "stream cut short (no data: [DONE])"
    elif not result.body or not result.body[-1].rstrip().endswith(b"}"):
        return "incomplete JSON body"
    return None


# --------------------------------------------------------------------------- load


@dataclass
class Run:
    """One timed run of one workload against one target."""

    target: str
    workload: str
    round: int
    seconds: float = 0.0  # measured span
    totals: list[float] = field(default_factory=list)  # time to last byte, seconds
    ttfbs: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    server_cpu: float = 0.0  # CPU seconds of the target's server process during the run
    fake_cpu: float = 0.0
    client_cpu: float = 0.0
    completed_all: int = 0  # including ramp and tail


class CpuMeter:
    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self.start = {k: cpu_seconds(p) for k, p in self.pids.items() if p}
        self.start["client"] = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def used(self) -> dict[str, float]:
        now = {k: cpu_seconds(p) for k, p in self.pids.items() if p}
        now["client"] = time.process_time()
        return {k: now[k] - self.start[k] for k in self.start}


def _record(run: Run, result: Result, stream: bool, index: int, max_tokens: int) -> bool:
    problem = quick_check(result, stream)
    if problem is None and index % CHECK_EVERY == 0:
        problem = check_body(result.body, stream=stream, max_tokens=max_tokens)
    if problem:
        run.errors[problem[:300]] += 1
        return False
    return True


async def sequential(
    target: Target, request: bytes, n: int, max_tokens: int, rnd: int, pids: dict[str, int | None]
) -> Run:
    assert target.endpoint is not None
    run = Run(target.name, "sequential", rnd)
    client = await target.endpoint.connect()
    try:
        with CpuMeter(pids) as cpu:
            t0 = time.perf_counter()
            for i in range(n):
                try:
                    result = await client.send(request)
                except (ConnectionError, OSError) as exc:
                    run.errors[repr(exc)[:120]] += 1
                    continue
                if _record(run, result, False, i, max_tokens):
                    run.totals.append(result.total)
            run.seconds = time.perf_counter() - t0
        _cpu_into(run, cpu.used(), target)
    finally:
        client.close()
    run.completed_all = len(run.totals)
    return run


async def closed_loop(
    target: Target,
    workload: str,
    request: bytes,
    *,
    clients: int,
    seconds: float,
    ramp: float,
    stream: bool,
    max_tokens: int,
    rnd: int,
    pids: dict[str, int | None],
) -> Run:
    """``clients`` connections each sending ``request`` back to back until the deadline."""
    assert target.endpoint is not None
    endpoint = target.endpoint
    run = Run(target.name, workload, rnd)
    conns: list[Client] = []
    for start in range(0, clients, 50):  # connect (not timed), 50 at a time
        conns += await asyncio.gather(*(endpoint.connect() for _ in range(start, min(clients, start + 50))))
    counter = 0
    loop_start = time.perf_counter()
    measure_from = loop_start + ramp
    deadline = measure_from + seconds
    cpu = CpuMeter(pids)

    async def start_cpu() -> None:
        await asyncio.sleep(ramp)
        cpu.__enter__()

    async def worker(client: Client) -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            try:
                result = await client.send(request)
            except (ConnectionError, OSError) as exc:
                run.errors[repr(exc)[:120]] += 1
                await asyncio.sleep(0.01)
                continue
            counter += 1
            run.completed_all += 1
            if _record(run, result, stream, counter, max_tokens) and measure_from <= result.start < deadline:
                run.totals.append(result.total)
                run.ttfbs.append(result.ttfb)

    try:
        cpu_task = asyncio.ensure_future(start_cpu())
        await asyncio.gather(*(worker(c) for c in conns))
        await cpu_task
        run.seconds = seconds
        used = cpu.used()
        # CPU is read when the last request in flight ends, a little after the deadline: scale to it.
        span = time.perf_counter() - measure_from
        _cpu_into(run, {k: v * seconds / span for k, v in used.items()}, target)
    finally:
        for c in conns:
            c.close()
    return run


def _cpu_into(run: Run, used: dict[str, float], target: Target) -> None:
    run.server_cpu = used.get("server", 0.0) if target.pid else 0.0
    run.fake_cpu = used.get("fake", 0.0)
    run.client_cpu = used.get("client", 0.0)


async def warm_up(target: Target, max_tokens: int, n: int) -> None:
    """Untimed requests (imports, caches, pools), every answer fully checked; raises on a bad one."""
    assert target.endpoint is not None
    client = await target.endpoint.connect()
    try:
        for stream in (False, True):
            request = target.endpoint.request(request_body(stream=stream, max_tokens=max_tokens))
            for _ in range(n if not stream else max(10, n // 4)):
                result = await client.send(request)
                problem = quick_check(result, stream) or check_body(
                    result.body, stream=stream, max_tokens=max_tokens
                )
                if problem:
                    raise RuntimeError(
                        f"{target.name} warm-up ({'stream' if stream else 'non-stream'}): {problem}"
                    )
    finally:
        client.close()


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``values``, in milliseconds."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return 1000.0 * ordered[int(rank) - 1]


def summarize(runs: list[Run], workload: str, target: str) -> dict[str, Any]:
    mine = [r for r in runs if r.workload == workload and r.target == target]
    totals = [t for r in mine for t in r.totals]
    ttfbs = [t for r in mine for t in r.ttfbs]
    seconds = sum(r.seconds for r in mine)
    count = len(totals)
    errors: collections.Counter[str] = collections.Counter()
    for r in mine:
        errors.update(r.errors)
    completed = sum(r.completed_all for r in mine) or 1
    out: dict[str, Any] = {
        "requests": count,
        "seconds": round(seconds, 3),
        "p50_ms": pct(totals, 50),
        "p90_ms": pct(totals, 90),
        "p99_ms": pct(totals, 99),
        "max_ms": pct(totals, 100),
        "mean_ms": 1000.0 * sum(totals) / count if count else float("nan"),
        "per_round_p50_ms": [pct(r.totals, 50) for r in mine],
        "per_round_p99_ms": [pct(r.totals, 99) for r in mine],
        "requests_per_second": count / seconds if seconds else 0.0,
        "per_round_requests_per_second": [len(r.totals) / r.seconds if r.seconds else 0.0 for r in mine],
        "server_cpu_us_per_request": (
            1e6 * sum(r.server_cpu for r in mine) / count if count and target != "direct" else None
        ),
        "fake_cpu_us_per_request": 1e6 * sum(r.fake_cpu for r in mine) / count if count else None,
        "client_cpu_us_per_request": 1e6 * sum(r.client_cpu for r in mine) / count if count else None,
        "errors": dict(errors),
        "error_rate": sum(errors.values()) / (completed + sum(errors.values())),
    }
    if ttfbs:
        out.update(ttfb_p50_ms=pct(ttfbs, 50), ttfb_p99_ms=pct(ttfbs, 99))
    return out


# --------------------------------------------------------------------------- run


async def measure(targets: list[Target], fake: FakeUpstream, args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    fake_pid = fake.process.pid
    server_pids = [fake_pid, *(t.pid for t in targets if t.available and t.pid)]
    max_tokens = args.max_tokens
    live = [t for t in targets if t.available]
    for t in live:
        print(f"  warm-up {t.name} ({args.warmup} requests)", flush=True)
        await warm_up(t, max_tokens, args.warmup)

    def pids(t: Target) -> dict[str, int | None]:
        return {"server": t.pid, "fake": fake_pid}

    def order(rnd: int) -> list[Target]:
        k = rnd % len(live)
        return live[k:] + live[:k]

    async def closed_loop_rounds(kind: str, *, stream: bool, clients: int, seconds: float) -> None:
        """``stream_rounds`` rounds of a closed-loop load, every target in rotating order."""
        for rnd in range(args.stream_rounds):
            for t in order(rnd):
                assert t.endpoint is not None
                req = t.endpoint.request(request_body(stream=stream, max_tokens=max_tokens))
                run = await closed_loop(
                    t,
                    kind,
                    req,
                    clients=clients,
                    seconds=seconds,
                    ramp=args.ramp,
                    stream=stream,
                    max_tokens=max_tokens,
                    rnd=rnd,
                    pids=pids(t),
                )
                runs.append(run)
                _progress(run)
                gc.collect()
                wait_idle(server_pids)

    gc.collect()
    gc.freeze()
    gc.disable()  # no collector pauses inside the client's timed spans; collected between runs
    try:
        per_round = max(1, args.requests // args.rounds)
        for rnd in range(args.rounds):
            for t in order(rnd):
                assert t.endpoint is not None
                req = t.endpoint.request(request_body(stream=False, max_tokens=max_tokens))
                run = await sequential(t, req, per_round, max_tokens, rnd, pids(t))
                runs.append(run)
                _progress(run)
                gc.collect()
                wait_idle(server_pids)
        if args.stream_chunk_delay_ms:
            fake.set_default("ok", chunk_delay_ms=args.stream_chunk_delay_ms)
        await closed_loop_rounds("streams", stream=True, clients=args.streams, seconds=args.stream_seconds)
        if args.stream_chunk_delay_ms:
            fake.set_default("ok")
        await closed_loop_rounds(
            "throughput", stream=False, clients=args.concurrency, seconds=args.throughput_seconds
        )
    finally:
        gc.enable()
        gc.unfreeze()
    return runs


def wait_idle(pids: Sequence[int], limit: float = 60.0) -> float:
    """Wait until the servers are idle (< 3 % of a core each over 0.5 s; e.g. LiteLLM's logging tasks
    that outlive a run), so no run pays for the one before; seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = [cpu_seconds(p) for p in pids]
        time.sleep(0.5)
        after = [cpu_seconds(p) for p in pids]
        if all(b - a < 0.015 for a, b in zip(before, after, strict=True)):
            break
    return time.monotonic() - start


def _progress(run: Run) -> None:
    errors = f", {sum(run.errors.values())} errors: {dict(run.errors)}" if run.errors else ""
    ttfb = f", TTFB p50 {pct(run.ttfbs, 50):.2f} ms" if run.ttfbs else ""
    print(
        f"  {run.workload:<10} round {run.round} {run.target:<9} {len(run.totals):6d} requests, "
        f"{len(run.totals) / run.seconds if run.seconds else 0:8.1f}/s, p50 {pct(run.totals, 50):7.2f} ms, "
        f"p99 {pct(run.totals, 99):7.2f} ms{ttfb}{errors}",
        flush=True,
    )


def src_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "meterline").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_head() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            p: _version(p)
            for p in (
                "meterline",
                "uvicorn",
                "uvloop",
                "httptools",
                "fastapi",
                "starlette",
                "httpx",
                "sqlalchemy",
            )
        },
        "loadavg_at_start": list(os.getloadavg()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(
        f"machine: {info['nproc']} CPU ({info['cpu']}), Python {info['python']}, "
        f"load {info['loadavg_at_start'][0]:.2f}",
        flush=True,
    )
    wanted = args.targets
    targets: list[Target] = []
    servers: list[Server] = []
    profile: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="meterline-bench-gateway-") as tmp:
        work = Path(tmp)
        fake = FakeUpstream.start(api_key=UPSTREAM_KEY, history=16)
        try:
            direct = Target("direct", version=f"meterline.testing.FakeUpstream ({fake.url})")
            direct.endpoint = Endpoint(
                HOST, fake.port, "/v1/chat/completions", {"Authorization": f"Bearer {UPSTREAM_KEY}"}
            )
            direct.available = True
            targets.append(direct)
            otel = start_otlp_sink(work, servers) if args.otel else None
            info["otel_endpoint"] = otel
            starters: dict[str, Callable[[FakeUpstream, Path, list[Server]], Target]] = {
                "meterline": partial(start_meterline, otel_endpoint=otel),
                "litellm": start_litellm,
            }
            for name, starter in starters.items():
                if name not in wanted:
                    continue
                try:
                    target = starter(fake, work, servers)
                except RuntimeError as exc:
                    target = Target(name, reason=str(exc)[:1000])
                targets.append(target)
                state = "ready" if target.available else f"NOT AVAILABLE: {target.reason}"
                print(f"  {name}: {state}", flush=True)
            info["targets"] = {t.name: t.version for t in targets}
            runs = _arun(measure(targets, fake, args))
            meterline = next((t for t in targets if t.name == "meterline" and t.available), None)
            if args.profile and meterline is not None:
                profile = run_profile(meterline, args)
            for server in servers:
                errors = _server_errors(server.log_tail(100_000))
                if errors:
                    info.setdefault("server_log_errors", {})[server.name] = errors
        finally:
            for server in servers:
                server.stop()
            fake.stop()

    info["loadavg_at_end"] = list(os.getloadavg())
    live = [t.name for t in targets if t.available]
    results: dict[str, Any] = {}
    for workload in ("sequential", "streams", "throughput"):
        results[workload] = {name: summarize(runs, workload, name) for name in live}
        if "direct" in live:
            base = results[workload]["direct"]
            for name in live:
                s = results[workload][name]
                s["added_p50_ms"] = s["p50_ms"] - base["p50_ms"]
                s["added_p99_ms"] = s["p99_ms"] - base["p99_ms"]
                if "ttfb_p50_ms" in s:
                    s["added_ttfb_p50_ms"] = s["ttfb_p50_ms"] - base["ttfb_p50_ms"]
                    s["added_ttfb_p99_ms"] = s["ttfb_p99_ms"] - base["ttfb_p99_ms"]
    return {
        "benchmark": "gateway",
        "spec": SPEC,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": info,
        "git_head": git_head(),
        "src_digest": src_digest(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": {
            t.name: {"available": t.available, "reason": t.reason, "version": t.version} for t in targets
        },
        "results": results,
        "verdict": verdict(results),
        "profile": profile,
        "runs": [
            {
                "target": r.target,
                "workload": r.workload,
                "round": r.round,
                "requests": len(r.totals),
                "seconds": r.seconds,
                "p50_ms": pct(r.totals, 50),
                "p99_ms": pct(r.totals, 99),
                "errors": dict(r.errors),
            }
            for r in runs
        ],
    }


def _arun(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop (as the servers do), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _server_errors(log: str) -> list[str]:
    lines = [line.strip() for line in log.splitlines()]
    found = {line[:200] for line in lines if "Traceback" in line or line.startswith(("ERROR", "CRITICAL"))}
    return sorted(found)[:20]


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    seq = results.get("sequential", {})
    streams = results.get("streams", {})
    out: dict[str, Any] = {}
    if "meterline" in seq and "direct" in seq:
        added = seq["meterline"]["added_p50_ms"]
        out["sequential_added_p50_ms"] = {
            "value": added,
            "target": SPEC["sequential_added_p50_ms"],
            "met": added <= SPEC["sequential_added_p50_ms"],
        }
    if "meterline" in streams and "direct" in streams:
        added = streams["meterline"]["added_p99_ms"]
        out["streams_added_p99_ms"] = {
            "value": added,
            "target": SPEC["streams_added_p99_ms"],
            "met": added <= SPEC["streams_added_p99_ms"],
        }
    if "meterline" in seq and "litellm" in seq:
        comparisons = {}
        for workload in ("sequential", "streams"):
            m, lite = results[workload]["meterline"], results[workload]["litellm"]
            for p in ("p50_ms", "p99_ms"):
                comparisons[f"{workload}_{p}"] = {
                    "meterline": m[p],
                    "litellm": lite[p],
                    "met": m[p] < lite[p],
                }
        out["lower_than_litellm"] = {"met": all(c["met"] for c in comparisons.values()), **comparisons}
    return out


# --------------------------------------------------------------------------- profile


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds of the event loop (the main thread) and of all other threads together
    (the process's figures include threads that have exited, e.g. idle thread-pool workers)."""

    def times(path: str) -> tuple[float, float]:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0, 0.0
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    process, main = times(f"/proc/{pid}/stat"), times(f"/proc/{pid}/task/{pid}/stat")
    return {
        "event loop thread": main,
        "other threads (thread pool)": (process[0] - main[0], process[1] - main[1]),
    }


# py-spy passes: (name, load, output format, extra flags). "active": every thread that is running (not
# idle); "gil": only the thread holding the GIL (the process's Python work); a flame graph of all active
# threads. Load "sequential" is one connection; "concurrent" is --concurrency connections (non-streamed);
# "streams" is --streams connections running streamed completions.
PROFILE_PASSES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("active", "sequential", "raw", ()),
    ("gil", "sequential", "raw", ("--gil",)),
    ("flamegraph", "sequential", "flamegraph", ()),
    ("concurrent-gil", "concurrent", "raw", ("--gil",)),
    ("streams-gil", "streams", "raw", ("--gil",)),
)


def run_profile(target: Target, args: argparse.Namespace) -> dict[str, Any] | None:
    """Sample Meterline with py-spy under the sequential load (PROFILE_PASSES), plus CPU per thread."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("  profile: py-spy not found (.venv/bin/pip install py-spy); skipped", flush=True)
        return None
    assert target.endpoint is not None
    assert target.pid is not None
    RESULTS.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gateway-pyspy-"))
    n = args.profile_requests
    req = target.endpoint.request(request_body(stream=False, max_tokens=args.max_tokens))
    result: dict[str, Any] = {"requests_per_pass": n, "passes": {}}
    try:
        stream_req = target.endpoint.request(request_body(stream=True, max_tokens=args.max_tokens))

        def load(kind: str) -> Run:
            if kind == "sequential":
                return _arun(sequential(target, req, n, args.max_tokens, 0, {}))
            streams = kind == "streams"
            return _arun(
                closed_loop(
                    target,
                    kind,
                    stream_req if streams else req,
                    clients=args.streams if streams else args.concurrency,
                    seconds=args.profile_seconds,
                    ramp=1.0,
                    stream=streams,
                    max_tokens=args.max_tokens,
                    rnd=0,
                    pids={},
                )
            )

        # CPU per thread, no profiler attached
        for kind in ("sequential", "concurrent", "streams"):
            before = thread_cpu(target.pid)
            done = load(kind)
            after = thread_cpu(target.pid)
            count = done.completed_all or 1
            result[f"{kind}_cpu_us_per_request_by_thread"] = {
                k: {
                    "user": 1e6 * (after[k][0] - before[k][0]) / count,
                    "system": 1e6 * (after[k][1] - before[k][1]) / count,
                }
                for k in after
            }
            result[f"{kind}_requests_per_second_unprofiled"] = len(done.totals) / done.seconds
            wait_idle([target.pid])
        for name, kind, fmt, extra in PROFILE_PASSES:
            path = RESULTS / "gateway-profile.svg" if fmt == "flamegraph" else scratch / f"{name}.txt"
            cmd = [spy, "record", "--pid", str(target.pid), "--rate", str(args.profile_rate), "--format", fmt]
            cmd += ["--threads", "--nonblocking", *extra, "-o", str(path)]
            recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(1.0)  # py-spy attaches
                if recorder.poll() is not None:
                    error = recorder.stderr.read() if recorder.stderr else ""
                    print(f"  profile: py-spy failed: {error[-300:]}", flush=True)
                    return None
                done = load(kind)
            finally:
                if recorder.poll() is None:
                    recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                    try:
                        recorder.communicate(timeout=60)
                    except subprocess.TimeoutExpired:
                        recorder.kill()
                        recorder.communicate()
            rate = len(done.totals) / done.seconds
            wait_idle([target.pid])
            if fmt == "flamegraph":
                result["flamegraph"] = str(path.relative_to(ROOT)) if path.exists() else None
                continue
            if not path.exists():
                print(f"  profile: py-spy wrote no {name} output", flush=True)
                continue
            summary = profile_summary(path.read_text())
            summary["requests_per_second_under_profiler"] = rate
            summary["load"] = kind
            result["passes"][name] = summary
            if args.profile_stacks:
                shutil.copyfile(path, f"{args.profile_stacks}.{name}.txt")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def _unit(value: float | None, unit: str, digits: int = 0) -> str:
    text = _f(value, digits)
    return text if text == "-" else f"{text} {unit}"


def report(summary: dict[str, Any]) -> str:
    res = summary["results"]
    names = [n for n in TARGETS if n in res.get("sequential", {})]
    seq, streams, thr = res["sequential"], res["streams"], res["throughput"]
    settings = summary["settings"]
    lines = [
        f"Sequential, non-streamed ({settings['requests']} requests per target, max_tokens "
        f"{settings['max_tokens']}; latency = time to last byte):",
        "",
        "| target | p50 | p99 | added p50 | added p99 | server CPU per request |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for n in names:
        s = seq[n]
        lines.append(
            f"| {n} | {_f(s['p50_ms'])} ms | {_f(s['p99_ms'])} ms | {_f(s.get('added_p50_ms'))} ms "
            f"| {_f(s.get('added_p99_ms'))} ms | {_unit(s.get('server_cpu_us_per_request'), 'µs')} |"
        )
    lines += [
        "",
        f"{settings['streams']} concurrent streams (closed loop, {settings['stream_rounds']} x "
        f"{settings['stream_seconds']:g} s per target; last byte and first body byte per stream):",
        "",
        "| target | last byte p50 | p99 | added p50 | added p99 | TTFB p50 | TTFB p99 "
        "| added TTFB p50 / p99 | streams/s | server CPU per stream |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n in names:
        st = streams.get(n, {})
        lines.append(
            f"| {n} | {_f(st.get('p50_ms'), 1)} ms | {_f(st.get('p99_ms'), 1)} ms "
            f"| {_f(st.get('added_p50_ms'), 1)} ms | {_f(st.get('added_p99_ms'), 1)} ms "
            f"| {_f(st.get('ttfb_p50_ms'), 1)} ms | {_f(st.get('ttfb_p99_ms'), 1)} ms "
            f"| {_f(st.get('added_ttfb_p50_ms'), 1)} / {_f(st.get('added_ttfb_p99_ms'), 1)} ms "
            f"| {_f(st.get('requests_per_second'), 0)} | {_unit(st.get('server_cpu_us_per_request'), 'µs')} |"
        )
    lines += [
        "",
        f"Throughput, non-streamed, {settings['concurrency']} concurrent clients, one server process:",
        "",
        "| target | requests/s | p50 | p99 | server CPU per request |",
        "|---|--:|--:|--:|--:|",
    ]
    for n in names:
        t = thr.get(n, {})
        lines.append(
            f"| {n} | {_f(t.get('requests_per_second'), 0)} | {_f(t.get('p50_ms'), 1)} ms "
            f"| {_f(t.get('p99_ms'), 1)} ms | {_unit(t.get('server_cpu_us_per_request'), 'µs')} |"
        )
    table = "\n".join(lines)
    print("\n" + table + "\n")
    for name, t in summary["targets"].items():
        if not t["available"]:
            print(f"{name}: not measured: {t['reason']}")
    for key, v in summary["verdict"].items():
        print(
            f"verdict {key}: {'met' if v['met'] else 'NOT met'}"
            + (f" ({_f(v['value'])} ms, target {v['target']} ms)" if "value" in v else "")
        )
    for name, s in seq.items():
        if s["errors"]:
            print(f"sequential errors {name}: {s['errors']}")
    for name, s in streams.items():
        if s["errors"]:
            print(f"stream errors {name}: {s['errors']}")
    if summary.get("profile"):
        from gateway_profile import print_profile

        print_profile(summary["profile"])
    return table


# --------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run to try the harness (~1 min)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per target")
    parser.add_argument("--rounds", type=int, default=4, help="sequential rounds (target order rotates)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed requests per target first")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--streams", type=int, default=200, help="concurrent streaming clients")
    parser.add_argument("--stream-seconds", type=float, default=10.0)
    parser.add_argument(
        "--stream-rounds", type=int, default=2, help="rounds of the streams and throughput runs"
    )
    parser.add_argument(
        "--stream-chunk-delay-ms", type=int, default=0, help="the fake waits this long before each piece"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="clients of the throughput run")
    parser.add_argument("--throughput-seconds", type=float, default=8.0)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds not counted at the start of a loop")
    parser.add_argument(
        "--otel", action="store_true", help="Meterline exports spans and metrics (otel_endpoint) to a sink"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy pass on Meterline (not in figures)")
    parser.add_argument("--profile-requests", type=int, default=2000, help="requests per profile pass")
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="concurrent profile pass")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--profile-stacks", type=Path, help="keep py-spy's raw stacks: PATH.active.txt, PATH.gil.txt"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON results (default bench/results/gateway-<date>.json)"
    )
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}")
    if args.quick:
        args.requests, args.rounds, args.warmup = 400, 2, 100
        args.stream_seconds, args.stream_rounds, args.throughput_seconds, args.ramp = 4.0, 1, 3.0, 1.0
        args.profile_requests = min(args.profile_requests, 1000)
    if args.output is None:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        args.output = RESULTS / f"gateway-{day}{'-quick' if args.quick else ''}.json"
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop the servers


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    summary = run(args)
    summary["table"] = report(summary)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")
    print(f"results: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


def _finite(value: Any) -> Any:
    """NaN (a percentile of nothing) as null, so the JSON is strict."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
