"""Writing usage as one unit of work: every decision of a settle, over a small transaction protocol.

``settle`` is the money path's write, in the order it happens, all inside the caller's transaction:

    take the organization's turn -> drop rows already stored (idempotency) -> split credits -> insert
    -> rollups -> receipts -> alerts -> end the reservations these rows settle

Storage implements ``SettleTransaction`` in SQL (``storage.ledger_store``) and decides nothing; the
database's group-commit writer runs ``settle`` once for every settle of an organization in a batch. The
unit tests drive it with an in-memory transaction (``tests/unit/test_unit_of_work.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from meterline.credits import CreditTerms, split
from meterline.errors import Conflict
from meterline.metering.records import LedgerRow
from meterline.metering.store import AppendResult
from meterline.quotas.limits import UNLIMITED

if TYPE_CHECKING:
    from meterline.receipts.notary import ChainHead, Receipt


class ReservationEnded(Conflict):
    """Its durable reservation was ended by someone else (settled, or quarantined by another process)
    while this settle ran: nothing this settle wrote is kept (the transaction is rolled back)."""


class SettleTransaction(Protocol):
    """What a settle needs from the database, inside one transaction."""

    def lock(self, organization_id: str, keys: Sequence[str] = ()) -> int:
        """Take the organization's turn (its settles queue until this transaction ends) and answer its
        billing anchor day, as stored now. ``keys``: the idempotency keys ``stored`` is asked for next
        (a store may read them with the turn)."""
        ...

    def stored(self, organization_id: str, keys: Sequence[str]) -> dict[str, LedgerRow]:
        """Rows already in the ledger, by idempotency key."""
        ...

    def credits_drawn(self, organization_id: str) -> tuple[Mapping[int, int], int]:
        """Monthly credits drawn per billing period (by its start, µs), and bonus credits left."""
        ...

    def add_credit_draws(self, organization_id: str, draws: Sequence[tuple[int, int, int, int]]) -> None:
        """Add (period start, monthly, bonus, overage) to what each period has drawn."""
        ...

    def insert(self, rows: Sequence[LedgerRow]) -> set[str]:
        """Insert rows whose idempotency key is not taken; the ids of the rows written."""
        ...

    def add_to_rollups(self, rows: Sequence[LedgerRow], anchor_day: int) -> None: ...

    def chain_head(self, organization_id: str) -> ChainHead: ...

    def add_receipts(self, receipts: Sequence[Receipt], head: ChainHead) -> None:
        """Store the receipts and move the organization's chain head to ``head``."""
        ...

    def evaluate_alerts(self, rows: Sequence[LedgerRow], terms: CreditTerms | None) -> None:
        """Fire the alerts these rows cross (in this transaction: an alert commits with its usage)."""
        ...

    def end_reservations(self, reservation_ids: Sequence[str]) -> int:
        """Delete durable reservations; how many there were."""
        ...


class ReceiptSigner(Protocol):
    def extend(self, head: ChainHead, rows: Sequence[LedgerRow]) -> tuple[list[Receipt], ChainHead]: ...


def settle(
    tx: SettleTransaction,
    rows: Sequence[LedgerRow],
    credits: CreditTerms | None,
    settles: Sequence[str] = (),
    *,
    notary: ReceiptSigner | None = None,
) -> AppendResult:
    """Write ``rows`` (one organization) and what follows from them; end the reservations ``settles``.

    A row whose idempotency key is stored already is not written: the stored row is answered in
    ``existing``. Raises ``ReservationEnded`` (the caller rolls back) when a reservation this settle
    ends was ended by someone else meanwhile."""
    # The split marks rows; a settle that fails (and may be retried with the same rows, as the writer
    # does after a failed merged run) leaves them as they came. (One that succeeded and was rolled back
    # with its batch is run again by the writer too: the ledger store puts the marks back first.)
    before = [(row.credits_monthly_nanos, row.credits_bonus_nanos, row.overage) for row in rows]
    try:
        return _settle(tx, rows, credits, settles, notary)
    except BaseException:
        for row, (monthly, bonus, overage) in zip(rows, before, strict=True):
            row.credits_monthly_nanos, row.credits_bonus_nanos, row.overage = monthly, bonus, overage
        raise


def _settle(
    tx: SettleTransaction,
    rows: Sequence[LedgerRow],
    credits: CreditTerms | None,
    settles: Sequence[str],
    notary: ReceiptSigner | None,
) -> AppendResult:
    written: list[LedgerRow] = []
    existing: dict[str, LedgerRow] = {}
    repeats: list[LedgerRow] = []
    if rows:
        organizations = {row.organization_id for row in rows}
        if len(organizations) > 1:
            raise ValueError("a settle takes one organization at a time")
        (org_id,) = organizations
        # Under the organization's turn the idempotency look-up and the credit balances are exact.
        keys = [row.idempotency_key for row in rows if row.idempotency_key is not None]
        anchor_day = tx.lock(org_id, keys)
        existing = tx.stored(org_id, keys) if keys else {}
        fresh: list[LedgerRow] = []
        taken: set[str] = set()
        for row in rows:
            key = row.idempotency_key
            if key is None:
                fresh.append(row)
            elif key in existing:
                continue
            elif key in taken:
                # The same key twice in one settle (two requests merged into one batch, a settle retried
                # while the first was queued): the first is written, the others answered with it. Never
                # split, inserted or counted twice.
                repeats.append(row)
            else:
                taken.add(key)
                fresh.append(row)
        if fresh:
            if credits is not None:
                split_credits(tx, fresh, credits)
            inserted = tx.insert(fresh)
            written = [row for row in fresh if row.id in inserted]
            if len(written) != len(fresh):
                # A concurrent request wrote the same key since the look-up (the unique index decided).
                raced = [row.idempotency_key for row in fresh if row.id not in inserted]
                existing.update(tx.stored(org_id, [key for key in raced if key is not None]))
        if repeats:
            by_key = {row.idempotency_key: row for row in written}
            for row in repeats:
                assert row.idempotency_key is not None
                first = by_key.get(row.idempotency_key) or existing.get(row.idempotency_key)
                if first is not None:
                    existing[row.idempotency_key] = first
        if written:
            tx.add_to_rollups(written, anchor_day)
            if notary is not None and any(row.receipt_id is not None for row in written):
                receipts, head = notary.extend(tx.chain_head(org_id), written)
                tx.add_receipts(receipts, head)
            tx.evaluate_alerts(written, credits)
    if settles:
        # Durable reservations end in the transaction that writes their rows: never both, never none. A
        # row written for a reservation someone else ended meanwhile would end it twice.
        ended = tx.end_reservations(list(dict.fromkeys(settles)))
        if ended < len({row.id for row in written} & set(settles)):
            raise ReservationEnded("a reservation was ended by another process during its settle")
    return AppendResult(written=written, existing=existing)


def split_credits(tx: SettleTransaction, rows: Sequence[LedgerRow], terms: CreditTerms) -> None:
    """Each row's draw (``meterline.credits.split``) from the balances read in this transaction, added
    to the billing periods it draws from."""
    if terms.monthly_allowance_nanos == UNLIMITED:
        drawn: Mapping[int, int] = {}  # everything is drawn from the monthly bucket: nothing to read
        bonus_left = 0
    else:
        drawn, bonus_left = tx.credits_drawn(terms.organization_id)
    tx.add_credit_draws(terms.organization_id, split(rows, terms, drawn, bonus_left))
