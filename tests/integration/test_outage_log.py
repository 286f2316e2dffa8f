"""What an operator reads in the log of a `meterline serve` when its database or its Redis goes away and
comes back: one line when the outage starts and one when it ends, the end logged when the dependency
answers again (not when the next request happens to come), with the requests that were really answered
503 — never a line per request or per background pass."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from meterline.storage.outage import QUIET_S
from servers import (
    MeterlineServer,
    PostgresServer,
    RedisServer,
    make_tenant_over_http,
    start_postgres,
    start_redis,
)

ADMIN = "ml_admin_outage_log_0123456789ab"
REFUSED = 3
ENDED = re.compile(r"(the [\w ]+?) is available again after ([\d.]+) s; (\d+) request\(s\) were answered 503")


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


def _serve(tmp_path: Path, settings: str) -> MeterlineServer:
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'admin_key = "{ADMIN}"\nsigning_key_file = "{tmp_path / "keys.json"}"\naccess_log = "off"\n'
        + settings
    )
    server = MeterlineServer(config, tmp_path, "server")
    server.start()
    return server


def _outage(
    server: MeterlineServer, stop: Callable[[], None], resume: Callable[[], None], down_s: float
) -> tuple[list[str], float]:
    """Events sent before, ``REFUSED`` sent during an outage of ``down_s`` seconds (long enough for the
    reaper's passes, every 5 s, to fail too), none after it; the server's log lines about it."""
    headers = make_tenant_over_http(server.base, {"Authorization": f"Bearer {ADMIN}"}, plan="free", name="A")

    def event(n: int) -> dict[str, object]:
        return {"events": [{"id": f"e{n}", "model": "gpt-4o-mini", "prompt_tokens": 10}]}

    sent = httpx.post(f"{server.base}/v1/events", json=event(0), headers=headers, timeout=30)
    assert sent.status_code == 200, sent.text
    assert callable(stop)
    assert callable(resume)
    stop()
    stopped = time.monotonic()
    try:
        for n in range(1, REFUSED + 1):
            answer = httpx.post(f"{server.base}/v1/events", json=event(n), headers=headers, timeout=30)
            assert answer.status_code == 503, answer.text
        time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))
    finally:
        resume()
    down = time.monotonic() - stopped
    # No request after the outage: its end is logged all the same, once a probe finds the dependency
    # back and nothing has failed for QUIET_S.
    deadline = time.monotonic() + QUIET_S + 10
    while not any(map(ENDED.search, log := server.log_path.read_text(errors="replace").splitlines())):
        assert time.monotonic() < deadline, "\n".join(log)
        time.sleep(0.2)
    return log, down


def _assert_one_episode(log: list[str], dependency: str, down: float, causes: tuple[str, ...]) -> None:
    started = [line for line in log if f"{dependency} is unavailable" in line]
    ended = [m for m in map(ENDED.search, log) if m]
    assert len(started) == 1, "\n".join(log)
    # The line says what failed (the driver's or the store's error), not the 503's wrapper.
    assert any(cause in started[0] for cause in causes), started[0]
    assert "ServiceUnavailable" not in started[0], started[0]
    assert [(m.group(1), int(m.group(3))) for m in ended] == [(dependency, REFUSED)], "\n".join(log)
    # From the first failure to the dependency answering again and quiet: the outage, the quiet time
    # and the second between probes at most.
    assert 1.0 < float(ended[0].group(2)) < down + QUIET_S + 2.5, "\n".join(log)


def test_a_database_outage_is_one_line_when_it_starts_and_one_when_it_ends(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = own_postgres.create_database("meterline_outage_log")
    server = _serve(tmp_path, f'database_url = "{url}"\n')
    try:
        log, down = _outage(server, own_postgres.pause, own_postgres.resume, 7.0)
    finally:
        server.stop()
    # Stopped mid-connection, or refusing new ones: the driver's error either way.
    _assert_one_episode(log, "the database", down, ("(AdminShutdown: ", "(OperationalError: "))


def test_a_redis_outage_is_one_line_when_it_starts_and_one_when_it_ends(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    # A stopped Redis (SIGSTOP): connections hang until the client's timeout, the worst case.
    pid = own_redis._process.pid if own_redis._process is not None else 0
    database = f"sqlite:///{tmp_path / 'm.db'}"
    server = _serve(tmp_path, f'database_url = "{database}"\nredis_url = "{own_redis.url}"\n')
    try:
        log, down = _outage(
            server, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT), 7.0
        )
    finally:
        server.stop()
    _assert_one_episode(log, "the counter store", down, ("(CounterStoreUnavailable: Redis at ",))
    # The reaper's passes and the settlements' sender say it once an outage too, not every pass.
    assert sum("abandoned holds are looked at again later" in line for line in log) <= 1, "\n".join(log)
