"""``meterline verify``: every receipt chain checked against the signing keys and the ledger, in the
local database or over HTTP. The Typer command is in ``main.py``; the work and its report are here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress

from meterline.errors import UpstreamError
from meterline.receipts import Audit, BrokenLink, audit_organization
from meterline.services import Services

HTTP_PAGE = 1000


@dataclass
class Verification:
    audits: list[Audit] = field(default_factory=list)
    checked: str = "signatures, links, ledger rows"

    @property
    def ok(self) -> bool:
        return all(a.report.ok for a in self.audits)

    @property
    def receipts(self) -> int:
        return sum(a.report.count for a in self.audits)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "organizations": len(self.audits),
            "receipts": self.receipts,
            "chains": [
                {
                    "organization_id": a.organization_id,
                    "receipts": a.report.count,
                    "head_seq": a.report.head.seq,
                    "ok": a.report.ok,
                }
                for a in self.audits
            ],
            "broken": [
                _broken_json(a.organization_id, a.report.broken) for a in self.audits if a.report.broken
            ],
        }

    def print(self, out: Console) -> None:
        for audit in self.audits:
            link = audit.report.broken
            if link is not None:
                out.print(
                    f"[bold red]BROKEN[/] organization {audit.organization_id} at seq {link.seq}"
                    f" (receipt {link.receipt_id or 'unknown'}): {link.reason}",
                    highlight=False,
                    soft_wrap=True,
                )
        if self.ok:
            out.print(
                f"OK: {self.receipts} receipts in {len(self.audits)} organization chain(s) verified"
                f" ({self.checked})",
                highlight=False,
                soft_wrap=True,
            )
        else:
            bad = sum(1 for a in self.audits if not a.report.ok)
            out.print(f"FAILED: {bad} of {len(self.audits)} organization chain(s) are broken", soft_wrap=True)


def _broken_json(organization_id: str, link: BrokenLink) -> dict[str, Any]:
    return {
        "organization_id": organization_id,
        "seq": link.seq,
        "receipt_id": link.receipt_id,
        "reason": link.reason,
    }


@contextmanager
def _progress(err: Console, show: bool) -> Iterator[Callable[[int], None]]:
    if not show or not err.is_terminal:
        yield lambda _n: None
        return
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("Verifying receipts", total=None)
        yield lambda n: bar.advance(task, n)


def verify_database(
    services: Services, organization_id: str | None, err: Console, show_progress: bool
) -> Verification:
    """Audit the chains of the local database against the deployment's key set (active and retired)."""
    keys = services.signing_keys.current().verifying
    if organization_id is not None:
        services.tenancy.get_organization(organization_id)  # NotFound names it
        organizations = [organization_id]
    else:
        organizations = services.receipts.organizations()
    result = Verification()
    with _progress(err, show_progress) as advance:
        for org in organizations:
            result.audits.append(audit_organization(services.receipts, keys, org, advance))
    return result


def verify_remote(url: str, api_key: str, err: Console, show_progress: bool) -> Verification:
    """Verify the chain of the key's organization through the API with the SDK: ``/v1/receipts`` pages
    checked locally against ``/.well-known/jwks.json``. Needs an organization-scoped key (the chain spans
    workspaces)."""
    from meterline import sdk

    try:
        with sdk.Client(url, api_key) as client, _progress(err, show_progress) as advance:
            checked = client.verify_chain(page_size=HTTP_PAGE, on_progress=advance)
    except sdk.MeterlineError as exc:
        raise UpstreamError(exc.message) from None
    organization_id = checked.organization_id or "(this key's organization)"
    # Over HTTP there are receipts and keys only: the ledger comparison needs the database.
    return Verification([Audit(organization_id, checked.report)], checked="signatures, links")
