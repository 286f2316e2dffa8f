"""The `meterline` command through its real entry point, against real databases (no server running)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meterline.storage.migrate import head_revision

METERLINE = str(Path(sys.executable).with_name("meterline"))


def run(*args: str, db: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATABASE_URL"] = db
    env["COLUMNS"] = "200"
    result = subprocess.run(
        [METERLINE, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def test_tenants_keys_and_credits_from_the_cli(database_url: str) -> None:
    org = as_json(
        run("orgs", "create", "Acme Corp", "--plan", "pro", "--spend-cap", "99.95", "--json", db=database_url)
    )[0]
    assert (org["name"], org["plan"], org["spend_cap"]) == ("Acme Corp", "pro", "99.95")
    ws = as_json(
        run("workspaces", "create", org["id"], "Research", "--group", "R&D", "--json", db=database_url)
    )[0]
    assert ws["group"] == "R&D"
    key = as_json(run("keys", "create", ws["id"], "Laptop", "--json", db=database_url))
    assert key["key"].startswith("ml_live_")
    listed = as_json(run("keys", "list", "--workspace", ws["id"], "--json", db=database_url))
    assert [k["key_prefix"] for k in listed] == [key["key"][:16]]
    assert "key" not in listed[0]
    revoked = as_json(run("keys", "revoke", key["id"], "--json", db=database_url))[0]
    assert revoked["revoked_at"] is not None
    grant = as_json(
        run("credits", "grant", org["id"], "250", "--reason", "Referral", "--json", db=database_url)
    )[0]
    assert grant["amount"] == "250"
    table = run("orgs", "list", db=database_url).stdout
    assert "Acme Corp" in table
    assert "99.95" in table
    assert org["id"] in run("workspaces", "list", db=database_url).stdout


def test_cli_errors_are_clear(sqlite_url: str) -> None:
    missing = run("workspaces", "create", "org_missing", "W", db=sqlite_url, ok=False)
    assert missing.returncode == 1
    assert "org_missing" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_plan = run("orgs", "create", "X", "--plan", "platinum", db=sqlite_url, ok=False)
    assert "unknown plan" in bad_plan.stderr
    bad_amount = run("credits", "grant", "org_x", "12.5.1", db=sqlite_url, ok=False)
    assert "amount" in bad_amount.stderr


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('credit_value = "zero"\n', encoding="utf-8")
    result = run("orgs", "list", "--config", str(config), db=f"sqlite:///{tmp_path}/x.db", ok=False)
    assert result.returncode == 2
    assert "broken.toml" in result.stderr
    assert "credit_value" in result.stderr


@pytest.mark.parametrize(
    "args", [["reconcile"], ["orgs", "list"], ["verify"], ["quarantine", "list"]], ids=" ".join
)
def test_a_command_run_where_there_is_no_database_says_so_and_creates_none(
    args: list[str], tmp_path: Path
) -> None:
    # An operator of the systemd unit (whose config is named only in the unit) runs a check from a
    # shell: it must not answer "0 drift over 0 rows" from an empty database it made on the spot.
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["COLUMNS"] = "400"
    result = subprocess.run(
        [METERLINE, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert f"no database at {tmp_path / 'meterline.db'}" in message, message
    assert "--config" in message
    assert "METERLINE_DATABASE_URL" in message
    assert list(tmp_path.iterdir()) == []
    # An empty file there (as this command made before) is no database either, and is left as it was.
    (tmp_path / "meterline.db").touch()
    result = subprocess.run(
        [METERLINE, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "has no Meterline tables" in " ".join(result.stderr.split())
    assert [(p.name, p.stat().st_size) for p in tmp_path.iterdir()] == [("meterline.db", 0)]


def test_a_postgresql_database_without_meterline_tables_is_named_not_filled(
    database_url: str, tmp_path: Path
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite: the file is the database (above)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = create_engine(url.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS meterline_cli_empty"))
        conn.execute(text("CREATE DATABASE meterline_cli_empty"))
    admin.dispose()
    empty = url.set(database="meterline_cli_empty").render_as_string(hide_password=False)
    result = run("reconcile", db=empty, ok=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "has no Meterline tables" in " ".join(result.stderr.split())
    assert "meterline migrate" in " ".join(result.stderr.split())


def test_migrate_and_keygen(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/fresh.db"
    assert f"revision {head_revision()}" in run("migrate", db=db).stdout
    key = run("keygen", db=db).stdout.strip()
    assert len(key) > 40


@pytest.mark.parametrize(
    "args", [["--help"], ["orgs", "--help"], ["keys", "create", "--help"], ["demo", "--help"]]
)
def test_help(args: list[str], tmp_path: Path) -> None:
    assert "Usage" in run(*args, db=f"sqlite:///{tmp_path}/h.db").stdout
