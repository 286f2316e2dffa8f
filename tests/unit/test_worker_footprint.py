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
print(" ".join(sorted(name for name in ("psycopg", "bpe_openai.registry") if name in sys.modules)) or "-")
"""


def test_a_worker_on_sqlite_loads_neither_the_postgresql_driver_nor_the_tokenizers_python_tables(
    tmp_path: Path,
) -> None:
    # psycopg: ~120 ms and ~5 MB a worker; bpe-openai's Python tables: ~1.5 s and ~85 MB.
    done = subprocess.run(
        [sys.executable, "-c", _SERVE, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["-"]
