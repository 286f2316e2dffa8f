"""A model of credits checked against the real thing (SQLite, the quota engine, the one settle path):
any sequence of grants, usage and period changes keeps monthly-before-bonus, never goes negative under
``block``, and the balances equal a recomputation from the ledger rows."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from conftest import ADMIN_KEY
from meterline.clock import FrozenClock, to_micros
from meterline.config import load_settings
from meterline.errors import LimitExceeded
from meterline.metering import UsageRecord, ingest
from meterline.quotas import billing_period
from meterline.quotas.gate import QuotaGate
from meterline.services import build_services
from meterline.storage.tables import credit_grants, ledger
from meterline.tenancy import Principal

ALLOWANCE = 20  # monthly credits of the plan
OPEN_LIMITS = dict.fromkeys(
    ("daily_calls", "monthly_calls", "daily_tokens", "monthly_tokens", "rpm", "tpm"), -1
)
START = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
NANOS = 10**9

Op = tuple[str, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("use"), st.integers(min_value=0, max_value=15)),
        st.tuples(st.just("grant"), st.integers(min_value=1, max_value=12)),
        st.tuples(st.just("next_period"), st.integers(min_value=1, max_value=45)),
    ),
    max_size=25,
)


@dataclass
class Model:
    period_start: datetime
    monthly_used: int = 0
    bonus_left: int = 0

    def use(self, amount: int) -> tuple[int, int] | None:
        """The draw (monthly, bonus), or None when block refuses it."""
        monthly_left = ALLOWANCE - self.monthly_used
        # A used-up allowance refuses every request, one of no credits too (quotas/README.md: a money line
        # reserves at least one nano).
        if max(amount, 1) > monthly_left + self.bonus_left:
            return None
        monthly = min(amount, monthly_left)
        bonus = amount - monthly
        self.monthly_used += monthly
        self.bonus_left -= bonus
        return monthly, bonus


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops)
def test_credits_follow_the_model(sequence: list[Op], sqlite_template: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{uuid.uuid4().hex}.db"
    shutil.copyfile(sqlite_template, path)
    config = load_settings(
        database_url=f"sqlite:///{path}",
        admin_key=ADMIN_KEY,
        signing_key_file=str(tmp_path / "key.json"),
        plans={"metered": {**OPEN_LIMITS, "monthly_credits": ALLOWANCE, "overage": "block"}},
        prices={"credit.use": {"per_unit": "0.01"}},  # one credit per unit
    )
    clock = FrozenClock(START)
    services = build_services(config, clock=clock, migrate=False)
    try:
        org = services.tenancy.create_organization("Model", "metered", billing_anchor_day=10)
        ws = services.tenancy.create_workspace(org.id, "W")
        principal = Principal(org.id, ws.id, "workspace")
        model = Model(billing_period(START, 10).start)
        for op, value in sequence:
            if op == "grant":
                services.grant_credits(org.id, Decimal(value), "promotion")
                model.bonus_left += value
            elif op == "next_period":
                clock.advance(days=value)
                period = billing_period(clock.now(), 10).start
                if period != model.period_start:  # a new period: the monthly bucket is full again
                    model.period_start, model.monthly_used = period, 0
            else:
                org = services.tenancy.get_organization(org.id)
                expected = model.use(value)
                record = UsageRecord(
                    organization_id=org.id,
                    workspace_id=ws.id,
                    created_at=clock.now(),
                    event="credit.use",
                    units=value,
                    idempotency_key=uuid.uuid4().hex,
                    request_hash="x",
                )
                subject = services.subject_of(org, principal)
                gate = QuotaGate(services.quotas, lambda _row, subject=subject: subject)
                (outcome,) = ingest(services.settler, services.account_of(org), [record], gate)
                if expected is None:
                    assert outcome.status == "refused"
                    assert isinstance(outcome.refusal, LimitExceeded)
                    assert outcome.refusal.code == "credits_exhausted"
                else:
                    assert outcome.status == "accepted"
                    assert outcome.row is not None
                    drawn = (
                        outcome.row.credits_monthly_nanos // NANOS,
                        outcome.row.credits_bonus_nanos // NANOS,
                    )
                    assert drawn == expected
            _check(services, org.id, clock.now(), model)
    finally:
        services.close()


def _ledger_monthly(services: object, org_id: str, period_start_us: int) -> int:
    db = services.db  # type: ignore[attr-defined]
    with db.read() as conn:
        total = conn.execute(
            select(func.coalesce(func.sum(ledger.c.credits_monthly_nanos), 0)).where(
                ledger.c.organization_id == org_id, ledger.c.created_at_us >= period_start_us
            )
        ).scalar_one()
    return int(total) // NANOS


def _check(services: object, org_id: str, now: datetime, model: Model) -> None:
    org = services.tenancy.get_organization(org_id)  # type: ignore[attr-defined]
    balance = services.credit_balance(org, now)  # type: ignore[attr-defined]
    assert balance.monthly_used == model.monthly_used * NANOS
    assert balance.bonus_left == model.bonus_left * NANOS
    assert balance.monthly_used <= ALLOWANCE * NANOS
    assert balance.bonus_left >= 0
    assert balance.overage == 0
    # Recomputed from the ledger rows and the grants alone.
    period_start = to_micros(billing_period(now, 10).start)
    assert _ledger_monthly(services, org_id, period_start) == model.monthly_used
    with services.db.read() as conn:  # type: ignore[attr-defined]
        bonus_drawn = conn.execute(
            select(func.coalesce(func.sum(ledger.c.credits_bonus_nanos), 0)).where(
                ledger.c.organization_id == org_id
            )
        ).scalar_one()
        granted = conn.execute(
            select(func.coalesce(func.sum(credit_grants.c.credits_nanos), 0)).where(
                credit_grants.c.organization_id == org_id
            )
        ).scalar_one()
    assert int(granted) - int(bonus_drawn) == model.bonus_left * NANOS
