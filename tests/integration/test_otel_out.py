"""OpenTelemetry out: a real `meterline serve` with `otel_endpoint` exports a GenAI span per gateway
request and the GenAI client metrics over OTLP/HTTP to a receiver on loopback, which decodes them with
`opentelemetry-proto`; what they say equals the ledger."""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from integration.test_serve import process
from meterline.testing.fake_upstream import FakeUpstream
from servers import free_port

ADMIN = "ml_admin_otel_out_0123456789abcdef"
COLLECTOR_TOKEN = "collector-token-0123456789"


class Receiver:
    """An OTLP/HTTP receiver: keeps every export it is sent, by path, with its headers."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[bytes]] = defaultdict(list)
        self.headers: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                owner.bodies[self.path].append(body)
                owner.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[Any]:
        found = []
        for body in self.bodies["/v1/traces"]:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            found += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return found

    def histograms(self, name: str) -> list[Any]:
        """The latest point of each series of histogram ``name`` (points are cumulative)."""
        latest: dict[tuple[Any, ...], Any] = {}
        for body in self.bodies["/v1/metrics"]:
            request = ExportMetricsServiceRequest()
            request.ParseFromString(body)
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for point in (p for m in sm.metrics if m.name == name for p in m.histogram.data_points):
                        latest[tuple(sorted(attrs(point.attributes).items()))] = point
        return list(latest.values())


def attrs(pairs: Any) -> dict[str, Any]:
    def value(pair: KeyValue) -> Any:
        return getattr(pair.value, pair.value.WhichOneof("value"))

    return {pair.key: value(pair) for pair in pairs}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()
    found.server.server_close()


def test_each_gateway_request_is_a_genai_span_and_metric_point(tmp_path: Path, receiver: Receiver) -> None:
    with FakeUpstream.start(api_key="sk-otel-out") as upstream:
        config = tmp_path / "meterline.toml"
        config.write_text(
            f'admin_key = "{ADMIN}"\notel_endpoint = "{receiver.url}"\notel_metrics_interval_ms = 200\n'
            f'otel_service_name = "meterline-test"\n'
            f'[otel_headers]\nAuthorization = "Bearer {COLLECTOR_TOKEN}"\n'
            f'[[upstreams]]\nname = "fake"\nprovider = "openai"\nbase_url = "{upstream.url}"\n'
            f'api_key = "sk-otel-out"\nmodels = ["gpt-*"]\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METERLINE_", "OTEL_"))}
        # The variables an instrumented application's exporter reads, as the README shows them: never
        # sent to Meterline's own collector.
        env["OTEL_EXPORTER_OTLP_HEADERS"] = "Authorization=Bearer ml_live_app_key,x-app=1"
        port = free_port()
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with process(["serve", "--config", str(config), "--port", str(port)], env, tmp_path, port) as base:
            org = httpx.post(
                f"{base}/v1/admin/organizations", json={"name": "Traced", "plan": "pro"}, headers=admin
            )
            ws = httpx.post(
                f"{base}/v1/admin/workspaces",
                json={"organization_id": org.json()["id"], "name": "W"},
                headers=admin,
            )
            key = httpx.post(
                f"{base}/v1/admin/keys", json={"workspace_id": ws.json()["id"], "name": "K"}, headers=admin
            )
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key.json()["key"], max_retries=0)
            hi = [{"role": "user", "content": "Say hello"}]
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=7, messages=hi)
            for _ in client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=hi, stream=True):
                pass
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="no-route-model", max_tokens=3, messages=hi)
            rows = httpx.get(
                f"{base}/v1/usage/ledger", headers={"Authorization": f"Bearer {key.json()['key']}"}
            )
            ledger = {row["model"]: row for row in rows.json()["data"]}
        # The server has stopped: everything queued was exported on the way out.

    assert receiver.headers
    assert all(h.get("authorization") == f"Bearer {COLLECTOR_TOKEN}" for h in receiver.headers)
    assert not any("x-app" in h for h in receiver.headers)
    spans = {span.name: span for span in receiver.spans()}
    assert set(spans) == {"chat gpt-4o-mini", "chat gpt-4o", "chat no-route-model"}
    for model in ("gpt-4o-mini", "gpt-4o"):
        span, row = attrs(spans[f"chat {model}"].attributes), ledger[model]
        assert span["gen_ai.operation.name"] == "chat"
        assert span["gen_ai.provider.name"] == "openai"
        assert span["gen_ai.request.model"] == span["gen_ai.response.model"] == model
        assert span["gen_ai.usage.input_tokens"] == row["prompt_tokens"]
        assert span["gen_ai.usage.output_tokens"] == row["completion_tokens"]
        assert span["meterline.cost"] == row["cost"]
        assert span["meterline.credits"] == row["credits"]
        assert span["meterline.receipt_id"] == row["receipt_id"]
        assert span["meterline.ledger_row_id"] == row["id"]
        assert span["http.response.status_code"] == 200
    refused = attrs(spans["chat no-route-model"].attributes)
    assert (refused["error.type"], refused["http.response.status_code"]) == ("404", 404)
    assert "gen_ai.usage.input_tokens" not in refused

    tokens = receiver.histograms("gen_ai.client.token.usage")
    by_type: dict[str, int] = defaultdict(int)
    for point in tokens:
        by_type[attrs(point.attributes)["gen_ai.token.type"]] += int(point.sum)
    assert by_type["input"] == sum(r["prompt_tokens"] for r in ledger.values())
    assert by_type["output"] == sum(r["completion_tokens"] for r in ledger.values())
    durations = receiver.histograms("gen_ai.client.operation.duration")
    assert sum(p.count for p in durations) == 3
    assert [attrs(p.attributes).get("error.type") for p in durations].count("404") == 1
