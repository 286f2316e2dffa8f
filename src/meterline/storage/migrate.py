"""Schema migrations with Alembic, run programmatically (no alembic.ini for operators to manage)."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from meterline.storage.database import Database

MIGRATIONS = Path(__file__).with_name("migrations")
# Any fixed number: serializes concurrent `meterline serve` processes migrating one PostgreSQL database.
_PG_MIGRATION_LOCK = 7_263_001


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    config = alembic_config()
    with db.engine.begin() as conn:
        if not db.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@functools.cache
def head_revision() -> str | None:
    # Read once a process: new migrations come with new code, hence a restart, and reading the scripts
    # costs ~10 ms of CPU (~200 ms the first time), which every `/readyz` probe paid in the worker.
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def is_up_to_date(db: Database) -> bool:
    return current_revision(db) == head_revision()
