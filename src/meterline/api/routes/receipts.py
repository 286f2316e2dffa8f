"""``/v1/receipts``: the signed receipt of a ledger row (seed 004), and an organization's receipt chain in
order, so that a client can verify it against ``/.well-known/jwks.json`` with nothing else."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from meterline.api.auth import PrincipalDep, ServicesDep, scope_of
from meterline.api.errors import request_id_of
from meterline.api.responses import JSON
from meterline.clock import from_micros, rfc3339
from meterline.errors import Forbidden, InvalidRequest, NotFound
from meterline.receipts import Receipt

router = APIRouter(prefix="/v1/receipts", tags=["receipts"])

RECEIPT_HEADER = "X-Meterline-Receipt"
# Receipt ids are UUIDs (or ids of that shape the gateway assigns); anything else is not looked up.
_RECEIPT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_NO = frozenset({"false", "0", "no", "off"})
_YES = frozenset({"true", "1", "yes", "on"})


def receipt_wanted(request: Request) -> bool | None:
    """``X-Meterline-Receipt``: false opts the request's ledger rows out of receipts; None when absent."""
    value = request.headers.get(RECEIPT_HEADER)
    if value is None:
        return None
    text = value.strip().lower()
    if text in _NO:
        return False
    if text in _YES:
        return True
    raise InvalidRequest(f"{RECEIPT_HEADER} must be true or false, got {value[:32]!r}", param=RECEIPT_HEADER)


def render_receipt(receipt: Receipt) -> dict[str, Any]:
    return {
        "id": receipt.id,
        "object": "receipt",
        "ledger_id": receipt.ledger_id,
        "seq": receipt.seq,
        "prev_hash": receipt.prev_hash,
        "jws": receipt.jws,
        "kid": receipt.kid,
        "organization_id": receipt.organization_id,
        "workspace_id": receipt.workspace_id,
        "created_at": rfc3339(from_micros(receipt.created_at_us)),
    }


@router.get("/{receipt_id}")
def get_receipt(receipt_id: str, request: Request, principal: PrincipalDep, services: ServicesDep) -> JSON:
    """One receipt: a workspace key sees its workspace's, an organization key its organization's, an
    access token its identifier's. Any other receipt is answered as unknown."""
    found = services.receipts.get(receipt_id) if _RECEIPT_ID.fullmatch(receipt_id) else None
    scope = scope_of(principal, request)
    if found is not None:
        receipt, identifier_id = found
        visible = (
            receipt.organization_id == scope.organization_id
            and scope.workspace_id in (None, receipt.workspace_id)
            and scope.identifier_id in (None, identifier_id)
        )
        if visible:
            return JSON({**render_receipt(receipt), "request_id": request_id_of(request)})
    raise NotFound(f"receipt {receipt_id[:64]!r} does not exist", param="id")


@router.get("")
def list_receipts(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    after_seq: Annotated[
        int, Query(ge=0, le=2**62, description="Receipts with a greater seq (0: from the start).")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size. Maximum 1000.")] = 100,
) -> JSON:
    """The organization's receipt chain in seq order. The chain covers every workspace of the
    organization, so it takes an organization-scoped key."""
    if principal.scope != "organization":
        raise Forbidden(
            "the receipt chain spans the whole organization: list it with an organization-scoped key, "
            "or fetch one receipt with GET /v1/receipts/{id}"
        )
    org_id = principal.organization_id
    page = services.receipts.page(org_id, after_seq, limit + 1)
    more = len(page) > limit
    page = page[:limit]
    head = services.receipts.head(org_id)
    return JSON(
        {
            "object": "list",
            "data": [render_receipt(r) for r in page],
            "has_more": more,
            "next_after_seq": page[-1].seq if more else None,
            # The stored head: a client that reached it has every receipt (nothing cut off the end).
            "head": None if head is None else {"seq": head.seq, "hash": head.hash},
            "request_id": request_id_of(request),
        }
    )
