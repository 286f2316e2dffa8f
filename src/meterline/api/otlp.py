"""OTLP/HTTP trace requests (protobuf or JSON, optionally gzip) decoded into ``metering.genai_spans.Span``,
and the answers OTLP exporters expect (``ExportTraceServiceResponse``, partial success included).

Decoding uses the project's own generated classes (``opentelemetry-proto``). OTLP/JSON differs from
protobuf's canonical JSON in one place: trace and span ids are hex, not base64; they are turned into
base64 before the parser sees them.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from starlette.responses import Response

from meterline.errors import InvalidRequest, PayloadTooLarge
from meterline.metering.genai_spans import Span

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# Attribute values nest (arrays, maps); deeper than this is not a GenAI attribute and is not read.
_MAX_DEPTH = 8
# An OTLP/JSON document nests about 8 levels to a span's attribute values; protobuf's parser stops at 100.
_MAX_JSON_DEPTH = 64
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"


def media_type(content_type: str | None) -> str:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in (PROTOBUF, JSON):
        return kind
    raise UnsupportedMediaType(
        f"OTLP/HTTP traces are {PROTOBUF} or {JSON}, got {kind or 'no content type'!r}", param="content-type"
    )


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body, gunzipped when ``Content-Encoding: gzip``; never more than ``limit`` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding != "gzip":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send gzip or none", param="content-encoding"
        )
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidRequest("the body is not valid gzip", param="content-encoding") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body is larger than {limit} bytes; send smaller batches")
    if not inflater.eof or inflater.unused_data:
        raise InvalidRequest(
            "the gzip body is truncated or holds more than one member", param="content-encoding"
        )
    return data


def _hex_ids_to_base64(document: dict[str, Any]) -> None:
    """OTLP/JSON's hex ids, as protobuf's JSON parser wants them (base64), in place. Walked with a stack,
    not by recursion: a hostile body nests a thousand levels deep; past ``_MAX_JSON_DEPTH`` it is not
    OTLP (whose messages nest a handful of levels, attribute values a few more)."""
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_JSON_DEPTH:
            raise InvalidRequest(f"the body nests deeper than {_MAX_JSON_DEPTH} levels; it is not OTLP")
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _ID_FIELDS and isinstance(value, str):
                    try:
                        node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                    except ValueError:
                        raise InvalidRequest(f"{key} must be hex, got {value[:40]!r}", param=key) from None
                elif isinstance(value, dict | list):
                    stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node if isinstance(item, dict | list))


def decode(body: bytes, kind: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    if kind == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError:
            raise InvalidRequest("the body is not an OTLP ExportTraceServiceRequest (protobuf)") from None
        return request
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest("an OTLP/JSON body is an object with resourceSpans")
    _hex_ids_to_base64(document)
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not an OTLP ExportTraceServiceRequest: {str(exc)[:200]}") from None
    return request


def _value(value: AnyValue, depth: int = 0) -> Any:
    kind = value.WhichOneof("value")
    if kind is None or depth > _MAX_DEPTH:
        return None
    if kind == "array_value":
        return tuple(_value(v, depth + 1) for v in value.array_value.values)
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values, depth + 1)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _attributes(pairs: Any, depth: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        found[pair.key] = _value(pair.value, depth)
    return found


def spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                nanos = span.end_time_unix_nano or span.start_time_unix_nano
                yield Span(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    name=span.name,
                    end=datetime.fromtimestamp(nanos // 1_000_000_000, UTC).replace(
                        microsecond=(nanos % 1_000_000_000) // 1000
                    ),
                    attributes=_attributes(span.attributes),
                    resource=resource,
                )


def answer(kind: str, rejected: int, message: str) -> Response:
    """``ExportTraceServiceResponse`` in the request's encoding. ``partial_success`` is left out when
    every span was taken and there is nothing to say; with ``rejected`` 0 its message is a warning."""
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    if kind == PROTOBUF:
        return Response(response.SerializeToString(), media_type=PROTOBUF)
    return Response(orjson.dumps(json_format.MessageToDict(response)), media_type=JSON)
