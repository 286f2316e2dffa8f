"""Writing usage as one unit of work: every decision of a settle, over a small transaction protocol.

``settle_together`` is the money path's write, in the order it happens, all inside the caller's
transaction, for one or several organizations at once (each its own share: ``Share``):

    take the organizations' turns -> drop rows already stored (idempotency) -> split credits -> insert
    -> rollups -> receipts -> alerts -> end the reservations these rows settle

Each decision is one organization's (its idempotency keys, credit balances, receipt chain, alerts);
what the transaction is asked to write is the shares' together (one insert, one rollup upsert, one
stretch of receipts), so a batch of many organizations costs a database about what one organization's
does. Storage implements ``SettleTransaction`` in SQL (``storage.ledger_store``) and decides nothing;
the database's group-commit writer runs ``settle_together`` once for all the settles of a batch. The
unit tests drive it with an in-memory transaction (``tests/unit/test_unit_of_work.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

    def lock(self, turns: Mapping[str, Sequence[str]]) -> Mapping[str, int]:
        """Take each organization's turn (its settles queue until this transaction ends; several are
        taken in one order, by id, so that two transactions queue instead of deadlocking) and answer
        each one's billing anchor day, as stored now. The values: the idempotency keys ``stored`` is
        asked for next (a store may read them with the turn)."""
        ...

    def stored(self, organization_id: str, keys: Sequence[str]) -> dict[str, LedgerRow]:
        """Rows already in the ledger, by idempotency key."""
        ...

    def credits_drawn(self, organization_id: str) -> tuple[Mapping[int, int], int]:
        """Monthly credits drawn per billing period (by its start, µs), and bonus credits left."""
        ...

    def add_credit_draws(self, draws: Sequence[tuple[str, int, int, int, int]]) -> None:
        """Add (organization, period start, monthly, bonus, overage) to what each period has drawn (one
        entry per organization and period)."""
        ...

    def insert(self, rows: Sequence[LedgerRow]) -> set[str]:
        """Insert rows whose idempotency key is not taken; the ids of the rows written."""
        ...

    def add_to_rollups(self, rows: Sequence[LedgerRow], anchor_days: Mapping[str, int]) -> None:
        """Add the rows to the rollups (``anchor_days``: each organization's, for its billing periods)."""
        ...

    def chain_head(self, organization_id: str) -> ChainHead: ...

    def add_receipts(self, receipts: Sequence[Receipt], heads: Mapping[str, ChainHead]) -> None:
        """Store the receipts and move each organization's chain head to its entry in ``heads``."""
        ...

    def evaluate_alerts(self, settled: Sequence[tuple[Sequence[LedgerRow], CreditTerms | None]]) -> None:
        """Fire the alerts the rows written cross (each entry one organization's rows and its credit
        terms; in this transaction: an alert commits with its usage)."""
        ...

    def end_reservations(self, reservation_ids: Sequence[str]) -> set[str]:
        """Delete durable reservations; the ids of those there were."""
        ...


class ReceiptSigner(Protocol):
    def extend(self, head: ChainHead, rows: Sequence[LedgerRow]) -> tuple[list[Receipt], ChainHead]: ...


@dataclass(frozen=True, slots=True)
class Share:
    """One organization's part of a settle: its rows (of that organization only), its credit terms, and
    the durable reservations they end (which may also come without rows)."""

    rows: Sequence[LedgerRow]
    credits: CreditTerms | None = None
    settles: Sequence[str] = ()


def settle(
    tx: SettleTransaction,
    rows: Sequence[LedgerRow],
    credits: CreditTerms | None,
    settles: Sequence[str] = (),
    *,
    notary: ReceiptSigner | None = None,
) -> AppendResult:
    """``settle_together`` of one organization's rows."""
    (result,) = settle_together(tx, [Share(rows, credits, settles)], notary=notary)
    return result


def settle_together(
    tx: SettleTransaction, shares: Sequence[Share], *, notary: ReceiptSigner | None = None
) -> list[AppendResult]:
    """Write each share's rows and what follows from them; end the reservations they settle. One
    answer per share, in order. Two shares of one organization are refused: merge them first.

    A row whose idempotency key is stored already is not written: the stored row is answered in
    ``existing``. Raises ``ReservationEnded`` (the caller rolls back) when a reservation this settle
    ends was ended by someone else meanwhile."""
    # The split marks rows; a settle that fails (and may be retried with the same rows, as the writer
    # does after a failed merged run) leaves them as they came. (One that succeeded and was rolled back
    # with its batch is run again by the writer too: the ledger store puts the marks back first.)
    rows = [row for share in shares for row in share.rows]
    before = [(row.credits_monthly_nanos, row.credits_bonus_nanos, row.overage) for row in rows]
    try:
        return _settle_together(tx, shares, notary)
    except BaseException:
        for row, (monthly, bonus, overage) in zip(rows, before, strict=True):
            row.credits_monthly_nanos, row.credits_bonus_nanos, row.overage = monthly, bonus, overage
        raise


@dataclass(slots=True)
class _Part:
    """A share as it is settled: its organization, the rows to insert, and what is answered."""

    share: Share
    organization_id: str | None
    fresh: list[LedgerRow]
    repeats: list[LedgerRow]
    existing: dict[str, LedgerRow]
    written: list[LedgerRow]


def _settle_together(
    tx: SettleTransaction, shares: Sequence[Share], notary: ReceiptSigner | None
) -> list[AppendResult]:
    turns: dict[str, list[str]] = {}
    parts: list[_Part] = []
    for share in shares:
        organizations = {row.organization_id for row in share.rows}
        if len(organizations) > 1:
            raise ValueError("a share of a settle takes one organization's rows")
        org_id = next(iter(organizations), None)  # None: a share that only ends reservations
        if org_id is not None:
            if org_id in turns:
                raise ValueError("a settle takes one share per organization")
            turns[org_id] = [row.idempotency_key for row in share.rows if row.idempotency_key is not None]
        parts.append(_Part(share, org_id, [], [], {}, []))
    # Under the organizations' turns the idempotency look-ups and the credit balances are exact.
    anchor_days = tx.lock(turns) if turns else {}
    draws: list[tuple[str, int, int, int, int]] = []
    for part in parts:
        if part.organization_id is not None:
            draws += _sort(tx, part, part.organization_id, turns[part.organization_id])
    if draws:
        tx.add_credit_draws(draws)
    fresh = [row for part in parts for row in part.fresh]
    inserted = tx.insert(fresh) if fresh else set()
    for part in parts:
        _written(tx, part, inserted)
    written = [row for part in parts for row in part.written]
    if written:
        tx.add_to_rollups(written, anchor_days)
        if notary is not None:
            receipts: list[Receipt] = []
            heads: dict[str, ChainHead] = {}
            for part in parts:
                org_id = part.organization_id
                if org_id is not None and any(row.receipt_id is not None for row in part.written):
                    signed, head = notary.extend(tx.chain_head(org_id), part.written)
                    receipts += signed
                    heads[org_id] = head
            if heads:
                tx.add_receipts(receipts, heads)
        tx.evaluate_alerts([(part.written, part.share.credits) for part in parts if part.written])
    settles = list(dict.fromkeys(reservation for share in shares for reservation in share.settles))
    if settles:
        # Durable reservations end in the transaction that writes their rows: never both, never none. A
        # row written for a reservation someone else ended meanwhile would end it twice.
        ended = tx.end_reservations(settles)
        if not {row.id for row in written} & set(settles) <= ended:
            raise ReservationEnded("a reservation was ended by another process during its settle")
    return [AppendResult(written=part.written, existing=part.existing) for part in parts]


def _sort(
    tx: SettleTransaction, part: _Part, organization_id: str, keys: Sequence[str]
) -> list[tuple[str, int, int, int, int]]:
    """A share's rows: those already stored (answered), repeats of a key within it, and the rows to
    write, their credits split; the draws of that split, by organization and period."""
    existing = part.existing
    if keys:
        existing.update(tx.stored(organization_id, keys))
    taken: set[str] = set()
    for row in part.share.rows:
        key = row.idempotency_key
        if key is None:
            part.fresh.append(row)
        elif key in existing:
            continue
        elif key in taken:
            # The same key twice in one settle (two requests merged into one batch, a settle retried
            # while the first was queued): the first is written, the others answered with it. Never
            # split, inserted or counted twice.
            part.repeats.append(row)
        else:
            taken.add(key)
            part.fresh.append(row)
    credits = part.share.credits
    if not part.fresh or credits is None:
        return []
    # By the terms' organization, whose balances the split read (the rows' own: one share, one organization).
    return [(credits.organization_id, *draw) for draw in split_credits(tx, part.fresh, credits)]


def _written(tx: SettleTransaction, part: _Part, inserted: set[str]) -> None:
    """What of a share the insert wrote; a key a concurrent request wrote first is answered with its row."""
    part.written = [row for row in part.fresh if row.id in inserted]
    existing = part.existing
    if part.organization_id is not None and len(part.written) != len(part.fresh):
        # A concurrent request wrote the same key since the look-up (the unique index decided).
        raced = [row.idempotency_key for row in part.fresh if row.id not in inserted]
        existing.update(tx.stored(part.organization_id, [key for key in raced if key is not None]))
    if part.repeats:
        by_key = {row.idempotency_key: row for row in part.written}
        for row in part.repeats:
            assert row.idempotency_key is not None
            first = by_key.get(row.idempotency_key) or existing.get(row.idempotency_key)
            if first is not None:
                existing[row.idempotency_key] = first


def split_credits(
    tx: SettleTransaction, rows: Sequence[LedgerRow], terms: CreditTerms
) -> list[tuple[int, int, int, int]]:
    """Each row's draw (``meterline.credits.split``) from the balances read in this transaction; what
    they draw from each billing period (start, monthly, bonus, overage), for ``add_credit_draws``."""
    if terms.monthly_allowance_nanos == UNLIMITED:
        drawn: Mapping[int, int] = {}  # everything is drawn from the monthly bucket: nothing to read
        bonus_left = 0
    else:
        drawn, bonus_left = tx.credits_drawn(terms.organization_id)
    return split(rows, terms, drawn, bonus_left)
