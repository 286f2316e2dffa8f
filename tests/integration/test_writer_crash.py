"""SIGKILL of `meterline serve` while gateway requests and event batches are queued in the group-commit
writer, several rounds on one SQLite file.

What a user relies on: every request that got a 2xx is in the ledger exactly once; a batch is in whole or
not at all (never half-written); resending the same event ids after the crash counts each once; and at
the end `meterline reconcile` finds 0 drift and `meterline verify` finds every receipt chain intact.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.testing.fake_upstream import FakeUpstream
from servers import METERLINE, all_ledger_rows, make_tenant_over_http
from servers import MeterlineServer as Server

pytestmark = pytest.mark.slow

ADMIN_KEY = "ml_admin_writer_crash_0123456789ab"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
UPSTREAM_KEY = "sk-upstream-writer-crash-0123456789"
BATCH = 25
ROUNDS = 3


@dataclass
class Sent:
    """What the clients sent in one round, and which of it got a 2xx before the kill."""

    batches: dict[str, list[str]] = field(default_factory=dict)  # batch name -> event ids
    accepted: dict[str, str] = field(default_factory=dict)  # event id -> ledger id (from a 2xx)
    receipts: list[str] = field(default_factory=list)  # gateway 2xx -> X-Meterline-Receipt-Id
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


def make_tenant(base: str) -> dict[str, str]:
    return make_tenant_over_http(base, ADMIN, plan="enterprise", name="Writers")


def events_of(batch: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{batch}-{i}",
            "model": "gpt-4o-mini",
            "prompt_tokens": 100 + i,
            "completion_tokens": 7,
            "run_id": batch,
        }
        for i in range(BATCH)
    ]


def cli(args: list[str], config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["COLUMNS"] = "250"
    return subprocess.run(
        [METERLINE, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
        check=False,
    )


# "database": the quota counters in the database too, as with several workers: an event batch's
# reservations and rows are queued to the writer together (metering/events.py, _append_as_admitted).
@pytest.mark.parametrize("counters", ["auto", "database"])
def test_sigkill_with_requests_queued_in_the_writer_loses_doubles_and_splits_nothing(
    tmp_path: Path, upstream: FakeUpstream, counters: str
) -> None:
    db_path = tmp_path / "meterline.db"
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'database_url = "sqlite:///{db_path}"\ncounters = "{counters}"\n'
        f'admin_key = "{ADMIN_KEY}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
        f'\n[[upstreams]]\nname = "fake"\nbase_url = "{upstream.url}"\napi_key = "{UPSTREAM_KEY}"\n'
    )
    servers: list[Server] = []
    headers: dict[str, str] = {}
    rounds: list[Sent] = []
    try:
        for round_no in range(ROUNDS):
            server = Server(config, tmp_path, f"server-{round_no}")
            servers.append(server)
            server.start()
            if not headers:
                headers = make_tenant(server.base)
            if rounds:  # resend everything of the round before: the same ids count once
                for batch, ids in rounds[-1].batches.items():
                    resent = httpx.post(
                        f"{server.base}/v1/events",
                        json={"events": events_of(batch)},
                        headers=headers,
                        timeout=60,
                    )
                    assert resent.status_code == 200, resent.text
                    for result in resent.json()["data"]:
                        assert result["status"] == "accepted", result
                        earlier = rounds[-1].accepted.get(result["id"])
                        if earlier is not None:  # acknowledged before the kill: the same row, a duplicate
                            assert result["duplicate"] is True
                            assert result["ledger_id"] == earlier
                    assert {r["id"] for r in resent.json()["data"]} == set(ids)
            rounds.append(run_round(server, headers, round_no))
            server.kill()
            check_whole_batches(tmp_path, config, rounds[-1])

        final = Server(config, tmp_path, "server-final")
        servers.append(final)
        final.start()
        for batch in rounds[-1].batches:
            resent = httpx.post(
                f"{final.base}/v1/events", json={"events": events_of(batch)}, headers=headers, timeout=60
            )
            assert resent.status_code == 200, resent.text
        rows = all_ledger_rows(final.base, headers)
    finally:
        for server in servers:
            server.stop()

    event_rows = [r for r in rows if r["run_id"]]
    gateway_rows = [r for r in rows if not r["run_id"]]
    # Once each: an event by its id, a gateway request by its receipt.
    per_event = Counter(r["event_id"] for r in event_rows)
    assert max(per_event.values()) == 1, per_event.most_common(3)
    per_receipt = Counter(r["receipt_id"] for r in gateway_rows)
    assert max(per_receipt.values()) == 1, per_receipt.most_common(3)
    by_id = {r["id"]: r for r in rows}
    sent_ids = {event_id for sent in rounds for ids in sent.batches.values() for event_id in ids}
    # Every event sent (acknowledged, cut off and resent) is in the ledger once: one row per id.
    assert len(event_rows) == len(sent_ids)
    for sent in rounds:
        for ledger_id in sent.accepted.values():
            assert ledger_id in by_id
        receipts = {r["receipt_id"] for r in rows}
        for receipt_id in sent.receipts:  # every gateway 2xx left its row (found by its receipt)
            assert receipt_id in receipts
    assert sum(len(s.receipts) for s in rounds) >= ROUNDS
    assert sum(len(s.accepted) for s in rounds) >= ROUNDS

    reconciled = cli(["reconcile"], config, tmp_path)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "0 drift" in reconciled.stdout
    verified = cli(["verify"], config, tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def run_round(server: Server, headers: dict[str, str], round_no: int) -> Sent:
    """Gateway requests and event batches from 16 clients at once; SIGKILL once a few were answered (of
    each kind: either may be the faster), with more queued behind them."""
    sent = Sent()
    answered = threading.Event()
    stop = threading.Event()
    count = 0

    def note_answer() -> None:
        nonlocal count
        with sent.lock:
            count += 1
            if count >= 12 and sent.receipts and sent.accepted:
                answered.set()

    def events_client(worker: int) -> None:
        with httpx.Client(base_url=server.base, headers=headers, timeout=30) as http:
            n = 0
            while not stop.is_set():
                batch = f"r{round_no}-w{worker}-b{n}"
                n += 1
                with sent.lock:
                    sent.batches[batch] = [e["id"] for e in events_of(batch)]
                try:
                    response = http.post("/v1/events", json={"events": events_of(batch)})
                except httpx.TransportError:
                    return
                assert response.status_code == 200, response.text
                with sent.lock:
                    for result in response.json()["data"]:
                        assert result["status"] == "accepted", result
                        sent.accepted[result["id"]] = result["ledger_id"]
                note_answer()

    def gateway_client(worker: int) -> None:
        with httpx.Client(base_url=server.base, headers=headers, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        "/v1/chat/completions",
                        json={
                            "model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": f"hi {worker}"}],
                        },
                    )
                except httpx.TransportError:
                    return
                assert response.status_code == 200, response.text
                with sent.lock:
                    sent.receipts.append(response.headers["x-meterline-receipt-id"])
                note_answer()

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(events_client, w) for w in range(8)]
        futures += [pool.submit(gateway_client, w) for w in range(8)]
        assert answered.wait(60), "nothing was answered"
        server.kill()
        stop.set()
        for future in futures:
            future.result(timeout=60)
    return sent


def check_whole_batches(tmp_path: Path, config: Path, sent: Sent) -> None:
    """Straight from the database file after the kill: each batch's events are all there or none."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "meterline.db")
    try:
        counts = dict(
            db.execute(
                "SELECT run_id, count(*) FROM ledger WHERE run_id IS NOT NULL GROUP BY run_id"
            ).fetchall()
        )
    finally:
        db.close()
    for batch in sent.batches:
        assert counts.get(batch, 0) in (0, BATCH), (batch, counts.get(batch))
    acknowledged = {event_id.rsplit("-", 1)[0] for event_id in sent.accepted}
    for batch in acknowledged:
        assert counts.get(batch) == BATCH, batch
