"""Decisions on an event loop never read the ledger: inside ``no_reads`` a decision that would load a
window raises ``WouldRead`` and holds nothing (the gateway then decides in a thread), and once the
windows are loaded the same decision is made there without a read."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from conftest import Tenant
from meterline.quotas.engine import Reservation, WouldRead, amounts_of, no_reads
from meterline.services import Services


def test_a_decision_that_must_load_a_window_waits_for_a_place_that_may_read(
    client: TestClient, tenant: Tenant, services: Services
) -> None:
    org = services.tenancy.get_organization(tenant.org["id"])
    principal = services.tenancy.authenticate(tenant.key)
    subject = services.subject_of(org, principal)
    amounts = amounts_of(tokens=1500, credits_nanos=0, cost_nanos=0, event="llm.request", units=1)
    request = [(subject, amounts, None)]

    with no_reads(), pytest.raises(WouldRead):
        services.quotas.reserve_many(request, hold_ids=["rsv_cold"])
    first = services.quotas.reserve_many(request, hold_ids=["rsv_first"])[0]
    assert isinstance(first, Reservation)

    with no_reads():
        warm = services.quotas.reserve_many(request, hold_ids=["rsv_warm"])[0]
    assert isinstance(warm, Reservation)
    # Nothing was held by the refused attempt: two holds of the same amounts, counted twice, not three times.
    consumed = [
        (a.consumed, b.consumed) for a, b in zip(first.levels or (), warm.levels or (), strict=True) if a
    ]
    assert consumed
    assert all(after == 2 * before for before, after in consumed), consumed
    services.quotas.release([first, warm])
