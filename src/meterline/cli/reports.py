"""``meterline usage | history | top | export``: usage read from a server (through the SDK) or from the
local database (``--org``), as rich tables or ``--json`` for scripts. Money is printed exactly."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meterline.cli.common import ConfigOption, DatabaseOption, JsonOption, err, fail, out
from meterline.cli.sources import ApiKeyOption, OrgOption, UrlOption, WorkspaceOption, client_for
from meterline.sdk import Breakdown, History, UsageSummary
from meterline.sdk.summary import Allowance

TopBy = Literal["model", "workspace", "workspace_group", "user", "endpoint", "key"]
RangeName = Literal["24h", "7d", "30d"]


def plain(value: object) -> Any:
    """JSON-able form of SDK results: Decimals as exact strings, times as RFC 3339."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "raw"}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat().replace("+00:00", "Z")
    return value


def print_json(value: object) -> None:
    typer.echo(json.dumps(plain(value), indent=2))


def _n(value: int | Decimal) -> str:
    """Counts with separators; -1 (unlimited) as the word."""
    if value == -1:
        return "unlimited"
    text = f"{value:,f}" if isinstance(value, Decimal) else f"{value:,}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _allowance_row(table: Table, name: str, a: Allowance) -> None:
    table.add_row(name, _n(a.usage), _n(a.limit), _n(a.remaining))


def _headline(summary: UsageSummary) -> Allowance:
    return Allowance(summary.usage, summary.limit, summary.remaining)


def usage_tables(summary: UsageSummary) -> list[Table]:
    period = summary.billing_period
    meters = Table(title=f"Usage — plan {summary.plan}, {period.start:%Y-%m-%d} to {period.end:%Y-%m-%d}")
    for column in ("meter", "used", "limit", "remaining"):
        meters.add_column(column, justify="left" if column == "meter" else "right")
    # The plan's primary meter first, against the limit that leaves the caller least (seed 003).
    by = summary.limited_by
    quota = f" ({by.scope} {by.name})" if by is not None else ""
    _allowance_row(meters, f"quota: {summary.meter}{quota}", _headline(summary))
    _allowance_row(meters, "tokens today", summary.daily.tokens)
    _allowance_row(meters, "calls today", summary.daily.calls)
    _allowance_row(meters, "tokens this period", summary.monthly.tokens)
    _allowance_row(meters, "calls this period", summary.monthly.calls)
    for limit in summary.limits:
        if limit.name not in ("daily_tokens", "daily_calls", "monthly_tokens", "monthly_calls"):
            meters.add_row(limit.name, _n(limit.used), _n(limit.max), _n(limit.remaining))
    money = Table(title=f"Credits and spend ({summary.currency})")
    for column in ("", "used", "allowance / cap", "remaining"):
        money.add_column(column, justify="left" if not column else "right")
    c = summary.credits
    money.add_row("monthly credits", _n(c.monthly.used), _n(c.monthly.allowance), _n(c.monthly.remaining))
    money.add_row("bonus credits", _n(c.bonus.used), _n(c.bonus.granted), _n(c.bonus.remaining))
    spend = summary.spend
    money.add_row(
        "spend",
        _n(spend.amount),
        "" if spend.cap is None else _n(spend.cap),
        "" if spend.remaining is None else _n(spend.remaining),
    )
    forecast = Table(title="Forecast")
    for column in ("days elapsed", "days remaining", "avg per day", "run out in"):
        forecast.add_column(column, justify="right")
    f = summary.forecast
    run_out = "never" if f.run_out_in_days is None else f"{f.run_out_in_days} days"
    forecast.add_row(
        str(period.days_elapsed), str(period.days_remaining), f"{_n(f.avg_per_day)} {f.unit}", run_out
    )
    return [meters, money, forecast]


