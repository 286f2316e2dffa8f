"""A realistic sample world for demos, screenshots and trying the dashboard: ``meterline demo``.

Everything is created through the real services (tenancy and the one settle path), never with raw SQL,
so the demo exercises exactly the code that production traffic does and its numbers obey every
invariant (ledger rows sum to the rollups, cost is priced from the bundled price database, ...).

The world is deterministic for a given ``seed`` and clock: the same call on an empty database yields the
same usage rows. Only ids, key secrets and ledger row ids are random, because the services mint them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from meterline.errors import LimitExceeded
from meterline.metering import Account, UsageRecord
from meterline.quotas.engine import Subject
from meterline.quotas.periods import billing_period
from meterline.quotas.plans import UNLIMITED, Plan
from meterline.services import Services
from meterline.tenancy.models import ApiKey, KeyScope, Organization, Workspace

# Records per settle() call: large enough that a batch costs one transaction for hundreds of rows, small
# enough that progress moves smoothly and one transaction never holds the SQLite writer for long.
SETTLE_BATCH = 500

# The demo stays this far below every limit that blocks, so a fresh demo can still take live requests
# (and the quota bars show "almost full" rather than "blocked").
_HEADROOM = Decimal("0.85")

_CASE_EVENT = "case.execute"
_SOURCES = (("web", 60), ("cli", 35), ("api", 5))


@dataclass(frozen=True)
class DemoKey:
    """A key created by the demo. ``organization`` and ``workspace`` are display names, not ids."""

    organization: str
    workspace: str
    name: str
    scope: str
    secret: str


@dataclass(frozen=True)
class DemoData:
    admin_key: str | None
    keys: list[DemoKey]
    rows: int


# -- the shape of the world ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    name: str
    provider: str
    kind: str  # "chat" | "embedding" | "audio" | "event"


_MODELS = {
    m.name: m
    for m in (
        _Model("gpt-4o-mini", "openai", "chat"),
        _Model("gpt-4o", "openai", "chat"),
        _Model("text-embedding-3-small", "openai", "embedding"),
        _Model("whisper-1", "openai", "audio"),
        _Model("claude-3-5-sonnet-latest", "anthropic", "chat"),
        _Model("claude-3-5-haiku-latest", "anthropic", "chat"),
        _Model(_CASE_EVENT, "", "event"),
    )
}


@dataclass(frozen=True)
class _WorkspaceSpec:
    name: str
    group: str
    weight: int
    ci_key: bool = False


@dataclass(frozen=True)
class _OrgSpec:
    name: str
    plan: str
    currency: str
    anchor: int | None  # None: the day ``days`` ago, so one period starts exactly at the history's start
    share: Decimal  # of rows_per_day
    people: tuple[str, ...]
    workspaces: tuple[_WorkspaceSpec, ...]
    models: tuple[tuple[str, int], ...]  # (model, weight); case.execute is ~5% everywhere
    token_scale: float  # multiplies the typical prompt/completion size
    weekend: float  # weekend traffic relative to a weekday
    discount_pct: int = 0
    spend_cap: Decimal | None = None
    max_daily_rows: int | None = None  # a soft ceiling, so a small plan's guard rarely has to drop rows
    grant: tuple[Decimal, str] | None = None
    # The organization whose alerts the demo shows: today a batch job takes its period's spend to this
    # share of the spend cap (past 50/75/80 %, a projected run-out, a spike), it uses a model the price
    # book does not know, and a client over its cap is refused until "refused frequently" fires.
    alerting: Decimal | None = None


_ORGS: tuple[_OrgSpec, ...] = (
    _OrgSpec(
        name="Northwind AI",
        plan="pro",
        currency="USD",
        anchor=1,
        share=Decimal("0.42"),
        people=(
            "alice@northwind.ai",
            "bob.kim@northwind.ai",
            "carol",
            "dmitri.v",
            "erin@northwind.ai",
            "farah.n@northwind.ai",
            "gus",
            "hana@northwind.ai",
            "ivan.petrov",
            "jules@northwind.ai",
            "kwame",
            "lena.s@northwind.ai",
        ),
        workspaces=(
            _WorkspaceSpec("Chat assistant", "Platform", 40, ci_key=True),
            _WorkspaceSpec("Data pipeline", "Platform", 25, ci_key=True),
            _WorkspaceSpec("Research sandbox", "Research", 15),
            _WorkspaceSpec("Help center bot", "Support", 20),
        ),
        models=(
            ("gpt-4o-mini", 34),
            ("gpt-4o", 20),
            ("text-embedding-3-small", 15),
            ("whisper-1", 3),
            ("claude-3-5-sonnet-latest", 13),
            ("claude-3-5-haiku-latest", 10),
            (_CASE_EVENT, 5),
        ),
        token_scale=1.0,
        weekend=0.35,
        grant=(Decimal(5000), "Referral bonus"),
    ),
    _OrgSpec(
        name="Globex Labs",
        plan="enterprise",
        currency="EUR",
        anchor=15,
        share=Decimal("0.33"),
        people=(
            "anna.mueller@globex.eu",
            "bastien@globex.eu",
            "chiara.r",
            "daan@globex.eu",
            "elif.k",
            "felix@globex.eu",
            "greta.l@globex.eu",
            "hugo",
            "ines@globex.eu",
            "jan.novak",
            "katja@globex.eu",
            "luca.b",
        ),
        workspaces=(
            _WorkspaceSpec("Production", "Platform", 45, ci_key=True),
            _WorkspaceSpec("Experiments", "Research", 30),
            _WorkspaceSpec("Customer support", "Support", 25),
        ),
        models=(
            ("claude-3-5-sonnet-latest", 25),
            ("claude-3-5-haiku-latest", 15),
            ("gpt-4o", 20),
            ("gpt-4o-mini", 15),
            ("text-embedding-3-small", 15),
            ("whisper-1", 5),
            (_CASE_EVENT, 5),
        ),
        token_scale=1.3,
        weekend=0.45,
        discount_pct=10,
    ),
    _OrgSpec(
        name="Initech",
        plan="free",
        currency="USD",
        anchor=31,
        share=Decimal("0.05"),
        people=(
            "peter.gibbons@initech.com",
            "milton",
            "samir.n",
            "michael.bolton@initech.com",
            "joanna",
            "bill.lumbergh@initech.com",
            "tom.smykowski",
            "nina@initech.com",
            "drew",
            "brian.t",
            "anne@initech.com",
            "bob.slydell",
        ),
        workspaces=(
            _WorkspaceSpec("TPS reports", "Platform", 60),
            _WorkspaceSpec("Prototype", "Research", 40, ci_key=True),
        ),
        models=(
            ("gpt-4o-mini", 60),
            ("claude-3-5-haiku-latest", 20),
            ("text-embedding-3-small", 15),
            (_CASE_EVENT, 5),
        ),
        # Small requests: the free plan allows 500,000 tokens a month.
        token_scale=0.5,
        weekend=0.3,
        max_daily_rows=25,
        grant=(Decimal(1000), "Launch promotion"),
    ),
    _OrgSpec(
        name="Umbrella Health",
        plan="pro",
        currency="USD",
        anchor=None,
        share=Decimal("0.20"),
        people=(
            "dr.ashford@umbrella.health",
            "claire.r",
            "leon.k@umbrella.health",
            "jill@umbrella.health",
            "chris.r",
            "ada.wong@umbrella.health",
            "barry.b",
            "rebecca@umbrella.health",
            "carlos.o",
            "sherry@umbrella.health",
            "hunk",
            "ethan.w@umbrella.health",
        ),
        workspaces=(
            _WorkspaceSpec("Clinical notes", "Platform", 40, ci_key=True),
            _WorkspaceSpec("Transcription", "Platform", 35),
            _WorkspaceSpec("Patient support", "Support", 25),
        ),
        models=(
            ("whisper-1", 15),
            ("gpt-4o-mini", 30),
            ("claude-3-5-sonnet-latest", 15),
            ("claude-3-5-haiku-latest", 15),
            ("text-embedding-3-small", 20),
            (_CASE_EVENT, 5),
        ),
        token_scale=0.9,
        # Hospitals run at weekends too.
        weekend=0.65,
        spend_cap=Decimal("250"),
        alerting=Decimal("0.83"),
    ),
)

# What the demo's gateway routes to its simulated upstream: (model, provider).
SERVED_MODELS: tuple[tuple[str, str], ...] = (
    *((m.name, m.provider) for m in _MODELS.values() if m.kind != "event"),
    ("o1-pro", "openai"),
)

_CHAT_ENDPOINTS = (("/v1/chat/completions", 70), ("/v1/responses", 30))
# Working hours peak around 14:00-16:00 UTC (Europe afternoon, US morning); nights stay non-zero.
_HOUR_WEIGHTS = tuple(
    0.15 + math.exp(-(((hour - 15) / 4.0) ** 2)) + 0.4 * math.exp(-(((hour - 9) / 2.5) ** 2))
    for hour in range(24)
)


# -- created entities ---------------------------------------------------------------------------------


@dataclass
class _Seeded:
    spec: _OrgSpec
    org: Organization
    plan: Plan
    account: Account
    workspaces: list[tuple[Workspace, _WorkspaceSpec, ApiKey, ApiKey | None]]
    identifiers: list[str]
    records: list[UsageRecord] = field(default_factory=list)


def _key(
    services: Services,
    keys: list[DemoKey],
    org: Organization,
    ws: Workspace,
    name: str,
    scope: KeyScope = "workspace",
    source: str | None = None,
) -> ApiKey:
    new = services.tenancy.create_key(ws.id, name, scope=scope, default_source=source)
    keys.append(DemoKey(org.name, ws.name, new.key.name, new.key.scope, new.secret))
    return new.key


def _create_world(services: Services, now: datetime, days: int, keys: list[DemoKey]) -> list[_Seeded]:
    tenancy = services.tenancy
    seeded: list[_Seeded] = []
    for index, spec in enumerate(_ORGS):
        anchor = spec.anchor if spec.anchor is not None else (now - timedelta(days=days)).day
        org = tenancy.create_organization(
            spec.name,
            spec.plan,
            currency=spec.currency,
            spend_cap=spec.spend_cap,
            billing_anchor_day=anchor,
            discount_pct=spec.discount_pct,
        )

        workspaces: list[tuple[Workspace, _WorkspaceSpec, ApiKey, ApiKey | None]] = []
        for ws_spec in spec.workspaces:
            ws = tenancy.create_workspace(org.id, ws_spec.name, ws_spec.group)
            default = _key(services, keys, org, ws, "Default")
            ci = _key(services, keys, org, ws, "CI", source="cli") if ws_spec.ci_key else None
            workspaces.append((ws, ws_spec, default, ci))
        # The organization-scope key reads across workspaces (dashboards, finance); it carries no usage.
        _key(services, keys, org, workspaces[0][0], "Org reader", "organization")
        if spec.grant is not None:
            tenancy.grant_credits(org.id, *spec.grant)
        # End users of the org's own product, as its backend reports them ("identifier" principals).
        identifiers = [f"user-{100 + 37 * index + 13 * i}" for i in range(30)]
        seeded.append(
            _Seeded(spec, org, services.plan_of(org), services.account_of(org), workspaces, identifiers)
        )
    return seeded


# -- traffic ------------------------------------------------------------------------------------------


def _pick(rng: random.Random, weighted: Sequence[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(max(int(rng.lognormvariate(math.log(median), sigma)), low), high)


def _day_factors(rng: random.Random, spec: _OrgSpec, dates: Sequence[date]) -> list[float]:
    """Relative traffic of each day: weekday shape, a gentle upward trend, noise and a few busy days."""
    factors: list[float] = []
    slope = rng.uniform(0.3, 0.6)  # growth across the whole window, differing per org
    for i, day in enumerate(dates):
        progress = i / max(len(dates) - 1, 1)
        weekday = spec.weekend if day.weekday() >= 5 else (1.1 if day.weekday() in (1, 2) else 1.0)
        busy = rng.uniform(1.5, 2.2) if rng.random() < 0.07 else 1.0
        noise = max(rng.gauss(1.0, 0.1), 0.5)
        factors.append((1 - slope / 2 + slope * progress) * weekday * busy * noise)
    return factors


def _instant(rng: random.Random, lo: datetime, hi: datetime) -> datetime:
    """A moment in [lo, hi) within one UTC day, more likely in working hours."""
    day_start = datetime.combine(lo.date(), time(), tzinfo=UTC)
    first = int((lo - day_start).total_seconds() // 3600)
    last = min(math.ceil((hi - day_start).total_seconds() / 3600), 24)
    hour = rng.choices(range(first, last), weights=_HOUR_WEIGHTS[first:last])[0]
    start = max(day_start + timedelta(hours=hour), lo)
    end = min(day_start + timedelta(hours=hour + 1), hi)
    micros = int((end - start).total_seconds() * 1_000_000)
    return start + timedelta(microseconds=rng.randrange(max(micros, 1)))


def _record(rng: random.Random, seeded: _Seeded, at: datetime, run_counter: list[int]) -> UsageRecord:
    spec = seeded.spec
    ws, _, default_key, ci_key = rng.choices(
        seeded.workspaces, weights=[w[1].weight for w in seeded.workspaces]
    )[0]
    source = _pick(rng, _SOURCES)
    api_key = ci_key if source == "cli" and ci_key is not None else default_key
    # A few heavy users and a long tail, as in any team.
    people = spec.people
    user = rng.choices(people, weights=[1 / (i + 1) ** 0.8 for i in range(len(people))])[0]
    identifier = rng.choice(seeded.identifiers) if rng.random() < 0.25 else None
    failover = rng.random() < 0.012
    region = rng.choice(("eu-west", "us-east")) if failover else None
    common: dict[str, Any] = {
        "organization_id": seeded.org.id,
        "workspace_id": ws.id,
        "created_at": at,
        "key_id": api_key.id,
        "key_prefix": api_key.key_prefix,
        "key_name": api_key.name,
        "identifier_id": identifier,
        "user_id": user,
        "source": source,
    }
    model = _MODELS[_pick(rng, spec.models)]
    scale = spec.token_scale
    if model.kind == "event":
        run_counter[0] += 1
        return UsageRecord(
            **common,
            event=_CASE_EVENT,
            units=1,
            run_id=f"run_{seeded.org.name[:3].lower()}_{run_counter[0]:06d}",
            metadata={"models_count": rng.randint(1, 4)},
            # Events arrive through the events API, where the client's event id is the idempotency key.
            idempotency_key=f"evt_{rng.getrandbits(64):016x}",
        )
    if model.kind == "audio":
        # Whole tenths of a second, as transcription services report durations.
        seconds = Decimal(rng.randint(50, 6000)) / 10
        return UsageRecord(
            **common,
            model=model.name,
            provider=model.provider,
            audio_seconds=seconds,
            endpoint="/v1/audio/transcriptions",
        )
    prompt = _lognormal_int(rng, 900 * scale, 0.9, 50, 8000)
    if model.kind == "embedding":
        return UsageRecord(
            **common,
            model=model.name,
            provider=model.provider,
            prompt_tokens=prompt,
            endpoint="/v1/embeddings",
            failover=failover,
            region=region,
        )
    completion = _lognormal_int(rng, 220 * scale, 0.8, 10, 2000)
    cache_read = cache_write = 0
    if model.provider == "anthropic":
        endpoint = "/v1/messages"
        # Long shared system prompts get cached: reads are common, writes happen when a cache is warmed.
        if prompt > 1024 and rng.random() < 0.45:
            cache_read = int(prompt * rng.uniform(0.3, 0.8))
            if rng.random() < 0.3:
                cache_write = int((prompt - cache_read) * rng.uniform(0.2, 0.9))
    else:
        endpoint = _pick(rng, _CHAT_ENDPOINTS)
    return UsageRecord(
        **common,
        model=model.name,
        provider=model.provider,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        endpoint=endpoint,
        failover=failover,
        region=region,
    )


# -- the alerting organization's day ------------------------------------------------------------------

# A model priced per request like a small invoice, and a fine-tune the price book cannot know.
_SPIKE_MODEL = SERVED_MODELS[-1][0]
_UNPRICED_MODEL = "umbrella-notes-ft-2"


def _alerting_day(
    services: Services, seeded: _Seeded, guard: _Guard, now: datetime, rng: random.Random
) -> None:
    """Today, in the last two hours: a batch job sends long notes to an expensive model until the period's
    spend reaches ``alerting`` of the spend cap, and a fine-tune the price book does not know is tried.

    Settled like all other rows, these cross the 50/75/80 % thresholds, project a run-out and make today
    unusual against the last seven days. What the guard would refuse is not generated, as elsewhere."""
    share, cap = seeded.spec.alerting, seeded.org.spend_cap_nanos
    assert share is not None
    assert cap is not None
    target = int(cap * share)
    lo = max(datetime.combine(now.date(), time(), tzinfo=UTC), now - timedelta(hours=2))
    ws, _, key, _ = seeded.workspaces[0]
    common: dict[str, Any] = {
        "organization_id": seeded.org.id,
        "workspace_id": ws.id,
        "key_id": key.id,
        "key_prefix": key.key_prefix,
        "key_name": key.name,
        "source": "api",
    }
    spike: list[UsageRecord] = []
    spent = guard.period_cost(now)
    while spent < target:
        record = UsageRecord(
            **common,
            created_at=_instant(rng, lo, now),
            user_id="notes-batch",
            model=_SPIKE_MODEL,
            provider="openai",
            prompt_tokens=rng.randint(8_000, 12_000),
            completion_tokens=rng.randint(600, 1_400),
            endpoint="/v1/responses",
        )
        cost = services.settler.price(record, seeded.account).cost_nanos
        if spent + cost > target or not guard.admit(record):
            break
        spent += cost
        spike.append(record)
    for _ in range(3):
        record = UsageRecord(
            **common,
            created_at=_instant(rng, lo, now),
            user_id=rng.choice(seeded.spec.people),
            model=_UNPRICED_MODEL,
            provider="openai",
            prompt_tokens=rng.randint(400, 1_200),
            completion_tokens=rng.randint(50, 300),
            endpoint="/v1/chat/completions",
        )
        if guard.admit(record):
            spike.append(record)
    seeded.records.extend(sorted(spike, key=lambda r: r.created_at))


def _refused_client(services: Services, seeded: _Seeded) -> None:
    """A client asks for more than the spend cap has left, again and again: each request is refused by
    the quota engine (a 429 over HTTP) and counted, until the "refused frequently" alert fires."""
    ws, _, key, _ = seeded.workspaces[0]
    subject = Subject(
        organization_id=seeded.org.id,
        plan=seeded.plan,
        billing_anchor_day=seeded.org.billing_anchor_day,
        workspace_id=ws.id,
        spend_cap_nanos=seeded.org.spend_cap_nanos,
        key_id=key.id,
    )
    estimate = UsageRecord(
        organization_id=seeded.org.id,
        workspace_id=ws.id,
        created_at=services.clock.now(),
        key_id=key.id,
        model=_SPIKE_MODEL,
        provider="openai",
        prompt_tokens=400_000,
        completion_tokens=100_000,
        endpoint="/v1/responses",
    )
    for _ in range(services.settings.alert_refusals_per_hour):
        try:
            reservation, _ = services.reservations.reserve(subject, estimate, seeded.account)
        except LimitExceeded:
            services.alerts.note_refusal(seeded.org.id)
        else:  # the cap had room after all: nothing to show, and nothing is kept
            services.reservations.release(seeded.org.id, reservation.id)
            return


class _Guard:
    """Keeps one organization's generated usage inside what its plan and spend cap would allow.

    A demo whose free org is already blocked, or whose capped org is over its cap, would show errors on
    the first live request; rows that would cross a limit (less headroom) are simply not generated.
    """

    def __init__(self, services: Services, seeded: _Seeded) -> None:
        self._services = services
        self._seeded = seeded
        plan = seeded.plan
        self._daily_tokens = self._cap(plan.daily_tokens)
        self._monthly_tokens = self._cap(plan.monthly_tokens)
        self._daily_calls = self._cap(plan.daily_calls)
        self._monthly_calls = self._cap(plan.monthly_calls)
        blocking_credits = plan.overage == "block" and plan.monthly_credits != UNLIMITED
        # Plan credits are whole credits; ledger credits are nanos of a credit.
        self._monthly_credits = self._cap(plan.monthly_credits * 1_000_000_000) if blocking_credits else None
        cap = seeded.org.spend_cap_nanos
        self._spend_cap = None if cap is None else int(cap * _HEADROOM)
        self._day: dict[date, list[int]] = {}
        self._period: dict[datetime, list[int]] = {}

    @staticmethod
    def _cap(limit: int) -> int | None:
        return None if limit == UNLIMITED else int(limit * _HEADROOM)

    def period_cost(self, at: datetime) -> int:
        """What was admitted in the billing period holding ``at`` (nanos of the org's currency)."""
        start = billing_period(at, self._seeded.org.billing_anchor_day).start
        return self._period.get(start, [0, 0, 0, 0])[2]

    def admit(self, record: UsageRecord) -> bool:
        tokens = record.prompt_tokens + record.completion_tokens
        day = self._day.setdefault(record.created_at.date(), [0, 0])
        period_start = billing_period(record.created_at, self._seeded.org.billing_anchor_day).start
        period = self._period.setdefault(period_start, [0, 0, 0, 0])  # tokens, calls, cost, credits
        cost = credits = 0
        if self._spend_cap is not None or self._monthly_credits is not None:
            # Pricing is pure (nothing written); only orgs with a money limit pay for this check.
            row = self._services.settler.price(record, self._seeded.account)
            cost, credits = row.cost_nanos, row.credits_nanos
        checks = (
            (self._daily_tokens, day[0] + tokens),
            (self._daily_calls, day[1] + 1),
            (self._monthly_tokens, period[0] + tokens),
            (self._monthly_calls, period[1] + 1),
            (self._spend_cap, period[2] + cost),
            (self._monthly_credits, period[3] + credits),
        )
        if any(limit is not None and value > limit for limit, value in checks):
            return False
        day[0] += tokens
        day[1] += 1
        period[0] += tokens
        period[1] += 1
        period[2] += cost
        period[3] += credits
        return True


def _generate(
    services: Services, world: list[_Seeded], now: datetime, days: int, rng: random.Random, rows_per_day: int
) -> None:
    start = now - timedelta(days=days)
    dates = [start.date() + timedelta(days=i) for i in range((now.date() - start.date()).days + 1)]
    # How much of each calendar day lies inside (start, now]: the first and last days are partial.
    spans: list[tuple[datetime, datetime]] = []
    for day in dates:
        day_start = datetime.combine(day, time(), tzinfo=UTC)
        spans.append((max(day_start, start), min(day_start + timedelta(days=1), now)))
    coverage = [(hi - lo) / timedelta(days=1) for lo, hi in spans]

    for seeded in world:
        spec = seeded.spec
        factors = _day_factors(rng, spec, dates)
        # Normalised so that the org's rows over the window average ``share * rows_per_day`` a day.
        covered = sum(coverage)
        mean = sum(f * c for f, c in zip(factors, coverage, strict=True)) / covered if covered else 1.0
        per_day = float(spec.share) * rows_per_day
        guard = _Guard(services, seeded)
        run_counter = [0]
        for (lo, hi), factor, cover in zip(spans, factors, coverage, strict=True):
            if hi <= lo:
                continue
            expected = per_day * factor / mean * cover
            if spec.max_daily_rows is not None:
                # Saturate smoothly rather than clip, so busy days still stand out below the ceiling.
                ceiling = spec.max_daily_rows
                expected = ceiling * math.tanh(expected / ceiling)
            count = int(expected) + (1 if rng.random() < expected % 1 else 0)
            # Time order, so the guard sees usage in the order the limits would have.
            moments = sorted(_instant(rng, lo, hi) for _ in range(count))
            for at in moments:
                record = _record(rng, seeded, at, run_counter)
                if guard.admit(record):
                    seeded.records.append(record)
        if spec.alerting is not None:
            _alerting_day(services, seeded, guard, now, rng)


# -- entry points -------------------------------------------------------------------------------------


def seed_demo(
    services: Services,
    *,
    days: int = 45,
    seed: int = 7,
    rows_per_day: int = 400,
    progress: Callable[[int, int], None] | None = None,
) -> DemoData:
    """Create four sample organizations with workspaces, keys, credit grants and ``days`` days of usage
    ending now (about ``rows_per_day`` ledger rows a day), all settled through ``services.settler``.

    Meant for an empty database (see ``is_seeded``): seeding twice creates a second set of organizations.
    ``progress(done, total)`` is called after each settled batch. The admin key is not created here.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    if rows_per_day < 0:
        raise ValueError("rows_per_day must not be negative")
    rng = random.Random(seed)
    now = services.clock.now().astimezone(UTC)
    keys: list[DemoKey] = []
    world = _create_world(services, now, days, keys)
    _generate(services, world, now, days, rng, rows_per_day)

    total = sum(len(s.records) for s in world)
    done = 0
    if progress is not None:
        progress(0, total)
    for seeded in world:
        records = seeded.records
        for first in range(0, len(records), SETTLE_BATCH):
            batch = records[first : first + SETTLE_BATCH]
            result = services.settler.settle(batch, seeded.account)
            done += len(result.written)
            if progress is not None:
                progress(done, total)
        if seeded.spec.alerting is not None:
            _refused_client(services, seeded)
    return DemoData(admin_key=None, keys=keys, rows=done)


def is_seeded(services: Services) -> bool:
    """Whether the database already holds any organization (demo or real): then the demo is not run."""
    organizations, _ = services.tenancy.list_organizations(limit=1)
    return len(organizations) > 0


__all__ = ["SERVED_MODELS", "DemoData", "DemoKey", "is_seeded", "seed_demo"]
