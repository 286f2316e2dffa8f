"""``/.well-known/``: the public half of the deployment's signing key, for verifying access tokens and
receipts offline."""

from __future__ import annotations

from fastapi import APIRouter, Request

from meterline.api.responses import JSON
from meterline.signing import SigningKey

router = APIRouter(tags=["meta"])


@router.get("/.well-known/jwks.json")
def jwks(request: Request) -> JSON:
    """The JWK set (RFC 7517) of the keys this deployment signs with: public parts only."""
    key: SigningKey = request.app.state.signing_key
    return JSON(key.public_jwks(), headers={"Cache-Control": "public, max-age=300"})
