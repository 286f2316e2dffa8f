"""Client compatibility of the gateway, as a user meets it: the official ``openai`` and ``anthropic`` SDKs
against a real Meterline server on loopback, in front of fake upstreams that are real HTTP servers.

* ``client.models.list()`` lists what pattern routes (``models = ["claude-*"]``) serve: the upstream's own
  list, kept for a while, or the price book's when the upstream cannot say.
* ``client.messages.count_tokens(...)`` reaches an Anthropic upstream, for a Meterline key, unbilled.
* An Azure OpenAI upstream (deployment URLs, ``api-version``, ``api-key``), per-upstream ``query`` and
  ``headers``, and model ``aliases``: the upstream gets its own names, the ledger the real model's.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import ADMIN_KEY, NOW, Tenant, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.gateway.tokens import count_tokens
from meterline.services import Services, build_services
from meterline.testing import MESSAGE_OVERHEAD
from meterline.testing.fake_upstream import FakeUpstream
from servers import ThreadServer, free_port

UPSTREAM_KEY = "sk-upstream-main-0123456789abcdef"
AZURE_KEY = "azure-resource-key-5f5f5f5f5f5f5f5f"
HEADER_SECRET = "team-secret-7a7a7a7a7a7a"
API_VERSION = "2024-10-21"
NANO = Decimal("0.000000001")
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def azure() -> Iterator[FakeUpstream]:
    """Stands for an Azure OpenAI resource: its deployment paths want ``api-key`` and an ``api-version``."""
    with FakeUpstream.start(api_key=AZURE_KEY) as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh(fake: FakeUpstream, azure: FakeUpstream) -> None:
    fake.reset()
    azure.reset()


class Gateway:
    def __init__(
        self, base: str, http: httpx.Client, tenant: Tenant, clock: FrozenClock, svc: Services
    ) -> None:
        self.base, self.http, self.tenant, self.clock, self.services = base, http, tenant, clock, svc
        self._clients: list[openai.OpenAI | anthropic.Anthropic] = []

    def openai(self, key: str | None = None) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=key or self.tenant.key, max_retries=0)
        self._clients.append(client)
        return client

    def anthropic(self, key: str | None = None) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=self.base, api_key=key or self.tenant.key, max_retries=0)
        self._clients.append(client)
        return client

    def ledger(self) -> list[dict[str, Any]]:
        response = self.http.get("/v1/usage/ledger", headers=self.tenant.headers)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["data"]
        return rows

    def only_row(self) -> dict[str, Any]:
        (row,) = self.ledger()
        return row


def _upstreams(fake: FakeUpstream, azure: FakeUpstream) -> list[dict[str, Any]]:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: its model list comes from the price book
    return [
        {
            "name": "azure-eu",
            "api": "azure",
            "base_url": azure.origin,
            "api_key": AZURE_KEY,
            "query": {"api-version": API_VERSION},
            "models": ["gpt-4.1", "text-embedding-3-large", "whisper-1"],
            "aliases": {"gpt-4.1": "prod-gpt41", "text-embedding-3-large": "prod-embed"},
        },
        {
            # The Azure set-up of the issue, as written: a deployment URL with its query string, the key
            # as a configured header.
            "name": "azure-by-url",
            "base_url": f"{azure.origin}/openai/deployments/prod-mini?api-version=2024-06-01",
            "headers": {"api-key": AZURE_KEY},
            "models": ["gpt-4.1-mini"],
        },
        {
            "name": "openai",
            "base_url": fake.url,
            "api_key": UPSTREAM_KEY,
            "models": ["gpt-4o*", "gpt-4.1", "o3-mini"],
            "aliases": {"o3-mini": "vendor/o3-mini", "gpt-4o-transcribe": "vendor/transcribe"},
            "headers": {"X-Team": HEADER_SECRET},
        },
        {
            "name": "claude",
            "provider": "anthropic",
            "base_url": fake.url,
            "api_key": UPSTREAM_KEY,
            "models": ["claude-*"],
        },
        {"name": "mistral", "provider": "mistral", "base_url": dead, "models": ["codestral*"]},
    ]


@pytest.fixture
def gw(sqlite_url: str, tmp_path: Path, fake: FakeUpstream, azure: FakeUpstream) -> Iterator[Gateway]:
    settings = load_settings(
        database_url=sqlite_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        upstreams=_upstreams(fake, azure),
    )
    clock = FrozenClock(NOW)
    services = build_services(settings, clock=clock, migrate=False)
    try:
        with (
            ThreadServer(create_app(settings, services=services)) as server,
            httpx.Client(base_url=server.base, timeout=30) as http,
        ):
            gateway = Gateway(server.base, http, make_tenant(http), clock, services)  # type: ignore[arg-type]
            try:
                yield gateway
            finally:
                for client in gateway._clients:
                    client.close()
    finally:
        services.close()


def _cost(input_per_m: str, output_per_m: str, prompt: int, completion: int) -> Decimal:
    return ((prompt * Decimal(input_per_m) + completion * Decimal(output_per_m)) / 1_000_000).quantize(NANO)


# -- GET /v1/models ----------------------------------------------------------------------------------
def test_models_lists_what_pattern_routes_serve(gw: Gateway, fake: FakeUpstream) -> None:
    listed = {m.id: m.owned_by for m in gw.openai().models.list()}

    # Named models, as before.
    assert {"gpt-4.1", "text-embedding-3-large", "whisper-1", "gpt-4.1-mini", "o3-mini"} <= set(listed)
    # "gpt-4o*": the upstream's own list, filtered by the pattern (its gpt-4.1-mini is not gpt-4o*).
    # An alias names a model its route serves: listed too.
    assert {m for m in listed if m.startswith("gpt-4o")} == {"gpt-4o", "gpt-4o-mini", "gpt-4o-transcribe"}
    # "claude-*": Anthropic's list (asked with Anthropic's headers), owned by the route's provider.
    assert {m for m in listed if m.startswith("claude-")} == {
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "claude-opus-4-1",
    }
    assert listed["claude-haiku-4-5"] == "anthropic"
    # "codestral*" on an upstream that does not answer: the price book's models of its provider.
    assert {"codestral", "codestral-2508"} <= set(listed)
    assert listed["codestral"] == "mistral"
    assert "gpt-4.1-nano" not in listed  # what no route serves is not listed

    lists = [r for r in fake.requests() if r.path == "/v1/models"]
    assert len(lists) == 2  # one per pattern route on this upstream, with its own key and headers
    assert {r.headers.get("anthropic-version") is not None for r in lists} == {True, False}
    assert all(
        UPSTREAM_KEY in (r.headers.get("authorization", "") + r.headers.get("x-api-key", "")) for r in lists
    )
    assert gw.tenant.key not in str([r.headers for r in lists])

    # Kept: a second listing asks no upstream; once the list is ten minutes old it is fetched again.
    assert {m.id for m in gw.openai().models.list()} == set(listed)
    assert len([r for r in fake.requests() if r.path == "/v1/models"]) == 2
    gw.clock.advance(minutes=11)
    assert {m.id for m in gw.openai().models.list()} == set(listed)
    assert len([r for r in fake.requests() if r.path == "/v1/models"]) == 4


def test_models_needs_a_key(gw: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        gw.openai(key="ml_live_not_a_key").models.list()


# -- Anthropic count_tokens --------------------------------------------------------------------------
def test_count_tokens_reaches_the_anthropic_upstream_and_costs_nothing(
    gw: Gateway, fake: FakeUpstream
) -> None:
    counted = gw.anthropic().messages.count_tokens(
        model="claude-haiku-4-5",
        system="You are terse.",
        messages=[{"role": "user", "content": "Count these words for me."}],
    )
    # The fake's documented count: o200k of the texts joined by newlines, plus 3 per message.
    assert (
        counted.input_tokens
        == count_tokens("You are terse.\nCount these words for me.", "gpt-4o") + 2 * MESSAGE_OVERHEAD
    )

    (seen,) = fake.requests()
    assert seen.path == "/v1/messages/count_tokens"
    assert seen.headers["x-api-key"] == UPSTREAM_KEY
    assert gw.tenant.key not in str(seen.headers)
    assert gw.ledger() == []  # not billed
    assert gw.services.reservation_store.count() == 0  # nothing reserved


def test_count_tokens_needs_a_key_and_a_served_model(gw: Gateway, fake: FakeUpstream) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        gw.anthropic(key="ml_live_not_a_key").messages.count_tokens(model="claude-haiku-4-5", messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError) as missing:
        gw.anthropic().messages.count_tokens(model="gpt-4o", messages=HELLO)  # type: ignore[arg-type]
    assert "gpt-4o" in str(missing.value)
    with pytest.raises(anthropic.BadRequestError):
        gw.anthropic().messages.count_tokens(model="", messages=HELLO)  # type: ignore[arg-type]
    assert fake.requests() == []


# -- Azure OpenAI, query, headers, aliases -----------------------------------------------------------
def test_azure_upstream_gets_deployment_urls_and_its_api_key(gw: Gateway, azure: FakeUpstream) -> None:
    client = gw.openai()
    reply = client.chat.completions.create(model="gpt-4.1", messages=HELLO, max_tokens=6)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6
    streamed = list(
        client.chat.completions.create(model="gpt-4.1", messages=HELLO, max_tokens=3, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == " tok" * 3
    embedded = client.embeddings.create(model="text-embedding-3-large", input="hello")
    assert embedded.usage.prompt_tokens > 0
    client.audio.transcriptions.create(model="whisper-1", file=("a.wav", _wav(2), "audio/wav"))
    answered = client.responses.create(model="gpt-4.1", input="Hi", max_output_tokens=16)
    assert answered.usage is not None

    chat, stream, embed, audio, responses = azure.requests()
    assert chat.path == stream.path == "/openai/deployments/prod-gpt41/chat/completions"
    assert embed.path == "/openai/deployments/prod-embed/embeddings"
    assert audio.path == "/openai/deployments/whisper-1/audio/transcriptions"  # no alias: the model's name
    # Azure's Responses API is not per deployment: the deployment is the body's model.
    assert responses.path == "/openai/responses"
    assert responses.json["model"] == "prod-gpt41"
    for seen in (chat, stream, embed, audio, responses):
        assert seen.query == f"api-version={API_VERSION}"
        assert seen.headers["api-key"] == AZURE_KEY
        assert "authorization" not in seen.headers
        assert seen.status == 200
    assert chat.json["model"] == "gpt-4.1"  # the body as the client sent it: Azure reads the URL

    # The ledger names and prices the real model (gpt-4.1: $2 / $8 a million), not the deployment.
    rows = gw.ledger()
    models = ["gpt-4.1", "gpt-4.1", "gpt-4.1", "text-embedding-3-large", "whisper-1"]
    assert sorted(r["model"] for r in rows) == models
    plain = next(r for r in rows if r["model"] == "gpt-4.1" and r["completion_tokens"] == 6)
    assert Decimal(plain["cost"]) == _cost("2", "8", plain["prompt_tokens"], 6)
    embedding = next(r for r in rows if r["model"] == "text-embedding-3-large")
    assert Decimal(embedding["cost"]) == _cost("0.13", "0", embedding["prompt_tokens"], 0) > 0


def test_a_base_url_with_a_query_string_keeps_it_after_the_path(gw: Gateway, azure: FakeUpstream) -> None:
    gw.openai().chat.completions.create(model="gpt-4.1-mini", messages=HELLO, max_tokens=2)
    (seen,) = azure.requests()
    assert seen.path == "/openai/deployments/prod-mini/chat/completions"
    assert seen.query == "api-version=2024-06-01"
    assert seen.headers["api-key"] == AZURE_KEY
    assert "authorization" not in seen.headers
    assert gw.only_row()["model"] == "gpt-4.1-mini"


def test_aliases_are_per_upstream_and_follow_failover(
    gw: Gateway, azure: FakeUpstream, fake: FakeUpstream
) -> None:
    azure.script("status", code=503)
    reply = gw.openai().chat.completions.create(model="gpt-4.1", messages=HELLO, max_tokens=4)
    assert reply.usage is not None
    (refused,) = azure.requests()
    assert refused.path == "/openai/deployments/prod-gpt41/chat/completions"
    (served,) = fake.requests()
    assert served.path == "/v1/chat/completions"
    assert served.json["model"] == "gpt-4.1"  # the backup has no alias for it: the client's name
    assert served.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    row = gw.only_row()
    assert (row["model"], row["failover"]) == ("gpt-4.1", True)
    assert Decimal(row["cost"]) == _cost("2", "8", row["prompt_tokens"], 4)


def test_an_alias_renames_the_model_in_the_body_and_headers_are_sent(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.openai()
    client.chat.completions.create(model="o3-mini", messages=HELLO, max_tokens=5)
    client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", _wav(1), "audio/wav"))
    chat, audio = fake.requests()
    assert chat.json["model"] == "vendor/o3-mini"
    assert chat.headers["x-team"] == HEADER_SECRET
    assert audio.form is not None
    assert audio.form["model"] == "vendor/transcribe"
    assert audio.form["file"]["size"] == len(_wav(1))
    rows = {r["model"]: r for r in gw.ledger()}
    assert set(rows) == {"o3-mini", "gpt-4o-transcribe"}
    assert Decimal(rows["o3-mini"]["cost"]) == _cost("1.1", "4.4", rows["o3-mini"]["prompt_tokens"], 5)


def test_configured_header_values_never_come_back(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script("status", code=400, message=f"bad team header {HEADER_SECRET}")
    with pytest.raises(openai.BadRequestError) as refused:
        gw.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2)
    assert HEADER_SECRET not in str(refused.value.body)
    assert "***" in str(refused.value.body)


def _wav(seconds: int, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * seconds * rate)
    return buffer.getvalue()
