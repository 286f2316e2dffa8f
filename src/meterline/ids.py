"""Identifiers: UUID v4 for ledger rows and receipts (seed 004), prefixed random ids for everything else."""

from __future__ import annotations

import secrets
import uuid


def ledger_id() -> str:
    return str(uuid.uuid4())


def receipt_id() -> str:
    return str(uuid.uuid4())


def prefixed(prefix: str, nbytes: int = 10) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


def request_id() -> str:
    return f"req_{secrets.token_hex(12)}"
