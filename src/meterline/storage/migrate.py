"""Schema migrations with Alembic, run programmatically (no alembic.ini for operators to manage).

Alembic is imported only to migrate. A process whose database is already at the code's revision (every
worker of ``serve --workers N``, whose parent migrated; any restart) reads the database's revision
itself and compares it with the newest script's name: Alembic's import cost each worker ~8 MB and
~100-150 ms, before it read the scripts (docs/benchmarks.md, "Workers without Alembic"). Scripts are
numbered in the order of their one chain and named after their revision
(``versions/0012_quota_counters.py`` holds revision ``0012_quota_counters``; the first two, from before
the rule, are ``0001`` and ``0002``), so the newest name is Alembic's head:
``tests/integration/test_migrations.py`` holds the scripts to that.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text

from meterline.storage.database import Database

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
VERSIONS = MIGRATIONS / "versions"
_SCRIPT = re.compile(r"\d{4}_\w+")
# Any fixed number: serializes concurrent `meterline serve` processes migrating one PostgreSQL database.
_PG_MIGRATION_LOCK = 7_263_001


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    from alembic import command

    config = alembic_config()
    with db.engine.begin() as conn:
        if not db.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def upgrade_if_behind(db: Database) -> None:
    """``upgrade`` unless the database is at the code's revision already (then Alembic is not imported).
    A database at a revision this code does not know goes to ``upgrade``, which says so."""
    if current_revision(db) != head_revision():
        upgrade(db)


def current_revision(db: Database) -> str | None:
    """The revision the database is at (Alembic's ``alembic_version``); None before any migration. Asked
    as Alembic asks (is there a table, then its row), so that a new database logs no error."""
    with db.engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        found = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return None if found is None else str(found)


@functools.cache
def head_revision() -> str:
    """The code's newest revision: the name of its newest migration script. Read once a process (new
    migrations come with new code, hence a restart)."""
    newest = max((p.stem for p in VERSIONS.glob("*.py") if _SCRIPT.fullmatch(p.stem)), default=None)
    if newest is None:
        raise RuntimeError(f"no migration scripts in {VERSIONS}: the installation is incomplete")
    return newest


def is_up_to_date(db: Database) -> bool:
    return current_revision(db) == head_revision()
