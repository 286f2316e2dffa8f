"""Importing the SDK loads no server code: it works as a client library (checked in a fresh process,
since this test session has the server loaded already)."""

from __future__ import annotations

import subprocess
import sys

SERVER_MODULES = ("fastapi", "starlette", "sqlalchemy", "uvicorn", "meterline.api", "meterline.storage")


def test_importing_the_sdk_loads_no_server_code() -> None:
    probe = (
        "import sys, meterline.sdk\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_MODULES!r} "
        f"or m.startswith({SERVER_MODULES[-2:]!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
