"""``meterline quarantine list|show|settle|void``: usage that could not be settled, for the operator.

It runs against the database (like the other management commands), through the same functions as the
admin API's ``/v1/admin/quarantine``; errors (unknown id, resolved already) are reported by
``services_for``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from meterline.cli.common import ConfigOption, DatabaseOption, JsonOption, emit, services_for

quarantine_app = typer.Typer(
    help="Usage that could not be settled: list it, then settle or void each entry.", no_args_is_help=True
)
_COLUMNS = ["id", "status", "organization_id", "reservation_id", "error", "created_at", "ledger_id", "note"]
NoteOption = Annotated[str | None, typer.Option(help="Why; kept with the entry.")]


@quarantine_app.command("list")
def quarantine_list(
    show_all: Annotated[bool, typer.Option("--all", help="Resolved entries too.")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Open entries (every entry with --all), oldest first."""
    from meterline.api import render

    with services_for(config, database_url) as services:
        entries, _total = services.quarantine.list(unresolved_only=not show_all, limit=1000, offset=0)
        rows = [render.quarantine_entry(e) for e in entries]
    emit(rows, _COLUMNS, as_json, "Quarantined usage")


@quarantine_app.command("show")
def quarantine_show(entry_id: str, config: ConfigOption = None, database_url: DatabaseOption = None) -> None:
    """One entry whole: the usage as it was held and the error."""
    from meterline.api import render

    with services_for(config, database_url) as services:
        entry = services.reservations.quarantined(entry_id)  # services_for reports a MeterlineError
        typer.echo(json.dumps(render.quarantine_entry(entry), indent=2))


@quarantine_app.command("settle")
def quarantine_settle(
    entry_id: str,
    note: NoteOption = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record the entry's usage in the ledger (its text cleaned), exactly once."""
    _resolve(entry_id, note, config, database_url, as_json, settle=True)


@quarantine_app.command("void")
def quarantine_void(
    entry_id: str,
    note: NoteOption = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Close the entry without billing it."""
    _resolve(entry_id, note, config, database_url, as_json, settle=False)


def _resolve(
    entry_id: str,
    note: str | None,
    config: Path | None,
    database_url: str | None,
    as_json: bool,
    *,
    settle: bool,
) -> None:
    from meterline.api import render

    with services_for(config, database_url) as services:
        if settle:
            services.reservations.settle_quarantined(entry_id, note)
        else:
            services.reservations.void_quarantined(entry_id, note)
        rows = [render.quarantine_entry(services.reservations.quarantined(entry_id))]
    emit(rows, _COLUMNS, as_json, "Settled" if settle else "Voided")
