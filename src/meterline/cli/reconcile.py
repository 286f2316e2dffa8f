"""``meterline reconcile``: the rollups and credit usage checked against (or rebuilt from) the ledger.
The Typer command is registered in ``main.py``; the work is in ``meterline.storage.reconcile``."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from meterline.storage.reconcile import Drift, Reconciliation


def _values(values: dict[str, int] | None, names: list[str]) -> str:
    if values is None:
        return "missing"
    return ", ".join(f"{n}={values[n]}" for n in names)


def describe(drift: Drift) -> str:
    key = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in drift.key.items())
    names = drift.differing
    stored, ledger = _values(drift.stored, names), _values(drift.ledger, names)
    return f"{drift.table} [{key}]: stored {stored}; ledger {ledger}"


def print_report(result: Reconciliation, out: Console) -> None:
    if result.rebuilt:
        out.print(
            f"rebuilt {result.rebuilt_rollups} usage_hourly, {result.rebuilt_narrow_rollups} usage_rollups, "
            f"{result.rebuilt_details} usage_details and {result.rebuilt_credit_usage} credit_usage rows "
            "from the ledger",
            highlight=False,
        )
    for drift in result.drift:
        out.print(f"[bold red]DRIFT[/] {escape(describe(drift))}", highlight=False, soft_wrap=True)
    summary = f"{len(result.drift)} drift" if result.drift else "0 drift"
    out.print(
        f"{summary} ({len(result.rollups)} usage_hourly, {len(result.narrow_rollups)} usage_rollups, "
        f"{len(result.details)} usage_details, {len(result.credit_usage)} credit_usage) over "
        f"{result.ledger_rows} ledger rows; receipt chains are checked by `meterline verify`",
        highlight=False,
    )
    print_quarantined(result.quarantined, out)


def print_quarantined(count: int, out: Console) -> None:
    if count:
        out.print(
            f"[bold yellow]{count} quarantined usage entr{'y' if count == 1 else 'ies'}[/] "
            "could not be settled and await an operator: `meterline quarantine list`, then settle or void",
            highlight=False,
        )
