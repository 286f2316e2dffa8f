"""House rule: domain packages import no web framework and no storage driver (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "meterline"
DOMAIN = [
    "tenancy",
    "pricing",
    "quotas",
    "metering",
    "receipts",
    "alerts",
    "credits",
    "money.py",
    "clock.py",
    "errors.py",
]
FORBIDDEN = (
    "fastapi",
    "starlette",
    "sqlalchemy",
    "psycopg",
    "sqlite3",
    "redis",
    "httpx",
    "uvicorn",
    "meterline.api",
    "meterline.storage",
    "meterline.cli",
)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("part", DOMAIN)
def test_domain_is_free_of_http_and_drivers(part: str) -> None:
    target = SRC / part
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    assert files
    for file in files:
        bad = {m for m in imports_of(file) if m.startswith(FORBIDDEN)}
        assert not bad, f"{file.relative_to(SRC)} imports {sorted(bad)}"


def test_every_domain_package_has_a_readme() -> None:
    for part in DOMAIN:
        if not part.endswith(".py"):
            assert (SRC / part / "README.md").is_file(), part


# The SDK is a client library: it may use the domain's pure parts (pricing, receipts, the tokenizer) but
# never the server's web framework, storage or services.
SDK_FORBIDDEN = (
    "fastapi",
    "starlette",
    "sqlalchemy",
    "psycopg",
    "sqlite3",
    "redis",
    "uvicorn",
    "meterline.api",
    "meterline.storage",
    "meterline.cli",
    "meterline.services",
)


def test_sdk_is_free_of_the_server() -> None:
    for file in sorted((SRC / "sdk").rglob("*.py")):
        bad = {m for m in imports_of(file) if m.startswith(SDK_FORBIDDEN)}
        assert not bad, f"{file.relative_to(SRC)} imports {sorted(bad)}"


# The gateway is framework-free: it relays and meters; the HTTP framework stays in ``api`` (a thin
# adapter) and its collaborators are named (``exchange.Collaborators``), not a service locator.
GATEWAY_FORBIDDEN = (*FORBIDDEN, "meterline.services", "aiohttp")


def test_gateway_is_free_of_the_web_framework_storage_and_services() -> None:
    files = sorted((SRC / "gateway").rglob("*.py"))
    assert files
    for file in files:
        if file.name == "upstream.py":
            continue  # the upstream leg: the one place that speaks aiohttp
        bad = {m for m in imports_of(file) if m.startswith(GATEWAY_FORBIDDEN)}
        assert not bad, f"{file.relative_to(SRC)} imports {sorted(bad)}"


def test_only_the_upstream_leg_speaks_aiohttp() -> None:
    users = {
        str(file.relative_to(SRC))
        for file in SRC.rglob("*.py")
        if any(m == "aiohttp" or m.startswith("aiohttp.") for m in imports_of(file))
    }
    assert users == {"gateway/upstream.py"}
