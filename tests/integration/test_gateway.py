"""The gateway end to end: the official ``openai`` and ``anthropic`` SDKs, unmodified, against a real
Meterline server on loopback, in front of fake upstreams that are real HTTP servers.

Every test checks what a user would: the SDK's answer, the headers, and the ledger row the request left
(tokens, exact cost, attribution, failover, receipt)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import time
import warnings
import wave
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet

from conftest import ADMIN, ADMIN_KEY, NOW, Tenant, make_tenant
from meterline.api.access_log import GATEWAY_PATHS
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.gateway.tokens import count_tokens
from meterline.services import Services, build_services
from meterline.testing.fake_upstream import FakeUpstream
from servers import ThreadServer, free_port

UPSTREAM_KEY = "sk-upstream-primary-0123456789abcdef"
BACKUP_KEY = "sk-upstream-backup-fedcba9876543210"
NANO = Decimal("0.000000001")
# genai-prices, per million tokens (USD).
GPT_4O_MINI = {"input": Decimal("0.15"), "cache_read": Decimal("0.075"), "output": Decimal("0.6")}
HAIKU = {
    "input": Decimal("1"),
    "cache_read": Decimal("0.1"),
    "cache_write": Decimal("1.25"),
    "output": Decimal("5"),
}


@pytest.fixture(scope="module")
def primary() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def backup() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=BACKUP_KEY) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_fakes(primary: FakeUpstream, backup: FakeUpstream) -> None:
    for fake in (primary, backup):
        fake.reset()


class Gateway:
    """A running Meterline server with one tenant, and ways to look at what it recorded."""

    def __init__(self, server: ThreadServer, services: Services, tenant: Tenant, http: httpx.Client) -> None:
        self.server, self.services, self.tenant, self.http = server, services, tenant, http
        self.base = server.base
        # SDK clients handed out, closed at teardown: a client left to the garbage collector inside a
        # reference cycle (a caught exception's traceback) can have its socket finalized first, which
        # is a ResourceWarning in whatever test runs then.
        self._clients: list[openai.OpenAI | anthropic.Anthropic] = []

    def openai(self, **kw: Any) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"{self.base}/v1", api_key=kw.pop("key", self.tenant.key), max_retries=0, **kw
        )
        self._clients.append(client)
        return client

    def async_openai(self) -> openai.AsyncOpenAI:
        """Use as ``async with``: it closes on the loop it ran on."""
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=self.tenant.key, max_retries=0)

    def anthropic(self) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=self.base, api_key=self.tenant.key, max_retries=0)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()

    def ledger(self) -> list[dict[str, Any]]:
        response = self.http.get("/v1/usage/ledger", headers=self.tenant.headers)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["data"]
        return rows

    def only_row(self) -> dict[str, Any]:
        rows = self.ledger()
        assert len(rows) == 1, rows
        return rows[0]

    def usage(self) -> dict[str, Any]:
        response = self.http.get("/v1/usage", headers=self.tenant.headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def open_reservations(self) -> int:
        return self.services.reservation_store.count()


def _settings(db_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream, **extra: Any) -> Any:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: a connect error
    upstreams = [
        {"name": "dead", "base_url": dead, "models": ["gpt-4.1"]},
        {
            "name": "primary",
            "provider": "openai",
            "base_url": primary.url,
            "api_key": UPSTREAM_KEY,
            "region": "eu-west",
            "models": [
                "gpt-4o-mini",
                "gpt-4o",
                "text-embedding-3-small",
                "whisper-1",
                "gpt-3.5-turbo-instruct",
                "costly-*",
            ],
        },
        {
            "name": "backup",
            "provider": "openai",
            "base_url": backup.url,
            "api_key": BACKUP_KEY,
            "region": "us-east",
            "models": ["gpt-4o-mini", "gpt-4.1", "costly-*"],
        },
        {
            "name": "claude",
            "provider": "anthropic",
            "base_url": primary.url,
            "api_key": UPSTREAM_KEY,
            "models": ["claude-*"],
        },
        {
            "name": "claude-backup",
            "provider": "anthropic",
            "base_url": backup.url,
            "api_key": BACKUP_KEY,
            "region": "us-east",
            "models": ["claude-*"],
        },
    ]
    return load_settings(
        database_url=db_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        upstreams=upstreams,
        stream_progress_interval_ms=20,
        **extra,
    )


def _start(settings: Any, **tenant: Any) -> Iterator[Gateway]:
    services = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    try:
        with (
            ThreadServer(create_app(settings, services=services)) as server,
            httpx.Client(base_url=server.base, timeout=30) as http,
        ):
            gateway = Gateway(server, services, make_tenant(http, **tenant), http)  # type: ignore[arg-type]
            try:
                yield gateway
            finally:
                gateway.close_clients()
    finally:
        services.close()


@pytest.fixture
def gw(sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream) -> Iterator[Gateway]:
    yield from _start(_settings(sqlite_url, tmp_path, primary, backup))


@pytest.fixture
def gw_any(
    database_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> Iterator[Gateway]:
    """The gateway on each backend (SQLite and PostgreSQL)."""
    yield from _start(_settings(database_url, tmp_path, primary, backup))


def _cost(prices: dict[str, Decimal], prompt: int, completion: int, read: int = 0, write: int = 0) -> Decimal:
    total = (
        (prompt - read - write) * prices["input"]
        + read * prices.get("cache_read", Decimal(0))
        + write * prices.get("cache_write", Decimal(0))
        + completion * prices["output"]
    ) / 1_000_000
    return total.quantize(NANO)


HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


# -- OpenAI chat, sync -------------------------------------------------------------------------------
def test_chat_completion_is_metered_exactly(gw_any: Gateway, primary: FakeUpstream) -> None:
    client = gw_any.openai()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO, max_tokens=7)
    completion = raw.parse()
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7
    for name in ("RPM", "TPM"):
        for part in ("Limit", "Remaining", "Reset"):
            assert raw.headers[f"x-ratelimit-{part.lower()}-{name.lower()}"].lstrip("-").isdigit()
    assert raw.headers["x-request-id"]
    receipt_id = raw.headers["x-meterline-receipt-id"]

    row = gw_any.only_row()
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    assert row["completion_tokens"] == 7
    assert Decimal(row["cost"]) == _cost(GPT_4O_MINI, completion.usage.prompt_tokens, 7)
    assert row["receipt_id"] == receipt_id
    assert row["provider"] == "openai"
    assert row["region"] == "eu-west"
    assert row["failover"] is False
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["source"] == "api"
    assert row["modality"] == "chat"
    assert row["key_prefix"] == gw_any.tenant.key_info["key_prefix"]
    assert gw_any.open_reservations() == 0

    # The upstream got the client's body byte for byte, with the upstream's key and not the client's.
    (seen,) = primary.requests()
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert gw_any.tenant.key not in json.dumps(seen.headers) + (seen.body or "")
    assert seen.body is not None
    assert seen.body.encode() == raw.http_request.content


def test_response_body_passes_through_unchanged(gw: Gateway, primary: FakeUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 4}
    direct = httpx.post(
        f"{primary.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}
    ).json()
    proxied = gw.http.post("/v1/chat/completions", json=body, headers=gw.tenant.headers)
    assert proxied.status_code == 200, proxied.text
    got = proxied.json()
    for volatile in ("id", "created"):
        direct.pop(volatile, None)
        got.pop(volatile, None)
    assert got == direct


# -- streaming ---------------------------------------------------------------------------------------
def test_stream_is_metered_and_the_extra_usage_chunk_is_hidden(gw: Gateway, primary: FakeUpstream) -> None:
    stream = gw.openai().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=9, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.choices for c in chunks), "the client did not ask for usage and must not get the usage chunk"
    assert all(c.usage is None for c in chunks)
    (seen,) = primary.requests()
    assert seen.json["stream_options"] == {"include_usage": True}
    row = gw.only_row()
    assert row["completion_tokens"] == 9 == count_tokens(text, "gpt-4o-mini")
    assert Decimal(row["cost"]) == _cost(GPT_4O_MINI, row["prompt_tokens"], 9)


def test_stream_with_usage_asked_for_gets_it(gw: Gateway) -> None:
    stream = gw.openai().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1
    row = gw.only_row()
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage[0].prompt_tokens, 5)


def test_stream_with_usage_asked_for_gets_it_when_the_upstream_sends_none(
    gw: Gateway, primary: FakeUpstream
) -> None:
    # Seed 001: every response carries usage. The upstream sends no usage chunk; the gateway's count
    # is sent in its place, before [DONE], and is what the row says.
    primary.set_default("no_usage")
    stream = gw.openai().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1
    row = gw.only_row()
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage[0].prompt_tokens,
        usage[0].completion_tokens,
    )
    assert usage[0].completion_tokens == 5
    # A client that did not ask gets no usage chunk.
    plain = gw.openai().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=2, stream=True
    )
    assert [c.usage for c in plain if c.usage is not None] == []


def test_async_client_plain_and_streamed(gw: Gateway) -> None:
    async def run() -> tuple[int, str]:
        async with gw.async_openai() as client:
            plain = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=3)
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, max_tokens=6, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert plain.usage is not None
            return plain.usage.completion_tokens, text

    completion_tokens, text = asyncio.run(run())
    assert completion_tokens == 3
    assert count_tokens(text, "gpt-4o-mini") == 6
    assert sorted(r["completion_tokens"] for r in gw.ledger()) == [3, 6]


def test_upstream_without_usage_is_counted_locally(gw: Gateway, primary: FakeUpstream) -> None:
    primary.set_default("no_usage")
    client = gw.openai()
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=8)
    assert plain.usage is not None, "the gateway adds usage when the upstream leaves it out"
    assert plain.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=5, stream=True)
    assert sum(1 for _ in stream) > 0
    rows = sorted(gw.ledger(), key=lambda r: r["completion_tokens"])
    assert [r["completion_tokens"] for r in rows] == [5, 8]
    assert rows[1]["prompt_tokens"] == plain.usage.prompt_tokens > 0


def test_a_stream_without_usage_is_counted_as_its_joined_text(gw: Gateway, primary: FakeUpstream) -> None:
    # Six "tok " pieces are 7 tokens joined, but 12 counted one piece at a time (what was billed).
    primary.set_default("no_usage", piece="tok ")
    stream = gw.openai().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=6, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok " * 6
    assert count_tokens(text, "gpt-4o-mini") == 7
    assert gw.only_row()["completion_tokens"] == 7


def test_cached_tokens_are_priced_once(gw: Gateway, primary: FakeUpstream) -> None:
    primary.set_default("cache")
    completion = gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=4)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    cached = completion.usage.prompt_tokens_details.cached_tokens or 0
    assert cached > 0
    row = gw.only_row()
    assert row["cache_read_tokens"] == cached
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    assert Decimal(row["cost"]) == _cost(GPT_4O_MINI, completion.usage.prompt_tokens, 4, read=cached)


# -- Anthropic ---------------------------------------------------------------------------------------
def test_anthropic_messages_plain_stream_and_cache(gw_any: Gateway, primary: FakeUpstream) -> None:
    client = gw_any.anthropic()
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=6, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.usage.output_tokens == 6
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert count_tokens(text, "claude-haiku-4-5") == 4
    primary.script("cache")
    cached = client.messages.create(
        model="claude-haiku-4-5", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
    )
    read = cached.usage.cache_read_input_tokens or 0
    write = cached.usage.cache_creation_input_tokens or 0
    assert read > 0
    assert write > 0
    rows = {r["completion_tokens"]: r for r in gw_any.ledger()}
    assert set(rows) == {6, 4, 2}
    assert rows[6]["prompt_tokens"] == message.usage.input_tokens
    assert rows[6]["provider"] == "anthropic"
    c = rows[2]
    assert c["prompt_tokens"] == cached.usage.input_tokens + read + write
    assert (c["cache_read_tokens"], c["cache_write_tokens"]) == (read, write)
    assert Decimal(c["cost"]) == _cost(HAIKU, c["prompt_tokens"], 2, read=read, write=write)
    # Anthropic's SDK sends x-api-key: the upstream sees its own key only.
    assert all(r.headers.get("x-api-key") == UPSTREAM_KEY for r in primary.requests())
    assert all("authorization" not in r.headers for r in primary.requests())


# claude-sonnet-4-5's public prices, per million tokens: $3 input, $15 output, $0.30 cache read, $3.75
# 5-minute and $6 1-hour cache write; web search $10 per 1,000 calls.
SONNET = {"input": Decimal(3), "output": Decimal(15), "read": Decimal("0.3"), "5m": Decimal("3.75")}
SONNET_1H = Decimal(6)
WEB_SEARCH = Decimal("0.01")


def test_anthropic_one_hour_cache_writes_and_web_searches_are_billed(
    gw_any: Gateway, primary: FakeUpstream
) -> None:
    # The anthropic SDK, plain and streamed; the upstream reports 1-hour writes and web searches as the
    # API does (cache_creation, server_tool_use). Billing them as 5-minute writes and free searches was
    # the defect: 1-hour writes cost 2x input, not 1.25x.
    client = gw_any.anthropic()
    cache = {"cache_read_tokens": 1000, "cache_creation_tokens": 3000, "cache_creation_1h_tokens": 2000}
    primary.script("cache", count=2, web_search_requests=3, **cache)
    plain = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=6, messages=[{"role": "user", "content": "Find it"}]
    )
    assert plain.usage.cache_creation is not None
    assert plain.usage.cache_creation.ephemeral_1h_input_tokens == 2000
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=4, messages=[{"role": "user", "content": "Find it"}]
    ) as stream:
        "".join(stream.text_stream)
    rows = {r["completion_tokens"]: r for r in gw_any.ledger()}
    assert set(rows) == {6, 4}
    for completion, row in rows.items():
        uncached = row["prompt_tokens"] - 1000 - 3000
        assert uncached == plain.usage.input_tokens
        detail = (row["cache_write_tokens"], row["cache_write_1h_tokens"], row["web_searches"])
        assert detail == (3000, 2000, 3)
        expected = (
            uncached * SONNET["input"]
            + 1000 * SONNET["read"]
            + 1000 * SONNET["5m"]
            + 2000 * SONNET_1H
            + completion * SONNET["output"]
        ) / 1_000_000 + 3 * WEB_SEARCH
        assert Decimal(row["cost"]) == expected.quantize(NANO), row


def test_anthropic_async_stream(gw: Gateway) -> None:
    async def run() -> str:
        async with anthropic.AsyncAnthropic(base_url=gw.base, api_key=gw.tenant.key, max_retries=0) as client:
            stream = await client.messages.create(
                model="claude-haiku-4-5",
                max_tokens=5,
                stream=True,
                messages=[{"role": "user", "content": "Hi"}],
            )
            parts = []
            async for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    parts.append(event.delta.text)
            return "".join(parts)

    assert count_tokens(asyncio.run(run()), "claude-haiku-4-5") == 5
    assert gw.only_row()["completion_tokens"] == 5


# -- other endpoints ---------------------------------------------------------------------------------
def test_embeddings_completions_responses_and_models(gw: Gateway) -> None:
    client = gw.openai()
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["one", "two three"])
    assert embedding.data
    assert embedding.usage.prompt_tokens > 0
    legacy = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Count:", max_tokens=3)
    assert legacy.usage is not None
    assert legacy.usage.completion_tokens == 3
    response = client.responses.create(model="gpt-4o-mini", input="Hello", max_output_tokens=4)
    assert response.usage is not None
    assert response.usage.output_tokens == 4
    with client.responses.stream(model="gpt-4o-mini", input="Hello", max_output_tokens=3) as events:
        final = events.get_final_response()
    assert final.usage is not None
    assert final.usage.output_tokens == 3
    rows = {(r["endpoint"], r["completion_tokens"]): r for r in gw.ledger()}
    assert set(rows) == {
        ("/v1/embeddings", 0),
        ("/v1/completions", 3),
        ("/v1/responses", 4),
        ("/v1/responses", 3),
    }
    assert rows[("/v1/embeddings", 0)]["modality"] == "embedding"
    assert rows[("/v1/embeddings", 0)]["prompt_tokens"] == embedding.usage.prompt_tokens
    models = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "text-embedding-3-small", "whisper-1"} <= models


def _wav(seconds: Decimal, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return buffer.getvalue()


def test_transcription_is_billed_by_audio_seconds(gw: Gateway, primary: FakeUpstream) -> None:
    audio = _wav(Decimal("2.5"))
    client = gw.openai()
    result = client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", audio, "audio/wav"))
    assert isinstance(result.text, str)
    (row,) = gw.ledger()
    assert row["modality"] == "transcription"
    assert row["billing_unit"] == "audio_second"
    # The upstream's own count wins (it bills whole seconds): 3 s of whisper-1 at $0.36 per hour.
    assert Decimal(str(row["audio_seconds"])) == 3
    assert Decimal(row["cost"]) == Decimal("0.0003")
    # Without one, the duration of the WAV file itself is billed, and the answer says so (seed 001:
    # every response carries usage).
    primary.script("no_usage")
    counted = client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", audio, "audio/wav"))
    newest = gw.ledger()[0]
    assert Decimal(str(newest["audio_seconds"])) == Decimal("2.5")
    assert Decimal(newest["cost"]) == Decimal("0.00025")
    assert counted.usage is not None
    assert (counted.usage.type, counted.usage.seconds) == ("duration", 2.5)


# -- failover and upstream errors --------------------------------------------------------------------
@pytest.mark.parametrize("failure", [{"code": 500}, {"code": 503}, {"code": 429}])
def test_failover_on_5xx_and_429(
    gw: Gateway, primary: FakeUpstream, backup: FakeUpstream, failure: Any
) -> None:
    primary.script("status", **failure)
    completion = gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2
    row = gw.only_row()
    assert row["failover"] is True
    assert row["region"] == "us-east"
    assert len(backup.requests()) == 1
    assert backup.requests()[0].headers["authorization"] == f"Bearer {BACKUP_KEY}"
    metrics = gw.http.get("/metrics").text
    assert 'meterline_gateway_failovers_total{upstream="backup"} 1.0' in metrics
    assert 'meterline_gateway_upstream_errors_total{kind="status",upstream="primary"} 1.0' in metrics


def test_failover_on_connect_error_and_for_streams(gw: Gateway, primary: FakeUpstream) -> None:
    client = gw.openai()
    completion = client.chat.completions.create(model="gpt-4.1", messages=HELLO, max_tokens=2)
    assert completion.usage is not None
    primary.script("status", code=502)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=3, stream=True)
    assert sum(1 for _ in stream) > 0
    rows = gw.ledger()
    assert [r["failover"] for r in rows] == [True, True]
    assert {r["region"] for r in rows} == {"us-east"}


def test_timeout_fails_over(
    sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    settings = _settings(sqlite_url, tmp_path, primary, backup)
    slow_first = [{**u.model_dump(), "timeout_seconds": 0.5} for u in settings.upstreams]
    for gateway in _start(
        settings.model_copy(update={"upstreams": load_settings(upstreams=slow_first).upstreams})
    ):
        primary.script("hang")
        completion = gateway.openai().chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, max_tokens=2
        )
        assert completion.usage is not None
        assert gateway.only_row()["failover"] is True


def test_all_routes_failing_is_a_502_that_costs_nothing(
    gw: Gateway, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    primary.set_default("status", code=500)
    backup.set_default("status", code=503)
    with pytest.raises(openai.InternalServerError) as caught:
        gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_error"
    assert UPSTREAM_KEY not in caught.value.response.text
    assert BACKUP_KEY not in caught.value.response.text
    assert gw.ledger() == []
    assert gw.open_reservations() == 0
    assert Decimal(str(gw.usage()["credits"]["used"])) == 0


def test_upstream_client_error_passes_its_status_and_costs_nothing(
    gw: Gateway, primary: FakeUpstream
) -> None:
    primary.script("status", code=400)
    with pytest.raises(openai.BadRequestError) as caught:
        gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2)
    assert caught.value.body["code"] == "upstream_error"  # type: ignore[index]
    assert gw.ledger() == []
    assert gw.open_reservations() == 0


# -- quotas ------------------------------------------------------------------------------------------
def test_quota_refusal_is_a_rate_limit_error_with_the_envelope(gw: Gateway) -> None:
    limited = gw.http.post(
        "/v1/admin/keys",
        json={"workspace_id": gw.tenant.workspace["id"], "name": "tight", "limits": {"rpm": 1}},
        headers=ADMIN,
    ).json()["key"]
    client = gw.openai(key=limited)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=1)
    response = caught.value.response
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining-rpm"] == "0"
    assert caught.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert caught.value.body["limit"]["name"] == "key.rpm"  # type: ignore[index]
    assert len(gw.ledger()) == 1
    assert 'meterline_quota_refusals_total{code="rate_limit_exceeded"} 1.0' in gw.http.get("/metrics").text


def _full_alerts(gateway: Gateway) -> list[dict[str, Any]]:
    response = gateway.http.get("/v1/alerts", headers=gateway.tenant.headers)
    assert response.status_code == 200, response.text
    return [a for a in response.json()["data"] if (a["kind"], a["threshold"]) == ("usage_threshold", 100)]


def test_a_request_refused_by_the_used_up_credits_fires_the_100_threshold_once(
    sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    # One credit a period; a request costs 0.9997: the second is refused at 99.97 %, where no settle
    # would ever cross 100 %. The organization hears of it once, from the refusals.
    limits = ("tpm", "rpm", "daily_tokens", "monthly_tokens", "daily_calls", "monthly_calls")
    unlimited = dict.fromkeys(limits, -1)
    settings = _settings(
        sqlite_url,
        tmp_path,
        primary,
        backup,
        plans={"one": {"monthly_credits": 1, "overage": "block", **unlimited}},
        prices={"costly-model": {"per_request": "0.009997"}},
    )
    for gateway in _start(settings, plan="one", billing_anchor_day=14):
        client = gateway.openai()
        client.chat.completions.create(model="costly-model", messages=HELLO, max_tokens=2)
        assert _full_alerts(gateway) == []
        for _ in range(3):
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="costly-model", messages=HELLO, max_tokens=2)
            assert caught.value.body["code"] == "credits_exhausted"  # type: ignore[index]
        (alert,) = _full_alerts(gateway)
        assert alert["details"]["used_pct"] == "99.97"
        assert alert["details"]["refused"] is True
        assert len(gateway.ledger()) == 1


# -- streams that end early --------------------------------------------------------------------------
def _wait_for_rows(gateway: Gateway, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = gateway.ledger()
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_token_limit_holds_and_requests_get_the_output_it_leaves(
    gw: Gateway, primary: FakeUpstream
) -> None:
    # An identifier with daily_tokens = 60 (block) ended at 63 used: admission counted the prompt, the
    # provider counted more. Now the counted prompt is reserved with a margin, and a request asking for
    # more output than the limit leaves is served with max_tokens cut to what is left (the upstream is
    # told; before, it was refused outright): the limit holds.
    token = gw.http.post(
        "/v1/token",
        json={"identifier_id": "kid-1", "limits": {"daily_tokens": 60}},
        headers={**gw.tenant.headers, "X-Workspace-Id": gw.tenant.workspace["id"]},
    )
    assert token.status_code == 200, token.text
    client = gw.openai(key=token.json()["access_token"])
    primary.set_default("cache", cached_tokens=6)  # the provider's prompt: 3 tokens more than counted
    hello = [{"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=53)
    assert first.usage is not None
    assert first.usage.prompt_tokens == count_tokens("Hi", "gpt-4o-mini") + 3 + 6
    (asked,) = [request.json["max_tokens"] for request in primary.requests()]
    assert asked < 53, "the output limit was cut to what the daily limit left"
    assert first.usage.completion_tokens == asked
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=53)
    assert sum(row["total_tokens"] for row in gw.ledger()) <= 60


def test_a_request_without_its_own_output_limit_is_told_what_was_reserved_under_a_token_limit(
    gw: Gateway, primary: FakeUpstream
) -> None:
    # The reservation holds the operator's default output (1,024 here) when a request sets no limit; an
    # answer past it would pass a block token limit, so the upstream is told that default. Callers that
    # no such limit holds are forwarded as they asked.
    token = gw.http.post(
        "/v1/token",
        json={"identifier_id": "kid-2", "limits": {"daily_tokens": 50_000}},
        headers={**gw.tenant.headers, "X-Workspace-Id": gw.tenant.workspace["id"]},
    )
    assert token.status_code == 200, token.text
    limited = gw.openai(key=token.json()["access_token"])
    limited.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    limited.responses.create(model="gpt-4o-mini", input="Hi")
    limited.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=7)
    # Embeddings produce no output and legacy completions default to 16 tokens: forwarded as asked.
    limited.embeddings.create(model="text-embedding-3-small", input="Hi")
    limited.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    told = [
        {k: v for k, v in r.json.items() if k in ("max_tokens", "max_completion_tokens", "max_output_tokens")}
        for r in primary.requests()
    ]
    assert told == [
        {"max_completion_tokens": 1024},
        {"max_output_tokens": 1024},
        {"max_tokens": 7},
        {},
        {},
        {},
    ]


def _leave_a_stream(gw: Gateway, primary: FakeUpstream, after: int = 5) -> None:
    """Start a long, slow stream and go away after ``after`` chunks."""
    primary.script("drip", pieces=400, chunk_delay_ms=10)
    body = {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 400, "stream": True}
    received = 0
    with gw.http.stream("POST", "/v1/chat/completions", json=body, headers=gw.tenant.headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            received += line.startswith("data: {")
            if received == after:
                break


def test_a_per_minute_token_limit_refuses_instead_of_cutting_the_answer(
    sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    # Only day and period limits cut the output: a request over the minute's tokens waits (429 with
    # Retry-After) rather than being answered with a truncated reply.
    settings = _settings(sqlite_url, tmp_path, primary, backup, plans={"tpm": {**OPEN_PLAN, "tpm": 100}})
    for gw in _start(settings, plan="tpm"):
        client = gw.openai()
        hello = [{"role": "user", "content": "Hi"}]
        client.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=40)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=hello, max_tokens=40)
        assert [r.json["max_tokens"] for r in primary.requests()] == [40]


def test_a_transcription_uses_no_tokens_so_a_used_up_token_limit_does_not_refuse_it(
    gw: Gateway, primary: FakeUpstream
) -> None:
    token = gw.http.post(
        "/v1/token",
        json={"identifier_id": "listener", "limits": {"daily_tokens": 1}},
        headers={**gw.tenant.headers, "X-Workspace-Id": gw.tenant.workspace["id"]},
    )
    client = gw.openai(key=token.json()["access_token"])
    result = client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", _wav(Decimal(1)), "audio/wav")
    )
    assert isinstance(result.text, str)


def test_client_disconnect_bills_what_was_generated(gw: Gateway, primary: FakeUpstream) -> None:
    _leave_a_stream(gw, primary)
    (row,) = _wait_for_rows(gw)
    # The first chunk carries the role only; then one token per chunk.
    assert 4 <= row["completion_tokens"] < 400, "billed what was generated: not zero, not the reservation"
    assert row["metadata"] == {"meterline.stream_end": "disconnect", "meterline.disconnect": "bill_generated"}
    assert gw.open_reservations() == 0


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/chat/completions", "application/json"),
        ("/v1/events", "application/json"),
        ("/v1/events", "text/plain"),  # a body the middleware does not read first: the route does
    ],
)
def test_a_client_that_leaves_before_its_body_arrives_is_not_a_server_error(
    gw: Gateway, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, path: str, content_type: str
) -> None:
    """A client closing its connection while the server still reads the body (a timeout, a crash, a
    cancelled request) is answered by nobody: the log says so in one line, the access log's status is 499
    (nginx's "client closed request"), never a 500 with a traceback that an operator would page on."""
    caplog.set_level(logging.INFO)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {gw.tenant.key}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 4000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gw.server.port)) as sock:
        sock.sendall(head.encode() + b'{"model": "gpt-4o-mini", "messages": [')
        time.sleep(0.3)  # the server is reading the body now
    deadline = time.monotonic() + 10
    while not [r for r in caplog.records if r.name == "meterline.access"]:
        assert time.monotonic() < deadline, "no access log line for the abandoned request"
        time.sleep(0.05)
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meterline.access"]
    assert (line["path"], line["status"], line["rows"]) == (path, 499, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text
    assert [r.getMessage() for r in caplog.records if "closed the connection" in r.getMessage()] == [
        f"POST {path}: the client closed the connection before its request was read; nothing was answered "
        "or recorded"
    ]
    assert gw.ledger() == []
    assert gw.open_reservations() == 0
    assert primary.requests() == []  # nothing went upstream
    if path in GATEWAY_PATHS:  # the gateway's own counter of requests by status says so too
        metrics = gw.http.get("/metrics").text
        assert f'meterline_gateway_requests_total{{endpoint="{path}",status="499"}} 1.0' in metrics, metrics
        assert 'status="500"' not in metrics


# A plan defined only in config starts closed; this one opens every limit.
OPEN_PLAN = dict.fromkeys(
    ("daily_tokens", "monthly_tokens", "daily_calls", "monthly_calls", "rpm", "tpm", "monthly_credits"), -1
)


def test_a_plan_that_refuses_unpriced_models_refuses_them_before_the_upstream(
    sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    settings = _settings(
        sqlite_url, tmp_path, primary, backup, plans={"strict": {**OPEN_PLAN, "unpriced": "block"}}
    )
    for gw in _start(settings, plan="strict"):
        with pytest.raises(openai.PermissionDeniedError, match="has no price"):
            gw.openai().chat.completions.create(model="costly-unknown", messages=HELLO, max_tokens=2)
        assert primary.requests() == []  # refused before it reached the model: nothing to bill
        gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2)
        assert [r["model"] for r in gw.ledger()] == ["gpt-4o-mini"]


def test_a_void_disconnect_plan_bills_nothing_for_a_stream_the_client_left(
    sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    settings = _settings(
        sqlite_url, tmp_path, primary, backup, plans={"voiding": {**OPEN_PLAN, "disconnect": "void"}}
    )
    for gw in _start(settings, plan="voiding"):
        _leave_a_stream(gw, primary)
        (row,) = _wait_for_rows(gw)
        assert (row["prompt_tokens"], row["completion_tokens"], row["cost"]) == (0, 0, "0")
        assert row["metadata"] == {"meterline.stream_end": "disconnect", "meterline.disconnect": "void"}
        assert gw.open_reservations() == 0
        # A stream that ends normally is billed as usual on the same plan.
        gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=3)
        assert sorted(r["completion_tokens"] for r in gw.ledger()) == [0, 3]


def test_usage_moves_while_a_stream_is_running(gw: Gateway, primary: FakeUpstream) -> None:
    primary.script("drip", pieces=60, chunk_delay_ms=15)
    body = {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 60, "stream": True}
    seen_midway: list[Decimal] = []
    with gw.http.stream("POST", "/v1/chat/completions", json=body, headers=gw.tenant.headers) as response:
        for i, _line in enumerate(response.iter_lines()):
            if i == 40:
                assert gw.ledger() == []
                seen_midway.append(Decimal(str(gw.usage()["credits"]["used"])))
    final = Decimal(str(gw.usage()["credits"]["used"]))
    row = gw.only_row()
    assert 0 < seen_midway[0] < final
    assert final == Decimal(row["credits"])


def test_stream_progress_is_priced_like_its_settle(gw: Gateway, primary: FakeUpstream) -> None:
    # Anthropic says at message_start that 20,000 prompt tokens were written to the 1-hour cache: $0.12
    # at $6 per million (12 credits of $0.01), where the 5-minute price would make it 7.5. Credits seen
    # while the stream runs must already count them at that price.
    written = {"cache_creation_tokens": 20_000, "cache_creation_1h_tokens": 20_000}
    primary.script("cache", pieces=60, chunk_delay_ms=15, **written)
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 60,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    seen_midway: list[Decimal] = []
    with gw.http.stream("POST", "/v1/messages", json=body, headers=gw.tenant.headers) as response:
        for i, _line in enumerate(response.iter_lines()):
            if i == 120:
                assert gw.ledger() == []
                seen_midway.append(Decimal(str(gw.usage()["credits"]["used"])))
    assert seen_midway[0] >= 12
    assert Decimal(gw.only_row()["credits"]) > seen_midway[0]


def test_upstream_cutting_the_stream_bills_what_arrived(gw: Gateway, primary: FakeUpstream) -> None:
    primary.script("cut", after=3)
    stream = gw.openai().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=20, stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    (row,) = _wait_for_rows(gw)
    assert row["completion_tokens"] == 3
    assert row["metadata"] == {"meterline.stream_end": "upstream_cut"}


def test_stream_is_cut_when_credits_run_out(
    sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    settings = _settings(
        sqlite_url,
        tmp_path,
        primary,
        backup,
        plans={
            "metered": {
                "monthly_credits": 20,
                "overage": "block",
                "stream_cutoff": True,
                "tpm": -1,
                "rpm": -1,
                "daily_tokens": -1,
                "monthly_tokens": -1,
                "daily_calls": -1,
                "monthly_calls": -1,
            }
        },
        # One credit (0.01) per output token.
        prices={"costly-model": {"input": "0", "output": "10000"}},
    )
    for gateway in _start(settings, plan="metered"):
        primary.script("drip", pieces=200, chunk_delay_ms=10)
        stream = gateway.openai().chat.completions.create(
            model="costly-model", messages=HELLO, max_tokens=5, stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            for _ in stream:
                pass
        assert "credits" in str(caught.value)
        (row,) = _wait_for_rows(gateway)
        assert 20 <= row["completion_tokens"] < 200
        assert row["metadata"] == {"meterline.stream_end": "credits_exhausted"}


# -- receipts, attribution, secrets ------------------------------------------------------------------
def test_receipts_verify_against_the_published_keys(gw_any: Gateway) -> None:
    raw = gw_any.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=2
    )
    receipt_id = raw.headers["x-meterline-receipt-id"]
    receipt = gw_any.http.get(f"/v1/receipts/{receipt_id}", headers=gw_any.tenant.headers)
    assert receipt.status_code == 200, receipt.text
    token = receipt.json()["jws"]
    keys = KeySet.import_key_set(gw_any.http.get("/.well-known/jwks.json").json())
    warnings.simplefilter("ignore", SecurityWarning)  # joserfc prefers the name "Ed25519" to "EdDSA"
    verified = jws.deserialize_compact(token, keys, algorithms=["EdDSA"])
    claims = json.loads(verified.payload)
    row = gw_any.only_row()
    assert claims["completion_tokens"] == row["completion_tokens"] == 2
    assert Decimal(claims["cost"]) == Decimal(row["cost"])
    header, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["cost"] = "0"
    tampered = ".".join(
        [header, base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode(), signature]
    )
    with pytest.raises(Exception, match="signature"):
        jws.deserialize_compact(tampered, keys, algorithms=["EdDSA"])


def test_receipt_opt_out(gw: Gateway) -> None:
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=1, extra_headers={"X-Meterline-Receipt": "false"}
    )
    assert "x-meterline-receipt-id" not in raw.headers
    assert gw.only_row()["receipt_id"] is None


def test_attribution_source_user_and_identifier(gw: Gateway) -> None:
    client = gw.openai()
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        max_tokens=1,
        user="alice",
        extra_headers={"X-Meterline-Source": "cli"},
    )
    token = gw.http.post("/v1/token", json={"identifier_id": "end-user-7"}, headers=gw.tenant.headers).json()
    gw.openai(key=token["access_token"]).chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=1, extra_headers={"X-Meterline-Source": "web"}
    )
    rows = sorted(gw.ledger(), key=lambda r: r["source"])
    assert [(r["source"], r["user_id"], r["identifier_id"]) for r in rows] == [
        ("cli", "alice", None),
        ("web", "end-user-7", "end-user-7"),
    ]


