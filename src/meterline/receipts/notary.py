"""Signing receipts into an organization's chain. Called by storage inside the settle transaction, after
it has read the chain head under the organization's lock; nothing here touches a database."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import orjson

from meterline.clock import to_micros
from meterline.metering.records import LedgerRow
from meterline.receipts.claims import GENESIS_HASH, RECEIPT_TYPE, link_hash, receipt_claims
from meterline.signing import SigningKey, header_of


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last receipt of a chain: its ``seq`` and link hash (``seq`` 0 and the genesis hash before any)."""

    seq: int
    hash: str


GENESIS = ChainHead(0, GENESIS_HASH)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A signed receipt as stored: the compact JWS plus the columns that find and order it."""

    id: str
    organization_id: str
    workspace_id: str
    ledger_id: str
    seq: int
    prev_hash: str
    jws: str
    created_at_us: int

    @property
    def hash(self) -> str:
        return link_hash(self.jws)

    @property
    def kid(self) -> str | None:
        kid = header_of(self.jws).get("kid")
        return kid if isinstance(kid, str) else None


class ActiveKey(Protocol):
    """Where the notary gets the key to sign with (``SigningKeys`` or the reloading ``KeyFile``)."""

    @property
    def active(self) -> SigningKey: ...


class Notary:
    def __init__(self, keys: ActiveKey) -> None:
        self._keys = keys

    def extend(self, head: ChainHead, rows: Iterable[LedgerRow]) -> tuple[list[Receipt], ChainHead]:
        """Receipts for the rows that carry a ``receipt_id``, chained after ``head``; and the new head.

        The caller must hold the organization's lock from reading ``head`` until it stores both, or two
        settles would fork the chain (the unique (organization, seq) index refuses the second)."""
        key = self._keys.active  # once per transaction: a rotation never splits one batch
        receipts: list[Receipt] = []
        seq, prev = head.seq, head.hash
        for row in rows:
            if row.receipt_id is None:
                continue
            seq += 1
            payload = orjson.dumps(receipt_claims(row, row.receipt_id, seq, prev))
            jws = key.sign_payload(payload, typ=RECEIPT_TYPE)
            receipts.append(
                Receipt(
                    id=row.receipt_id,
                    organization_id=row.organization_id,
                    workspace_id=row.workspace_id,
                    ledger_id=row.id,
                    seq=seq,
                    prev_hash=prev,
                    jws=jws,
                    created_at_us=to_micros(row.recorded_at),
                )
            )
            prev = link_hash(jws)
        return receipts, ChainHead(seq, prev)
