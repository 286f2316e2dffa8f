"""A program instrumented with a real OpenTelemetry GenAI instrumentation, as a user's would be: the
official SDK calls the upstream directly and the real OTLP/HTTP exporter sends the spans to Meterline.

    python otel_client.py INSTRUMENTATION MODE TRACES_URL KEY UPSTREAM_URL [--retry]

INSTRUMENTATION: ``openai-v2`` (opentelemetry-instrumentation-openai-v2), ``openllmetry-openai``,
``openllmetry-anthropic`` (OpenLLMetry) or ``openinference-openai``. MODE ``calls`` makes the calls of
``calls()`` (``gateway`` makes the same ones through Meterline's gateway, uninstrumented: the reference).
``--retry`` exports every finished span a second time, as an exporter does when its first attempt failed.
Run in a process of its own: instrumentations patch the SDKs for the whole process.
"""

from __future__ import annotations

import sys

import anthropic
import openai
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def instrument(name: str, provider: TracerProvider) -> None:
    if name == "openai-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=provider)
    elif name == "openllmetry-openai":
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor as LlmetryOpenAI

        LlmetryOpenAI().instrument(tracer_provider=provider)
    elif name == "openllmetry-anthropic":
        from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor

        AnthropicInstrumentor().instrument(tracer_provider=provider)
    elif name == "openinference-openai":
        from openinference.instrumentation.openai import OpenAIInstrumentor as OpenInference

        OpenInference().instrument(tracer_provider=provider)
    else:
        raise SystemExit(f"unknown instrumentation {name}")


def calls(name: str, openai_url: str, anthropic_url: str, key: str) -> None:
    hi = [{"role": "user", "content": "Say hello to the metering service"}]
    if name.endswith("anthropic"):
        claude = anthropic.Anthropic(base_url=anthropic_url, api_key=key, max_retries=0)
        claude.messages.create(model="claude-3-5-haiku-latest", max_tokens=9, messages=hi)
        with claude.messages.stream(model="claude-3-5-haiku-latest", max_tokens=5, messages=hi) as stream:
            for _ in stream:
                pass
        return
    client = openai.OpenAI(base_url=openai_url, api_key=key, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=9, messages=hi, user="alice")
    chunks = client.chat.completions.create(
        model="gpt-4o", max_tokens=5, messages=hi, stream=True, stream_options={"include_usage": True}
    )
    for _ in chunks:
        pass
    client.embeddings.create(model="text-embedding-3-small", input="metering spans")


def main() -> None:
    name, mode, traces_url, key, upstream = sys.argv[1:6]
    if mode == "gateway":  # the same calls through Meterline's gateway (traces_url is its base)
        calls(name, f"{traces_url}/v1", traces_url, key)
        return
    provider = TracerProvider(resource=Resource.create({"service.name": "Support Bot"}))
    exporter = OTLPSpanExporter(endpoint=traces_url, headers={"Authorization": f"Bearer {key}"})
    finished = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(SimpleSpanProcessor(finished))
    instrument(name, provider)
    calls(name, f"{upstream}/v1", upstream, "sk-otel-upstream")
    if "--retry" in sys.argv:
        exporter.export(finished.get_finished_spans())
    provider.shutdown()
    print(len(finished.get_finished_spans()))


if __name__ == "__main__":
    main()
