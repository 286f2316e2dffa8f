"""What ``meterline demo`` prints and the simulated upstream it routes to.

The demo must show the gateway working on a machine with no provider account and no network, so it
starts the package's own fake upstream (``meterline.testing.FakeUpstream``): a real HTTP server on
loopback that answers in the providers' formats with generated text (``" tok tok …"``) and reports the
usage of it. Everything after the upstream — reservations, the settle, receipts, the live meter — is the
real product. The banner and ``GET /v1/models`` say the upstream is simulated.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from meterline.demo import SERVED_MODELS
from meterline.testing import FakeUpstream

# Streams pace their pieces like a model does, so the dashboard's meter can be watched moving.
CHUNK_DELAY_MS = 40
DEFAULT_PIECES = 48
SIMULATED = "simulated"


def start_simulated_upstream() -> FakeUpstream:
    return FakeUpstream.start(
        api_key="sk-simulated-" + secrets.token_hex(8),
        default_pieces=DEFAULT_PIECES,
        chunk_delay_ms=CHUNK_DELAY_MS,
    )


def simulated_routes(upstream: FakeUpstream) -> list[dict[str, Any]]:
    """One route per provider of the demo's models, both to the simulated upstream."""
    routes: list[dict[str, Any]] = []
    for provider in sorted({p for _, p in SERVED_MODELS}):
        routes.append(
            {
                "name": f"{SIMULATED}-{provider}",
                "provider": provider,
                "base_url": upstream.url,
                "api_key": upstream.api_key,
                "models": [m for m, p in SERVED_MODELS if p == provider],
                "owned_by": f"{provider} ({SIMULATED} by meterline demo)",
            }
        )
    return routes


def print_keys(console: Console, keys: list[dict[str, str]], keys_file: Path) -> None:
    """One key per line, whole, so it can be copied from the terminal (a table would cut it)."""
    console.print(f"Demo keys (also in {keys_file}):", highlight=False)
    for k in keys:
        typer.echo(f"  {k['organization']} / {k['workspace']} ({k['scope']}): {k['key']}", err=True)


def print_banner(
    console: Console,
    *,
    base: str,
    admin_key: str,
    first_key: str | None,
    upstream: FakeUpstream | None,
) -> None:
    typer.echo(f"Admin key for this run: {admin_key}", err=True)
    if upstream is not None:
        console.print(
            f"[bold yellow]Upstream: SIMULATED[/] at {upstream.url} (meterline.testing.FakeUpstream): "
            "answers are generated text; their usage is metered, priced and limited for real. "
            "`meterline demo --config FILE` routes to the upstreams of FILE instead.",
            highlight=False,
        )
    if first_key is not None:
        typer.echo(f"\nexport KEY={first_key}", err=True)
        typer.echo(f'curl -s -H "Authorization: Bearer $KEY" {base}/v1/usage', err=True)
    typer.echo(f"Dashboard: {base}/dashboard (sign in with an organization or workspace key)", err=True)
    hint = _path_hint()
    if hint:
        typer.echo(hint, err=True)


def _path_hint() -> str | None:
    """How to reach the ``meterline`` command when the shell cannot find this one (a virtualenv that is
    not activated, as after ``make demo``)."""
    here = Path(sys.argv[0]).resolve().parent
    found = shutil.which("meterline")
    if found is not None and Path(found).resolve().parent == here:
        return None
    activate = here / "activate"
    if not activate.exists():
        return f"The meterline command is {here / 'meterline'} (not on PATH)."
    relative = os.path.relpath(activate)
    shown = activate if relative.startswith("..") else relative
    return f"To run the README's meterline commands: . {shown}  (or call {here / 'meterline'})"
