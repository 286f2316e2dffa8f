"""``meterline serve --workers N`` answers ``/metrics`` for the whole server, not for whichever worker the
scrape's connection landed on.

The kernel spreads connections over the workers' sockets: a Prometheus scrape reaches one worker at
random. Were each worker to answer with its own counters, successive scrapes would jump between the
workers' counts (to Prometheus, counter resets and rates that mean nothing). Every worker answers with
the sum over all of them, a worker killed and replaced included: its counts stay, its in-flight gauge
goes."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meterline.testing.fake_upstream import FakeUpstream
from servers import MeterlineServer as Server

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="workers get a socket each on Linux")

ADMIN_KEY = "ml_admin_metrics_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
UPSTREAM_KEY = "sk-upstream-metrics-0123456789"
REQUESTS = 40
SCRAPES = 12


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


def scrape(base: str) -> str:
    """One scrape on a connection of its own (so that scrapes land on different workers)."""
    with httpx.Client(base_url=base, timeout=30) as client:
        answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    return answer.text


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample (``labels`` as Prometheus prints them, e.g. ``{code="x"}``)."""
    pattern = re.escape(name + labels) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"{name}{labels} is not in the scrape:\n{text[-3000:]}"
    return float(found.group(1))


def test_every_scrape_counts_the_requests_of_every_worker(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'admin_key = "{ADMIN_KEY}"\n'
        f'database_url = "sqlite:///{tmp_path / "meterline.db"}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
        f'\n[[upstreams]]\nname = "fake"\nprovider = "openai"\nbase_url = "{upstream.url}"\n'
        f'api_key = "{UPSTREAM_KEY}"\nmodels = ["*"]\n'
    )
    server = Server(config, tmp_path, "workers", ("--workers", "2"))
    server.start()
    try:
        deadline = time.monotonic() + 30
        while len(server.workers()) < 2:
            assert time.monotonic() < deadline, "two workers did not start"
            time.sleep(0.1)
        with httpx.Client(base_url=server.base, headers=ADMIN, timeout=30) as admin:
            org = admin.post("/v1/admin/organizations", json={"name": "Scraped"}).json()
            ws = admin.post("/v1/admin/workspaces", json={"organization_id": org["id"], "name": "W"}).json()
            key = admin.post("/v1/admin/keys", json={"workspace_id": ws["id"], "name": "k"}).json()["key"]
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
        for _ in range(REQUESTS):  # a connection each: the kernel spreads them over both workers
            with httpx.Client(base_url=server.base, timeout=30) as client:
                answer = client.post(
                    "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                )
                assert answer.status_code == 200, answer.text
        chats = 'meterline_gateway_requests_total{endpoint="/v1/chat/completions",status="200"}'

        counts = [sample(scrape(server.base), chats) for _ in range(SCRAPES)]
        assert counts == [REQUESTS] * SCRAPES
        assert {sample(scrape(server.base), "meterline_reservations_in_flight") for _ in range(4)} == {0.0}

        # A worker killed and replaced: what it counted is still counted.
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in server.workers() or len(server.workers()) < 2:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.1)
        time.sleep(1)  # the replacement listening
        counts = [sample(scrape(server.base), chats) for _ in range(SCRAPES)]
        assert counts == [REQUESTS] * SCRAPES
        texts = [scrape(server.base) for _ in range(4)]
        assert {sample(t, "meterline_reservations_in_flight") for t in texts} == {0.0}
        assert all("meterline_quarantined_entries 0.0" in t for t in texts), texts[0][-2000:]
    finally:
        server.stop()
