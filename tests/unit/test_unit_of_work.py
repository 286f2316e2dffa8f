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
from meterline.metering.unit_of_work import ReservationEnded, Share, settle, settle_together
from meterline.receipts import GENESIS, ChainHead, Notary, Receipt, verify_chain
from meterline.signing import SigningKey, SigningKeys

AT = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)
ANCHOR_PERIOD = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp()) * 1_000_000
PERIOD_ON_15TH = int(datetime(2026, 2, 15, tzinfo=UTC).timestamp()) * 1_000_000  # anchor day 15


@dataclass
class MemoryTransaction:
    """``SettleTransaction`` in memory, recording the calls it gets."""

    ledger: dict[tuple[str, str], LedgerRow] = field(default_factory=dict)
    rows: list[LedgerRow] = field(default_factory=list)
    drawn: dict[str, dict[int, int]] = field(default_factory=dict)  # per organization
    bonus_left: dict[str, int] = field(default_factory=dict)
    draws: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    heads: dict[str, ChainHead] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    anchor_days: dict[str, int] = field(default_factory=dict)
    turns: list[dict[str, list[str]]] = field(default_factory=list)
    rollups: list[tuple[set[str], dict[str, int]]] = field(default_factory=list)
    alerted: list[list[str]] = field(default_factory=list)
    reservations: set[str] = field(default_factory=set)
    refuse_insert: set[str] = field(default_factory=set)  # ids a "concurrent request" beat us to
    calls: list[str] = field(default_factory=list)

    def lock(self, turns: Mapping[str, Sequence[str]]) -> Mapping[str, int]:
        self.calls.append("lock")
        self.turns.append({org: list(keys) for org, keys in turns.items()})
        return {org: self.anchor_days.get(org, 1) for org in turns}

    def stored(self, organization_id: str, keys: Sequence[str]) -> dict[str, LedgerRow]:
        self.calls.append("stored")
        return {k: self.ledger[(organization_id, k)] for k in keys if (organization_id, k) in self.ledger}

    def credits_drawn(self, organization_id: str) -> tuple[Mapping[int, int], int]:
        self.calls.append("credits_drawn")
        return dict(self.drawn.get(organization_id, {})), self.bonus_left.get(organization_id, 0)

    def add_credit_draws(self, draws: Sequence[tuple[str, int, int, int, int]]) -> None:
        self.calls.append("add_credit_draws")
        keys = [(organization_id, start) for organization_id, start, *_ in draws]
        assert len(set(keys)) == len(keys), "one entry per organization and period"
        for organization_id, *draw in draws:
            self.draws.setdefault(organization_id, []).append((draw[0], draw[1], draw[2], draw[3]))

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

    def add_to_rollups(self, rows: Sequence[LedgerRow], anchor_days: Mapping[str, int]) -> None:
        self.calls.append("add_to_rollups")
        self.rollups.append(({row.id for row in rows}, dict(anchor_days)))

    def chain_head(self, organization_id: str) -> ChainHead:
        self.calls.append("chain_head")
        return self.heads.get(organization_id, GENESIS)

    def add_receipts(self, receipts: Sequence[Receipt], heads: Mapping[str, ChainHead]) -> None:
        self.calls.append("add_receipts")
        self.receipts += receipts
        self.heads.update(heads)

    def evaluate_alerts(self, settled: Sequence[tuple[Sequence[LedgerRow], CreditTerms | None]]) -> None:
        self.calls.append("evaluate_alerts")
        self.alerted += [[row.id for row in rows] for rows, _terms in settled]

    def end_reservations(self, reservation_ids: Sequence[str]) -> set[str]:
        self.calls.append("end_reservations")
        ended = self.reservations & set(reservation_ids)
        self.reservations -= ended
        return ended


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
    tx = MemoryTransaction(drawn={"org_1": {ANCHOR_PERIOD: 70}}, bonus_left={"org_1": 25})
    rows = [row("a", credits=20), row("b", credits=20), row("c", credits=20)]
    settle(tx, rows, terms)
    assert [(r.credits_monthly_nanos, r.credits_bonus_nanos, r.overage) for r in rows] == [
        (20, 0, False),
        (10, 10, False),
        (0, 15, True),  # 5 nanos past both buckets
    ]
    assert tx.draws == {"org_1": [(ANCHOR_PERIOD, 30, 25, 5)]}


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
    tx = MemoryTransaction(drawn={"org_1": {ANCHOR_PERIOD: 30}})
    first, again, other = row("ev-dup", credits=30), row("ev-dup", credits=30), row("ev-2", credits=30)
    result = settle(tx, [first, again, other], terms, notary=Notary(keys))
    assert result.written == [first, other]
    assert result.existing == {"ev-dup": first}
    assert tx.draws == {
        "org_1": [(ANCHOR_PERIOD, 60, 0, 0)]
    }  # not 90 (nor any overage): the repeat draws nothing
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


