"""API key secrets: random, shown once, stored only as a hash, recognizable by a non-secret prefix."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_MARK = "ml_live_"
PREFIX_LENGTH = len(KEY_MARK) + 8
_KEY_SHAPE = re.compile(r"^ml_live_[0-9a-f]{48}$")


def generate_key() -> str:
    """192 random bits: enough that a plain SHA-256 is a safe way to store and find them."""
    return KEY_MARK + secrets.token_hex(24)


def key_prefix(secret: str) -> str:
    return secret[:PREFIX_LENGTH]


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def looks_like_key(secret: str) -> bool:
    return bool(_KEY_SHAPE.match(secret))


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
