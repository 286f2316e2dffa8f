"""The Alembic migrations create exactly the schema that `storage/tables.py` describes, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from meterline.storage.database import Database
from meterline.storage.migrate import head_revision, is_up_to_date, upgrade
from meterline.storage.tables import metadata


def test_migrations_match_the_tables(database_url: str) -> None:
    db = Database(database_url)
    try:
        upgrade(db)  # idempotent on an up-to-date database
        assert is_up_to_date(db)
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        db.dispose()
    assert head_revision() == "0012_quota_counters"
