"""``meterline usage | history | top | export | verify | reconcile`` through the real entry point (a
subprocess of the installed command), against a real server and against the local database."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conftest import ADMIN_KEY, NOW, make_tenant
from meterline.sdk import Event
from sdk.conftest import Server

METERLINE = str(Path(sys.executable).with_name("meterline"))


def run(*args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    result = subprocess.run(
        [METERLINE, *args],
        capture_output=True,
        text=True,
        env={**clean, "COLUMNS": "200", **env},
        timeout=120,
        check=False,
    )
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


@pytest.fixture
def used(server: Server) -> Server:
    events = [
        Event(
            id=f"cli-{i}",
            model="gpt-4o-mini" if i % 2 else "gpt-4o",
            provider="openai",
            prompt_tokens=1000,
            completion_tokens=100 * i,
            user_id=f"user-{i % 2}",
            timestamp=NOW - timedelta(hours=i),
        )
        for i in range(6)
    ]
    with server.client() as client:
        assert client.send_events(events).accepted == 6
    return server


def test_usage_history_and_top_from_a_server(used: Server) -> None:
    env = {"METERLINE_URL": used.base, "METERLINE_API_KEY": used.tenant.key}
    table = run("usage", **env).stdout
    for text in ("tokens today", "calls this period", "monthly credits", "Forecast", "run out in"):
        assert text in table
    summary = as_json(run("usage", "--json", **env))
    with used.client() as client:
        expected = client.usage()
        assert summary["usage"] == expected.usage == 6000 + 1500
        assert Decimal(summary["monthly"]["cost"]) == expected.monthly.cost

        history = as_json(run("history", "--days", "3", "--json", **env))
        assert [day["date"] for day in history][-1] == NOW.date().isoformat()
        assert sum(day["tokens"] for day in history) == sum(d.tokens for d in client.history(3).data)

    top = as_json(run("top", "--by", "model", "--json", "--url", used.base, "--api-key", used.tenant.key))
    assert [row["key"] for row in top["data"]] == ["gpt-4o", "gpt-4o-mini"]
    assert sum(Decimal(row["share_pct"]) for row in top["data"]) == pytest.approx(
        Decimal(100), abs=Decimal("0.1")
    )
    users = run("top", "--by", "user", **env).stdout
    assert "user-0" in users
    assert "user-1" in users


def test_a_command_asking_a_server_loads_no_database_code(used: Server) -> None:
    # It starts in about half the time without the database's stack and the web framework, which only
    # commands on the local database (and `serve`) need. The interpreter lists what it imported.
    env = {"METERLINE_URL": used.base, "METERLINE_API_KEY": used.tenant.key, "PYTHONPROFILEIMPORTTIME": "1"}
    result = run("usage", "--json", **env)
    assert as_json(result)["usage"] == 6000 + 1500
    lines = result.stderr.splitlines()
    loaded = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "meterline.cli.main" in loaded
    server_side = ("sqlalchemy", "psycopg", "alembic", "fastapi", "uvicorn", "genai_prices")
    ours = ("meterline.storage", "meterline.services", "meterline.api", "meterline.metering.settle")
    assert not sorted(m for m in loaded if m.split(".")[0] in server_side or m.startswith(ours))


def test_usage_of_a_plan_sold_by_cases(server: Server) -> None:
    # Issue 17 item 9: seed 003's summary in cases, through the SDK and the CLI, not tokens and -1.
    tenant = make_tenant(server.http, plan="cases", name="Aira")  # type: ignore[arg-type]
    events = [Event(id=f"case-{i}", event="case.execute", run_id=f"prn_{i}") for i in range(3)]
    events.append(Event(id="chat", model="gpt-4o-mini", provider="openai", prompt_tokens=900))
    with server.client(tenant.key) as client:
        assert client.send_events(events).accepted == 4
        summary = client.usage()
    top = (summary.meter, summary.usage, summary.limit, summary.remaining)
    assert top == ("units:case.execute", 3, 5000, 4997)
    by = summary.limited_by
    assert by is not None
    assert (by.scope, by.name, by.window) == ("organization", "period_units:case.execute", "period")
    table = run("usage", METERLINE_URL=server.base, METERLINE_API_KEY=tenant.key).stdout
    headline = next(line for line in table.splitlines() if "quota:" in line)
    assert [cell.strip() for cell in headline.strip("│ ").split("│")] == [
        "quota: units:case.execute (organization period_units:case.execute)",
        "3",
        "5,000",
        "4,997",
    ]


def test_export_to_a_file_equals_the_api_export(used: Server, tmp_path: Path) -> None:
    env = {"METERLINE_URL": used.base, "METERLINE_API_KEY": used.tenant.key}
    target = tmp_path / "usage.csv"
    start = (NOW - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    done = run("export", "--start", start, "--end", "2026-03-14T23:00:00Z", "-o", str(target), **env)
    assert "wrote 4 rows" in done.stderr
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(rows) == 4
    with used.client() as client:
        assert target.read_bytes() == b"".join(client.iter_export(start=start, end="2026-03-14T23:00:00Z"))
    whole = run("export", **env).stdout
    assert len(whole.strip().splitlines()) == 7


FOCUS_OVERRIDES = Path(__file__).with_name("data") / "focus-validator-overrides.yaml"


def focus_validator(path: Path) -> subprocess.CompletedProcess[str]:
    """The FinOps Foundation's validator on ``path``. It reads its currency list relative to the working
    directory, so it runs from where it is installed."""
    spec = importlib.util.find_spec("focus_validator")  # found, not imported (it warns on import)
    assert spec is not None
    assert spec.origin is not None
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "focus_validator.main",
            "--data-file",
            str(path),
            "--validate-version",
            "1.0",
            "--override-file",
            str(FOCUS_OVERRIDES),
        ],
        cwd=Path(spec.origin).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_focus_export_passes_the_finops_validator_and_sums_to_the_usage(
    used: Server, tmp_path: Path
) -> None:
    extra = [
        Event(id="case-1", event="case.execute", units=2, timestamp=NOW - timedelta(minutes=5)),
        Event(
            id="claude-1",
            model="claude-3-5-haiku-latest",
            provider="anthropic",
            prompt_tokens=3000,
            completion_tokens=50,
            cache_read_tokens=2048,
            timestamp=NOW - timedelta(minutes=3),
        ),
    ]
    with used.client() as client:
        assert client.send_events(extra).accepted == 2
        usage = client.usage()
    env = {"METERLINE_URL": used.base, "METERLINE_API_KEY": used.tenant.key}
    target = tmp_path / "focus.csv"
    run("export", "--format", "focus", "-o", str(target), **env)
    checked = focus_validator(target)
    assert "Validation succeeded" in checked.stdout, checked.stdout + checked.stderr

    lines = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(lines) == 8
    period = usage.billing_period.start.strftime("%Y-%m-%dT%H:%M:%SZ")
    this_period = [line for line in lines if line["BillingPeriodStart"] == period]
    assert sum(Decimal(line["BilledCost"]) for line in this_period) == usage.monthly.cost
    tokens = sum(
        Decimal(line["ConsumedQuantity"]) for line in this_period if line["ConsumedUnit"] == "Tokens"
    )
    assert tokens == usage.monthly.tokens.usage
    case = next(line for line in lines if line["SkuId"] == "case.execute")
    assert (case["ConsumedQuantity"], case["ConsumedUnit"], case["ChargeCategory"]) == (
        "2.0",
        "case.execute",
        "Usage",
    )
    assert all(line["BillingCurrency"] == "USD" and line["x_LedgerRowId"] for line in lines)
    for line in lines:  # priced per request: unit price x quantity is the cost, exactly
        assert (line["PricingQuantity"], line["PricingUnit"]) == ("1.0", "Requests")
        assert Decimal(line["ListUnitPrice"]) * Decimal(line["PricingQuantity"]) == Decimal(line["ListCost"])
        assert Decimal(line["ContractedUnitPrice"]) == Decimal(line["ContractedCost"])
        assert line["SubAccountName"] == line["ResourceName"] == used.tenant.workspace["name"]
        assert line["ProviderName"] == line["PublisherName"] != ""
        assert line["InvoiceIssuerName"] == "Meterline"

    # The check can fail: a cost that is not a number is caught.
    broken = tmp_path / "broken.csv"
    broken.write_text(target.read_text().replace(lines[0]["BilledCost"], "n/a", 1))
    assert "Validation succeeded" not in focus_validator(broken).stdout


def test_verify_and_reconcile_against_a_server(used: Server) -> None:
    report = as_json(run("verify", "--json", METERLINE_URL=used.base, METERLINE_API_KEY=used.org_key))
    assert (report["ok"], report["receipts"]) == (True, 6)
    checked = as_json(run("reconcile", "--url", used.base, "--admin-key", ADMIN_KEY, "--json"))
    assert (checked["ok"], checked["drift"], checked["ledger_rows"]) == (True, 0, 6)
    assert (
        "0 drift over 6 ledger rows"
        in run("reconcile", "--url", used.base, METERLINE_ADMIN_KEY=ADMIN_KEY).stdout
    )
    no_key = run("reconcile", "--url", used.base, ok=False)
    assert no_key.returncode == 2
    assert "--admin-key" in no_key.stderr
    wrong = run("reconcile", "--url", used.base, "--admin-key", "nope", ok=False)
    assert wrong.returncode == 1
    assert "invalid admin key" in wrong.stderr


def test_the_local_database_gives_the_same_figures(used: Server, tmp_path: Path) -> None:
    org = used.tenant.org["id"]
    local = {
        "METERLINE_DATABASE_URL": used.database_url,
        "METERLINE_SIGNING_KEY_FILE": str(used.signing_key_file),
    }
    with used.client() as client:
        remote_csv = b"".join(client.iter_export())
    target = tmp_path / "local.csv"
    run("export", "--org", org, "-o", str(target), **local)
    assert target.read_bytes() == remote_csv
    # The local process runs on today's clock, the server on a frozen one: compare whole history.
    days = as_json(run("history", "--org", org, "--days", "366", "--json", **local))
    assert sum(day["tokens"] for day in days) == 7500
    assert as_json(run("usage", "--org", org, "--json", **local))["plan"] == "pro"
    missing = run("usage", "--org", "org_missing", ok=False, **local)
    assert missing.returncode == 1
    assert "org_missing" in missing.stderr


def test_errors_are_clear(used: Server) -> None:
    nowhere = run("usage", ok=False)
    assert nowhere.returncode == 2
    assert "--url" in nowhere.stderr
    assert "--org" in nowhere.stderr
    bad_key = run("usage", "--url", used.base, "--api-key", "ml_live_wrong_000000000000000000", ok=False)
    assert bad_key.returncode == 1
    assert "401 unauthorized" in bad_key.stderr
    bad_range = run(
        "export", "--start", "yesterday", METERLINE_URL=used.base, METERLINE_API_KEY=used.tenant.key, ok=False
    )
    assert "start" in bad_range.stderr
