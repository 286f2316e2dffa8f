"""A Redis Cluster master dies under load (``kill -9``) while ``meterline serve --workers 2`` meters events
against a block limit: its replica takes over, requests in between get a clear 503 (the counters cannot
be checked; nothing is written), the service goes on by itself, and in the end exactly the limit was
admitted, with the ledger, ``/v1/usage`` and reconcile in agreement.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import assert_envelope
from servers import MeterlineServer, PostgresServer, start_redis_cluster

pytestmark = pytest.mark.slow

ADMIN_KEY = "ml_admin_failover_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LIMIT = 120
LEASE_S = 3  # a reservation whose answer was lost in the failover is given back this soon


def _event(http: httpx.Client, base: str) -> httpx.Response:
    event = {"id": f"evt-{uuid.uuid4().hex}", "model": "failover-model", "prompt_tokens": 3}
    return http.post(f"{base}/v1/events", json={"events": [event]})


def test_a_master_failover_under_load_keeps_the_limit_exact(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    cluster = start_redis_cluster()
    database = f"failover_{uuid.uuid4().hex[:12]}"
    server: MeterlineServer | None = None
    try:
        config = tmp_path / "meterline.toml"
        config.write_text(
            f'admin_key = "{ADMIN_KEY}"\n'
            f'signing_key_file = "{tmp_path / "keys.json"}"\n'
            f'database_url = "{pg_server.create_database(database)}"\n'
            f'redis_url = "{cluster.url}"\n'
            f"reservation_ttl_seconds = {LEASE_S}\n"
            "[plans.capped]\ndaily_tokens = -1\nmonthly_tokens = -1\nmonthly_calls = -1\nrpm = -1\ntpm = -1\n"
            f'monthly_credits = -1\ndaily_calls = {LIMIT}\noverage = "block"\n'
        )
        server = MeterlineServer(config, tmp_path, "serve", ("--workers", "2"))
        base = server.start()
        with httpx.Client(base_url=base, headers=ADMIN, timeout=30) as admin:
            org = admin.post("/v1/admin/organizations", json={"name": "F", "plan": "capped"}).json()
            ws = admin.post("/v1/admin/workspaces", json={"organization_id": org["id"], "name": "W"}).json()
            key = admin.post("/v1/admin/keys", json={"workspace_id": ws["id"], "name": "K"}).json()["key"]
        headers = {"Authorization": f"Bearer {key}"}
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def send(count: int, pause: float = 0.0) -> None:
            with httpx.Client(headers=headers, timeout=30) as http:
                for _ in range(count):
                    answer = _event(http, base)
                    with lock:
                        answers.append(answer)
                    time.sleep(pause)

        send(30)  # counters loaded, the organization's keys live on one master
        victim = cluster.master_of(f"meterline:{{{org['id']}}}holds")
        with ThreadPoolExecutor(max_workers=8) as pool:
            load = [pool.submit(send, 40, 0.02) for _ in range(8)]  # ~2 s of traffic, killed halfway
            time.sleep(0.8)
            cluster.kill(victim)
            for done in load:
                done.result()
        cluster.wait_ok()
        assert cluster.master_of(f"meterline:{{{org['id']}}}holds") != victim
        # Past the lease, the reaper (every 5 s) gives back what a lost answer left reserved.
        deadline = time.monotonic() + 60
        while sum(a.status_code == 200 for a in answers) < LIMIT:
            assert time.monotonic() < deadline, "the service did not come back after the failover"
            send(20)
            if sum(a.status_code == 200 for a in answers) < LIMIT:
                time.sleep(1)
        send(20)  # and then it stays shut

        statuses = {a.status_code for a in answers}
        assert statuses <= {200, 429, 503}, statuses
        for answer in answers:
            if answer.status_code == 503:
                assert_envelope(answer, 503, "service_unavailable")
            elif answer.status_code == 429:
                assert_envelope(answer, 429, "quota_exceeded")
        admitted = sum(a.status_code == 200 for a in answers)
        assert admitted == LIMIT
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            ledger: dict[str, Any] = http.get("/v1/usage/ledger", params={"limit": 1000}).json()
            assert ledger["total_count"] == LIMIT
            for _ in range(4):  # whichever worker answers
                usage = http.get("/v1/usage").json()
                assert usage["daily"]["calls"]["usage"] == LIMIT
                calls = next(limit for limit in usage["limits"] if limit["name"] == "daily_calls")
                assert (calls["used"], calls["remaining"]) == (LIMIT, 0), calls
        reconciled = httpx.get(f"{base}/v1/admin/reconcile", headers=ADMIN, timeout=60).json()
        assert reconciled["ok"], reconciled
        assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log()
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
        pg_server.drop_database(database)