def test_several_organizations_settle_together_each_by_its_own_books(keys: SigningKeys) -> None:
    """A batch of several organizations' settles is one settle: one turn-taking for all, one insert,
    one rollup write and one receipts write; idempotency, credits, receipt chains and alerts stay each
    organization's own."""
    notary = Notary(keys)
    tx = MemoryTransaction(
        drawn={"org_2": {PERIOD_ON_15TH: 90}}, bonus_left={"org_1": 5}, anchor_days={"org_2": 15}
    )
    settle(tx, [row("seen", org="org_2")], None, notary=notary)  # org_2's chain has a receipt already
    tx.calls.clear()
    tx.turns.clear()
    tx.rollups.clear()
    tx.alerted.clear()
    terms_1 = CreditTerms("org_1", monthly_allowance_nanos=100, billing_anchor_day=1, enforced=True)
    terms_2 = CreditTerms("org_2", monthly_allowance_nanos=100, billing_anchor_day=15, enforced=True)
    mine = [row("a", credits=60, org="org_1"), row("b", credits=60, org="org_1")]
    theirs = [row("a", credits=20, org="org_2"), row("seen", org="org_2")]  # "a" is org_1's too
    ours, others = settle_together(tx, [Share(mine, terms_1), Share(theirs, terms_2)], notary=notary)

    assert ours.written == mine
    assert ours.existing == {}
    assert others.written == [theirs[0]]
    assert list(others.existing) == ["seen"]
    assert tx.turns == [{"org_1": ["a", "b"], "org_2": ["a", "seen"]}]
    assert tx.calls.count("lock") == tx.calls.count("insert") == tx.calls.count("add_to_rollups") == 1
    assert tx.calls.count("add_receipts") == tx.calls.count("add_credit_draws") == 1
    assert tx.rollups == [({r.id for r in [*mine, theirs[0]]}, {"org_1": 1, "org_2": 15})]
    # Each organization's credits from its own balance: org_1 100 monthly + 5 bonus for 120 (15 past
    # both), org_2 10 left of its month for 20.
    assert [(r.credits_monthly_nanos, r.credits_bonus_nanos, r.overage) for r in mine] == [
        (60, 0, False),
        (40, 5, True),
    ]
    assert (theirs[0].credits_monthly_nanos, theirs[0].credits_bonus_nanos, theirs[0].overage) == (
        10,
        0,
        True,
    )
    assert tx.draws == {"org_1": [(ANCHOR_PERIOD, 100, 5, 15)], "org_2": [(PERIOD_ON_15TH, 10, 0, 10)]}
    assert tx.alerted == [[r.id for r in mine], [theirs[0].id]]
    # Each chain goes on from its own head.
    by_org = {org: [r for r in tx.receipts if r.organization_id == org] for org in ("org_1", "org_2")}
    assert [r.seq for r in by_org["org_1"]] == [1, 2]
    assert [r.seq for r in by_org["org_2"]] == [1, 2]
    for org, chain in by_org.items():
        assert verify_chain([r.jws for r in chain], keys.public_jwks(), organization_id=org).ok
    assert tx.heads["org_1"].seq == 2
    assert tx.heads["org_2"].seq == 2


def test_a_settle_takes_one_share_per_organization() -> None:
    with pytest.raises(ValueError, match="one share per organization"):
        settle_together(MemoryTransaction(), [Share([row("a")]), Share([row("b")])])


def test_a_reservation_ended_elsewhere_fails_every_share_and_leaves_their_rows_as_they_came() -> None:
    terms = CreditTerms("org_2", monthly_allowance_nanos=10, billing_anchor_day=1, enforced=True)
    tx = MemoryTransaction(reservations={"rsv_1"})
    settled, other = row("rsv_1", org="org_1"), row("ev-1", credits=30, org="org_2")
    settled.id = "rsv_1"
    gone = row("rsv_2", org="org_3")
    gone.id = "rsv_2"  # ended by another process meanwhile
    shares = [Share([settled], None, ["rsv_1"]), Share([other], terms), Share([gone], None, ["rsv_2"])]
    with pytest.raises(ReservationEnded):
        settle_together(tx, shares)
    assert (other.credits_monthly_nanos, other.credits_bonus_nanos, other.overage) == (0, 0, False)


def test_a_reservation_ended_elsewhere_is_told_apart_from_another_ended_here() -> None:
    """One share's reservation was ended elsewhere while another share ends one without a row: the count
    of reservations ended matches, but not which."""
    tx = MemoryTransaction(reservations={"rsv_other"})
    settled = row("rsv_1")
    settled.id = "rsv_1"  # rsv_1 itself is gone
    with pytest.raises(ReservationEnded):
        settle_together(tx, [Share([settled], None, ["rsv_1"]), Share([], None, ["rsv_other"])])


def test_rows_of_any_organization_id_are_settled() -> None:
    tx = MemoryTransaction()
    nameless = row("a", org="")
    (result,) = settle_together(tx, [Share([nameless])])
    assert result.written == [nameless]
