"""The composition root: one ``Services`` per process, built from Settings. The API, the CLI and the
demo all use it, so they share one code path for every operation."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from meterline.clock import Clock, SystemClock, to_micros
from meterline.config import Settings
from meterline.credits import CreditBalance, CreditTerms
from meterline.errors import NotFound
from meterline.key_file import KeyFile
from meterline.metering import Account, Settler
from meterline.metering.reservations import Reservations
from meterline.pricing import CurrencyRates, PriceBook
from meterline.quotas import Plan, billing_period, build_plans
from meterline.quotas.counters import CounterStore, CounterStoreUnavailable
from meterline.quotas.engine import QuotaEngine, Subject
from meterline.quotas.limits import NANOS_PER_WHOLE, UNLIMITED
from meterline.receipts import Notary
from meterline.storage import credit_store
from meterline.storage.alert_store import AlertEvaluator, AlertPolicy
from meterline.storage.counter_stores import open_counter_store
from meterline.storage.database import Database
from meterline.storage.ledger_store import SqlLedgerStore
from meterline.storage.migrate import is_up_to_date, upgrade_if_behind
from meterline.storage.outage import is_outage
from meterline.storage.quarantine_store import SqlQuarantineStore
from meterline.storage.quota_source import SqlUsageSource
from meterline.storage.receipt_store import SqlReceiptStore
from meterline.storage.reservation_store import SqlReservationStore
from meterline.storage.sql_counters import SqlCounterStore
from meterline.storage.tenancy_store import SqlTenancyStore
from meterline.storage.usage_reader import SqlUsageReader
from meterline.storage.webhook_store import SealResult, SqlWebhookStore
from meterline.tenancy import CreditGrant, Organization, Principal, TenancyService


@dataclass
class Services:
    settings: Settings
    db: Database
    clock: Clock
    plans: dict[str, Plan]
    tenancy: TenancyService
    ledger: SqlLedgerStore
    reader: SqlUsageReader
    settler: Settler
    counters: CounterStore
    quotas: QuotaEngine
    reservations: Reservations
    reservation_store: SqlReservationStore
    rates: CurrencyRates = field(repr=False)
    # The deployment's keys (access tokens, receipts; data keys sealing webhook secrets), re-read when
    # `meterline keys rotate` replaces the file.
    signing_keys: KeyFile = field(repr=False)
    receipts: SqlReceiptStore = field(repr=False)
    alerts: AlertEvaluator = field(repr=False)
    webhooks: SqlWebhookStore = field(repr=False)
    quarantine: SqlQuarantineStore = field(repr=False)

    def plan_of(self, org: Organization) -> Plan:
        try:
            return self.plans[org.plan]
        except KeyError:
            raise NotFound(f"plan {org.plan!r} of organization {org.id} is not configured") from None

    def account_of(self, org: Organization) -> Account:
        plan = self.plan_of(org)
        discount = org.discount_pct or plan.discount_pct
        allowance = plan.monthly_credits
        credits = CreditTerms(
            organization_id=org.id,
            monthly_allowance_nanos=UNLIMITED if allowance == UNLIMITED else allowance * NANOS_PER_WHOLE,
            billing_anchor_day=org.billing_anchor_day,
            enforced=org.spend_cap_nanos is None and allowance != UNLIMITED and plan.overage == "block",
            spend_cap_nanos=org.spend_cap_nanos,
        )
        return Account(organization_id=org.id, currency=org.currency, discount_pct=discount, credits=credits)

    def subject_of(
        self, org: Organization, principal: Principal, identifier_id: str | None = None
    ) -> Subject:
        """Who consumes, with every limit that applies: plan, spend cap, key and identifier limits."""
        identifier_id = identifier_id or principal.identifier_id
        identifier_limits = None
        if identifier_id is not None:
            identifier = self.tenancy.get_identifier(principal.workspace_id, identifier_id)
            identifier_limits = identifier.limits if identifier is not None else None
        return Subject(
            organization_id=org.id,
            plan=self.plan_of(org),
            billing_anchor_day=org.billing_anchor_day,
            workspace_id=principal.workspace_id,
            spend_cap_nanos=org.spend_cap_nanos,
            key_id=principal.key_id,
            key_limits=principal.key_limits,
            identifier_id=identifier_id,
            identifier_limits=identifier_limits,
        )

    def credit_balance(self, org: Organization, now: datetime) -> CreditBalance:
        start_us = to_micros(billing_period(now, org.billing_anchor_day).start)
        with self.db.read() as conn:
            return credit_store.balance(conn, org.id, start_us)

    def grant_credits(self, organization_id: str, amount: Decimal, reason: str) -> CreditGrant:
        grant = self.tenancy.grant_credits(organization_id, amount, reason)
        self.quotas.forget_bonus(organization_id)
        return grant

    def seal_webhook_secrets(self) -> SealResult:
        """Seal the webhook secrets stored in the clear (from before sealing) or under an older data key
        with the active one. Run only when ``meterline serve`` starts and by ``meterline keys rotate``:
        a command run elsewhere (the default key file path is relative) must not seal with its own file.
        Never with a key file this process has just created: that is only logged."""
        keys = self.signing_keys
        keys.ring()  # a lazy key file is read now, so that ``created`` is known
        return self.webhooks.seal_stored_secrets(new_key_file=str(keys.path) if keys.created else None)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """What a load balancer asks before sending this process requests: whether it can serve, and per
        check "ok" or what is wrong (never a URL or a credential). Redis out of reach with
        ``quota_fail_open`` leaves it ready: it admits requests unchecked then, and taking every process
        out of rotation would turn a Redis outage into an outage of the API."""
        checks: dict[str, str] = {}
        try:
            current = is_up_to_date(self.db)
        except Exception:  # whatever the driver raises: the database did not answer
            checks["database"] = "unreachable"
            checks["migrations"] = "unknown"
        else:
            checks["database"] = "ok"
            checks["migrations"] = "ok" if current else "behind the code: run `meterline migrate`"
        try:
            self.counters.ping(to_micros(self.clock.now()))
            checks["counters"] = "ok"
        except CounterStoreUnavailable:
            if self.quotas.fail_open and self.settings.counter_store == "redis":
                checks["counters"] = "unreachable: requests are admitted unchecked (quota_fail_open)"
                return all(checks[name] == "ok" for name in ("database", "migrations")), checks
            checks["counters"] = "unreachable"
        return all(value == "ok" for value in checks.values()), checks

    def close(self) -> None:
        self.counters.close()
        self.db.dispose()


def build_services(
    settings: Settings, *, clock: Clock | None = None, migrate: bool = True, lazy_keys: bool = False
) -> Services:
    """``lazy_keys``: the key file is read (or created) at its first use rather than now (management
    commands, most of which never sign, verify or seal)."""
    clock = clock or SystemClock()
    db = Database(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )
    if migrate:
        upgrade_if_behind(db)
    plans = build_plans(settings.plans)
    rates = CurrencyRates(settings.currency_rates)
    currencies = sorted({"USD", settings.currency, *settings.currency_rates})
    # Read (or created) here, before any request, so that every process of a deployment settles on one
    # key set at start-up and a bad key file stops the process instead of failing settles.
    signing_keys = KeyFile(settings.signing_key_file, lazy=lazy_keys)
    where = settings.counter_store
    counters: CounterStore = (
        SqlCounterStore(db)
        if where == "database"
        else open_counter_store(settings.redis_url if where == "redis" else None)
    )
    alerts = AlertEvaluator(
        db,
        clock,
        AlertPolicy(
            thresholds=settings.alert_thresholds,
            refusals_per_hour=settings.alert_refusals_per_hour,
            unusual_factor=settings.alert_unusual_factor,
            unusual_min_volume=settings.alert_unusual_min_volume,
        ),
        counters,
    )
    ledger = SqlLedgerStore(db, Notary(signing_keys), alerts)
    settler = Settler(
        ledger,
        PriceBook(settings.prices, settings.currency),
        rates,
        credit_value=settings.credit_value,
        credit_currency=settings.currency,
        clock=clock,
    )
    tenancy = TenancyService(
        SqlTenancyStore(db),
        clock,
        plans=list(plans),
        currencies=currencies,
        default_currency=settings.currency,
    )
    quotas = QuotaEngine(
        counters,
        SqlUsageSource(db),
        clock,
        reservation_ttl=timedelta(seconds=settings.reservation_ttl_seconds),
        fail_open=settings.quota_fail_open,
    )
    reservation_store = SqlReservationStore(db)
    webhooks = SqlWebhookStore(db, signing_keys)
    services = Services(
        settings=settings,
        db=db,
        clock=clock,
        plans=plans,
        tenancy=tenancy,
        ledger=ledger,
        reader=SqlUsageReader(db),
        settler=settler,
        counters=counters,
        quotas=quotas,
        reservations=None,  # type: ignore[arg-type]  # set below: it needs account_of
        reservation_store=reservation_store,
        rates=rates,
        signing_keys=signing_keys,
        receipts=SqlReceiptStore(db),
        alerts=alerts,
        webhooks=webhooks,
        quarantine=SqlQuarantineStore(db),
    )
    services.reservations = Reservations(
        quotas,
        settler,
        reservation_store,
        counters,
        clock,
        lambda org_id: services.account_of(tenancy.get_organization(org_id)),
        quarantine=services.quarantine,
        is_outage=is_outage,
    )
    return services
