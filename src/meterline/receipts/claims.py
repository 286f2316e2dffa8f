"""What a receipt says: the billable fields of one ledger row, its place in the organization's chain,
and the hash that links the next receipt to it."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from meterline.clock import rfc3339, to_micros
from meterline.metering.records import NO_DETAIL, VECTOR_COUNTS, LedgerRow, UsageVector
from meterline.money import format_nanos

# Not ``at+jwt``: a receipt must never pass for an access token signed by the same key, nor the reverse.
RECEIPT_TYPE = "meterline-receipt+jwt"
ISSUER = "meterline"
# ``prev`` of the first receipt of every chain: the shape of a link hash (43 base64url characters, the
# encoding of 32 zero bytes), so that every receipt's ``prev`` is read and compared the same way.
GENESIS_HASH = "A" * 43
# Claims that place a receipt in its chain; every other claim is derived from its ledger row.
CHAIN_CLAIMS = ("iss", "jti", "seq", "prev")


def link_hash(jws: str) -> str:
    """What the next receipt's ``prev`` holds: base64url (no padding) of SHA-256 of the compact JWS."""
    digest = hashlib.sha256(jws.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def row_claims(row: LedgerRow) -> dict[str, Any]:
    """The claims a ledger row determines. Money as exact decimal strings (never a JSON float), times as
    RFC 3339; ``iat`` is when the row was settled, which is when its receipt was signed."""
    return {
        "ledger_id": row.id,
        "organization_id": row.organization_id,
        "workspace_id": row.workspace_id,
        "key_prefix": row.key_prefix,
        "model": row.model,
        "provider": row.provider,
        "region": row.region,
        "modality": row.modality,
        "billing_unit": row.billing_unit,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cache_read_tokens": row.cache_read_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        # Milliseconds stored; a nano is 10^-6 ms, so this prints the exact seconds ("12.5").
        "audio_seconds": None if row.audio_ms is None else format_nanos(row.audio_ms * 1_000_000),
        "units": row.units,
        "event": row.event,
        "currency": row.currency,
        "cost": format_nanos(row.cost_nanos),
        "list_cost": format_nanos(row.list_cost_nanos),
        "discount_applied_pct": row.discount_applied_pct,
        "credits": format_nanos(row.credits_nanos),
        "failover": row.failover,
        "created_at": rfc3339(row.created_at),
        "iat": to_micros(row.recorded_at) // 1_000_000,
        **_detail_claims(row.usage),
    }


def _detail_claims(usage: UsageVector) -> dict[str, Any]:
    """The usage vector's non-zero parts (a row without any makes the same claims as before the vector
    existed, so older receipts still verify against their rows)."""
    return {} if usage is NO_DETAIL else usage.parts()


def receipt_claims(row: LedgerRow, receipt_id: str, seq: int, prev: str) -> dict[str, Any]:
    return {"iss": ISSUER, "jti": receipt_id, "seq": seq, "prev": prev, **row_claims(row)}


def mismatch(claims: dict[str, Any], row: LedgerRow) -> str | None:
    """How a receipt's claims differ from the ledger row they were made from, or None if they agree.

    Catches a ledger row edited after it was signed (its receipt still says what was billed)."""
    if claims.get("jti") != row.receipt_id:
        return f"ledger row {row.id} names receipt {row.receipt_id!r}, not this one"
    expected_claims = row_claims(row)
    for name, expected in expected_claims.items():
        if name not in claims:
            return f"claim {name} is missing"
        found = claims[name]
        # ``True == 1`` in Python; a JSON boolean and a number are not the same claim.
        if found != expected or type(found) is not type(expected):
            return f"ledger row {name} is {expected!r} but the receipt says {found!r}"
    for name in _DETAIL_NAMES:
        if name in claims and name not in expected_claims:  # the row lost a part the receipt attests
            return f"the receipt says {name} is {claims[name]!r} but the ledger row has none"
    return None


_DETAIL_NAMES = (*VECTOR_COUNTS, "service_tier", "batch")
