"""Verifying a chain of receipts with nothing but the receipts and a JWK set: every signature (EdDSA, a
``kid`` of the set, the receipt ``typ``), every ``prev`` link and ``seq`` continuity. Anyone holding the
receipts can run this; it trusts no database."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from meterline.receipts.claims import ISSUER, RECEIPT_TYPE, link_hash
from meterline.receipts.notary import GENESIS, ChainHead
from meterline.signing import SignatureError, VerifyingKeys


@dataclass(frozen=True, slots=True)
class BrokenLink:
    """Where a chain first fails: the ``seq`` the receipt should have had, its id when readable, why."""

    seq: int
    receipt_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    """``count`` receipts checked, the last good ``head``, and the first broken link if any."""

    count: int
    head: ChainHead
    broken: BrokenLink | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


class ChainVerifier:
    """Checks receipts one at a time, in chain order (so a chain of any length streams through it)."""

    def __init__(
        self, keys: VerifyingKeys, *, start: ChainHead = GENESIS, organization_id: str | None = None
    ) -> None:
        self._keys = keys
        self.head = start
        self.count = 0
        self._organization_id = organization_id

    def check(self, jws: str) -> tuple[dict[str, Any], None] | tuple[None, BrokenLink]:
        """The receipt's verified claims, or where and why the chain breaks at it. Only a receipt that
        passes moves the head, so after a break every later receipt fails too: report the first."""
        expected = self.head.seq + 1
        try:
            claims = self._keys.verify(jws, typ=RECEIPT_TYPE)
        except SignatureError as exc:
            return None, BrokenLink(expected, _unverified_id(jws), str(exc))
        receipt_id = claims.get("jti")
        if not isinstance(receipt_id, str) or claims.get("iss") != ISSUER:
            return None, BrokenLink(expected, None, "not a Meterline receipt (no jti or wrong issuer)")
        seq = claims.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq != expected:
            return None, BrokenLink(
                expected,
                receipt_id,
                f"expected seq {expected}, found seq {seq}: a receipt is missing or out of order",
            )
        if claims.get("prev") != self.head.hash:
            return None, BrokenLink(
                expected, receipt_id, "prev does not match the hash of the previous receipt"
            )
        if self._organization_id is None:
            self._organization_id = claims.get("organization_id")
        elif claims.get("organization_id") != self._organization_id:
            return None, BrokenLink(expected, receipt_id, "receipt belongs to another organization's chain")
        self.head = ChainHead(seq, link_hash(jws))
        self.count += 1
        return claims, None


def verify_chain(
    receipts: Iterable[str],
    jwks: Mapping[str, Any] | VerifyingKeys,
    *,
    start: ChainHead = GENESIS,
    organization_id: str | None = None,
) -> ChainReport:
    """Verify compact JWS receipts given in chain order against a JWK set (``/.well-known/jwks.json``).

    ``start`` resumes after a chain's known head (default: the chain begins at seq 1)."""
    keys = jwks if isinstance(jwks, VerifyingKeys) else VerifyingKeys.from_jwks(jwks)
    verifier = ChainVerifier(keys, start=start, organization_id=organization_id)
    for jws in receipts:
        _, broken = verifier.check(jws)
        if broken is not None:
            return ChainReport(verifier.count, verifier.head, broken)
    return ChainReport(verifier.count, verifier.head)


def _unverified_id(jws: str) -> str | None:
    """The ``jti`` of a receipt that failed verification, only to name it in the report."""
    try:
        payload = jws.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) else None