def usage(
    identifier: Annotated[str | None, typer.Option("--identifier", help="One end user's usage.")] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    org: OrgOption = None,
    workspace: WorkspaceOption = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Current usage: used / limit / remaining of every meter, credits, spend and the run-out forecast."""
    with client_for(url, api_key, org, workspace, config, database_url) as client:
        summary = client.usage(identifier)
    if as_json:
        print_json(summary.raw)
        return
    for table in usage_tables(summary):
        out.print(table)
    if summary.forecast.will_run_out_before_period_end:
        out.print("[bold yellow]warning:[/] projected to run out before the billing period ends")


def history_table(history: History) -> Table:
    table = Table(title="Daily usage (UTC)")
    for column in ("date", "calls", "tokens", "cost", "credits"):
        table.add_column(column, justify="left" if column == "date" else "right")
    for day in history.data:
        table.add_row(day.date.isoformat(), _n(day.calls), _n(day.tokens), _n(day.cost), _n(day.credits))
    return table


def history(
    days: Annotated[int, typer.Option(min=1, max=366, help="Days back, today included.")] = 30,
    identifier: Annotated[str | None, typer.Option("--identifier", help="One end user's usage.")] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    org: OrgOption = None,
    workspace: WorkspaceOption = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Daily calls, tokens, cost and credits of the past days."""
    with client_for(url, api_key, org, workspace, config, database_url) as client:
        result = client.history(days, identifier)
    if as_json:
        print_json(result.data)
        return
    out.print(history_table(result))


def top_table(result: Breakdown) -> Table:
    title = f"Top {result.by} by {result.unit}, {result.start:%Y-%m-%d %H:%M} to {result.end:%Y-%m-%d %H:%M}"
    table = Table(title=title)
    for column in ("#", result.by, "requests", "tokens", "credits", "cost", "share %"):
        table.add_column(column, justify="left" if column == result.by else "right")
    for rank, row in enumerate(result.data, start=result.offset + 1):
        name = row.name or row.key or "(none)"
        if row.key_prefix:
            name = f"{name} ({row.key_prefix})"
        table.add_row(
            str(rank),
            name,
            _n(row.requests),
            _n(row.tokens),
            _n(row.credits),
            _n(row.cost),
            str(row.share_pct),
        )
    return table


def top(
    by: Annotated[TopBy, typer.Option("--by", help="What to rank.")] = "model",
    range_: Annotated[
        RangeName | None, typer.Option("--range", help="24h, 7d or 30d (default: this billing period).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many rows.")] = 10,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    org: OrgOption = None,
    workspace: WorkspaceOption = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """The top models, workspaces, users, ... ranked by credits (or cost for spend-capped organizations)."""
    with client_for(url, api_key, org, workspace, config, database_url) as client:
        result = client.breakdown(by, range=range_, limit=limit)
    if as_json:
        print_json(result)
        return
    out.print(top_table(result))
    if result.has_more:
        out.print(f"{result.total - len(result.data)} more; use --limit to see them", highlight=False)


def export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="CSV file (default: stdout).")] = None,
    start: Annotated[str | None, typer.Option(help="RFC 3339, e.g. 2026-03-01T00:00:00Z.")] = None,
    end: Annotated[str | None, typer.Option(help="RFC 3339.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format", help="ledger (Meterline's columns) or focus (FOCUS 1.2 columns for FinOps tools)."
        ),
    ] = "ledger",
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    org: OrgOption = None,
    workspace: WorkspaceOption = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """The ledger rows of a time range as CSV (oldest first), streamed, with a progress bar."""
    if export_format not in ("ledger", "focus"):
        fail(f"--format is ledger or focus, not {export_format!r}", 2)
    filters: dict[str, Any] = {"start": start, "end": end, "model": model}
    with client_for(url, api_key, org, workspace, config, database_url) as client:
        rows = client.ledger(limit=1, **filters).total_count
        filters["format"] = export_format
        if output is None:
            for chunk in client.iter_export(**filters):
                sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            return
        with Progress(
            TextColumn("Exporting {task.fields[rows]} ledger rows"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
        ) as bar:
            # The export streams without a length: the bar shows the bytes written so far, and the row
            # count the ledger reports for the same filters.
            task = bar.add_task("export", total=None, rows=rows)
            written = client.export_csv(
                output, on_chunk=lambda chunk: bar.advance(task, len(chunk)), **filters
            )
    err.print(f"wrote {rows} rows ({written:,} bytes) to {output}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
    app.command("history")(history)
    app.command("top")(top)
    app.command("export")(export)
