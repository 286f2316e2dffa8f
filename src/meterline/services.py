"""The composition root: one ``Services`` per process, built from Settings. The API, the CLI and the
demo all use it, so they share one code path for every operation."""

from __future__ import annotations

from dataclasses import dataclass, field

from meterline.clock import Clock, SystemClock
from meterline.config import Settings
from meterline.errors import NotFound
from meterline.metering import Account, Settler
from meterline.pricing import CurrencyRates, PriceBook
from meterline.quotas import Plan, build_plans
from meterline.storage.database import Database
from meterline.storage.ledger_store import SqlLedgerStore
from meterline.storage.migrate import upgrade
from meterline.storage.tenancy_store import SqlTenancyStore
from meterline.storage.usage_reader import SqlUsageReader
from meterline.tenancy import Organization, TenancyService


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
    rates: CurrencyRates = field(repr=False)

    def plan_of(self, org: Organization) -> Plan:
        try:
            return self.plans[org.plan]
        except KeyError:
            raise NotFound(f"plan {org.plan!r} of organization {org.id} is not configured") from None

    def account_of(self, org: Organization) -> Account:
        discount = org.discount_pct or self.plan_of(org).discount_pct
        return Account(organization_id=org.id, currency=org.currency, discount_pct=discount)

    def close(self) -> None:
        self.db.dispose()


def build_services(settings: Settings, *, clock: Clock | None = None, migrate: bool = True) -> Services:
    clock = clock or SystemClock()
    db = Database(settings.database_url)
    if migrate:
        upgrade(db)
    plans = build_plans(settings.plans)
    rates = CurrencyRates(settings.currency_rates)
    currencies = sorted({"USD", settings.currency, *settings.currency_rates})
    ledger = SqlLedgerStore(db)
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
    return Services(
        settings=settings,
        db=db,
        clock=clock,
        plans=plans,
        tenancy=tenancy,
        ledger=ledger,
        reader=SqlUsageReader(db),
        settler=settler,
        rates=rates,
    )
