"""The Alembic migrations create exactly the schema that `storage/tables.py` describes, on both backends."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient

from conftest import ADMIN_KEY
from meterline.api.app import create_app
from meterline.config import load_settings
from meterline.storage.database import Database
from meterline.storage.migrate import (
    VERSIONS,
    alembic_config,
    current_revision,
    head_revision,
    is_up_to_date,
    upgrade,
)
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


def test_the_newest_script_is_alembics_head_and_each_script_is_named_after_its_revision() -> None:
    # What lets a process tell that its database is current without importing Alembic (migrate.py).
    scripts = ScriptDirectory.from_config(alembic_config())
    assert head_revision() == scripts.get_current_head()
    chain = [script.revision for script in scripts.walk_revisions()][::-1]  # from the first
    names = sorted(path.stem for path in VERSIONS.glob("*.py"))
    assert len(chain) == len(names)
    # in one chain, in the order of their names; the first two revisions are their numbers alone
    for revision, name in zip(chain, names, strict=True):
        assert revision == name or (revision in ("0001", "0002") and name.startswith(revision + "_"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_server_started_on_a_database_behind_the_code_migrates_it(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'meterline.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database(f"behind_{secrets.token_hex(4)}")
    db = Database(url)
    try:
        assert current_revision(db) is None  # a new database
        upgrade(db, "0011_usage_details")
        assert current_revision(db) == "0011_usage_details"
    finally:
        db.dispose()
    settings = load_settings(
        database_url=url, admin_key=ADMIN_KEY, signing_key_file=str(tmp_path / "signing-key.json")
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["checks"]["migrations"] == "ok"
    db = Database(url)
    try:
        assert current_revision(db) == head_revision() == "0012_quota_counters"
    finally:
        db.dispose()
