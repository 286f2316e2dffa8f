"""Signed receipts (seed 004): one compact JWS per settled ledger row, chained per organization."""

from meterline.receipts.audit import Audit, ReceiptArchive, audit_organization
from meterline.receipts.chain import BrokenLink, ChainReport, ChainVerifier, verify_chain
from meterline.receipts.claims import GENESIS_HASH, RECEIPT_TYPE, link_hash, mismatch, receipt_claims
from meterline.receipts.notary import GENESIS, ChainHead, Notary, Receipt

__all__ = [
    "GENESIS",
    "GENESIS_HASH",
    "RECEIPT_TYPE",
    "Audit",
    "BrokenLink",
    "ChainHead",
    "ChainReport",
    "ChainVerifier",
    "Notary",
    "Receipt",
    "ReceiptArchive",
    "audit_organization",
    "link_hash",
    "mismatch",
    "receipt_claims",
    "verify_chain",
]
