"""POST /v1/events (SPEC §4) on every backend: idempotency, per-event errors, no partial writes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from conftest import ADMIN, Tenant, add_key, assert_envelope, in_one_batch, make_tenant
from meterline.receipts import verify_chain
from meterline.services import Services


def event(i: int | str, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"ev-{i}",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        **fields,
    }


def ledger(client: TestClient, tenant: Tenant, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/usage/ledger", params={"limit": 1000, **params}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_events_are_priced_and_recorded(client: TestClient, tenant: Tenant) -> None:
    response = client.post(
        "/v1/events",
        json={
            "events": [
                event(
                    1,
                    user_id="alice",
                    source="cli",
                    endpoint="/v1/chat/completions",
                    run_id="r-1",
                    metadata={"ticket": 42},
                    timestamp="2026-03-14T09:00:00Z",
                ),
                {
                    "id": "case-1",
                    "event": "case.execute",
                    "units": 1,
                    "run_id": "prn_1",
                    "metadata": {"models_count": 3},
                },
            ]
        },
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 0, 0)
    first = body["data"][0]
    # gpt-4o-mini: $0.15 / MTok in, $0.60 / MTok out -> 1000 * 0.15e-6 + 500 * 0.6e-6 = 0.00045
    assert first["cost"] == "0.00045"
    assert first["credits"] == "0.045"  # credit_value 0.01
    assert first["priced"] is True
    rows = ledger(client, tenant)["data"]
    by_event = {r["event"]: r for r in rows}
    llm = by_event["llm.request"]
    assert llm["created_at"] == "2026-03-14T09:00:00Z"
    assert (llm["user_id"], llm["source"], llm["run_id"], llm["metadata"]) == (
        "alice",
        "cli",
        "r-1",
        {"ticket": 42},
    )
    assert llm["key_prefix"] == tenant.key[:16]
    assert llm["key_name"] == "Default"
    assert llm["billing_unit"] == "token"
    assert llm["modality"] == "chat"
    assert by_event["case.execute"]["billing_unit"] == "unit"


def test_resending_an_event_counts_it_once(client: TestClient, tenant: Tenant) -> None:
    batch = {"events": [event(1), event(2)]}
    first = client.post("/v1/events", json=batch, headers=tenant.headers).json()
    again = client.post("/v1/events", json=batch, headers=tenant.headers).json()
    assert [r["ledger_id"] for r in again["data"]] == [r["ledger_id"] for r in first["data"]]
    assert [r["cost"] for r in again["data"]] == [r["cost"] for r in first["data"]]
    assert again["duplicates"] == 2
    assert ledger(client, tenant)["total_count"] == 2
    usage = client.get("/v1/usage", headers=tenant.headers).json()
    assert usage["usage"] == 3000


def test_same_id_in_one_batch(client: TestClient, tenant: Tenant) -> None:
    body = client.post(
        "/v1/events", json={"events": [event(1), event(1), event(1, prompt_tokens=7)]}, headers=tenant.headers
    ).json()
    statuses = [(r["status"], r["duplicate"]) for r in body["data"]]
    assert statuses == [("accepted", False), ("accepted", True), ("rejected", False)]
    assert body["data"][2]["error"]["code"] == "conflict"
    assert ledger(client, tenant)["total_count"] == 1


def test_same_id_different_body_is_a_conflict(client: TestClient, tenant: Tenant) -> None:
    client.post("/v1/events", json={"events": [event(1)]}, headers=tenant.headers)
    response = client.post(
        "/v1/events", json={"events": [event(1, completion_tokens=501)]}, headers=tenant.headers
    )
    error = assert_envelope(response, 409, "conflict")
    assert "ev-1" in error["message"]
    rows = ledger(client, tenant)["data"]
    assert [r["completion_tokens"] for r in rows] == [500]


def test_ids_are_per_organization(client: TestClient, tenant: Tenant) -> None:
    other = make_tenant(client, name="Other")
    assert client.post("/v1/events", json={"events": [event(1)]}, headers=tenant.headers).status_code == 200
    again = client.post("/v1/events", json={"events": [event(1, prompt_tokens=5)]}, headers=other.headers)
    assert again.status_code == 200
    assert again.json()["duplicates"] == 0


def test_invalid_events_are_rejected_and_nothing_of_them_is_written(
    client: TestClient, tenant: Tenant
) -> None:
    bad = [
        event("neg", prompt_tokens=-1),
        event("absurd", completion_tokens=10**12),
        event("float", prompt_tokens=1.5),
        event("string", prompt_tokens="100"),
        event("unknown-field", tokens=5),
        event("future", timestamp="2026-03-15T10:30:00Z"),
        event("ancient", timestamp="2020-01-01T00:00:00Z"),
        event("bad-time", timestamp="14/03/2026"),
        event("naive-time", timestamp="2026-03-14T10:00:00"),
        event("cache", prompt_tokens=10, cache_read_tokens=8, cache_write_tokens=5),
        event("bad-event-name", event="case execute!"),
        {"model": "gpt-4o-mini"},
        {"id": "", "model": "gpt-4o-mini"},
        event("meta", metadata="not an object"),
        event("big-meta", metadata={"x": "y" * 10_000}),
        event("units", units=-2),
        event("huge-int-meta", metadata={"x": 123456789012345678901234567890}),
        event("bool-units", units=True),
        event("audio", audio_seconds=-1),
    ]
    response = client.post("/v1/events", json={"events": [event("good"), *bad]}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 1
    assert body["rejected"] == len(bad)
    for index, result in enumerate(body["data"][1:], start=1):
        assert result["status"] == "rejected", result
        assert result["error"]["code"] == "invalid_request"
        assert result["error"]["param"].startswith(f"events[{index}]"), result
        assert result["error"]["message"]
    assert ledger(client, tenant)["total_count"] == 1


def test_non_finite_numbers_are_refused(client: TestClient, tenant: Tenant) -> None:
    headers = {**tenant.headers, "Content-Type": "application/json"}
    for raw in (
        b'{"events":[{"id":"a","metadata":{"x":1e400}}]}',
        b'{"events":[{"id":"b","audio_seconds":"NaN"}]}',
        b'{"events":[{"id":"c","audio_seconds":1e400}]}',
    ):
        assert_envelope(client.post("/v1/events", content=raw, headers=headers), 422, "invalid_request")
    assert ledger(client, tenant)["total_count"] == 0


def test_a_batch_of_only_invalid_events_is_422(client: TestClient, tenant: Tenant) -> None:
    error = assert_envelope(
        client.post("/v1/events", json={"events": [event(1, prompt_tokens=-5)]}, headers=tenant.headers),
        422,
        "invalid_request",
    )
    assert error["param"] == "events[0].prompt_tokens"
    assert ledger(client, tenant)["total_count"] == 0


def test_batch_limits(client: TestClient, tenant: Tenant) -> None:
    too_many = {"events": [event(i) for i in range(1001)]}
    assert (
        "1000"
        in assert_envelope(
            client.post("/v1/events", json=too_many, headers=tenant.headers), 413, "payload_too_large"
        )["message"]
    )
    assert_envelope(
        client.post("/v1/events", json={"events": []}, headers=tenant.headers), 400, "invalid_request"
    )
    full = client.post("/v1/events", json={"events": [event(i) for i in range(1000)]}, headers=tenant.headers)
    assert full.json()["accepted"] == 1000
    assert ledger(client, tenant, limit=1)["total_count"] == 1000


def test_malformed_bodies(client: TestClient, tenant: Tenant) -> None:
    headers = {**tenant.headers, "Content-Type": "application/json"}
    assert (
        "JSON"
        in assert_envelope(
            client.post("/v1/events", content=b"{nope", headers=headers), 400, "invalid_request"
        )["message"]
    )
    assert_envelope(client.post("/v1/events", content=b"[]", headers=headers), 422, "invalid_request")
    assert_envelope(client.post("/v1/events", json={"events": "x"}, headers=headers), 422, "invalid_request")
    assert_envelope(
        client.post("/v1/events", json={"events": [1, 2]}, headers=headers), 422, "invalid_request"
    )
    assert_envelope(
        client.post("/v1/events", json={"events": [], "extra": 1}, headers=headers), 422, "invalid_request"
    )
    huge = b'{"events": [' + b'{"id": "x"},' * 1_000_000 + b'{"id": "y"}]}'
    assert_envelope(client.post("/v1/events", content=huge, headers=headers), 413, "payload_too_large")
    assert ledger(client, tenant)["total_count"] == 0


def test_unknown_model_is_recorded_unpriced(client: TestClient, tenant: Tenant) -> None:
    body = client.post(
        "/v1/events",
        json={"events": [event(1, model="my-own-llm-v9", provider="acme")]},
        headers=tenant.headers,
    ).json()
    result = body["data"][0]
    assert (result["status"], result["priced"], result["cost"]) == ("accepted", False, "0")


def test_concurrent_resends_are_counted_once(client: TestClient, tenant: Tenant) -> None:
    batch = {"events": [event(i) for i in range(50)]}

    def send(_: int) -> int:
        return client.post("/v1/events", json=batch, headers=tenant.headers).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(send, range(16))) == {200}
    assert ledger(client, tenant)["total_count"] == 50
    assert client.get("/v1/usage", headers=tenant.headers).json()["usage"] == 50 * 1500


def test_events_need_a_valid_key(client: TestClient, tenant: Tenant) -> None:
    batch = {"events": [event(1)]}
    assert_envelope(client.post("/v1/events", json=batch), 401, "unauthorized")
    assert_envelope(
        client.post("/v1/events", json=batch, headers={"Authorization": "Bearer ml_live_nothex"}),
        401,
        "unauthorized",
    )
    fake = "ml_live_" + "0" * 48
    assert_envelope(
        client.post("/v1/events", json=batch, headers={"Authorization": f"Bearer {fake}"}),
        401,
        "unauthorized",
    )


def test_concurrent_batches_sharing_rollup_rows_all_land(client: TestClient, tenant: Tenant) -> None:
    """Batches whose events fall into the same rollup rows, sent concurrently in different orders, all
    succeed (no deadlock between transactions) and every token is counted exactly once."""
    users = [f"user-{u}" for u in range(30)]

    def send(worker: int) -> int:
        order = users if worker % 2 else list(reversed(users))
        batch = {"events": [event(f"{worker}-{u}", user_id=u) for u in order]}
        return client.post("/v1/events", json=batch, headers=tenant.headers).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(send, range(16))) == [200] * 16
    assert ledger(client, tenant, limit=1)["total_count"] == 16 * 30
    assert client.get("/v1/usage", headers=tenant.headers).json()["usage"] == 16 * 30 * 1500


@contextmanager
def poisoned(services: Services) -> Iterator[None]:
    """The database refuses any ledger row whose idempotency key is "poison" (a trigger)."""
    db = services.db
    poison_ddl = (
        [
            "CREATE TRIGGER poison BEFORE INSERT ON ledger WHEN NEW.idempotency_key = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        ]
        if db.is_sqlite
        else [
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.idempotency_key = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION poison()",
        ]
    )
    with db.write() as conn:
        for statement in poison_ddl:
            conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        with db.write() as conn:
            conn.exec_driver_sql("DROP TRIGGER poison" if db.is_sqlite else "DROP TRIGGER poison ON ledger")
            if not db.is_sqlite:
                conn.exec_driver_sql("DROP FUNCTION poison()")


def test_one_bad_event_in_a_group_committed_batch_fails_only_its_own_request(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    """Twelve requests committed in one transaction by the writer; the database refuses one event of one
    of them. That request fails whole (none of its events is written); the other eleven land."""
    # Authenticated once before: the key's last-used stamp (a write outside the writer, once a minute)
    # must not wait behind the held transaction.
    assert client.get("/v1/usage", headers=tenant.headers).status_code == 200

    def send(worker: int) -> Any:
        events = [event(f"{worker}-{i}", user_id=f"user-{i}", run_id=f"w{worker}") for i in range(5)]
        if worker == 7:
            events[3]["id"] = "poison"
        return client.post("/v1/events", json={"events": events}, headers=tenant.headers)

    with poisoned(services):
        answers = in_one_batch(services, 12, send)

    bad = answers[7]
    assert bad.status_code >= 400
    assert "error" in bad.json()
    assert [a.status_code for i, a in enumerate(answers) if i != 7] == [200] * 11
    rows = ledger(client, tenant, limit=1000)
    assert rows["total_count"] == 11 * 5
    assert {r["run_id"] for r in rows["data"]} == {f"w{w}" for w in range(12) if w != 7}
    # Resent once the database takes it again, the refused request lands whole.
    assert send(7).status_code == 200
    assert ledger(client, tenant, limit=1)["total_count"] == 12 * 5


def test_requests_of_several_organizations_in_one_batch_each_keep_their_own_books(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    """One transaction settles the requests of several organizations together: each keeps its own
    idempotency (one event id in three organizations is three events; a resent one is a duplicate in
    its own), usage, receipt chain and credits; a request the database refuses fails alone."""
    tenants = [tenant, make_tenant(client, name="Beta"), make_tenant(client, name="Gamma")]
    for t in tenants:  # each has a receipt chain and a stored event already; its key is stamped
        first = client.post("/v1/events", json={"events": [event("first")]}, headers=t.headers)
        assert first.status_code == 200, first.text
    batches = [
        (0, [event("shared"), event("a", completion_tokens=100)]),
        (1, [event("shared", prompt_tokens=2000), event("first")]),  # "first": resent
        (2, [event("shared"), event("b")]),
        (2, [event("c"), {**event("d"), "id": "poison"}]),  # refused by the database: fails alone
        (0, [event("e")]),
    ]

    def send(n: int) -> Any:
        owner, events = batches[n]
        return client.post("/v1/events", json={"events": events}, headers=tenants[owner].headers)

    with poisoned(services):
        answers = in_one_batch(services, len(batches), send)

    assert [a.status_code for a in answers[:3]] == [200] * 3
    assert answers[3].status_code >= 400
    assert answers[4].status_code == 200
    assert [e["duplicate"] for e in answers[1].json()["data"]] == [False, True]
    # Each organization: its own rows (the event id "shared" once in each), usage, chain.
    expected = {
        0: ["ev-a", "ev-e", "ev-first", "ev-shared"],
        1: ["ev-first", "ev-shared"],
        2: ["ev-b", "ev-first", "ev-shared"],
    }
    usage = {0: 1500 + 1100 + 1500 + 1500, 1: 1500 + 2500, 2: 3 * 1500}
    jwks = client.get("/.well-known/jwks.json").json()
    for n, t in enumerate(tenants):
        rows = ledger(client, t)["data"]
        assert sorted(r["event_id"] for r in rows) == expected[n], n
        assert client.get("/v1/usage", headers=t.headers).json()["usage"] == usage[n], n
        key = add_key(client, t.workspace["id"], "Org reader", scope="organization")
        receipts = client.get(
            "/v1/receipts", params={"limit": 100}, headers={"Authorization": f"Bearer {key}"}
        )
        assert receipts.status_code == 200, receipts.text
        chain = receipts.json()["data"]
        assert [r["seq"] for r in chain] == list(range(1, len(rows) + 1)), n
        assert {r["ledger_id"] for r in chain} == {r["id"] for r in rows}, n
        report = verify_chain([r["jws"] for r in chain], jwks, organization_id=t.org["id"])
        assert report.ok, report.broken
    reconciled = client.get("/v1/admin/reconcile", headers=ADMIN).json()
    assert reconciled["ok"], reconciled


def test_one_event_sent_twice_into_one_group_committed_batch_counts_once(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    """A client retrying a batch while the first attempt is still queued: both requests are committed in
    one transaction by the writer, and the event is written, priced and counted once."""
    assert client.get("/v1/usage", headers=tenant.headers).status_code == 200  # key stamp written now
    body = {"events": [event("twice")]}
    answers = in_one_batch(
        services, 2, lambda _: client.post("/v1/events", json=body, headers=tenant.headers)
    )
    assert [a.status_code for a in answers] == [200, 200]
    results = [a.json()["data"][0] for a in answers]
    assert sorted(r["duplicate"] for r in results) == [False, True]
    assert results[0]["ledger_id"] == results[1]["ledger_id"]
    assert ledger(client, tenant)["total_count"] == 1
    assert client.get("/v1/usage", headers=tenant.headers).json()["usage"] == 1500
    # Every projection (rollups, credits drawn) agrees with the ledger: nothing was split twice.
    reconciled = client.get("/v1/admin/reconcile", headers=ADMIN).json()
    assert reconciled["ok"], reconciled


def test_the_usage_vector_is_accepted_priced_and_shown(client: TestClient, tenant: Tenant) -> None:
    # claude-sonnet-4-5 lists $3 input, $3.75 5-minute and $6 1-hour cache writes per million tokens,
    # $15 output, and $10 per 1,000 web searches.
    vector = {
        "cache_write_tokens": 3000,
        "cache_write_1h_tokens": 2000,
        "reasoning_tokens": 40,
        "web_searches": 3,
        "web_fetches": 1,
        "service_tier": "priority",
        "batch": True,
    }
    sent = event(
        "vec", model="claude-sonnet-4-5", provider="anthropic", prompt_tokens=5000, completion_tokens=100
    )
    response = client.post("/v1/events", json={"events": [{**sent, **vector}]}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    # 2,000 uncached x 3 + 1,000 x 3.75 + 2,000 x 6 + 100 x 15 = 23,250 per million; 3 searches x $0.01.
    assert response.json()["data"][0]["cost"] == "0.05325"
    row = ledger(client, tenant)["data"][0]
    assert {name: row[name] for name in vector} == vector
    assert (row["input_audio_tokens"], row["output_audio_tokens"], row["accepted_prediction_tokens"]) == (
        0,
        0,
        0,
    )
    csv = client.get("/v1/usage/export.csv", headers=tenant.headers).text.splitlines()
    header, line = csv[0].split(","), csv[1].split(",")
    cells = dict(zip(header, line, strict=True))
    assert (cells["cache_write_1h_tokens"], cells["web_searches"], cells["service_tier"]) == (
        "2000",
        "3",
        "priority",
    )
    assert cells["batch"] == "true"


def test_each_event_of_a_batch_keeps_its_own_usage_vector(client: TestClient, tenant: Tenant) -> None:
    # One settle writes the batch's rows in one statement (on PostgreSQL the vectors' counts travel
    # together, taken by each row's place): every row must come back with its own counts.
    names = (
        "cache_write_1h_tokens", "input_audio_tokens", "cache_audio_read_tokens", "output_audio_tokens",
        "reasoning_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens", "web_searches",
        "web_fetches",
    )  # fmt: skip
    vectors = {
        f"v{i}": {name: 10 * i + 9 - k for k, name in enumerate(names)}
        | {"cache_write_tokens": 10 * i + 100, "cache_read_tokens": 1000}
        for i in range(1, 4)
    }
    vectors["v0"] = {}  # none given: all zero
    sent = [event(i, prompt_tokens=5000, completion_tokens=500, **vector) for i, vector in vectors.items()]
    response = client.post("/v1/events", json={"events": sent}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 4, response.text
    rows = {row["event_id"]: row for row in ledger(client, tenant)["data"]}
    for i, vector in vectors.items():
        row = rows[f"ev-{i}"]
        assert {name: row[name] for name in names} == {name: vector.get(name, 0) for name in names}, i


def test_a_usage_vector_that_does_not_add_up_is_refused_with_what_to_fix(
    client: TestClient, tenant: Tenant
) -> None:
    bad = [
        event(1, cache_write_tokens=10, cache_write_1h_tokens=11),
        event(2, completion_tokens=50, reasoning_tokens=40, output_audio_tokens=20),
        event(3, service_tier="Flex!"),
        event(4, web_searches=-1),
    ]
    response = client.post("/v1/events", json={"events": bad}, headers=tenant.headers)
    assert response.status_code == 422, response.text
    params = [r["error"]["param"] for r in response.json()["data"]]
    assert params == [
        "events[0].cache_write_1h_tokens",
        "events[1].completion_tokens",
        "events[2].service_tier",
        "events[3].web_searches",
    ]
    assert (
        "cache_write_1h_tokens must not exceed cache_write_tokens"
        in response.json()["data"][0]["error"]["message"]
    )
    assert ledger(client, tenant)["data"] == []


def test_look_ups_read_together_answer_each_organization_its_own_rows(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    """Concurrent idempotency look-ups are one read (``storage.read_together``): the same event id in two
    organizations, asked in one read, finds each organization's own row."""
    other = make_tenant(client, name="Other")
    mine = client.post("/v1/events", json={"events": [event("shared")]}, headers=tenant.headers).json()
    theirs = client.post("/v1/events", json={"events": [event("shared")]}, headers=other.headers).json()
    store = services.settler._store
    answers = store._lookup_all(  # type: ignore[attr-defined]
        [
            (tenant.org["id"], ["ev-shared", "ev-never-sent"]),
            (other.org["id"], ["ev-shared"]),
            (tenant.org["id"], ["ev-shared"]),
        ]
    )
    assert [{key: row.id for key, row in answer.items()} for answer in answers] == [
        {"ev-shared": mine["data"][0]["ledger_id"]},
        {"ev-shared": theirs["data"][0]["ledger_id"]},
        {"ev-shared": mine["data"][0]["ledger_id"]},
    ]
    assert mine["data"][0]["ledger_id"] != theirs["data"][0]["ledger_id"]
    alone = store._lookup_all([(other.org["id"], ["ev-shared", "ev-never-sent"])])  # type: ignore[attr-defined]
    assert [{key: row.id for key, row in answer.items()} for answer in alone] == [
        {"ev-shared": theirs["data"][0]["ledger_id"]}
    ]
