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
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from meterline.testing.fake_upstream import FakeUpstream
from servers import free_port

METERLINE = str(Path(sys.executable).with_name("meterline"))
ADMIN = "ml_admin_integration_0123456789"


@contextmanager
def process(
    args: list[str],
    env: dict[str, str],
    cwd: Path,
    port: int,
    timeout: float = 120,
    stderr: Path | None = None,
) -> Iterator[str]:
    """The command running until the block ends (SIGINT). Its output goes to ``server.log``, and its
    standard error to ``stderr`` instead when one is named."""
    base = f"http://127.0.0.1:{port}"
    log = (cwd / "server.log").open("w")
    errors = stderr.open("w") if stderr is not None else None
    proc = subprocess.Popen(
        [METERLINE, *args], env=env, cwd=cwd, stdout=log, stderr=errors or subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (cwd / "server.log").read_text() + (
                stderr.read_text() if stderr is not None else ""
            )
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
        if errors is not None:
            errors.close()


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
        # A load balancer keeps its connections to a backend open for a minute (AWS ALB's default idle
        # timeout is 60 s) and sends the next request on one idle that long: a backend that has closed it
        # meanwhile answers nothing (the balancer's 502, or the client's "server disconnected").
        with httpx.Client(base_url=base, limits=httpx.Limits(keepalive_expiry=60)) as client:
            assert client.get("/healthz").status_code == 200
            time.sleep(6)  # past uvicorn's default keep-alive (5 s)
            events: list[str] = []
            again = client.get("/healthz", extensions={"trace": lambda name, info: events.append(name)})
            assert again.status_code == 200
            assert "connection.connect_tcp.started" not in events, "the server had closed the idle connection"
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


REPO = Path(__file__).resolve().parents[2]


def readme_tour_python() -> str:
    """The README's first Python block: the tour's call through the gateway, as a reader copies it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("```python\n", text.index("## A 5-minute tour")) + len("```python\n")
    return text[start : text.index("```", start)]


def test_demo_serves_the_gateway_alerts_and_realistic_data(tmp_path: Path) -> None:
    """`make demo` as a new user meets it: keys printed whole, the way to the CLI, a gateway that answers
    the README's first calls as written (through a simulated upstream, said so), a meter that moves while
    a stream runs, an organization whose alerts show, and weeks of realistic history."""
    port = free_port()
    banner_file = tmp_path / "demo.err"
    # PATH without the virtualenv, as in a shell where it is not activated.
    env = clean_env(PATH="/usr/bin:/bin")
    with process(
        ["demo", "--port", str(port), "--days", "31"], env, tmp_path, port, timeout=240, stderr=banner_file
    ) as base:
        banner = banner_file.read_text()
        keys = json.loads((tmp_path / "meterline-demo.keys.json").read_text())
        lines = banner.splitlines()
        for k in keys:  # whole, and alone at the end of its line: copyable
            assert any(line.endswith(f": {k['key']}") for line in lines), k
        first = next(k["key"] for k in keys if k["scope"] == "workspace")
        assert f"export KEY={first}" in lines
        assert "Upstream: SIMULATED" in banner
        venv = Path(METERLINE).parent
        assert f". {venv / 'activate'}" in banner or ". .venv/bin/activate" in banner

        # The README's first openai calls, as written (only the port differs), streamed and not.
        code = readme_tour_python().replace("localhost:8080", f"127.0.0.1:{port}")
        run = subprocess.run(
            [sys.executable, "-c", code],
            env={**clean_env(), "KEY": first},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert "CompletionUsage(" in run.stdout
        assert run.stdout.count(" tok") > 100
        assert "None" not in run.stdout.splitlines()[-1]

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=first, max_retries=0)
        served = {m.id: m.owned_by for m in client.models.list()}
        assert {"gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "text-embedding-3-small"} <= set(served)
        assert all("simulated" in owner for owner in served.values())

        # The meter moves while a stream runs (the dashboard polls this same summary).
        headers = {"Authorization": f"Bearer {first}"}
        moving = False
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=100, stream=True
        )
        for _chunk in stream:
            usage = httpx.get(f"{base}/v1/usage", headers=headers).json()
            if Decimal(str(usage["credits"]["in_flight"])) > 0:
                moving = True
                stream.close()
                break
        assert moving, "the usage summary never showed the running stream"

        # Anthropic's SDK too.
        claude = anthropic.Anthropic(base_url=base, api_key=first, max_retries=0)
        message = claude.messages.create(
            model="claude-3-5-haiku-latest", max_tokens=12, messages=[{"role": "user", "content": "Hi"}]
        )
        assert message.usage.output_tokens == 12

        # One organization shows every alert its usage can raise.
        umbrella = next(
            k["key"] for k in keys if k["organization"] == "Umbrella Health" and k["scope"] == "organization"
        )
        alerts = httpx.get(f"{base}/v1/alerts", headers={"Authorization": f"Bearer {umbrella}"}).json()
        kinds = {a["kind"] for a in alerts["data"]}
        assert kinds >= {
            "usage_threshold",
            "projected_run_out",
            "unusual_usage",
            "rate_limits_exceeded_frequently",
            "unpriced_usage",
        }, kinds
        thresholds = {a["threshold"] for a in alerts["data"] if a["kind"] == "usage_threshold"}
        assert thresholds == {50, 75, 80}  # near the cap, not over it: the demo still takes requests

        org_key = next(k["key"] for k in keys if k["scope"] == "organization")
        headers = {"Authorization": f"Bearer {org_key}"}
        history = httpx.get(f"{base}/v1/usage/history", headers=headers).json()
        assert sum(1 for d in history["data"] if d["calls"] > 0) >= 28
        ledger = httpx.get(f"{base}/v1/usage/ledger", params={"limit": 1000}, headers=headers).json()
        assert ledger["total_count"] > 1000
        assert len({r["model"] for r in ledger["data"]}) >= 3


def test_readme_says_how_to_reach_the_meterline_command() -> None:
    """After `make demo` the CLI lives in .venv: the README says how, and doing so finds it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = readme[readme.index("## Set-up") : readme.index("## A 5-minute tour")]
    assert ". .venv/bin/activate" in setup
    activate = Path(METERLINE).parent / "activate"
    found = subprocess.run(
        ["bash", "-c", f". {activate} && command -v meterline"],
        env=clean_env(PATH="/usr/bin:/bin"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert found.stdout.strip() == METERLINE


# -- the access log ----------------------------------------------------------------------------------
UPSTREAM_KEY = "sk-upstream-access-log-0123456789"
PROMPT = "a prompt that must never reach a log line"
ACCESS_FIELDS = {
    "ts",
    "request_id",
    "method",
    "path",
    "status",
    "organization_id",
    "workspace_id",
    "key_prefix",
    "model",
    "provider",
    "upstream",
    "failover",
    "ended",
    "rows",
    "tokens",
    "cost",
    "currency",
    "duration_ms",
}


def json_lines(text: str) -> list[dict[str, Any]]:
    """The access-log lines of a process's stderr: whole lines that are JSON objects, nothing around them."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def make_key(base: str, **key: Any) -> dict[str, Any]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    org = httpx.post(f"{base}/v1/admin/organizations", json={"name": "Logged", "plan": "free"}, headers=admin)
    assert org.status_code == 201, org.text
    ws = httpx.post(
        f"{base}/v1/admin/workspaces", json={"organization_id": org.json()["id"], "name": "W"}, headers=admin
    ).json()
    created = httpx.post(
        f"{base}/v1/admin/keys", json={"workspace_id": ws["id"], "name": "K", **key}, headers=admin
    )
    assert created.status_code == 201, created.text
    answer: dict[str, Any] = created.json()
    return answer


def add_key(base: str, workspace_id: str, **key: Any) -> dict[str, Any]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    created = httpx.post(f"{base}/v1/admin/keys", json={"workspace_id": workspace_id, **key}, headers=admin)
    assert created.status_code == 201, created.text
    answer: dict[str, Any] = created.json()
    return answer


def chat(base: str, key: str, *, stream: bool = False) -> tuple[httpx.Headers, int]:
    """A chat completion with the official SDK, read to its end: its headers and its total tokens."""
    with openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as client:
        messages: Any = [{"role": "user", "content": PROMPT}]
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=messages,
            max_tokens=3,
            stream=stream,
            stream_options={"include_usage": True} if stream else openai.NOT_GIVEN,
        )
        answer = raw.parse()
        chunks = list(answer) if stream else [answer]
        usage = chunks[-1].usage
        assert usage is not None
        return raw.headers, usage.total_tokens


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(api_key=UPSTREAM_KEY) as fake:
        yield fake


def serve_env(tmp_path: Path, upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    config = tmp_path / "meterline.toml"
    config.write_text(
        f'[[upstreams]]\nname = "fake"\nbase_url = "{upstream.url}"\napi_key = "{UPSTREAM_KEY}"\n',
        encoding="utf-8",
    )
    return clean_env(
        METERLINE_ADMIN_KEY=ADMIN,
        METERLINE_CONFIG=str(config),
        METERLINE_DATABASE_URL=f"sqlite:///{tmp_path / 'access.db'}",
        **extra,
    )


def test_serve_writes_one_access_log_line_per_metered_request(tmp_path: Path, upstream: FakeUpstream) -> None:
    port = free_port()
    stderr = tmp_path / "stderr.log"
    with process(
        ["serve", "--port", str(port)], serve_env(tmp_path, upstream), tmp_path, port, stderr=stderr
    ) as base:
        key = make_key(base)
        tight = add_key(base, key["workspace_id"], name="tight", limits={"daily_calls": 0})
        answer, answer_tokens = chat(base, key["key"])
        streamed, streamed_tokens = chat(base, key["key"], stream=True)
        with pytest.raises(openai.RateLimitError):
            chat(base, tight["key"])
        with pytest.raises(openai.AuthenticationError):
            chat(base, "ml_not_a_key_at_all_0123456789")
        events = [
            {
                "id": "e1",
                "model": "gpt-4o",
                "provider": "openai",
                "prompt_tokens": 10,
                "completion_tokens": 5,
            },
            {
                "id": "e2",
                "model": "gpt-4o",
                "provider": "openai",
                "prompt_tokens": 20,
                "completion_tokens": 1,
            },
        ]
        headers = {"Authorization": f"Bearer {key['key']}", "X-Request-Id": "batch-1"}
        batch = httpx.post(f"{base}/v1/events", json={"events": events}, headers=headers)
        assert batch.json()["accepted"] == 2, batch.text
        again = httpx.post(f"{base}/v1/events", json={"events": events}, headers=headers)
        assert again.json()["duplicates"] == 2
        ledger = httpx.get(f"{base}/v1/usage/ledger", headers=headers).json()["data"]
        auth = {"Authorization": f"Bearer {key['key']}"}
        held = httpx.post(
            f"{base}/v1/reservations",
            json={"model": "gpt-4o", "provider": "openai", "prompt_tokens": 100, "completion_tokens": 50},
            headers=auth,
        )
        assert held.status_code == 201, held.text
        settle = f"{base}/v1/reservations/{held.json()['id']}/settle"
        settled = httpx.post(settle, json={"completion_tokens": 7}, headers=auth).json()
        assert httpx.post(settle, json={"completion_tokens": 7}, headers=auth).json()["duplicate"]
        # Not metered: no lines for reads, admin calls or health checks.
        assert httpx.get(f"{base}/healthz").status_code == 200
    text = stderr.read_text()
    lines = json_lines(text)
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/v1/chat/completions", 200),
        ("/v1/chat/completions", 200),
        ("/v1/chat/completions", 429),
        ("/v1/chat/completions", 401),
        ("/v1/events", 200),
        ("/v1/events", 200),
        (settle.removeprefix(base), 200),
        (settle.removeprefix(base), 200),
    ], text
    for line in lines:
        assert set(line) == ACCESS_FIELDS
        assert line["method"] == "POST"
        assert line["duration_ms"] >= 0
        assert line["ts"].endswith("Z")
    by_receipt = {row["receipt_id"]: row for row in ledger}

    plain, stream, refused, unknown, batch_line, repeat, settle_line, settled_again = lines
    row = by_receipt[answer["x-meterline-receipt-id"]]
    assert plain["request_id"] == answer["x-request-id"]
    assert plain["organization_id"] == row["organization_id"]
    assert plain["workspace_id"] == key["workspace_id"]
    assert plain["key_prefix"] == key["key_prefix"]
    assert (plain["model"], plain["provider"], plain["upstream"]) == ("gpt-4o-mini", "openai", "fake")
    assert (plain["ended"], plain["failover"], plain["rows"]) == ("complete", False, 1)
    assert plain["tokens"] == answer_tokens == row["total_tokens"]
    assert plain["cost"] == row["cost"]
    assert Decimal(plain["cost"]) > 0
    assert plain["currency"] == "USD"

    row = by_receipt[streamed["x-meterline-receipt-id"]]
    assert (stream["ended"], stream["rows"], stream["tokens"]) == ("complete", 1, row["total_tokens"])
    assert stream["tokens"] == streamed_tokens
    assert stream["cost"] == row["cost"]

    assert refused["key_prefix"] == tight["key_prefix"]
    assert refused["organization_id"] == plain["organization_id"]
    assert (refused["model"], refused["rows"], refused["tokens"], refused["cost"]) == (
        "gpt-4o-mini",
        0,
        0,
        "0",
    )
    assert unknown["organization_id"] is None
    assert unknown["key_prefix"] is None
    assert unknown["tokens"] == 0

    assert batch_line["request_id"] == "batch-1"
    assert (batch_line["model"], batch_line["provider"], batch_line["rows"]) == ("gpt-4o", "openai", 2)
    assert batch_line["tokens"] == 36
    assert Decimal(batch_line["cost"]) == sum(Decimal(r["cost"]) for r in ledger if r["model"] == "gpt-4o")
    assert batch_line["ended"] is None
    assert batch_line["upstream"] is None
    assert (repeat["rows"], repeat["tokens"], repeat["cost"]) == (0, 0, "0")  # answered again, not added

    assert (settle_line["model"], settle_line["rows"], settle_line["tokens"]) == ("gpt-4o", 1, 107)
    assert settle_line["cost"] == settled["cost"]
    assert settle_line["key_prefix"] == key["key_prefix"]
    assert (settled_again["rows"], settled_again["tokens"]) == (0, 0)

    for secret in (key["key"], tight["key"], ADMIN, UPSTREAM_KEY, PROMPT):
        assert secret not in text


def test_access_log_goes_to_a_file_or_nowhere(tmp_path: Path, upstream: FakeUpstream) -> None:
    access = tmp_path / "access.log"
    stderr = tmp_path / "stderr.log"
    port = free_port()
    env = serve_env(tmp_path, upstream, METERLINE_ACCESS_LOG=str(access))
    with process(["serve", "--port", str(port)], env, tmp_path, port, stderr=stderr) as base:
        key = make_key(base)
        chat(base, key["key"])
    assert json_lines(stderr.read_text()) == []
    [line] = json_lines(access.read_text())
    assert (line["path"], line["status"], line["key_prefix"]) == (
        "/v1/chat/completions",
        200,
        key["key_prefix"],
    )

    port = free_port()
    env = serve_env(tmp_path, upstream, METERLINE_ACCESS_LOG="off")
    with process(["serve", "--port", str(port)], env, tmp_path, port, stderr=stderr) as base:
        chat(base, key["key"])
    assert json_lines(stderr.read_text()) == []
    assert "Uvicorn running" in stderr.read_text()  # the server's own messages are still there
    assert len(json_lines(access.read_text())) == 1
