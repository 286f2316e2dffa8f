"""Auditing stored receipts against the ledger (``meterline verify``): the chain as ``chain.py`` checks
it, plus that every receipt's claims equal its ledger row, that every ledger row naming a receipt has
one, and that the stored chain head is the last receipt (nothing cut off the end)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from meterline.metering.records import LedgerRow
from meterline.receipts.chain import BrokenLink, ChainReport, ChainVerifier
from meterline.receipts.claims import mismatch
from meterline.receipts.notary import ChainHead, Receipt
from meterline.signing import VerifyingKeys

PAGE = 1000


class ReceiptArchive(Protocol):
    """What an audit reads from storage."""

    def organizations(self) -> list[str]: ...
    def head(self, organization_id: str) -> ChainHead | None: ...
    def entries(
        self, organization_id: str, after_seq: int, limit: int
    ) -> Sequence[tuple[Receipt, LedgerRow | None]]: ...
    def row_without_receipt(self, organization_id: str) -> LedgerRow | None: ...


@dataclass(frozen=True, slots=True)
class Audit:
    organization_id: str
    report: ChainReport


def audit_organization(
    archive: ReceiptArchive,
    keys: VerifyingKeys,
    organization_id: str,
    progress: Callable[[int], None] | None = None,
) -> Audit:
    """Check one organization's chain against its ledger. ``progress(n)`` after each page of n receipts."""
    verifier = ChainVerifier(keys, organization_id=organization_id)

    def broken(link: BrokenLink) -> Audit:
        return Audit(organization_id, ChainReport(verifier.count, verifier.head, link))

    while True:
        page = archive.entries(organization_id, verifier.head.seq, PAGE)
        for receipt, row in page:
            expected = verifier.head.seq + 1
            claims, link = verifier.check(receipt.jws)
            if link is not None:
                # The stored row names the receipt even when its JWS is too damaged to read.
                return broken(link if link.receipt_id else replace(link, receipt_id=receipt.id))
            assert claims is not None
            if (receipt.id, receipt.seq, receipt.ledger_id) != (
                claims["jti"],
                claims["seq"],
                claims["ledger_id"],
            ):
                return broken(
                    BrokenLink(expected, receipt.id, "receipt row does not match its signed claims")
                )
            if row is None:
                return broken(BrokenLink(expected, receipt.id, f"ledger row {receipt.ledger_id} is missing"))
            problem = mismatch(claims, row)
            if problem is not None:
                return broken(BrokenLink(expected, receipt.id, problem))
        if progress is not None and page:
            progress(len(page))
        if len(page) < PAGE:
            break
    head = archive.head(organization_id)
    end = verifier.head
    if head is None and end.seq > 0:
        return broken(BrokenLink(end.seq, None, "receipts exist but the organization has no chain head"))
    if head is not None and head != end:
        reason = (
            f"the chain head is seq {head.seq} but the receipts end at seq {end.seq}: receipts were removed"
            if head.seq > end.seq
            else "the chain head does not match the last receipt"
        )
        return broken(BrokenLink(end.seq + 1, None, reason))
    row = archive.row_without_receipt(organization_id)
    if row is not None:
        return broken(
            BrokenLink(
                end.seq + 1, row.receipt_id, f"ledger row {row.id} names a receipt that does not exist"
            )
        )
    return Audit(organization_id, ChainReport(verifier.count, end))
