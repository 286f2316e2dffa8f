"""`meterline serve` and `meterline demo` as real processes on loopback, used over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from servers import free_port

METERLINE = str(Path(sys.executable).with_name("meterline"))
ADMIN = "ml_admin_integration_0123456789"


@contextmanager
def process(
    args: list[str], env: dict[str, str], cwd: Path, port: int, timeout: float = 120
) -> Iterator[str]:
    base = f"http://127.0.0.1:{port}"
    log = (cwd / "server.log").open("w")
    proc = subprocess.Popen([METERLINE, *args], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (cwd / "server.log").read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(extra)
    return env


def test_serve_with_no_configuration_uses_meterline_db(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(METERLINE_ADMIN_KEY=ADMIN)
    with process(["serve", "--port", str(port)], env, tmp_path, port) as base:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        org = httpx.post(
            f"{base}/v1/admin/organizations", json={"name": "Live", "plan": "free"}, headers=admin
        )
        assert org.status_code == 201
        ws = httpx.post(
            f"{base}/v1/admin/workspaces",
            json={"organization_id": org.json()["id"], "name": "W"},
            headers=admin,
        ).json()
        key = httpx.post(
            f"{base}/v1/admin/keys", json={"workspace_id": ws["id"], "name": "K"}, headers=admin
        ).json()
        headers = {"Authorization": f"Bearer {key['key']}"}
        sent = httpx.post(
            f"{base}/v1/events",
            json={
                "events": [
                    {
                        "id": "1",
                        "model": "gpt-4o",
                        "provider": "openai",
                        "prompt_tokens": 10,
                        "completion_tokens": 5,
                    }
                ]
            },
            headers=headers,
        )
        assert sent.json()["accepted"] == 1
        assert httpx.get(f"{base}/v1/usage", headers=headers).json()["usage"] == 15
        assert httpx.get(f"{base}/docs").status_code == 200
    assert (tmp_path / "meterline.db").exists()
    log = (tmp_path / "server.log").read_text()
    assert ADMIN not in log
    assert key["key"] not in log


def test_serve_refuses_a_default_admin_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [METERLINE, "serve"],
        env=clean_env(METERLINE_ADMIN_KEY="changeme"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "admin_key" in result.stderr
    assert "well-known default" in result.stderr


def test_demo_serves_realistic_data(tmp_path: Path) -> None:
    port = free_port()
    with process(
        ["demo", "--port", str(port), "--days", "31"], clean_env(), tmp_path, port, timeout=240
    ) as base:
        keys = json.loads((tmp_path / "meterline-demo.keys.json").read_text())
        org_key = next(k["key"] for k in keys if k["scope"] == "organization")
        headers = {"Authorization": f"Bearer {org_key}"}
        history = httpx.get(f"{base}/v1/usage/history", headers=headers).json()
        assert sum(1 for d in history["data"] if d["calls"] > 0) >= 28
        ledger = httpx.get(f"{base}/v1/usage/ledger", params={"limit": 1000}, headers=headers).json()
        assert ledger["total_count"] > 1000
        assert len({r["model"] for r in ledger["data"]}) >= 3
