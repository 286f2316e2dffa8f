"""``audit_organization`` on every backend, in process: the stored chain against the ledger, and the
settle transaction's all-or-nothing for receipts (a failed settle leaves neither row nor receipt)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from meterline.metering import Account, UsageRecord
from meterline.receipts import ChainHead, audit_organization
from meterline.services import Services
from meterline.tenancy import Organization


def execute(services: Services, sql: str, **params: Any) -> None:
    with services.db.engine.begin() as conn:
        conn.execute(text(sql), params)


@pytest.fixture
def org(services: Services) -> Organization:
    org = services.tenancy.create_organization("Acme", "pro")
    services.tenancy.create_workspace(org.id, "Main")
    return org


def settle(services: Services, org: Organization, count: int, **fields: Any) -> list[Any]:
    ws = services.tenancy.list_workspaces(org.id, limit=1)[0][0]
    records = [
        UsageRecord(
            organization_id=org.id,
            workspace_id=ws.id,
            created_at=services.clock.now() - timedelta(minutes=i),
            model="gpt-4o-mini",
            prompt_tokens=10 + i,
            completion_tokens=5,
            **fields,
        )
        for i in range(count)
    ]
    return list(services.settler.settle(records, services.account_of(org)).written)


def audit(services: Services, org: Organization) -> Any:
    keys = services.signing_keys.current().verifying
    return audit_organization(services.receipts, keys, org.id).report


def test_an_intact_chain_and_rows_without_receipts(services: Services, org: Organization) -> None:
    rows = settle(services, org, 3)
    settle(services, org, 2, receipt=False)
    report = audit(services, org)
    assert report.ok, report.broken
    assert report.count == 3
    assert report.head == services.receipts.head(org.id)
    assert [r.ledger_id for r in services.receipts.page(org.id, 0, 10)] == [r.id for r in rows]


def test_a_settle_that_fails_writes_no_receipt(services: Services, org: Organization) -> None:
    settle(services, org, 1)
    account = services.account_of(org)
    ws_id = services.tenancy.list_workspaces(org.id, limit=1)[0][0].id
    record = UsageRecord(
        organization_id=org.id, workspace_id=ws_id, created_at=services.clock.now(), model="m"
    )
    row = services.settler.price(record, account)
    # A receipt id that is taken: the receipt insert fails, and with it the whole settle.
    row.receipt_id = services.receipts.page(org.id, 0, 1)[0].id
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        services.settler.append([row], Account(org.id, org.currency, 0, account.credits))
    assert services.reservation_store.ledger_row(org.id, row.id) is None
    assert services.receipts.head(org.id) == ChainHead(1, services.receipts.page(org.id, 0, 1)[0].hash)
    assert audit(services, org).ok


def test_unreadable_receipt_is_named_by_its_stored_id(services: Services, org: Organization) -> None:
    settle(services, org, 3)
    second = services.receipts.page(org.id, 1, 1)[0]
    execute(services, "UPDATE receipts SET jws = 'garbage' WHERE id = :i", i=second.id)
    broken = audit(services, org).broken
    assert broken is not None
    assert (broken.seq, broken.receipt_id, broken.reason) == (2, second.id, "token is not a compact JWS")


def test_a_deleted_ledger_row_is_reported(services: Services, org: Organization) -> None:
    rows = settle(services, org, 2)
    execute(services, "DELETE FROM ledger WHERE id = :i", i=rows[1].id)
    broken = audit(services, org).broken
    assert broken is not None
    assert broken.seq == 2
    assert broken.reason == f"ledger row {rows[1].id} is missing"


def test_a_receipt_moved_to_another_row_is_reported(services: Services, org: Organization) -> None:
    rows = settle(services, org, 2)
    execute(services, "UPDATE receipts SET ledger_id = :l WHERE ledger_id = :m", l=rows[0].id, m=rows[1].id)
    broken = audit(services, org).broken
    assert broken is not None
    assert (broken.seq, broken.reason) == (2, "receipt row does not match its signed claims")


def test_a_lost_chain_head_is_reported(services: Services, org: Organization) -> None:
    settle(services, org, 2)
    execute(services, "DELETE FROM receipt_chains WHERE organization_id = :o", o=org.id)
    broken = audit(services, org).broken
    assert broken is not None
    assert "no chain head" in broken.reason


def test_the_chain_continues_after_an_opted_out_row_and_across_batches(
    services: Services, org: Organization
) -> None:
    settle(services, org, 2)
    settle(services, org, 1, receipt=False)
    settle(services, org, 3)
    assert [r.seq for r in services.receipts.page(org.id, 0, 10)] == [1, 2, 3, 4, 5]
    assert audit(services, org).ok
