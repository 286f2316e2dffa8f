"""PostgreSQL stopped and started again under load, in front of a real `meterline serve`.

While the database is down every answer is a 200 (a gateway answer already served upstream) or a 503
envelope with ``Retry-After`` — never a 500, never a reset connection — and the log says so once, not
with a traceback per request. When it is back the service recovers by itself: every acknowledged event
is in the ledger once, the refused ones go in when resent, and the projections reconcile with 0 drift."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from conftest import assert_envelope
from integration.test_serve import clean_env, process
from meterline.storage.database import Database
from meterline.storage.migrate import upgrade
from meterline.storage.outage import QUIET_S
from meterline.storage.tables import reservations
from meterline.testing.fake_upstream import FakeUpstream
from servers import (
    MeterlineServer,
    PostgresServer,
    all_ledger_rows,
    free_port,
    make_tenant_over_http,
    start_postgres,
)

ADMIN = "ml_admin_outage_0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-outage-0123456789"
WORKERS = 6
BEFORE_S, DOWN_S, AFTER_S = 1.5, 4.0, 3.0


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


class Load:
    """Clients on keep-alive connections, each alternating events, gateway calls and usage reads."""

    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []
        self.acknowledged: set[str] = set()
        self.refused: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def run(self, worker: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                kind = ("events", "chat", "usage")[n % 3]
                event_id = f"w{worker}-{n}"
                try:
                    if kind == "events":
                        body = {"events": [{"id": event_id, "model": "gpt-4o-mini", "prompt_tokens": 10}]}
                        response = http.post("/v1/events", json=body)
                    elif kind == "chat":
                        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
                        response = http.post("/v1/chat/completions", json=chat)
                    else:
                        response = http.get("/v1/usage")
                except httpx.TransportError as exc:
                    with self._lock:
                        self.failures.append(f"{kind}: {type(exc).__name__}: {exc}")
                    continue
                self._check(kind, event_id, response)

    def _check(self, kind: str, event_id: str, response: httpx.Response) -> None:
        with self._lock:
            self.statuses[(kind, response.status_code)] += 1
            if response.status_code == 503:
                assert_envelope(response, 503, "service_unavailable")
                assert int(response.headers["retry-after"]) >= 1
                if kind == "events":
                    self.refused.add(event_id)
            elif response.status_code == 200:
                if kind == "events":
                    self.acknowledged.add(event_id)
            else:
                self.failures.append(f"{kind}: {response.status_code} {response.text[:300]}")

    def stop(self) -> None:
        self._stop.set()


# "database": the quota counters in PostgreSQL too (as with several workers): the events' reservations
# and rows are queued to the writer together, and an outage is the append's 503.
@pytest.mark.parametrize("counters", ["auto", "database"])
def test_a_postgresql_outage_answers_503s_then_recovers(
    own_postgres: PostgresServer, tmp_path: Path, counters: str
) -> None:
    url = own_postgres.create_database("meterline_outage")
    db = Database(url)
    upgrade(db)
    db.dispose()
    config = tmp_path / "meterline.toml"
    stderr = tmp_path / "stderr.log"
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        config.write_text(
            f'[[upstreams]]\nname = "fake"\nprovider = "openai"\nbase_url = "{fake.url}"\n'
            f'api_key = "{UPSTREAM_KEY}"\nmodels = ["*"]\n'
            # Limits are not what this test is about: the load must not meet one.
            "[plans.load]\ndaily_tokens = -1\nmonthly_tokens = -1\ndaily_calls = -1\nmonthly_calls = -1\n"
            'rpm = -1\ntpm = -1\nmonthly_credits = -1\noverage = "block"\n'
        )
        env = clean_env(
            METERLINE_DATABASE_URL=url,
            METERLINE_ADMIN_KEY=ADMIN,
            METERLINE_SIGNING_KEY_FILE=str(tmp_path / "keys.json"),
            METERLINE_CONFIG=str(config),
            METERLINE_ACCESS_LOG="off",
            METERLINE_COUNTERS=counters,
        )
        port = free_port()
        with process(["serve", "--port", str(port)], env, tmp_path, port, stderr=stderr) as base:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            org = httpx.post(
                f"{base}/v1/admin/organizations", json={"name": "A", "plan": "load"}, headers=admin
            )
            ws = httpx.post(
                f"{base}/v1/admin/workspaces",
                json={"organization_id": org.json()["id"], "name": "W"},
                headers=admin,
            )
            key = httpx.post(
                f"{base}/v1/admin/keys", json={"workspace_id": ws.json()["id"], "name": "K"}, headers=admin
            ).json()["key"]

            load = Load(base, key)
            threads = [threading.Thread(target=load.run, args=(w,)) for w in range(WORKERS)]
            for thread in threads:
                thread.start()
            try:
                time.sleep(BEFORE_S)
                own_postgres.pause()
                time.sleep(DOWN_S / 2)
                # A load balancer's two questions: the process is up, but it cannot serve.
                down_health = httpx.get(f"{base}/healthz", timeout=30)
                down_ready = httpx.get(f"{base}/readyz", timeout=30)
                time.sleep(DOWN_S / 2)
                own_postgres.resume()
                time.sleep(AFTER_S)
            finally:
                load.stop()
                for thread in threads:
                    thread.join(timeout=60)

            assert load.failures == []
            assert down_health.status_code == 200
            assert down_ready.status_code == 503, down_ready.text
            assert down_ready.json()["checks"]["database"] == "unreachable"
            assert httpx.get(f"{base}/readyz", timeout=30).json() == {
                "status": "ready",
                "checks": {"database": "ok", "migrations": "ok", "counters": "ok"},
            }
            assert load.statuses[("events", 503)] > 0, load.statuses  # the outage was seen
            assert load.statuses[("events", 200)] > 0, load.statuses
            # Back by itself: every kind of request succeeds again.
            headers = {"Authorization": f"Bearer {key}"}
            assert httpx.get(f"{base}/v1/usage", headers=headers).status_code == 200
            # Refused events were not recorded: resent, they count once; acknowledged ones are there once.
            refused = sorted(load.refused)
            for start in range(0, len(refused), 500):
                batch = [
                    {"id": i, "model": "gpt-4o-mini", "prompt_tokens": 10}
                    for i in refused[start : start + 500]
                ]
                resent = httpx.post(f"{base}/v1/events", json={"events": batch}, headers=headers, timeout=30)
                assert resent.status_code == 200, resent.text
                assert resent.json()["duplicates"] == 0
                assert resent.json()["accepted"] == len(batch)
            again = [
                {"id": i, "model": "gpt-4o-mini", "prompt_tokens": 10}
                for i in sorted(load.acknowledged)[:500]
            ]
            repeat = httpx.post(f"{base}/v1/events", json={"events": again}, headers=headers, timeout=30)
            assert repeat.json()["duplicates"] == len(again)
            # Gateway answers served while the database was down are settled with their actual usage by
            # the reaper's next sweep (every 5 s), not at their estimate.
            deadline = time.monotonic() + 30
            while _open_reservations(url) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _open_reservations(url) == 0
            rows = all_ledger_rows(base, headers)
            event_rows = [r for r in rows if r["endpoint"] is None]
            recorded = {r["event_id"] for r in event_rows}
            assert recorded == load.acknowledged | load.refused, (
                sorted((load.acknowledged | load.refused) - recorded)[:20],
                sorted(recorded - (load.acknowledged | load.refused))[:20],
                len(rows),
            )
            chat_rows = [r for r in rows if r["endpoint"] == "/v1/chat/completions"]
            assert len(chat_rows) == load.statuses[("chat", 200)]
            assert all(not (r["metadata"] or {}).get("meterline.recovered") for r in chat_rows)
            assert {r["completion_tokens"] for r in chat_rows} == {chat_rows[0]["completion_tokens"]}
            assert len({r["id"] for r in rows}) == len(rows)
            reconciled = httpx.get(f"{base}/v1/admin/reconcile", headers=admin, timeout=60).json()
            assert reconciled["ok"], reconciled
            assert reconciled["quarantined"] == 0
            # Its end is logged once a probe finds the database back and nothing failed for QUIET_S.
            deadline = time.monotonic() + QUIET_S + 10
            while "the database is available again after " not in stderr.read_text():
                assert time.monotonic() < deadline, stderr.read_text()[-5000:]
                time.sleep(0.2)

    # One line when the outage started and one when it ended, with the requests answered 503.
    log = stderr.read_text()
    assert log.count("the database is unavailable (") == 1, log[-5000:]
    refused = sum(count for (_kind, status), count in load.statuses.items() if status == 503)
    assert log.count("the database is available again after ") == 1, log[-5000:]
    ended = [line for line in log.splitlines() if "available again" in line]
    assert ended[0].endswith(f"; {refused} request(s) were answered 503"), (refused, load.statuses, ended)
    assert "the counter store is unavailable" not in log, log[-5000:]
    assert log.count("Traceback") <= 2, log[-5000:]


def _open_reservations(url: str) -> int:
    db = Database(url)
    try:
        with db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(reservations)).scalar_one())
    finally:
        db.dispose()


def test_answers_served_in_an_outage_are_billed_at_their_actual_usage_by_every_process(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    # Two servers on one database (two machines), counters in the database. Gateway requests in flight
    # on both when PostgreSQL stops get their answers from the upstream meanwhile; their settles wait for
    # the database, kept with the actual usage by the server that served each. Their leases (4 s) end
    # during the outage. When the database is back, whichever server's reaper sweeps first (each sweeps
    # every 5 s from its own start) may not settle the other's at its estimate: every row holds what was
    # used.
    url = own_postgres.create_database("meterline_outage_servers")
    config = tmp_path / "meterline.toml"
    with FakeUpstream.start(api_key=UPSTREAM_KEY, delay_ms=3000, pieces=7) as fake:
        config.write_text(
            f'database_url = "{url}"\nadmin_key = "{ADMIN}"\ncounters = "database"\n'
            f'signing_key_file = "{tmp_path / "keys.json"}"\naccess_log = "off"\n'
            "reservation_ttl_seconds = 4\n"
            f'[[upstreams]]\nname = "fake"\nprovider = "openai"\nbase_url = "{fake.url}"\n'
            f'api_key = "{UPSTREAM_KEY}"\nmodels = ["*"]\n'
            "[plans.load]\ndaily_tokens = -1\nmonthly_tokens = -1\ndaily_calls = -1\nmonthly_calls = -1\n"
            'rpm = -1\ntpm = -1\nmonthly_credits = -1\noverage = "block"\n'
        )
        first = MeterlineServer(config, tmp_path, "first")
        first.start()
        time.sleep(2.5)
        second = MeterlineServer(config, tmp_path, "second")
        second.start()
        try:
            headers = make_tenant_over_http(
                first.base, {"Authorization": f"Bearer {ADMIN}"}, plan="load", name="A"
            )
            answers: list[httpx.Response] = []

            def chat(base: str) -> None:
                body = {
                    "model": "gpt-4o-mini",
                    "max_tokens": 400,
                    "messages": [{"role": "user", "content": "hi"}],
                }
                answers.append(
                    httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
                )

            threads = [threading.Thread(target=chat, args=(server.base,)) for server in [first, second] * 12]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 10
            while _open_reservations(url) < 24:  # every one admitted, and waiting for the upstream
                assert time.monotonic() < deadline, "the requests were not all admitted"
                time.sleep(0.05)
            own_postgres.pause()
            try:
                for thread in threads:
                    thread.join(timeout=30)
                time.sleep(7)  # past every lease, and a failed sweep of each server's reaper
            finally:
                own_postgres.resume()
            assert [a.status_code for a in answers] == [200] * 24, [
                a.text for a in answers if a.status_code != 200
            ]
            deadline = time.monotonic() + 40
            while _open_reservations(url) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _open_reservations(url) == 0
            time.sleep(6)  # another sweep of each: nothing more may happen
            rows = [
                r for r in all_ledger_rows(first.base, headers) if r["endpoint"] == "/v1/chat/completions"
            ]
            assert len(rows) == 24
            recovered = [r["id"] for r in rows if (r["metadata"] or {}).get("meterline.recovered")]
            assert recovered == [], f"{len(recovered)} of 24 settled at their estimate by a reaper"
            assert {r["completion_tokens"] for r in rows} == {7}
        finally:
            first.stop()
            second.stop()
