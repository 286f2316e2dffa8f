"""What a worker on the default database (SQLite) loads: workers are sized to memory
(README, "Size workers to memory as well as cores"), so libraries it never uses stay out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SERVE = """
import sys
from fastapi.testclient import TestClient
from meterline.api.app import create_app
from meterline.config import load_settings

folder = sys.argv[1]
settings = load_settings(
    database_url=f"sqlite:///{folder}/meterline.db",
    admin_key="admin-key-for-the-footprint-test",
    signing_key_file=f"{folder}/signing-key.json",
)
with TestClient(create_app(settings)) as client:
    assert client.get("/readyz").status_code == 200
    admin = {"Authorization": "Bearer admin-key-for-the-footprint-test"}
    org = client.post("/v1/admin/organizations", json={"name": "F", "plan": "free"}, headers=admin).json()
    ws = client.post("/v1/admin/workspaces", json={"organization_id": org["id"], "name": "W"}, headers=admin)
    key = client.post("/v1/admin/keys", json={"workspace_id": ws.json()["id"], "name": "K"}, headers=admin)
    sent = client.post(
        "/v1/events",
        json={"events": [{"id": "1", "model": "gpt-4o", "prompt_tokens": 3}]},
        headers={"Authorization": f"Bearer {key.json()['key']}"},
    )
    assert sent.json()["accepted"] == 1, sent.text
print(" ".join(sorted(name for name in sys.argv[2:] if name in sys.modules)) or "-")
"""


def _serve(folder: Path, *modules: str) -> list[str]:
    """Serve a request in a new process on ``folder``'s database; which of ``modules`` it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _SERVE, str(folder), *modules], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_worker_on_sqlite_loads_neither_the_postgresql_driver_nor_the_tokenizers_python_tables(
    tmp_path: Path,
) -> None:
    # psycopg: ~120 ms and ~5 MB a worker; bpe-openai's Python tables: ~1.5 s and ~85 MB.
    assert _serve(tmp_path, "psycopg", "bpe_openai.registry") == ["-"]


def test_a_process_started_on_a_database_already_migrated_loads_no_alembic(tmp_path: Path) -> None:
    # Every worker of `serve --workers N` (its parent migrated) and every restart: Alembic's import and
    # its reading of the scripts cost ~8 MB and ~300 ms a process.
    assert _serve(tmp_path, "alembic") == ["alembic"]  # a new database: this process migrates it
    assert _serve(tmp_path, "alembic") == ["-"]
