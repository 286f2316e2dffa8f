"""Reading receipts and their chains (the receipts API and ``meterline verify``); they are written by
``ledger_store`` in the settle transaction. Implements ``meterline.receipts.ReceiptArchive``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, union

from meterline.metering.records import LedgerRow
from meterline.receipts import ChainHead, Receipt
from meterline.storage.database import Database
from meterline.storage.ledger_store import row_from_db
from meterline.storage.tables import ledger, organizations, receipt_chains, receipts


def _receipt(r: Any) -> Receipt:
    return Receipt(
        id=r.id,
        organization_id=r.organization_id,
        workspace_id=r.workspace_id,
        ledger_id=r.ledger_id,
        seq=int(r.seq),
        prev_hash=r.prev_hash,
        jws=r.jws,
        created_at_us=int(r.created_at_us),
    )


class SqlReceiptStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, receipt_id: str) -> tuple[Receipt, str | None] | None:
        """A receipt and the identifier of its ledger row (what an access token may see)."""
        query = (
            select(receipts, ledger.c.identifier_id)
            .select_from(receipts.outerjoin(ledger, ledger.c.id == receipts.c.ledger_id))
            .where(receipts.c.id == receipt_id)
        )
        with self._db.read() as conn:
            found = conn.execute(query).first()
        return None if found is None else (_receipt(found), found.identifier_id)

    def page(self, organization_id: str, after_seq: int, limit: int) -> list[Receipt]:
        """An organization's receipts with ``seq > after_seq``, in chain order (the unique index)."""
        query = (
            select(receipts)
            .where(receipts.c.organization_id == organization_id, receipts.c.seq > after_seq)
            .order_by(receipts.c.seq)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [_receipt(r) for r in conn.execute(query)]

    def head(self, organization_id: str) -> ChainHead | None:
        query = select(receipt_chains.c.seq, receipt_chains.c.head_hash).where(
            receipt_chains.c.organization_id == organization_id
        )
        with self._db.read() as conn:
            found = conn.execute(query).first()
        return None if found is None else ChainHead(int(found.seq), found.head_hash)

    # -- ReceiptArchive ------------------------------------------------------------------------------
    def organizations(self) -> list[str]:
        """Every organization, and any chain whose organization row is gone."""
        query = union(select(organizations.c.id), select(receipt_chains.c.organization_id))
        with self._db.read() as conn:
            return sorted(r[0] for r in conn.execute(query))

    def entries(
        self, organization_id: str, after_seq: int, limit: int
    ) -> Sequence[tuple[Receipt, LedgerRow | None]]:
        page = self.page(organization_id, after_seq, limit)
        if not page:
            return []
        query = select(ledger).where(ledger.c.id.in_([r.ledger_id for r in page]))
        with self._db.read() as conn:
            rows = {r.id: row_from_db(r) for r in conn.execute(query)}
        return [(r, rows.get(r.ledger_id)) for r in page]

    def row_without_receipt(self, organization_id: str) -> LedgerRow | None:
        """A ledger row that names a receipt which is not stored (the first by time), if any."""
        query = (
            select(ledger)
            .select_from(ledger.outerjoin(receipts, receipts.c.id == ledger.c.receipt_id))
            .where(
                ledger.c.organization_id == organization_id,
                ledger.c.receipt_id.is_not(None),
                receipts.c.id.is_(None),
            )
            .order_by(ledger.c.created_at_us)
            .limit(1)
        )
        with self._db.read() as conn:
            found = conn.execute(query).first()
        return None if found is None else row_from_db(found)