def test_secrets_stay_out_of_responses_and_logs(
    gw: Gateway, primary: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    primary.script("status", code=500)
    client = gw.openai()
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=1)
    seen = [gw.http.get("/metrics").text, gw.http.get("/v1/models", headers=gw.tenant.headers).text]
    seen += [json.dumps(gw.ledger())]
    seen += [caplog.text]
    for text in seen:
        assert UPSTREAM_KEY not in text
        assert BACKUP_KEY not in text
        assert gw.tenant.key not in text
    assert any(r.name == "meterline.access" for r in caplog.records)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": 7, "messages": []}', 400, "model"),
        (b'{"model": "no-such-model", "messages": []}', 404, "model"),
    ],
)
def test_bad_requests_get_the_envelope(gw: Gateway, body: bytes, status: int, param: str | None) -> None:
    response = gw.http.post(
        "/v1/chat/completions",
        content=body,
        headers={**gw.tenant.headers, "content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["request_id"] == response.headers["x-request-id"]
    assert gw.open_reservations() == 0


def test_bad_headers_and_credentials(gw: Gateway) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO}
    response = gw.http.post(
        "/v1/chat/completions", json=body, headers={**gw.tenant.headers, "X-Meterline-Source": "Not Valid!"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Meterline-Source"
    assert gw.http.post("/v1/chat/completions", json=body).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        gw.openai(key="ml_live_not_a_real_key_000000000000").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO
        )
    assert gw.http.get("/v1/models").status_code == 401


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_an_unreachable_redis_answers_503_or_admits_unchecked(
    fail_open: bool, sqlite_url: str, tmp_path: Path, primary: FakeUpstream, backup: FakeUpstream
) -> None:
    # Nothing listens for Redis. The first request decides in a worker thread, the next on the event loop
    # (the organization is cached by then): both answer as the operator chose.
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    settings = _settings(
        sqlite_url, tmp_path, primary, backup, redis_url=dead_redis, quota_fail_open=fail_open
    )
    for gateway in _start(settings):
        for _ in range(2):
            answer = gateway.http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {gateway.tenant.key}"},
            )
            if fail_open:
                assert answer.status_code == 200, answer.text
            else:
                assert answer.status_code == 503, answer.text
                assert "counter store" in answer.json()["error"]["message"]
        assert len(gateway.ledger()) == (2 if fail_open else 0)
