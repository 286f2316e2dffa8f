"""Prometheus metrics at ``/metrics``. One registry per application, so that several apps in one process
(tests) never share counters. Label values are route names, endpoint paths and error codes: bounded sets
chosen by the operator, never by a client, and never a key."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        self.quarantined = Gauge(
            "meterline_quarantined_entries",
            "Usage entries that could not be settled and await an operator (meterline quarantine list).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
