"""What every ``meterline`` command shares: the consoles, failing with a message, the configuration
options, and opening the services of the configured database."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from meterline.errors import ConfigError, MeterlineError

if TYPE_CHECKING:  # imported where used: commands that ask a server never load the database's stack
    from meterline.config import Settings
    from meterline.services import Services

out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (default: $METERLINE_CONFIG).")
]
DatabaseOption = Annotated[
    str | None, typer.Option("--database-url", help="Overrides database_url (sqlite:///… or postgresql://…).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def settings_from(config: Path | None, database_url: str | None = None, **overrides: Any) -> Settings:
    from meterline.config import load_settings

    try:
        return load_settings(config, database_url=database_url, **overrides)
    except ConfigError as exc:
        fail(exc.message, 2)


@contextmanager
def services_for(
    config: Path | None, database_url: str | None, *, create: bool = False
) -> Iterator[Services]:
    """The deployment's services for a command. Only a command that sets a deployment up (``create``:
    ``migrate``, ``orgs create``) may make a new database; any other one run where there is none (a
    shell without the service's config) says so instead of answering from an empty database it made."""
    # The key file only when a command signs, verifies or seals: the others never create or read it.
    # No command here seals stored webhook secrets (only `serve` at start and `keys rotate` do).
    from meterline.services import build_services

    settings = settings_from(config, database_url)
    if not create:
        _require_database(settings.database_url)
    services = build_services(settings, lazy_keys=True)
    try:
        yield services
    except MeterlineError as exc:
        fail(exc.message)
    finally:
        services.close()


def emit(rows: list[dict[str, Any]], columns: list[str], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)


_WHERE = (
    "run the command where `meterline serve` runs, or name the deployment with --config or "
    "--database-url (METERLINE_CONFIG, METERLINE_DATABASE_URL)"
)


def sqlite_database(url: str) -> str | None:
    """The database part of a SQLite URL (a path, ":memory:", a "file:" URI, or ""); None for another
    kind of database."""
    from sqlalchemy.engine import make_url

    from meterline.storage.database import normalize_url

    parsed = make_url(normalize_url(url))
    return (parsed.database or "") if parsed.get_backend_name() == "sqlite" else None


def _require_database(url: str) -> None:
    name = sqlite_database(url)
    if name is not None:
        if not name or name == ":memory:" or name.startswith("file:"):
            return
        where = Path(name).resolve()
        if not where.exists():
            fail(f"no database at {where}: {_WHERE}; `meterline migrate` makes a new one", 2)
        if _sqlite_has_tables(where):
            return
        shown = str(where)
    else:
        from sqlalchemy.engine import make_url

        from meterline.storage.database import Database
        from meterline.storage.migrate import current_revision

        db = Database(url)
        try:
            if current_revision(db) is not None:
                return
        except Exception:
            return  # unreachable: the command's own attempt says how (an outage, credentials)
        finally:
            db.dispose()
        shown = make_url(url).render_as_string(hide_password=True)
    fail(f"the database {shown} has no Meterline tables: {_WHERE}; `meterline migrate` makes them", 2)


def _sqlite_has_tables(path: Path) -> bool:
    """Read-only, so that another application's file is left as it is (no journal mode set)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone()
    except sqlite3.Error:
        return True  # unreadable or busy: the command's own attempt says how
    return found is not None
