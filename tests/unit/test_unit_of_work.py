"""The settle unit of work (``metering.unit_of_work``) over an in-memory transaction: what is written,
in which order, what is answered for repeats, how credits split, when receipts are signed, and when a
settle must roll back. No database: these decisions are the domain's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pytest

from meterline import ids
from meterline.credits import CreditTerms
from meterline.metering.records import LedgerRow
from meterline.metering.unit_of_work import ReservationEnded, settle
from meterline.receipts import GENESIS, ChainHead, Notary, Receipt, verify_chain
from meterline.signing import SigningKey, SigningKeys

AT = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)
ANCHOR_PERIOD = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp()) * 1_000_000


@dataclass
class MemoryTransaction:
    """``SettleTransaction`` in memory, recording the calls it gets."""

    ledger: dict[tuple[str, str], LedgerRow] = field(default_factory=dict)
    rows: list[LedgerRow] = field(default_factory=list)
    drawn: dict[int, int] = field(default_factory=dict)
    bonus_left: int = 0
    draws: list[tuple[int, int, int, int]] = field(default_factory=list)
    head: ChainHead = GENESIS
    receipts: list[Receipt] = field(default_factory=list)
    reservations: set[str] = field(default_factory=set)
    refuse_insert: set[str] = field(default_factory=set)  # ids a "concurrent request" beat us to
    calls: list[str] = field(default_factory=list)

    def lock(self, organization_id: str, keys: Sequence[str] = ()) -> int:
        self.calls.append("lock")
        return 1

    def stored(self, organization_id: str, keys: Sequence[str]) -> dict[str, LedgerRow]:
        self.calls.append("stored")
        return {k: self.ledger[(organization_id, k)] for k in keys if (organization_id, k) in self.ledger}

    def credits_drawn(self, organization_id: str) -> tuple[Mapping[int, int], int]:
        self.calls.append("credits_drawn")
        return dict(self.drawn), self.bonus_left

    def add_credit_draws(self, organization_id: str, draws: Sequence[tuple[int, int, int, int]]) -> None:
        self.calls.append("add_credit_draws")
        self.draws += draws

    def insert(self, rows: Sequence[LedgerRow]) -> set[str]:
        self.calls.append("insert")
        written = set()
        for row in rows:
            key = (row.organization_id, row.idempotency_key)
            if row.idempotency_key is not None and key in self.ledger:
                continue  # ON CONFLICT (organization, idempotency key) DO NOTHING, as in SQL
            if row.id in self.refuse_insert:
                assert row.idempotency_key is not None
                self.ledger[(row.organization_id, row.idempotency_key)] = replace(row, id="the-other-one")
                continue
            if row.idempotency_key is not None:
                self.ledger[(row.organization_id, row.idempotency_key)] = row
            self.rows.append(row)
            written.add(row.id)
        return written

    def add_to_rollups(self, rows: Sequence[LedgerRow], anchor_day: int) -> None:
        self.calls.append("add_to_rollups")

    def chain_head(self, organization_id: str) -> ChainHead:
        self.calls.append("chain_head")
        return self.head

    def add_receipts(self, receipts: Sequence[Receipt], head: ChainHead) -> None:
        self.calls.append("add_receipts")
        self.receipts += receipts
        self.head = head

    def evaluate_alerts(self, rows: Sequence[LedgerRow], terms: CreditTerms | None) -> None:
        self.calls.append("evaluate_alerts")

    def end_reservations(self, reservation_ids: Sequence[str]) -> int:
        self.calls.append("end_reservations")
        ended = self.reservations & set(reservation_ids)
        self.reservations -= ended
        return len(ended)


def row(key: str | None, credits: int = 10, receipt: bool = True, org: str = "org_1") -> LedgerRow:
    return LedgerRow(
        id=ids.ledger_id(),
        organization_id=org,
        workspace_id="ws_1",
        key_id="key_1",
        key_prefix="ml_live_a1b2",
        key_name="K",
        identifier_id=None,
        user_id=None,
        source="api",
        endpoint=None,
        event="llm.request",
        units=1,
        run_id=None,
        metadata=None,
        model="m",
        modality="chat",
        provider=None,
        region=None,
        billing_unit="token",
        audio_ms=None,
        prompt_tokens=10,
        completion_tokens=5,
        cache_read_tokens=0,
        cache_write_tokens=0,
        total_tokens=15,
        currency="USD",
        list_cost_nanos=credits,
        discount_applied_pct=0,
        cost_nanos=credits,
        credits_nanos=credits,
        priced=True,
        overage=False,
        failover=False,
        receipt_id=ids.receipt_id() if receipt else None,
        idempotency_key=key,
        request_hash=None,
        created_at=AT,
        recorded_at=AT,
    )


@pytest.fixture
def keys() -> SigningKeys:
    return SigningKeys(SigningKey.generate())


def test_a_settle_runs_its_steps_in_order_and_ends_its_reservation(keys: SigningKeys) -> None:
    tx = MemoryTransaction(reservations={"rsv_1"})
    first = row("rsv_1")
    first.id = "rsv_1"
    result = settle(tx, [first], None, ["rsv_1"], notary=Notary(keys))
    assert result.written == [first]
    assert result.existing == {}
    assert tx.calls == [
        "lock",
        "stored",
        "insert",
        "add_to_rollups",
        "chain_head",
        "add_receipts",
        "evaluate_alerts",
        "end_reservations",
    ]
    assert tx.reservations == set()
    assert [r.ledger_id for r in tx.receipts] == ["rsv_1"]
    assert verify_chain([r.jws for r in tx.receipts], keys.public_jwks()).ok


def test_a_repeated_key_is_answered_with_the_stored_row_and_signed_once(keys: SigningKeys) -> None:
    tx = MemoryTransaction()
    first = settle(tx, [row("ev-1"), row("ev-2")], None, notary=Notary(keys))
    again = settle(tx, [row("ev-2"), row("ev-3")], None, notary=Notary(keys))
    assert [r.idempotency_key for r in again.written] == ["ev-3"]
    assert again.existing == {"ev-2": first.written[1]}
    assert len(tx.rows) == 3
    assert [r.seq for r in tx.receipts] == [1, 2, 3]
    assert verify_chain([r.jws for r in tx.receipts], keys.public_jwks()).ok


def test_nothing_new_writes_nothing_but_the_look_up() -> None:
    tx = MemoryTransaction()
    settle(tx, [row("ev-1")], None)
    tx.calls.clear()
    result = settle(tx, [row("ev-1")], None)
    assert result.written == []
    assert tx.calls == ["lock", "stored"]


def test_credits_draw_monthly_then_bonus_then_overage_in_row_order() -> None:
    terms = CreditTerms("org_1", monthly_allowance_nanos=100, billing_anchor_day=1, enforced=True)
    tx = MemoryTransaction(drawn={ANCHOR_PERIOD: 70}, bonus_left=25)
    rows = [row("a", credits=20), row("b", credits=20), row("c", credits=20)]
    settle(tx, rows, terms)
    assert [(r.credits_monthly_nanos, r.credits_bonus_nanos, r.overage) for r in rows] == [
        (20, 0, False),
        (10, 10, False),
        (0, 15, True),  # 5 nanos past both buckets
    ]
    assert tx.draws == [(ANCHOR_PERIOD, 30, 25, 5)]


def test_an_unlimited_allowance_reads_no_balance() -> None:
    terms = CreditTerms("org_1", monthly_allowance_nanos=-1, billing_anchor_day=1, enforced=False)
    tx = MemoryTransaction()
    rows = [row("a", credits=20)]
    settle(tx, rows, terms)
    assert "credits_drawn" not in tx.calls
    assert (rows[0].credits_monthly_nanos, rows[0].credits_bonus_nanos) == (20, 0)


def test_a_key_a_concurrent_request_wrote_first_is_answered_as_existing() -> None:
    mine, raced = row("ev-1"), row("ev-2")
    tx = MemoryTransaction(refuse_insert={raced.id})
    result = settle(tx, [mine, raced], None)
    assert result.written == [mine]
    assert result.existing["ev-2"].id == "the-other-one"


def test_a_reservation_ended_elsewhere_meanwhile_fails_the_settle() -> None:
    tx = MemoryTransaction(reservations=set())  # another process quarantined or settled it
    settled = row("rsv_1")
    settled.id = "rsv_1"
    with pytest.raises(ReservationEnded):
        settle(tx, [settled], None, ["rsv_1"])


def test_rows_without_receipt_ids_read_no_chain(keys: SigningKeys) -> None:
    tx = MemoryTransaction()
    settle(tx, [row("ev-1", receipt=False)], None, notary=Notary(keys))
    assert "chain_head" not in tx.calls
    assert tx.receipts == []


def test_a_settle_takes_one_organization() -> None:
    with pytest.raises(ValueError, match="one organization"):
        settle(MemoryTransaction(), [row("a"), row("b", org="org_2")], None)


def test_one_key_twice_in_a_settle_is_written_split_and_signed_once(keys: SigningKeys) -> None:
    """Two requests with one key merged into one batch (or a settle retried while the first is queued)."""
    terms = CreditTerms("org_1", monthly_allowance_nanos=100, billing_anchor_day=1, enforced=True)
    tx = MemoryTransaction(drawn={ANCHOR_PERIOD: 30}, bonus_left=0)
    first, again, other = row("ev-dup", credits=30), row("ev-dup", credits=30), row("ev-2", credits=30)
    result = settle(tx, [first, again, other], terms, notary=Notary(keys))
    assert result.written == [first, other]
    assert result.existing == {"ev-dup": first}
    assert tx.draws == [(ANCHOR_PERIOD, 60, 0, 0)]  # not 90 (nor any overage): the repeat draws nothing
    assert not other.overage
    assert len(tx.rows) == 2
    assert [r.ledger_id for r in tx.receipts] == [first.id, other.id]


def test_a_failed_settle_leaves_its_rows_as_they_came() -> None:
    """The writer retries a failed merged settle one append at a time, with the same rows."""
    terms = CreditTerms("org_1", monthly_allowance_nanos=10, billing_anchor_day=1, enforced=True)
    tx = MemoryTransaction(reservations=set())
    settled = row("rsv_1", credits=30)
    settled.id = "rsv_1"
    with pytest.raises(ReservationEnded):
        settle(tx, [settled], terms, ["rsv_1"])
    assert (settled.credits_monthly_nanos, settled.credits_bonus_nanos, settled.overage) == (0, 0, False)
