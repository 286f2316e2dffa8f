"""meterline.demo: the sample world is complete, consistent with the rollups, within limits and repeatable."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from meterline.clock import FrozenClock
from meterline.config import load_settings
from meterline.demo import DemoData, is_seeded, seed_demo
from meterline.metering import LedgerRow
from meterline.metering.reading import LedgerFilter, Scope
from meterline.quotas.periods import billing_period
from meterline.services import Services, build_services
from meterline.tenancy import Organization

NOW = datetime(2025, 3, 14, 15, 30, tzinfo=UTC)
DAYS = 35
ROWS_PER_DAY = 60
# Wide enough to hold every row: totals() works on whole hours, [start, end).
RANGE_START = NOW - timedelta(days=DAYS + 2)
RANGE_END = NOW + timedelta(days=1)


def make_services(path: Path) -> Services:
    settings = load_settings(
        database_url=f"sqlite:///{path}", signing_key_file=str(path.with_suffix(".key.json"))
    )
    return build_services(settings, clock=FrozenClock(NOW))


def ledger_rows(services: Services, org_id: str) -> list[LedgerRow]:
    rows: list[LedgerRow] = []
    while True:
        page = services.reader.ledger_page(Scope(org_id), LedgerFilter(), limit=1000, offset=len(rows))
        rows.extend(page.rows)
        if not page.rows or len(rows) >= page.total:
            return rows


@dataclass
class World:
    services: Services
    data: DemoData
    before: bool
    progress: list[tuple[int, int]]
    orgs: dict[str, Organization]
    rows: dict[str, list[LedgerRow]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    services = make_services(tmp_path_factory.mktemp("demo") / "demo.db")
    before = is_seeded(services)
    calls: list[tuple[int, int]] = []
    data = seed_demo(
        services,
        days=DAYS,
        rows_per_day=ROWS_PER_DAY,
        progress=lambda done, total: calls.append((done, total)),
    )
    orgs = {o.name: o for o in services.tenancy.list_organizations()[0]}
    rows = {o.id: ledger_rows(services, o.id) for o in orgs.values()}
    yield World(services, data, before, calls, orgs, rows)
    services.close()


def all_rows(world: World) -> list[LedgerRow]:
    return [row for rows in world.rows.values() for row in rows]


def test_is_seeded_false_before_and_true_after(world: World) -> None:
    assert world.before is False
    assert is_seeded(world.services) is True


def test_four_organizations_with_their_billing_settings(world: World) -> None:
    assert set(world.orgs) == {"Northwind AI", "Globex Labs", "Initech", "Umbrella Health"}
    globex, initech = world.orgs["Globex Labs"], world.orgs["Initech"]
    umbrella = world.orgs["Umbrella Health"]
    assert (globex.plan, globex.currency, globex.discount_pct) == ("enterprise", "EUR", 10)
    assert initech.plan == "free"
    assert umbrella.spend_cap_nanos is not None
    anchors = {o.billing_anchor_day for o in world.orgs.values()}
    assert len(anchors) == 4
    assert (NOW - timedelta(days=DAYS)).day in anchors


def test_workspaces_have_groups_and_keys(world: World) -> None:
    tenancy = world.services.tenancy
    groups: set[str | None] = set()
    for org in world.orgs.values():
        workspaces, _ = tenancy.list_workspaces(org.id)
        assert 2 <= len(workspaces) <= 4
        groups |= {ws.group for ws in workspaces}
        keys, _ = tenancy.list_keys(organization_id=org.id)
        assert {k.workspace_id for k in keys if k.scope == "workspace"} == {ws.id for ws in workspaces}
        assert sum(k.scope == "organization" for k in keys) == 1
    assert {"Platform", "Research", "Support"} <= groups


def test_credit_grants_for_two_orgs(world: World) -> None:
    reasons = {
        grant.reason
        for org in world.orgs.values()
        for grant in world.services.tenancy.list_credit_grants(org.id)
    }
    assert reasons == {"Referral bonus", "Launch promotion"}


def test_every_key_secret_authenticates(world: World) -> None:
    assert world.data.admin_key is None
    assert len(world.data.keys) >= 4 * 3
    for key in world.data.keys:
        principal = world.services.tenancy.authenticate(key.secret)
        assert principal.organization_id == world.orgs[key.organization].id
        assert principal.key_name == key.name
        assert principal.scope == key.scope


def test_history_covers_every_day_up_to_now(world: World) -> None:
    rows = all_rows(world)
    assert len(rows) == world.data.rows
    assert all(NOW - timedelta(days=DAYS) <= r.created_at <= NOW for r in rows)
    days_per_org = [len({r.created_at.date() for r in org_rows}) for org_rows in world.rows.values()]
    assert max(days_per_org) >= DAYS
    # Roughly rows_per_day a day, but not the same number every day.
    per_day = Counter(r.created_at.date() for r in rows)
    assert 0.8 * DAYS * ROWS_PER_DAY <= len(rows) <= 1.2 * DAYS * ROWS_PER_DAY
    assert len(set(per_day.values())) > 5


def test_realistic_mix_of_models_sources_and_users(world: World) -> None:
    rows = all_rows(world)
    models = Counter(r.model for r in rows if r.model)
    assert {"gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "whisper-1"} <= set(models)
    assert {"claude-3-5-sonnet-latest", "claude-3-5-haiku-latest"} <= set(models)
    sources = Counter(r.source for r in rows)
    assert sources["web"] > sources["cli"] > sources["api"] > 0
    assert len({r.user_id for r in rows}) >= 20
    assert any(r.identifier_id for r in rows)
    assert any(r.failover and r.region in ("eu-west", "us-east") for r in rows)
    events = [r for r in rows if r.event == "case.execute"]
    assert 0.02 * len(rows) < len(events) < 0.1 * len(rows)
    assert all(r.units == 1 and r.run_id and r.metadata and r.metadata["models_count"] >= 1 for r in events)


def test_rows_are_internally_consistent(world: World) -> None:
    for r in all_rows(world):
        assert r.cache_read_tokens + r.cache_write_tokens <= r.prompt_tokens
        if r.model == "whisper-1":
            assert r.audio_seconds is not None
            assert 5 <= r.audio_seconds <= 600
            assert (r.prompt_tokens, r.completion_tokens, r.endpoint) == (0, 0, "/v1/audio/transcriptions")
        elif r.model == "text-embedding-3-small":
            assert (r.completion_tokens, r.endpoint) == (0, "/v1/embeddings")
        elif r.provider == "anthropic":
            assert r.endpoint == "/v1/messages"
        if r.model is not None:
            # Every model is priced but the one fine-tune that shows the "unpriced usage" alert.
            assert r.priced == (r.model != "umbrella-notes-ft-2"), r.model
    assert any(r.cache_read_tokens for r in all_rows(world))
    assert sum(1 for r in all_rows(world) if not r.priced and r.model) >= 1


def test_ledger_rows_sum_to_the_rollups(world: World) -> None:
    for org in world.orgs.values():
        rows = world.rows[org.id]
        totals = world.services.reader.totals(Scope(org.id), RANGE_START, RANGE_END)
        assert totals.requests == len(rows)
        assert totals.cost_nanos == sum(r.cost_nanos for r in rows)
        assert totals.total_tokens == sum(r.total_tokens for r in rows)
        assert all(r.currency == org.currency for r in rows)


def test_free_org_stays_within_plan_and_capped_org_within_cap(world: World) -> None:
    free = world.orgs["Initech"]
    plan = world.services.plan_of(free)
    tokens: defaultdict[datetime, int] = defaultdict(int)
    calls: defaultdict[datetime, int] = defaultdict(int)
    daily: defaultdict[date, int] = defaultdict(int)
    for r in world.rows[free.id]:
        start = billing_period(r.created_at, free.billing_anchor_day).start
        tokens[start] += r.total_tokens
        calls[start] += 1
        daily[r.created_at.date()] += r.total_tokens
    assert tokens
    assert max(tokens.values()) < plan.monthly_tokens
    assert max(calls.values()) < plan.monthly_calls
    assert max(daily.values()) < plan.daily_tokens

    capped = world.orgs["Umbrella Health"]
    assert capped.spend_cap_nanos is not None
    assert sum(r.cost_nanos for r in world.rows[capped.id]) < capped.spend_cap_nanos


def test_progress_reports_every_batch(world: World) -> None:
    assert world.progress
    assert world.progress[-1] == (world.data.rows, world.data.rows)
    done = [d for d, _ in world.progress]
    assert done == sorted(done)
    assert {t for _, t in world.progress} == {world.data.rows}


def test_same_seed_same_world(tmp_path: Path) -> None:
    def run(name: str, seed: int) -> tuple[int, int]:
        services = make_services(tmp_path / name)
        try:
            data = seed_demo(services, days=30, seed=seed, rows_per_day=20)
            orgs, _ = services.tenancy.list_organizations()
            tokens = sum(
                services.reader.totals(Scope(o.id), RANGE_START, RANGE_END).total_tokens for o in orgs
            )
            return data.rows, tokens
        finally:
            services.close()

    first = run("a.db", 11)
    assert first == run("b.db", 11)
    assert first[0] > 0
    assert first != run("c.db", 12)
