"""Domain objects as the JSON the API promises (seed shapes first, then Meterline's extra fields)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from meterline.clock import rfc3339
from meterline.credits import CreditBalance
from meterline.errors import InvalidRequest
from meterline.metering import LedgerRow
from meterline.metering.forecast import Forecast
from meterline.metering.quarantine import QuarantineEntry
from meterline.metering.reading import Totals
from meterline.metering.records import VECTOR_COUNTS, UsageVector
from meterline.metering.summary import Allowance
from meterline.money import format_nanos, from_nanos, to_nanos
from meterline.pricing import CurrencyRates
from meterline.quotas.engine import LimitStatus
from meterline.quotas.limits import NANOS_LIMITS, UNLIMITED
from meterline.tenancy import ApiKey, CreditGrant, Organization, Workspace


def money_number(nanos: int) -> orjson.Fragment:
    """A JSON number written as the exact decimal text (``0.000009274``, never ``9.274e-06``)."""
    return orjson.Fragment(format_nanos(nanos).encode())


def _time(at: datetime | None) -> str | None:
    return None if at is None else rfc3339(at)


def organization(org: Organization) -> dict[str, Any]:
    return {
        "id": org.id,
        "object": "organization",
        "name": org.name,
        "plan": org.plan,
        "currency": org.currency,
        "spend_cap": None if org.spend_cap_nanos is None else format_nanos(org.spend_cap_nanos),
        "billing_anchor_day": org.billing_anchor_day,
        "discount_pct": org.discount_pct,
        "alert_thresholds": None if org.alert_thresholds is None else list(org.alert_thresholds),
        "created_at": rfc3339(org.created_at),
    }


def workspace(ws: Workspace) -> dict[str, Any]:
    return {
        "id": ws.id,
        "object": "workspace",
        "organization_id": ws.organization_id,
        "name": ws.name,
        "group": ws.group,
        "created_at": rfc3339(ws.created_at),
    }


def named_limits(limits: Mapping[str, int] | None) -> dict[str, int | str] | None:
    """A key's or identifier's limits as the API takes them: money (``spend_cap``) as decimal text."""
    if limits is None:
        return None
    return {
        name: format_nanos(value) if name in NANOS_LIMITS and value != UNLIMITED else value
        for name, value in limits.items()
    }


def api_key(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "object": "api_key",
        "organization_id": key.organization_id,
        "workspace_id": key.workspace_id,
        "name": key.name,
        "key_prefix": key.key_prefix,
        "scope": key.scope,
        "default_source": key.default_source,
        "limits": named_limits(key.limits),
        "created_at": rfc3339(key.created_at),
        "last_used_at": _time(key.last_used_at),
        "revoked_at": _time(key.revoked_at),
    }


def credit_grant(grant: CreditGrant) -> dict[str, Any]:
    return {
        "id": grant.id,
        "object": "credit_grant",
        "organization_id": grant.organization_id,
        "amount": format_nanos(grant.credits_nanos),
        "bucket": "bonus",
        "reason": grant.reason,
        "created_at": rfc3339(grant.created_at),
    }


def quarantine_entry(entry: QuarantineEntry) -> dict[str, Any]:
    """A quarantined usage entry: the usage as it was held (raw JSON text when it cannot be decoded)."""
    try:
        usage: Any = orjson.loads(entry.record_json)
    except orjson.JSONDecodeError:
        usage = None
    return {
        "id": entry.id,
        "object": "quarantine_entry",
        "organization_id": entry.organization_id,
        "reservation_id": entry.reservation_id,
        "usage": usage,
        "raw": None if usage is not None else entry.record_json,
        "error": entry.error,
        "created_at": _time(entry.created_at),
        "status": entry.resolution or "open",
        "resolved_at": _time(entry.resolved_at),
        "ledger_id": entry.ledger_id,
        "note": entry.note,
    }


def cost_eur_nanos(row: LedgerRow, rates: CurrencyRates) -> int | None:
    """Seed 004's ``cost_eur``: the row's cost in EUR (converted with the configured rate if needed)."""
    if row.currency == "EUR":
        return row.cost_nanos
    try:
        return to_nanos(rates.convert(from_nanos(row.cost_nanos), row.currency, "EUR"))
    except InvalidRequest:  # no EUR rate configured
        return None


def ledger_row(row: LedgerRow, rates: CurrencyRates) -> dict[str, Any]:
    eur = cost_eur_nanos(row, rates)
    data: dict[str, Any] = {
        # Seed 004 fields, in its order.
        "id": row.id,
        "model": row.model,
        "modality": row.modality,
        "provider": row.provider,
        "billing_unit": row.billing_unit,
        "audio_seconds": None if row.audio_ms is None else money_number(row.audio_ms * 1_000_000),
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cost_eur": None if eur is None else money_number(eur),
        "discount_applied_pct": row.discount_applied_pct,
        "receipt_id": row.receipt_id,
        "failover": row.failover,
        "key_prefix": row.key_prefix,
        "key_name": row.key_name,
        "created_at": rfc3339(row.created_at),
        # Meterline's additions: exact money as strings, attribution and the billable details.
        "cost": format_nanos(row.cost_nanos),
        "list_cost": format_nanos(row.list_cost_nanos),
        "currency": row.currency,
        "credits": format_nanos(row.credits_nanos),
        "credits_monthly": format_nanos(row.credits_monthly_nanos),
        "credits_bonus": format_nanos(row.credits_bonus_nanos),
        "priced": row.priced,
        "overage": row.overage,
        "cache_read_tokens": row.cache_read_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        "total_tokens": row.total_tokens,
        **usage_vector(row.usage),
        "organization_id": row.organization_id,
        "workspace_id": row.workspace_id,
        "identifier_id": row.identifier_id,
        "user_id": row.user_id,
        "source": row.source,
        "endpoint": row.endpoint,
        "event": row.event,
        "units": row.units,
        "run_id": row.run_id,
        "metadata": row.metadata,
        "event_id": row.idempotency_key,
    }
    if row.region is not None:
        # Seed 004: "Omitted for region-less providers".
        data["region"] = row.region
    return data


def usage_vector(usage: UsageVector) -> dict[str, Any]:
    """A row's usage vector (parts of its token counts, per-call counts), named as ``POST /v1/events``
    takes it."""
    data: dict[str, Any] = {name: getattr(usage, name) for name in VECTOR_COUNTS}
    data["service_tier"] = usage.service_tier
    data["batch"] = usage.batch
    return data


def usage_event(row: LedgerRow) -> dict[str, Any]:
    """Seed 003's event shape."""
    return {
        "id": row.id,
        "event": row.event,
        "units": row.units,
        "run_id": row.run_id,
        "metadata": row.metadata,
        "created_at": rfc3339(row.created_at),
    }


