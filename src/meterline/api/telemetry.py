"""OpenTelemetry out: with ``otel_endpoint`` set, each gateway request is exported as a GenAI client span
(the GenAI semantic conventions' attributes, plus what Meterline billed: ``meterline.cost``,
``meterline.credits``, ``meterline.receipt_id``) and counted in the GenAI client metrics
(``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration``), over OTLP/HTTP.

Off by default, and then nothing here runs. On, the request path only records: the span is made when
the request is over (from the access log's entry: its row, status and duration) and handed to a batch
processor, whose thread exports it; metrics are aggregated in memory and exported every
``otel_metrics_interval_ms``. A collector that is down or slow costs the gateway nothing but the spans
the batch queue drops when full. Uses its own tracer and meter providers: an application that embeds
Meterline keeps its global ones.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from meterline import __version__
from meterline.config import Settings
from meterline.metering.records import LedgerRow
from meterline.money import format_nanos

# The GenAI semantic conventions' operation for each gateway endpoint.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/audio/transcriptions": "transcription",
}
# The buckets the GenAI metric conventions advise.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKENS_METRIC = "gen_ai.client.token.usage"
OPERATION_DURATION = "gen_ai.client.operation.duration"


# The exporters add the headers these variables name to every export. They are how an application
# instrumented with OpenTelemetry is told its collector's credentials, often a Meterline key for
# ``POST /v1/traces`` (the README says so): beside Meterline's own ``otel_headers`` they would send that
# key to Meterline's collector. Meterline's telemetry reads ``otel_headers`` only.
_HEADER_VARIABLES = (
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
)
_ENVIRONMENT = threading.Lock()


@contextlib.contextmanager
def _without_header_variables() -> Iterator[None]:
    """The exporters read the variables when made: made without them (once, at start-up)."""
    with _ENVIRONMENT:
        saved = {name: os.environ.pop(name) for name in _HEADER_VARIABLES if name in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


class GatewayTelemetry:
    """The deployment's span and metric exporters (one per process)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.otel_endpoint is not None
        base = settings.otel_endpoint.rstrip("/")
        headers = {name: value.get_secret_value() for name, value in settings.otel_headers.items()}
        with _without_header_variables():
            span_exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers)
            metric_exporter = OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers)
        resource = Resource.create(
            {"service.name": settings.otel_service_name, "service.version": __version__}
        )
        self._tracer_provider = TracerProvider(resource=resource)
        self._tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self._tracer = self._tracer_provider.get_tracer("meterline.gateway", __version__)
        reader = PeriodicExportingMetricReader(
            metric_exporter, export_interval_millis=settings.otel_metrics_interval_ms
        )
        self._meter_provider = MeterProvider(
            metric_readers=[reader],
            resource=resource,
            views=[
                View(
                    instrument_name=TOKENS_METRIC,
                    aggregation=ExplicitBucketHistogramAggregation(TOKEN_BUCKETS),
                ),
                View(
                    instrument_name=OPERATION_DURATION,
                    aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS),
                ),
            ],
        )
        meter = self._meter_provider.get_meter("meterline.gateway", __version__)
        self._tokens = meter.create_histogram(
            TOKENS_METRIC, unit="{token}", description="Number of input and output tokens used."
        )
        self._duration = meter.create_histogram(
            OPERATION_DURATION, unit="s", description="GenAI operation duration."
        )

    def record(
        self,
        *,
        path: str,
        status: int,
        start_ns: int,
        end_ns: int,
        duration_s: float,
        requested_model: str | None,
        row: LedgerRow | None,
        upstream: str | None,
        ids: Mapping[str, str | None],
    ) -> None:
        """One gateway request, over: its span and its metric points."""
        operation = OPERATIONS.get(path, "chat")
        model = requested_model or (row.model if row is not None else None)
        common: dict[str, str] = {"gen_ai.operation.name": operation}
        provider = row.provider if row is not None else None
        if provider:
            common["gen_ai.provider.name"] = provider
        if model:
            common["gen_ai.request.model"] = model
        if row is not None and row.model:
            common["gen_ai.response.model"] = row.model
        failed = status >= 400
        attributes: dict[str, str | int | bool] = {**common, "http.response.status_code": status}
        if failed:
            attributes["error.type"] = str(status)
        if upstream is not None:
            attributes["meterline.upstream"] = upstream
        for name, value in ids.items():
            if value is not None:
                attributes[f"meterline.{name}"] = value
        if row is not None:
            attributes.update(
                {
                    "gen_ai.usage.input_tokens": row.prompt_tokens,
                    "gen_ai.usage.output_tokens": row.completion_tokens,
                    "gen_ai.usage.cache_read.input_tokens": row.cache_read_tokens,
                    "gen_ai.usage.cache_creation.input_tokens": row.cache_write_tokens,
                    # Exact decimal text: a double would not hold every amount of money.
                    "meterline.cost": format_nanos(row.cost_nanos),
                    "meterline.currency": row.currency,
                    "meterline.credits": format_nanos(row.credits_nanos),
                    "meterline.ledger_row_id": row.id,
                    "meterline.failover": row.failover,
                    "meterline.overage": row.overage,
                }
            )
            if row.receipt_id:
                attributes["meterline.receipt_id"] = row.receipt_id
        span = self._tracer.start_span(
            f"{operation} {model}" if model else operation,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        if failed:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)
        metric_attributes: dict[str, str] = dict(common)
        if failed:
            metric_attributes["error.type"] = str(status)
        self._duration.record(duration_s, metric_attributes)
        if row is not None:
            self._tokens.record(row.prompt_tokens, {**common, "gen_ai.token.type": "input"})
            self._tokens.record(row.completion_tokens, {**common, "gen_ai.token.type": "output"})

    def shutdown(self) -> None:
        """Export what is queued and stop (the server is stopping)."""
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()
