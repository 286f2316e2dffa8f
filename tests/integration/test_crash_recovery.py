"""Crash recovery of two-phase reservations, with a real `meterline serve` process killed by SIGKILL.

The rule under test (metering/reservations.py): with the in-process counter store, every durable
reservation found at start-up was left by a process that is gone, so it is settled at its estimate and
its ledger row says ``"meterline.recovered": true`` in ``metadata``. A settle that was answered before the
crash keeps its actual usage; nothing is ever written twice, and settling again answers the same row.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers import MeterlineServer as Server
from servers import listening, make_tenant_over_http, running

pytestmark = pytest.mark.slow

ADMIN_KEY = "ml_admin_crash_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MODEL = "crash-model"
RECOVERED = "meterline.recovered"
CALLS_LIMIT = 1000
TOKENS_LIMIT = 10_000_000


@dataclass
class Deployment:
    config: Path
    cwd: Path
    db_path: Path
    servers: list[Server]

    def start(self) -> Server:
        """A new process on the same database file and config (a fresh port)."""
        server = Server(self.config, self.cwd, f"server-{len(self.servers)}")
        self.servers.append(server)
        server.start()
        return server

    def open_reservations(self) -> int:
        conn = sqlite3.connect(self.db_path)
        try:
            count: int = conn.execute("SELECT count(*) FROM reservations").fetchone()[0]
        finally:
            conn.close()
        return count


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """SQLite + in-process counters; plan ``crash`` limits calls and tokens (so counters are involved)."""
    db_path = tmp_path / "meterline.db"
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'database_url = "sqlite:///{db_path}"\n'
        f'admin_key = "{ADMIN_KEY}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\n'
        "\n[plans.crash]\n"
        f"daily_tokens = {TOKENS_LIMIT}\nmonthly_tokens = -1\n"
        f"daily_calls = {CALLS_LIMIT}\nmonthly_calls = -1\n"
        'rpm = -1\ntpm = -1\nmonthly_credits = -1\noverage = "block"\n'
        f'\n[prices."{MODEL}"]\ninput = "1.50"\noutput = "6.00"\n'
    )
    deployed = Deployment(config, tmp_path, db_path, [])
    try:
        yield deployed
    finally:
        for server in deployed.servers:
            server.stop()


# -- HTTP ---------------------------------------------------------------------------------------------
def make_tenant(base: str) -> dict[str, str]:
    return make_tenant_over_http(base, ADMIN, plan="crash", name="Crashers")


def reserve(http: httpx.Client, base: str, tag: str, prompt: int, completion: int) -> httpx.Response:
    return http.post(
        f"{base}/v1/reservations",
        json={"model": MODEL, "prompt_tokens": prompt, "completion_tokens": completion, "user_id": tag},
    )


def settle(http: httpx.Client, base: str, reservation_id: str, **actual: Any) -> httpx.Response:
    return http.post(f"{base}/v1/reservations/{reservation_id}/settle", json=actual)


def ledger_rows(base: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    page = httpx.get(f"{base}/v1/usage/ledger", params={"limit": 1000}, headers=headers, timeout=30)
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["total_count"] == len(body["data"]) < 1000
    rows: list[dict[str, Any]] = body["data"]
    return rows


def usage_of(base: str, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/usage", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def limit_named(usage: dict[str, Any], name: str) -> dict[str, Any]:
    found = [limit for limit in usage["limits"] if limit["name"] == name]
    assert len(found) == 1, usage["limits"]
    return found[0]


def recovered(row: dict[str, Any]) -> bool:
    return bool((row["metadata"] or {}).get(RECOVERED))


def check_totals(base: str, headers: dict[str, str], rows: list[dict[str, Any]]) -> None:
    """Summary, limit counters (settled + reserved) and ledger agree: no hold is left anywhere."""
    tokens = sum(r["total_tokens"] for r in rows)
    usage = usage_of(base, headers)
    assert usage["daily"]["calls"]["usage"] == len(rows)
    assert usage["daily"]["tokens"]["usage"] == tokens
    assert limit_named(usage, "daily_calls")["used"] == len(rows)
    assert limit_named(usage, "daily_tokens")["used"] == tokens


# -- tests --------------------------------------------------------------------------------------------
def test_reservations_open_at_a_sigkill_are_settled_at_their_estimate_on_restart(
    deployment: Deployment,
) -> None:
    first = deployment.start()
    headers = make_tenant(first.base)
    estimates: dict[str, tuple[int, int]] = {}
    with httpx.Client(headers=headers, timeout=30) as http:
        for i in range(5):
            held = reserve(http, first.base, f"r{i}", 100 * (i + 1), 50 * (i + 1))
            assert held.status_code == 201, held.text
            assert held.json()["estimate"]["total_tokens"] == 150 * (i + 1)
            estimates[held.json()["id"]] = (100 * (i + 1), 50 * (i + 1))
        ids = list(estimates)
        actual = {ids[0]: 7, ids[1]: 11}  # completion tokens actually used
        for reservation_id, completion in actual.items():
            done = settle(http, first.base, reservation_id, completion_tokens=completion, metadata={"k": "v"})
            assert done.status_code == 200, done.text
            assert done.json()["duplicate"] is False
            assert done.json()["recovered"] is False
            assert done.json()["total_tokens"] == estimates[reservation_id][0] + completion
        # Before the crash: 2 settled, 3 held, all counted against the limits.
        assert limit_named(usage_of(first.base, headers), "daily_calls")["used"] == 5
        assert len(ledger_rows(first.base, headers)) == 2

    first.kill()
    assert deployment.open_reservations() == 3
    second = deployment.start()
    assert deployment.open_reservations() == 0  # start-up settled them before serving

    rows = ledger_rows(second.base, headers)
    assert len(rows) == 5
    by_id = {r["id"]: r for r in rows}
    # One row per reservation, none twice (a settled row's id is its reservation's).
    assert set(by_id) == set(estimates)
    for reservation_id, (prompt, completion) in estimates.items():
        row = by_id[reservation_id]
        assert row["event_id"] == reservation_id
        assert row["prompt_tokens"] == prompt
        if reservation_id in actual:
            assert row["completion_tokens"] == actual[reservation_id]
            assert row["metadata"] == {"k": "v"}
            assert not recovered(row)
        else:
            assert row["completion_tokens"] == completion  # the estimate
            assert row["metadata"] == {RECOVERED: True}
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert row["priced"] is True
        assert Decimal(row["cost"]) > 0
    events = httpx.get(f"{second.base}/v1/usage/events", params={"per_page": 100}, headers=headers).json()
    assert events["pagination"]["total"] == 5
    assert sorted(recovered(e) for e in events["data"]) == [False, False, True, True, True]

    with httpx.Client(headers=headers, timeout=30) as http:
        late = ids[3]  # recovered at start-up: settling it now answers the recovered row
        again = settle(http, second.base, late, completion_tokens=1)
        assert again.status_code == 200, again.text
        body = again.json()
        assert (body["duplicate"], body["recovered"], body["ledger_id"]) == (True, True, late)
        assert body["total_tokens"] == sum(estimates[late])
        twice = settle(http, second.base, ids[0], completion_tokens=999)
        assert twice.status_code == 200, twice.text
        assert (twice.json()["duplicate"], twice.json()["recovered"]) == (True, False)
        assert twice.json()["total_tokens"] == estimates[ids[0]][0] + actual[ids[0]]
        released = http.post(f"{second.base}/v1/reservations/{ids[4]}/release")
        assert released.status_code == 404, released.text  # it ended at start-up

    after = ledger_rows(second.base, headers)
    assert sorted(r["id"] for r in after) == sorted(by_id)
    assert sum(r["total_tokens"] for r in after) == sum(r["total_tokens"] for r in rows)
    check_totals(second.base, headers, after)
    assert limit_named(usage_of(second.base, headers), "daily_calls")["used"] == 5


@dataclass
class Held:
    tag: str
    prompt: int
    completion: int
    actual_completion: int
    id: str | None = None  # set when the reservation got its 201
    settle_answer: dict[str, Any] | None = None  # set when a settle got its 200 before the kill
    settle_sent: bool = False


def test_a_sigkill_amid_concurrent_reservations_and_settles_loses_and_doubles_nothing(
    deployment: Deployment,
) -> None:
    first = deployment.start()
    headers = make_tenant(first.base)
    rng = random.Random(7)

    def job(tag: str) -> Held:
        completion = rng.randint(2, 400)
        return Held(tag, rng.randint(1, 400), completion, rng.randint(0, completion - 1))

    opened = [job(f"open-{i}") for i in range(30)]
    late = [job(f"late-{i}") for i in range(15)]  # reserved while the process is killed
    local = threading.local()
    clients: list[httpx.Client] = []

    def http() -> httpx.Client:
        client: httpx.Client | None = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(headers=headers, timeout=30)
            clients.append(client)
        return client

    answered = 0
    answered_lock = threading.Lock()
    enough = threading.Event()
    go = threading.Event()

    def do_reserve(held: Held) -> None:
        go.wait()
        try:
            response = reserve(http(), first.base, held.tag, held.prompt, held.completion)
        except httpx.TransportError:
            return  # cut off by the kill: the client never learns the id
        assert response.status_code == 201, response.text
        held.id = response.json()["id"]

    def do_settle(held: Held) -> None:
        nonlocal answered
        assert held.id is not None
        go.wait()
        held.settle_sent = True
        try:
            response = settle(http(), first.base, held.id, completion_tokens=held.actual_completion)
        except httpx.TransportError:
            return
        assert response.status_code == 200, response.text
        held.settle_answer = response.json()
        with answered_lock:
            answered += 1
            if answered >= 3:
                enough.set()

    try:
        with ThreadPoolExecutor(max_workers=48) as pool:
            go.set()
            for future in [pool.submit(do_reserve, held) for held in opened]:
                future.result(timeout=60)
            assert all(held.id is not None for held in opened)
            go.clear()
            settling = opened[:24]  # the last 6 are never settled before the crash
            futures = [pool.submit(do_settle, held) for held in settling]
            futures += [pool.submit(do_reserve, held) for held in late]
            time.sleep(0.2)  # every request lines up, then all are sent at once
            go.set()
            assert enough.wait(timeout=30), "no settle was answered"
            first.kill()
            for future in futures:
                future.result(timeout=60)
    finally:
        go.set()
        for client in clients:
            client.close()

    settled_before = [held for held in settling if held.settle_answer is not None]
    cut_off = [held for held in settling if held.settle_answer is None] + [h for h in late if h.id is None]
    assert len(settled_before) >= 3
    assert cut_off, "every request was answered before the kill: nothing was in flight"
    for held in settled_before:
        assert held.settle_answer is not None
        assert held.settle_answer["duplicate"] is False
        assert held.settle_answer["total_tokens"] == held.prompt + held.actual_completion

    second = deployment.start()
    assert deployment.open_reservations() == 0
    rows = ledger_rows(second.base, headers)
    per_id = Counter(r["id"] for r in rows)
    assert max(per_id.values()) == 1, per_id.most_common(3)
    by_id = {r["id"]: r for r in rows}
    known = [held for held in [*opened, *late] if held.id is not None]
    for held in known:  # every reservation that got its 201 has exactly one row
        assert held.id in by_id, f"{held.tag} ({held.id}) was lost"
        row = by_id[held.id]
        assert row["user_id"] == held.tag
        assert row["prompt_tokens"] == held.prompt
        estimate = held.completion
        if held.settle_answer is not None:  # answered before the kill: the actual usage, for good
            assert not recovered(row), row
            assert row["completion_tokens"] == held.actual_completion
            assert row["id"] == held.settle_answer["ledger_id"]
        elif held.settle_sent:  # in flight: its transaction committed (actual) or not (recovered estimate)
            if recovered(row):
                assert row["completion_tokens"] == estimate
            else:
                assert row["completion_tokens"] == held.actual_completion
        else:  # never settled: recovered at start-up at its estimate
            assert recovered(row), row
            assert row["completion_tokens"] == estimate
    # Reservations whose 201 was lost in the kill may have been made durable: recovered, never doubled.
    unknown = [r for r in rows if r["id"] not in {held.id for held in known}]
    unanswered_late = {held.tag: held for held in late if held.id is None}
    assert len(unknown) <= len(unanswered_late)
    for row in unknown:
        assert recovered(row), row
        held = unanswered_late[row["user_id"]]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (held.prompt, held.completion)

    # Settling every known reservation again (on the new process) answers its one row and writes nothing.
    with httpx.Client(headers=headers, timeout=30) as client:
        for held in known:
            assert held.id is not None
            again = settle(client, second.base, held.id, completion_tokens=1)
            assert again.status_code == 200, again.text
            body = again.json()
            assert body["duplicate"] is True
            assert body["recovered"] is recovered(by_id[held.id])
            assert body["total_tokens"] == by_id[held.id]["total_tokens"]
    after = ledger_rows(second.base, headers)
    assert sorted(r["id"] for r in after) == sorted(by_id)
    check_totals(second.base, headers, after)
    log = "\n".join(server.log_path.read_text(errors="replace") for server in deployment.servers)
    assert "Traceback" not in log, log[-4000:]


# -- one worker of several killed ---------------------------------------------------------------------


def test_a_worker_killed_mid_load_leaves_the_others_serving_and_its_reservations_recovered_once(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "meterline.db"
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'database_url = "sqlite:///{db_path}"\nadmin_key = "{ADMIN_KEY}"\n'
        f'signing_key_file = "{tmp_path / "signing-key.json"}"\nreservation_ttl_seconds = 3\n'
        "\n[plans.crash]\n"
        f"daily_tokens = {TOKENS_LIMIT}\nmonthly_tokens = -1\n"
        f"daily_calls = {CALLS_LIMIT}\nmonthly_calls = -1\n"
        'rpm = -1\ntpm = -1\nmonthly_credits = -1\noverage = "block"\n'
        f'\n[prices."{MODEL}"]\ninput = "1.50"\noutput = "6.00"\n'
    )
    server = Server(config, tmp_path, "workers", ("--workers", "2"))
    server.start()
    try:
        port = int(server.base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        while len(server.workers()) < 2 or listening(port) < 2:  # both workers listen: none of it is lost
            assert time.monotonic() < deadline, "two workers did not start"
            time.sleep(0.1)
        headers = make_tenant(server.base)
        held: list[str] = []
        # Reservations left open, on connections of their own: both workers hold some.
        for i in range(30):
            answer = httpx.post(
                f"{server.base}/v1/reservations",
                json={"model": MODEL, "prompt_tokens": 100, "completion_tokens": 50, "user_id": f"u{i}"},
                headers=headers,
                timeout=30,
            )
            assert answer.status_code == 201, answer.text
            held.append(answer.json()["id"])
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        # Gone: its listening socket closed. (A connection the kernel queued on that socket before then
        # is reset with it, unless net.ipv4.tcp_migrate_req hands it to another worker's: README.)
        deadline = time.monotonic() + 10
        while running(victim):
            assert time.monotonic() < deadline, "the killed worker did not end"
            time.sleep(0.02)
        # The others keep serving: every request after the kill is answered.
        sent = [{"id": f"after-{i}", "model": MODEL, "prompt_tokens": 10} for i in range(60)]
        for event in sent:
            answer = httpx.post(
                f"{server.base}/v1/events", json={"events": [event]}, headers=headers, timeout=30
            )
            assert answer.status_code == 200, answer.text
        # The supervisor starts a new worker in its place.
        deadline = time.monotonic() + 30
        while len(server.workers()) < 2 or victim in server.workers():
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        # Past their lease, the open reservations are settled at their estimate by the reapers, each once.
        deadline = time.monotonic() + 60
        while len(ledger_rows(server.base, headers)) < len(held) + len(sent):
            assert time.monotonic() < deadline, "open reservations were not recovered"
            time.sleep(0.5)
        time.sleep(6)  # another reaper pass or two on every worker: nothing more may appear
        rows = ledger_rows(server.base, headers)
        assert len(rows) == len(held) + len(sent)
        by_id = Counter(r["id"] for r in rows)
        assert all(by_id[reservation_id] == 1 for reservation_id in held)
        assert all(recovered(r) for r in rows if r["id"] in held)
        assert {r["event_id"] for r in rows if r["id"] not in held} == {e["id"] for e in sent}
        check_totals(server.base, headers, rows)  # the counters hold no reservation any more
        reconciled = httpx.get(f"{server.base}/v1/admin/reconcile", headers=ADMIN, timeout=60).json()
        assert reconciled["ok"], reconciled
    finally:
        server.stop()
