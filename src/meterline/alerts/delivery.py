"""Webhook delivery policy: the retry schedule and the signing-secret format (Standard Webhooks)."""

from __future__ import annotations

import base64
import binascii
import secrets

# Seconds to wait after the n-th failed attempt (1-based); the last value repeats until max attempts.
RETRY_SCHEDULE_S = (5, 30, 120, 600, 3600, 3 * 3600, 6 * 3600)
SECRET_PREFIX = "whsec_"  # noqa: S105 - a format prefix, not a secret


def retry_delay(failed_attempts: int, schedule: tuple[int, ...] = RETRY_SCHEDULE_S) -> int:
    """Exponential-ish backoff: how long to wait before attempt ``failed_attempts + 1``."""
    if failed_attempts < 1:
        return 0
    return schedule[min(failed_attempts, len(schedule)) - 1]


def new_secret() -> str:
    """``whsec_`` + base64 of 24 random bytes: the form ``standardwebhooks.Webhook`` accepts."""
    return secret_from_bytes(secrets.token_bytes(24))


def secret_bytes(secret: str) -> bytes:
    """The key a ``whsec_`` secret encodes (what is sealed at rest); ValueError if it is not one."""
    body = secret.removeprefix(SECRET_PREFIX)
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    # Only the canonical form: the secret rebuilt from these bytes must be the one shown at registration.
    if not secret.startswith(SECRET_PREFIX) or not raw or secret_from_bytes(raw) != secret:
        raise ValueError("not a whsec_ signing secret")
    return raw


def secret_from_bytes(raw: bytes) -> str:
    return SECRET_PREFIX + base64.b64encode(raw).decode()
