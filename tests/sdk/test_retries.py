"""Retries against real refusals: the server's own 429s and their ``Retry-After``. The client's sleep
moves the server's clock instead of waiting, so the retried request meets the next minute for real."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import ADMIN_KEY, NOW, make_tenant
from meterline.api.app import create_app
from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.sdk import (
    APIConnectionError,
    Client,
    Event,
    QuotaExceededError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)
from meterline.services import build_services
from sdk.conftest import Server
from servers import ThreadServer, free_port


def _event(i: int) -> Event:
    return Event(id=f"rl-{i}", model="gpt-4o-mini", prompt_tokens=10, completion_tokens=5)


def test_a_rate_limit_is_retried_after_retry_after(server: Server) -> None:
    key = server.key_with_limits({"rpm": 2})
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        server.clock.advance(seconds=seconds)

    with server.client(key, sleep=sleep) as client:
        client.send_events([_event(1)])
        client.send_events([_event(2)])
        third = client.send_events([_event(3)])
    assert third.accepted == 1
    assert len(waits) == 1
    assert 0 < waits[0] <= 60
    with server.client() as reader:
        assert reader.ledger().total_count == 3


def test_without_retries_the_refusal_is_raised_with_its_limit(server: Server) -> None:
    key = server.key_with_limits({"rpm": 1})
    with server.client(key, retry=RetryPolicy(max_retries=0)) as client:
        client.send_events([_event(1)])
        with pytest.raises(RateLimitError) as refused:
            client.send_events([_event(2)])
    error = refused.value
    assert not isinstance(error, QuotaExceededError)
    assert (error.status_code, error.code) == (429, "rate_limit_exceeded")
    assert error.retry_after is not None
    assert error.retry_after > 0
    assert error.limit is not None
    assert error.limit["name"] == "key.rpm"
    assert error.request_id


def test_a_quota_that_resets_tomorrow_is_not_waited_for(server: Server) -> None:
    key = server.key_with_limits({"daily_calls": 1})
    waits: list[float] = []
    with server.client(key, sleep=waits.append) as client:
        client.send_events([_event(1)])
        with pytest.raises(QuotaExceededError) as refused:
            client.send_events([_event(2)])
    assert refused.value.code == "quota_exceeded"
    assert refused.value.retry_after is not None
    assert refused.value.retry_after > 60
    assert waits == []


def test_no_answer_is_a_connection_error_retried_with_backoff() -> None:
    waits: list[float] = []
    dead = f"http://127.0.0.1:{free_port()}"
    retry = RetryPolicy(max_retries=3, backoff=0.25)
    with Client(dead, "k", sleep=waits.append, retry=retry) as client, pytest.raises(APIConnectionError):
        client.usage()
    assert waits == [0.25, 0.5, 1.0]


def test_a_503_is_retried_after_its_retry_after_then_raised(sqlite_url: str, tmp_path: Path) -> None:
    # A deployment whose shared counter store is down fails closed: every write answers 503, asking for a
    # retry after 2 s (the server's Retry-After wins over the client's own backoff).
    settings = load_settings(
        database_url=sqlite_url,
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "key.json"),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    services = build_services(settings, clock=FrozenClock(NOW), migrate=False)
    waits: list[float] = []
    try:
        with (
            ThreadServer(create_app(settings, services=services)) as running,
            httpx.Client(base_url=running.base) as http,
        ):
            tenant = make_tenant(http, plan="free")  # type: ignore[arg-type]
            retry = RetryPolicy(max_retries=2, backoff=0.1)
            with Client(running.base, tenant.key, retry=retry, sleep=waits.append) as client:
                with pytest.raises(ServiceUnavailableError) as down:
                    client.send_events([_event(1)])
                assert client.usage().plan == "free"  # reads still answer
    finally:
        services.close()
    assert (down.value.status_code, down.value.code) == (503, "service_unavailable")
    assert waits == [2.0, 2.0]
