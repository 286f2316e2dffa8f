"""``meterline verify``: every receipt chain checked against the signing keys and the ledger, in the
local database or over HTTP. The Typer command is in ``main.py``; the work and its report are here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress

from meterline.errors import UpstreamError
from meterline.receipts import Audit, BrokenLink, ChainReport, ChainVerifier, audit_organization
from meterline.services import Services
from meterline.signing import VerifyingKeys

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
    """Verify the chain of the key's organization through the API: ``/v1/receipts`` pages checked
    against ``/.well-known/jwks.json``. Needs an organization-scoped key (the chain spans workspaces)."""
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30) as client:
        keys = VerifyingKeys.from_jwks(_get(client, "/.well-known/jwks.json", {}))
        verifier = ChainVerifier(keys)
        organization_id = "(this key's organization)"  # named by the first receipt listed
        after = 0
        with _progress(err, show_progress) as advance:
            while True:
                body = _get(client, "/v1/receipts", {"after_seq": after, "limit": HTTP_PAGE})
                for item in body["data"]:
                    organization_id = item.get("organization_id", organization_id)
                    expected = verifier.head.seq + 1
                    claims, link = verifier.check(item["jws"])
                    if (
                        link is None
                        and claims is not None
                        and (item["id"], item["seq"])
                        != (
                            claims["jti"],
                            claims["seq"],
                        )
                    ):
                        link = BrokenLink(
                            expected, item["id"], "listed id or seq differs from the signed claims"
                        )
                    if link is not None:
                        return _single(organization_id, ChainReport(verifier.count, verifier.head, link))
                advance(len(body["data"]))
                if not body["has_more"]:
                    break
                after = body["next_after_seq"]
        head = body.get("head")
        end = verifier.head
        if head is not None and (head["seq"], head["hash"]) != (end.seq, end.hash):
            link = BrokenLink(
                end.seq + 1, None, f"the chain head is seq {head['seq']}, the receipts end at {end.seq}"
            )
            return _single(organization_id, ChainReport(verifier.count, end, link))
        return _single(organization_id, ChainReport(verifier.count, end))


def _single(organization_id: str, report: ChainReport) -> Verification:
    # Over HTTP there are receipts and keys only: the ledger comparison needs the database.
    return Verification([Audit(organization_id, report)], checked="signatures, links")


def _get(client: httpx.Client, path: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        response = client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"cannot reach {client.base_url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise UpstreamError(f"GET {path} answered {response.status_code}: {message or response.text[:200]}")
    return body
