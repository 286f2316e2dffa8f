"""Receipts (seed 004) and their verification on the client's side: signatures are checked against the
deployment's public JWK set with ``meterline.receipts`` (the code the server's own audit runs), so a
client trusts nothing but the keys it fetched."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from meterline.receipts import RECEIPT_TYPE, BrokenLink, ChainHead, ChainReport, ChainVerifier
from meterline.sdk._json import Json, obj, opt_str, time
from meterline.sdk.errors import VerificationError
from meterline.signing import SignatureError, VerifyingKeys


@dataclass(frozen=True, slots=True)
class Receipt:
    """A signed receipt. ``claims`` are the verified JWS claims when the SDK verified it, else None."""

    id: str
    ledger_id: str
    seq: int
    prev_hash: str
    jws: str
    kid: str | None
    organization_id: str
    workspace_id: str
    created_at: datetime
    claims: dict[str, Any] | None = None
    request_id: str | None = None  # a receipt fetched alone; not on the items of a page

    @classmethod
    def from_json(cls, data: Json) -> Receipt:
        return cls(
            id=str(data["id"]),
            ledger_id=str(data["ledger_id"]),
            seq=int(data["seq"]),
            prev_hash=str(data["prev_hash"]),
            jws=str(data["jws"]),
            kid=opt_str(data.get("kid")),
            organization_id=str(data["organization_id"]),
            workspace_id=str(data["workspace_id"]),
            created_at=time(data["created_at"]),
            request_id=opt_str(data.get("request_id")),
        )

    @property
    def verified(self) -> bool:
        return self.claims is not None


@dataclass(frozen=True, slots=True)
class ReceiptPage:
    """Receipts of the organization's chain in ``seq`` order; ``head`` is the chain's stored end."""

    data: list[Receipt]
    has_more: bool
    next_after_seq: int | None
    head: ChainHead | None
    request_id: str | None = None

    @classmethod
    def from_json(cls, data: Json) -> ReceiptPage:
        head = obj(data.get("head"))
        return cls(
            data=[Receipt.from_json(r) for r in data["data"]],
            has_more=bool(data["has_more"]),
            next_after_seq=None if data.get("next_after_seq") is None else int(data["next_after_seq"]),
            head=ChainHead(int(head["seq"]), str(head["hash"])) if head else None,
            request_id=opt_str(data.get("request_id")),
        )


def verify_receipt(receipt: Receipt, keys: VerifyingKeys) -> Receipt:
    """``receipt`` with its verified claims; ``VerificationError`` when the signature, the typ, or the
    id/seq the listing shows differ from what was signed."""
    try:
        claims = keys.verify(receipt.jws, typ=RECEIPT_TYPE)
    except SignatureError as exc:
        raise VerificationError(f"receipt {receipt.id} does not verify: {exc}") from None
    if (claims.get("jti"), claims.get("seq")) != (receipt.id, receipt.seq):
        raise VerificationError(f"receipt {receipt.id}: its id or seq differs from the signed claims")
    if claims.get("organization_id") not in (None, receipt.organization_id):
        raise VerificationError(f"receipt {receipt.id}: signed for another organization")
    return Receipt(**{**_fields(receipt), "claims": claims})


def _fields(receipt: Receipt) -> dict[str, Any]:
    return {name: getattr(receipt, name) for name in Receipt.__dataclass_fields__}


@dataclass
class ChainCheck:
    """Follows an organization's chain page by page (any length streams through it)."""

    keys: VerifyingKeys
    organization_id: str | None = None
    broken: BrokenLink | None = None
    _verifier: ChainVerifier = field(init=False)

    def __post_init__(self) -> None:
        self._verifier = ChainVerifier(self.keys)

    def feed(self, page: ReceiptPage) -> bool:
        """Check one page; False once the chain is broken (later receipts need not be fetched)."""
        for item in page.data:
            if self.broken is not None:
                return False
            self.organization_id = self.organization_id or item.organization_id
            expected = self._verifier.head.seq + 1
            claims, link = self._verifier.check(item.jws)
            if link is None and claims is not None and (item.id, item.seq) != (claims["jti"], claims["seq"]):
                link = BrokenLink(expected, item.id, "listed id or seq differs from the signed claims")
            self.broken = link
        return self.broken is None

    def finish(self, head: ChainHead | None) -> ChainReport:
        """The report; a stored head beyond the last receipt means receipts were cut off the end."""
        end = self._verifier.head
        if self.broken is None and head is not None and (head.seq, head.hash) != (end.seq, end.hash):
            self.broken = BrokenLink(
                end.seq + 1, None, f"the chain head is seq {head.seq}, the receipts end at {end.seq}"
            )
        return ChainReport(self._verifier.count, end, self.broken)
