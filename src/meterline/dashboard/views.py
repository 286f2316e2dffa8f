"""What each page shows, built from the bodies of its JSON twins (decoded with exact decimals).

Pure functions from dicts to dicts: no HTTP, no storage. The routes in ``meterline.api.routes.dashboard``
fetch the bodies by calling the JSON routes themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from meterline.dashboard import charts
from meterline.dashboard.allocation import allocation_of
from meterline.dashboard.formatting import amount, exact, percent

RANGES = (("24h", "24 hours"), ("7d", "7 days"), ("30d", "30 days"))
TABLE_PAGE = 5  # rows per "Show More" page of the top tables
MODELS_SHOWN = 8

# The ranked tables of seed 002, and the breakdown dimension behind each.
TableName = Literal["workspace", "workspace_group", "user"]
TABLES: tuple[tuple[TableName, str, str], ...] = (
    ("workspace", "Top workspaces", "Workspace"),
    ("workspace_group", "Top workspace groups", "Workspace group"),
    ("user", "Top users", "User"),
)


def table_titles(by: TableName) -> tuple[str, str]:
    """A table's title and the header of its name column."""
    for name, title, column in TABLES:
        if name == by:
            return title, column
    raise ValueError(f"no table {by!r}")


@dataclass(frozen=True, slots=True)
class TableRow:
    name: str
    requests: int
    tokens: int
    figure: Decimal  # credits, or money for spend-cap organizations
    cost: Decimal
    share_pct: Decimal
    # By model: the non-zero parts of what its tokens were, labelled, and requests without a price.
    detail: tuple[tuple[str, int], ...] = ()
    unpriced: int = 0


# The usage vector's parts as the cost breakdown names them (storage order of ``DETAIL_MEASURES``).
DETAIL_LABELS = (
    ("cache_read_tokens", "cache reads"),
    ("cache_write_tokens", "cache writes"),
    ("cache_write_1h_tokens", "of which 1-hour"),
    ("input_audio_tokens", "audio in"),
    ("cache_audio_read_tokens", "cached audio"),
    ("output_audio_tokens", "audio out"),
    ("reasoning_tokens", "reasoning"),
    ("accepted_prediction_tokens", "accepted predictions"),
    ("rejected_prediction_tokens", "rejected predictions"),
    ("web_searches", "web searches"),
    ("web_fetches", "web fetches"),
)


