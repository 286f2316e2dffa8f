"""Hostile input over real HTTP, on SQLite and PostgreSQL: NUL, unpaired surrogates, overlong strings,
out-of-range and odd-offset timestamps, huge numbers and wrong types, in every field and query parameter.

Each one must answer a 4xx error envelope that names what to fix, reach no upstream, write nothing, and
leave the connection usable for the next request (no reset after an error)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import func, select

from conftest import ADMIN, ADMIN_KEY, NOW, Tenant, assert_envelope, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.services import Services, build_services
from meterline.storage.tables import metadata
from meterline.testing.fake_upstream import FakeUpstream
from servers import ThreadServer

UPSTREAM_KEY = "sk-upstream-hostile-0123456789"
NUL = "gpt-4o-mini\u0000x"
SURROGATE = "a\ud800"
LOW_SURROGATE = "\udfffz"
OVERLONG = "x" * 70_000
BAD_TEXT = {"nul": NUL, "surrogate": SURROGATE, "low-surrogate": LOW_SURROGATE, "overlong": OVERLONG}
BAD_TIMES = [
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "2026-13-01T00:00:00Z",
    "2026-03-14T10:30:00+25:00",
    "2026-03-14T10:30:00+24:00",
    "2026-03-14",
    "1969-12-31T23:59:59Z",
    "+002026-03-14T10:30:00Z",
    "2026-03-14T10:30:00\u0000Z",
    "\ud800",
]
HUGE = 10**30


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as upstream:
        yield upstream


class World:
    def __init__(self, http: httpx.Client, services: Services, tenant: Tenant, fake: FakeUpstream) -> None:
        self.http, self.services, self.tenant, self.fake = http, services, tenant, fake

    def counts(self) -> dict[str, int]:
        with self.services.db.read() as conn:
            return {
                t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in metadata.sorted_tables
            }

    def send(
        self, method: str, path: str, *, body: Any = None, raw: bytes | None = None, **kw: Any
    ) -> httpx.Response:
        headers = {**self.tenant.headers, **kw.pop("headers", {})}
        if body is not None:
            # ensure_ascii: a surrogate travels as the escape a client would send (\ud800).
            raw = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        return self.http.request(method, path, content=raw, headers=headers, **kw)


@pytest.fixture
def world(database_url: str, tmp_path: Path, fake: FakeUpstream) -> Iterator[World]:
    fake.reset()
    settings = load_settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "signing-key.json"),
        upstreams=[
            {
                "name": "fake",
                "provider": "openai",
                "base_url": fake.url,
                "api_key": UPSTREAM_KEY,
                "models": ["*"],
            },
        ],
    )
    services = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    try:
        with (
            ThreadServer(create_app(settings, services=services)) as server,
            httpx.Client(base_url=server.base, timeout=30) as http,
        ):
            tenant = make_tenant(http)  # type: ignore[arg-type]
            # One row already there, so reads have something to filter.
            seeded = http.post(
                "/v1/events",
                json={"events": [{"id": "seed", "model": "gpt-4o-mini", "prompt_tokens": 5}]},
                headers=tenant.headers,
            )
            assert seeded.status_code == 200, seeded.text
            yield World(http, services, tenant, fake)
    finally:
        services.close()


def _refused(response: httpx.Response, *, param: str | None = None) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = assert_envelope(response, response.status_code, response.json()["error"]["code"])
    if param is not None:
        assert error["param"] is not None, error
        assert param in error["param"], error
    return error


def _body_cases() -> list[tuple[str, str, Any, str | None]]:
    """(method, path, body, the param the error must name)."""
    cases: list[tuple[str, str, Any, str | None]] = []
    event_fields = [
        "id",
        "event",
        "model",
        "provider",
        "region",
        "identifier_id",
        "user_id",
        "source",
        "endpoint",
        "run_id",
    ]
    for name, bad in BAD_TEXT.items():
        for field in event_fields:
            event = {"id": f"e-{field}", "prompt_tokens": 3, field: bad}
            cases.append(("POST", "/v1/events", {"events": [event]}, field))
        cases.append(
            ("POST", "/v1/events", {"events": [{"id": "m1", "metadata": {"note": bad}}]}, "metadata")
        )
        if name != "overlong":  # a long key is bounded by the metadata's size
            cases.append(("POST", "/v1/events", {"events": [{"id": "m2", "metadata": {bad: 1}}]}, "metadata"))
        cases += [
            (
                "POST",
                "/v1/chat/completions",
                {"model": bad, "messages": [{"role": "user", "content": "hi"}]},
                "model",
            ),
            ("POST", "/v1/embeddings", {"model": bad, "input": "hi"}, "model"),
            ("POST", "/v1/responses", {"model": bad, "input": "hi"}, "model"),
            (
                "POST",
                "/v1/messages",
                {"model": bad, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                "model",
            ),
            (
                "POST",
                "/v1/messages/count_tokens",
                {"model": bad, "messages": [{"role": "user", "content": "hi"}]},
                "model",
            ),
            ("POST", "/v1/reservations", {"model": bad, "prompt_tokens": 3}, "model"),
            ("POST", "/v1/reservations", {"identifier_id": bad, "prompt_tokens": 3}, "identifier_id"),
            ("POST", "/v1/token", {"identifier_id": bad}, "identifier_id"),
            ("POST", "/v1/alerts/webhooks", {"url": "http://example.test/" + bad}, "url"),
            (
                "POST",
                "/v1/alerts/webhooks",
                {"url": "https://example.test/h", "description": bad},
                "description",
            ),
        ]
        if name != "overlong":  # a long user is not stored, and the prompt is the upstream's to judge
            cases += [
                (
                    "POST",
                    "/v1/chat/completions",
                    {"model": "gpt-4o-mini", "user": bad, "messages": [{"role": "user", "content": "hi"}]},
                    "user",
                ),
                (
                    "POST",
                    "/v1/messages",
                    {
                        "model": "claude-3-5-haiku",
                        "max_tokens": 5,
                        "metadata": {"user_id": bad},
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                    "user_id",
                ),
            ]
        if name == "surrogate":  # not UTF-8: no upstream could take it
            cases.append(
                (
                    "POST",
                    "/v1/chat/completions",
                    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": bad}]},
                    None,
                )
            )
    # Wrong types and huge numbers.
    cases += [
        ("POST", "/v1/events", {"events": "not a list"}, "events"),
        ("POST", "/v1/events", {"events": [{"id": "t1", "prompt_tokens": "12"}]}, "prompt_tokens"),
        ("POST", "/v1/events", {"events": [{"id": "t2", "prompt_tokens": HUGE}]}, "prompt_tokens"),
        ("POST", "/v1/events", {"events": [{"id": "t3", "units": -1}]}, "units"),
        ("POST", "/v1/events", {"events": [{"id": "t4", "model": 7}]}, "model"),
        ("POST", "/v1/events", {"events": [{"id": "t5", "audio_seconds": HUGE}]}, "audio_seconds"),
        ("POST", "/v1/events", {"events": [{"id": "t6", "metadata": {"n": HUGE}}]}, "metadata"),
        ("POST", "/v1/events", {"events": [{"id": 5}]}, "id"),
        ("POST", "/v1/events", {"events": [[1, 2]]}, None),
        ("POST", "/v1/chat/completions", {"model": 5, "messages": []}, "model"),
        ("POST", "/v1/reservations", {"prompt_tokens": HUGE}, "prompt_tokens"),
        ("POST", "/v1/reservations", {"ttl_seconds": HUGE}, "ttl_seconds"),
        ("POST", "/v1/token", {"identifier_id": "u", "expires_in": HUGE}, "expires_in"),
        ("POST", "/v1/token", {"identifier_id": "u", "limits": {"daily_tokens": HUGE}}, "daily_tokens"),
    ]
    for time in BAD_TIMES:
        cases.append(("POST", "/v1/events", {"events": [{"id": "ts", "timestamp": time}]}, "timestamp"))
    return cases


def _admin_cases(tenant: Tenant) -> list[tuple[str, str, Any, str | None]]:
    org, ws = tenant.org["id"], tenant.workspace["id"]
    cases: list[tuple[str, str, Any, str | None]] = []
    for bad in BAD_TEXT.values():
        cases += [
            ("POST", "/v1/admin/organizations", {"name": bad}, "name"),
            ("POST", "/v1/admin/organizations", {"name": "ok", "plan": bad}, "plan"),
            ("PATCH", f"/v1/admin/organizations/{org}", {"name": bad}, "name"),
            ("POST", "/v1/admin/workspaces", {"organization_id": org, "name": bad}, "name"),
            ("POST", "/v1/admin/workspaces", {"organization_id": org, "name": "w", "group": bad}, "group"),
            ("POST", "/v1/admin/keys", {"workspace_id": ws, "name": bad}, "name"),
            (
                "POST",
                "/v1/admin/keys",
                {"workspace_id": ws, "name": "k", "default_source": bad},
                "default_source",
            ),
            ("POST", "/v1/admin/credits", {"organization_id": org, "amount": "5", "reason": bad}, "reason"),
            (
                "POST",
                "/v1/admin/credits",
                {"organization_id": bad, "amount": "5", "reason": "r"},
                "organization_id",
            ),
        ]
    cases += [
        (
            "POST",
            "/v1/admin/credits",
            {"organization_id": org, "amount": "1e999999", "reason": "r"},
            "amount",
        ),
        ("POST", "/v1/admin/credits", {"organization_id": org, "amount": 1.5, "reason": "r"}, "amount"),
        ("POST", "/v1/admin/organizations", {"name": "n", "spend_cap": str(HUGE) * 3}, "spend_cap"),
        (
            "POST",
            "/v1/admin/keys",
            {"workspace_id": ws, "name": "k", "limits": {"daily_tokens": HUGE}},
            "limits",
        ),
    ]
    return cases


QUERY_READS = [
    "/v1/usage",
    "/v1/usage/history",
    "/v1/usage/events",
    "/v1/usage/ledger",
    "/v1/usage/timeseries",
    "/v1/usage/breakdown",
    "/v1/usage/export.csv",
    "/v1/alerts",
    "/v1/receipts",
]


def _query_cases() -> list[tuple[str, dict[str, str], str | None]]:
    cases: list[tuple[str, dict[str, str], str | None]] = []
    for path in QUERY_READS:
        cases.append((path, {"identifier_id": NUL}, "identifier_id"))
    for bad in ("\u0000", "gpt\u0000", "x" * 5000):
        for param in ("model", "key_prefix", "provider", "modality"):
            cases.append(("/v1/usage/ledger", {param: bad}, param))
            cases.append(("/v1/usage/export.csv", {param: bad}, param))
        cases.append(("/v1/usage/breakdown", {"by": bad}, "by"))
        cases.append(("/v1/usage/timeseries", {"range": bad}, "range"))
    for time in BAD_TIMES:
        for path in ("/v1/usage/ledger", "/v1/usage/export.csv"):
            cases.append((path, {"start": time}, "start"))
            cases.append((path, {"end": time}, "end"))
        cases.append(
            ("/v1/usage/breakdown", {"by": "model", "start": time, "end": "2026-03-14T11:00:00Z"}, "start")
        )
    for param, value, path in [
        ("limit", str(HUGE), "/v1/usage/ledger"),
        ("offset", str(HUGE), "/v1/usage/ledger"),
        ("limit", "-1", "/v1/usage/ledger"),
        ("per_page", "1e3", "/v1/usage/events"),
        ("page", str(HUGE), "/v1/usage/events"),
        ("days", str(HUGE), "/v1/usage/history"),
        ("after_seq", str(HUGE), "/v1/receipts"),
        ("limit", "NaN", "/v1/alerts"),
    ]:
        cases.append((path, {param: value}, param))
    return cases


def test_hostile_bodies_are_refused_before_any_upstream_call_or_write(world: World) -> None:
    before = world.counts()
    cases = _body_cases() + _admin_cases(world.tenant)
    for method, path, body, param in cases:
        headers = ADMIN if path.startswith("/v1/admin") else {}
        response = world.send(method, path, body=body, headers=headers)
        try:
            _refused(response, param=param)
        except AssertionError as exc:
            raise AssertionError(f"{method} {path} {json.dumps(body)[:200]}: {exc}") from None
        # The same keep-alive connection serves the next request.
        assert world.http.get("/healthz").status_code == 200
    assert world.fake.requests() == []
    assert world.counts() == before


def test_hostile_query_parameters_are_refused(world: World) -> None:
    before = world.counts()
    for path, params, param in _query_cases():
        # A surrogate cannot be UTF-8: it travels as its CESU-8 bytes, percent-encoded.
        query = "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'))}" for k, v in params.items())
        response = world.http.get(f"{path}?{query}", headers=world.tenant.headers)
        try:
            _refused(response, param=param)
        except AssertionError as exc:
            raise AssertionError(f"GET {path} {params!r:.200}: {exc}") from None
    assert world.counts() == before


def test_a_nul_in_a_multipart_model_or_a_header_is_refused(world: World) -> None:
    before = world.counts()
    response = world.http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", b"RIFF....WAVE", "audio/wav")},
        data={"model": NUL},
        headers=world.tenant.headers,
    )
    _refused(response, param="model")
    odd = ("ws_\u00e9" + "x" * 300).encode("latin-1")
    response = world.send("GET", "/v1/usage", headers={"X-Workspace-Id": odd})
    assert 400 <= response.status_code < 500, response.text
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for header in ("X-Meterline-Source", "X-Meterline-Receipt"):
        response = world.send("POST", "/v1/chat/completions", body=chat, headers={header: odd})
        _refused(response, param=header)
    # A NUL in a header value, sent raw (clients refuse to build one).
    status_line = _raw_get(world, "/v1/usage", b"X-Workspace-Id: ws_\x00x\r\n")
    assert status_line.startswith(b"HTTP/1.1 4"), status_line
    assert world.fake.requests() == []
    assert world.counts() == before


def test_a_nul_in_a_path_id_or_behind_a_second_content_type_is_refused(world: World) -> None:
    before = world.counts()
    for method, path in [
        ("POST", "/v1/reservations/rsv_a%00b/settle"),
        ("POST", "/v1/reservations/rsv_a%00b/release"),
        ("GET", "/v1/receipts/a%00b"),
        ("DELETE", "/v1/alerts/webhooks/wh_%00"),
        ("GET", "/v1/admin/organizations/org_%00"),
        ("GET", "/v1/admin/quarantine/qrn_%00"),
    ]:
        headers = ADMIN if "/admin/" in path else {}
        response = world.send(method, path, body={} if method == "POST" else None, headers=headers)
        _refused(response, param="path")
    # The routes read the first Content-Type: a second one must not steer the check away from the body.
    body = json.dumps({"name": "Acme\u0000"}).encode()
    response = world.http.post(
        "/v1/admin/organizations",
        content=body,
        headers=[
            ("Authorization", ADMIN["Authorization"]),
            ("Content-Type", "application/json"),
            ("Content-Type", "text/plain"),
        ],
    )
    _refused(response, param="name")
    assert world.counts() == before


def _raw_get(world: World, path: str, extra_headers: bytes) -> bytes:
    import socket

    url = httpx.URL(str(world.http.base_url))
    with socket.create_connection((url.host, url.port or 80), timeout=10) as sock:
        auth = world.tenant.headers["Authorization"].encode()
        sock.sendall(
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + auth
            + b"\r\n"
            + extra_headers
            + b"Connection: close\r\n\r\n"
        )
        return sock.recv(65536).split(b"\r\n", 1)[0]


def test_an_error_message_quoting_bad_text_still_renders(world: World) -> None:
    # The 422 message names the offending value; the envelope must serialize whatever it holds.
    response = world.send(
        "POST",
        "/v1/events",
        raw=b'{"events": [{"id": "a\\ud800"}]}',
        headers={"content-type": "application/json"},
    )
    error = _refused(response, param="id")
    assert "surrogate" in error["message"]
    response = world.send(
        "POST",
        "/v1/events",
        raw=b'{"events": [{"id": 1, "model": "\\u0000"}]}',
        headers={"content-type": "application/json"},
    )
    _refused(response, param="model")
