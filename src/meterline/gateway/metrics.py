"""Prometheus metrics at ``/metrics``. One registry per application, so that several apps in one process
(tests) never share counters. Label values are route names, endpoint paths and error codes: bounded sets
chosen by the operator, never by a client, and never a key.

With ``serve --workers N`` a scrape reaches one worker, whichever the kernel gives its connection, so
every worker answers for all of them: the supervisor names a fresh directory in ``SHARED_DIR``
(prometheus_client's multiprocess mode, read when prometheus_client is first imported, so before any
worker starts), each worker keeps its values in files there, and a scrape sums them. A worker that died
keeps its counts (counters never go back); its share of the in-flight gauge is dropped at the next
scrape. Keeping a value in a file costs 0.6 to 1.2 µs more per update (~5 µs per gateway request), and
only with several workers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# prometheus_client's own variable: the directory of every worker's values.
SHARED_DIR = "PROMETHEUS_MULTIPROC_DIR"

# Added latency is what matters: the buckets reach down to 100 µs.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "meterline_gateway_requests",
            "Gateway requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "meterline_gateway_request_seconds",
            "Time from request to the last byte of the response, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "meterline_gateway_upstream_seconds",
            "Time until an upstream answered (headers received), by upstream.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "meterline_gateway_upstream_errors",
            "Upstream attempts that failed, by upstream and kind (connect, timeout, status, protocol).",
            ["upstream", "kind"],
            registry=r,
        )
        self.failovers = Counter(
            "meterline_gateway_failovers",
            "Requests served by a later route than the first, by upstream.",
            ["upstream"],
            registry=r,
        )
        self.refusals = Counter(
            "meterline_quota_refusals",
            "Requests refused by the quota engine, by error code.",
            ["code"],
            registry=r,
        )
        self.in_flight = Gauge(
            "meterline_reservations_in_flight",
            "Gateway reservations not yet settled or released.",
            registry=r,
            multiprocess_mode="livesum",  # the workers' sum, a dead worker's left out
        )
        self.tokens = Counter(
            "meterline_gateway_tokens",
            "Tokens settled through the gateway, by kind (prompt, completion).",
            ["kind"],
            registry=r,
        )

        self.otlp_spans = Counter(
            "meterline_otlp_spans",
            "Spans received on POST /v1/traces, by outcome: metered, duplicate, rejected, or ignored (not "
            "a model call).",
            ["outcome"],
            registry=r,
        )
        # Read from the database at each scrape (one count for every worker), never kept in a file.
        self.quarantined = _Quarantined()
        r.register(self.quarantined)
        self._shared_dir = os.environ.get(SHARED_DIR)

    def render(self) -> bytes:
        if self._shared_dir is None:
            return generate_latest(self.registry)
        _forget_dead_workers(self._shared_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._shared_dir)  # type: ignore[no-untyped-call]
        registry.register(self.quarantined)
        return generate_latest(registry)


class _Quarantined(Collector):
    def __init__(self) -> None:
        self._count: Callable[[], float] = lambda: 0.0

    def set_function(self, count: Callable[[], float]) -> None:
        self._count = count

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "meterline_quarantined_entries",
            "Usage entries that could not be settled and await an operator (meterline quarantine list).",
            value=self._count(),
        )


def _forget_dead_workers(directory: str) -> None:
    """Drop the gauge shares of workers that are gone (files ``gauge_live<mode>_<pid>.db``): a worker
    killed with reservations in flight would otherwise count them for ever. Their counters stay."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            # Two scrapes at once (threads, or two workers) may both find it: the second finds it gone.
            with contextlib.suppress(FileNotFoundError):
                multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's