def _detail(row: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    usage = row.get("usage") or {}
    return tuple((label, int(usage[name])) for name, label in DETAIL_LABELS if usage.get(name))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def table_rows(body: Mapping[str, Any]) -> list[TableRow]:
    """A ``/v1/usage/breakdown`` body's rows; rows without a value (no user, no group) read "(none)"."""
    in_money = body["unit"] != "credits"
    return [
        TableRow(
            name=str(row["name"]) if row["name"] is not None else "(none)",
            requests=int(row["requests"]),
            tokens=int(row["tokens"]),
            figure=Decimal(row["cost"] if in_money else row["credits"]),
            cost=Decimal(row["cost"]),
            share_pct=Decimal(row["share_pct"]),
            detail=_detail(row),
            unpriced=int(row.get("unpriced_requests") or 0),
        )
        for row in body["data"]
    ]


def table(by: str, title: str, column: str, body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "by": by,
        "title": title,
        "column": column,
        "unit": body["unit"],
        "rows": table_rows(body),
        "total": body["total"],
        "has_more": body["has_more"],
        "next_offset": body["offset"] + len(body["data"]),
    }


def chart(body: Mapping[str, Any]) -> dict[str, Any]:
    """The usage chart of a ``/v1/usage/timeseries?by=source`` body, with the table of its buckets."""
    unit = str(body["unit"])
    granularity = str(body["granularity"])
    buckets = body["data"]
    labels = [charts.bucket_label(_time(b["start"]), granularity) for b in buckets]
    lines = charts.usage_lines(buckets)
    names = list(lines)
    rows = [
        {
            "label": labels[i],
            "start": b["start"],
            "end": b["end"],
            "values": [lines[name][i] for name in names],
            "total": Decimal(b["total"]),
        }
        for i, b in enumerate(buckets)
    ]
    title = f"Usage per {granularity} in {'credits' if unit == 'credits' else unit}, web and CLI"
    return {
        "range": body["range"],
        "granularity": granularity,
        "bucket_word": {"hour": "hourly", "day": "daily", "week": "weekly"}.get(granularity, granularity),
        "unit": unit,
        "names": names,
        "rows": rows,
        "svg": charts.line_chart(lines, labels, unit, title),
        "svg_small": charts.line_chart(lines, labels, unit, title, width=420),
        "title": title,
        "total": sum((r["total"] for r in rows), Decimal(0)),
    }


def models(body: Mapping[str, Any]) -> dict[str, Any]:
    """Usage by model (a bar chart) and the cost breakdown (money per model) of a ``by=model`` body."""
    rows = table_rows(body)[:MODELS_SHOWN]
    unit = str(body["unit"])
    svg = charts.bar_chart([(r.name, r.figure) for r in rows], unit, "Usage by model") if rows else ""
    return {
        "unit": unit,
        "currency": body["currency"],
        "rows": rows,
        "svg": svg,
        "more": max(int(body["total"]) - len(rows), 0),
        "total_cost": Decimal(body["totals"]["cost"]),
        "total_credits": Decimal(body["totals"]["credits"]),
        "unpriced": int(body["totals"].get("unpriced_requests") or 0),
    }


def usage_page(
    summary: Mapping[str, Any],
    timeseries: Mapping[str, Any],
    by_model: Mapping[str, Any],
    by_endpoint: Mapping[str, Any],
    tables: Sequence[dict[str, Any]],
    alerts: Mapping[str, Any],
) -> dict[str, Any]:
    period = summary["billing_period"]
    forecast = summary["forecast"]
    return {
        "summary": summary,
        "allocation": allocation_of(summary),
        "period_start": _time(period["start"]),
        "period_end": _time(period["end"]),
        "days_remaining": period["days_remaining"],
        "days_elapsed": period["days_elapsed"],
        "avg_per_day": Decimal(forecast["avg_per_day"]),
        "forecast_unit": forecast["unit"],
        "run_out_in": None if forecast["run_out_in_days"] is None else Decimal(forecast["run_out_in_days"]),
        "will_run_out": bool(forecast["will_run_out_before_period_end"]),
        "chart": chart(timeseries),
        "ranges": RANGES,
        "models": models(by_model),
        "endpoints": table_rows(by_endpoint),
        "tables": tables,
        "alerts": alerts["data"],
        "alerts_total": alerts["total_count"],
    }


LIMIT_NAMES = {
    "rpm": "Requests per minute",
    "tpm": "Tokens per minute",
    "daily_tokens": "Daily tokens",
    "monthly_tokens": "Monthly tokens",
    "daily_calls": "Daily calls",
    "monthly_calls": "Monthly calls",
    "credits": "Credits",
    "spend": "Spend",
}


def limit_title(name: str) -> str:
    """A limit's name as people say it: 'rpm' reads 'Requests per minute'; unknown names are tidied."""
    return LIMIT_NAMES.get(name) or name.replace("_", " ").replace(":", " ").capitalize()


# Where the Upgrade and referral buttons lead when the operator has not set ``upgrade_url`` /
# ``referral_url``: the Billing page's plan-and-limits section and its bonus-credits explanation.
UPGRADE_SECTION = "/dashboard/billing#plan"
REFERRAL_SECTION = "/dashboard/billing#referral"


def links(upgrade_url: str | None, referral_url: str | None) -> dict[str, Any]:
    """The Upgrade and referral buttons' targets, and whether each is the operator's own page."""
    return {
        "upgrade": upgrade_url or UPGRADE_SECTION,
        "referral": referral_url or REFERRAL_SECTION,
        "upgrade_configured": upgrade_url is not None,
        "referral_configured": referral_url is not None,
    }


THRESHOLDS_HELP = "1 to 20 whole percentages between 1 and 1000, separated by commas (say 50, 75, 80, 100)"


def parse_thresholds(text: str) -> list[int]:
    """The thresholds typed into the Billing page's form ("50, 75 %, 100") as the API takes them; a
    ``ValueError`` says what to fix. Ranges are the API's to check."""
    parts = [part for part in re.split(r"[\s,;%]+", text) if part]
    if not parts:
        raise ValueError(f"Enter {THRESHOLDS_HELP}.")
    for part in parts:
        if not re.fullmatch(r"[0-9]{1,6}", part):
            shown = part if len(part) <= 24 else part[:23] + "…"
            raise ValueError(f"“{shown}” is not a whole percentage. Enter {THRESHOLDS_HELP}.")
    return [int(part) for part in parts]


def alert_settings(organization: Mapping[str, Any], webhooks: Mapping[str, Any]) -> dict[str, Any]:
    """The Billing page's alerts section from ``GET /v1/organization`` and ``GET /v1/alerts/webhooks``."""
    own = organization["alert_thresholds"]
    defaults = [int(t) for t in organization["default_alert_thresholds"]]
    in_effect = defaults if own is None else [int(t) for t in own]
    cap = organization["spend_cap"]
    return {
        "thresholds": in_effect,
        "thresholds_text": ", ".join(str(t) for t in in_effect),
        "own_thresholds": own is not None,
        "default_thresholds": defaults,
        "spend_cap": None if cap is None else Decimal(cap),
        "currency": organization["currency"],
        "webhooks": [{**w, "created": _time(w["created_at"])} for w in webhooks["data"]],
    }


def billing_page(summary: Mapping[str, Any], grants: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    limits = []
    for limit in summary["limits"]:
        unlimited = limit["max"] == -1
        limits.append(
            {
                **limit,
                "title": limit_title(str(limit["name"])),
                "unlimited": unlimited,
                "money": limit["meter"] in ("credits", "spend"),
                "used_pct": None
                if unlimited or not limit["max"]
                else min(Decimal(limit["used"]) * 100 / Decimal(limit["max"]), Decimal(100)),
            }
        )
    return {
        "summary": summary,
        "allocation": allocation_of(summary),
        "limits": limits,
        "credits": summary["credits"],
        # Whether usage past the credits is billed as overage rather than refused (the plan's policy).
        "credits_overage": any(
            limit["meter"] == "credits" and limit.get("policy") == "overage" for limit in summary["limits"]
        ),
        "spend": summary["spend"],
        "grants": grants,
        "period_start": _time(summary["billing_period"]["start"]),
        "period_end": _time(summary["billing_period"]["end"]),
    }


def usage_bar(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The usage bar's state: the widget page and its JSON twin (``/widget/usage-bar.json``)."""
    a = allocation_of(summary)
    used_pct = a.used_pct
    if a.total is None:
        label = f"{amount(a.used, a.unit)} used · unlimited"
    else:
        label = f"{amount(a.used, a.unit)} of {amount(a.total, a.unit)} used"
    if a.in_flight > 0:
        # Streams still running: their consumption so far is already in ``used``; say so.
        label = f"{label} · {amount(a.in_flight, a.unit)} streaming"
    return {
        "object": "usage_bar",
        "plan": a.plan,
        "unit": a.unit,
        "used": exact(a.used),
        "total": None if a.total is None else exact(a.total),
        "in_flight": exact(a.in_flight),
        "used_pct": None if used_pct is None else exact(used_pct),
        "bar_pct": None if used_pct is None else exact(min(used_pct, Decimal(100))),
        "label": label,
        "pct_label": percent(used_pct),
        "show_upgrade": a.show_upgrade,
        "show_referral": a.show_referral,
        "billing_period_end": summary["billing_period"]["end"],
    }
