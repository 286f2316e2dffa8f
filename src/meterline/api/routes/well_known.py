"""``/.well-known/``: the public halves of the deployment's signing keys (the active one and every retired
one), for verifying access tokens and receipts offline."""

from __future__ import annotations

from fastapi import APIRouter, Request

from meterline.api.responses import JSON
from meterline.key_file import KeyFile

router = APIRouter(tags=["meta"])


@router.get("/.well-known/jwks.json")
def jwks(request: Request) -> JSON:
    """The JWK set (RFC 7517) of the keys this deployment signs and signed with: public parts only, the
    active key first. A retired key stays here, so receipts it signed remain verifiable."""
    keys: KeyFile = request.app.state.signing_key
    return JSON(keys.public_jwks(), headers={"Cache-Control": "public, max-age=300"})
