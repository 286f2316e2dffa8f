"""``meterline reconcile --url``: the server checks its projections against its ledger
(``GET /v1/admin/reconcile``, admin key) and the command prints what it found, like the local mode."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape

from meterline.cli.common import fail, out
from meterline.cli.reconcile import describe, print_quarantined
from meterline.sdk import Client, MeterlineError
from meterline.sdk.calls import Call
from meterline.storage.reconcile import Drift


def reconcile_remote(url: str, admin_key: str, as_json: bool) -> int:
    """Print the server's reconciliation; the exit status: 0 without drift, 1 with."""
    try:
        with Client(url, admin_key) as client:
            result: dict[str, Any] = client.call(Call("GET", "/v1/admin/reconcile", dict))
    except MeterlineError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        for entry in result["entries"]:
            drift = Drift(entry["table"], entry["key"], entry["stored"], entry["ledger"])
            out.print(f"[bold red]DRIFT[/] {escape(describe(drift))}", highlight=False, soft_wrap=True)
        out.print(
            f"{result['drift']} drift over {result['ledger_rows']} ledger rows (checked by the server); "
            "receipt chains are checked by `meterline verify`",
            highlight=False,
        )
        print_quarantined(int(result.get("quarantined", 0)), out)
    return 0 if result["ok"] else 1