def allowance(a: Allowance) -> dict[str, int]:
    return {"usage": a.usage, "limit": a.limit, "remaining": a.remaining}


def totals(t: Totals) -> dict[str, Any]:
    return {
        "calls": t.requests,
        "tokens": t.total_tokens,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "units": t.units,
        "cost": format_nanos(t.cost_nanos),
        "credits": format_nanos(t.credits_nanos),
    }


def _amount(meter: str, value: int) -> Any:
    """Credits and money are counted in nanos and shown as exact decimals; -1 stays -1 (unlimited)."""
    if meter in ("credits", "spend") and value != UNLIMITED:
        return money_number(value)
    return value


def limit_status(status: LimitStatus) -> dict[str, Any]:
    limit = status.limit
    return {
        "name": limit.name,
        "meter": limit.meter,
        "window": limit.window,
        "scope": limit.scope,
        "policy": limit.policy,
        "max": _amount(limit.meter, limit.max),
        "used": _amount(limit.meter, status.consumed),
        "remaining": _amount(limit.meter, status.remaining),
        "resets_at": None if status.window is None else rfc3339(status.window.end),
    }


def credits(balance: CreditBalance, allowance_nanos: int, in_flight_nanos: int = 0) -> dict[str, Any]:
    """Credit buckets; ``in_flight_nanos`` (what running streams have consumed so far) counts as drawn."""
    balance = balance.including(in_flight_nanos, allowance_nanos)
    unlimited = allowance_nanos == UNLIMITED
    monthly_left = UNLIMITED if unlimited else max(allowance_nanos - balance.monthly_used, 0)
    return {
        "monthly": {
            "allowance": _amount("credits", allowance_nanos),
            "used": money_number(balance.monthly_used),
            "remaining": _amount("credits", monthly_left),
        },
        "bonus": {
            "granted": money_number(balance.bonus_granted),
            "used": money_number(balance.bonus_used),
            "used_this_period": money_number(balance.bonus_used_this_period),
            "remaining": money_number(max(balance.bonus_left, 0)),
        },
        "overage": money_number(balance.overage),
        "in_flight": money_number(in_flight_nanos),
        "used": money_number(balance.monthly_used + balance.bonus_used_this_period + balance.overage),
        "remaining": _amount(
            "credits", UNLIMITED if unlimited else monthly_left + max(balance.bonus_left, 0)
        ),
    }


def forecast(f: Forecast) -> dict[str, Any]:
    """Seed 002's metric cards: average per day and run-out, in credits or the spend cap's currency."""
    return {
        "avg_per_day": money_number(f.avg_per_day_nanos),
        "run_out_in_days": None
        if f.run_out_in_days is None
        else orjson.Fragment(str(f.run_out_in_days).encode()),
        "will_run_out_before_period_end": f.will_run_out_before_period_end,
        "unit": f.unit,
    }
