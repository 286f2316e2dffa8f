"""Identifier tokens (seed 000): short-lived access tokens for one end user, and rotating refresh tokens.

* An access token is a JWT signed by the deployment's active Ed25519 key (``meterline.signing``; every
  key of the set, active or retired, verifies by ``kid``), typed ``at+jwt`` (RFC 9068) so that nothing
  else signed by those keys passes for one. Its claims name the
  identifier (``sub``), organization (``org``), workspace (``ws``), refresh-token family (``fam``) and
  the API key that issued it (``key``). It is checked against the clock and against storage (family and
  issuing key not revoked) on every use, so revocation takes effect at once.
* A refresh token is an opaque random secret (``mlr_`` + 48 hex), stored only as its SHA-256. Using it
  spends it and yields a new pair in the same family. Presenting a spent one means the secret leaked or
  the client is confused: the whole family is revoked (OAuth 2.0 Security BCP, refresh token rotation).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from meterline import ids
from meterline.clock import Clock, to_micros
from meterline.errors import Forbidden, InvalidRequest, Unauthorized
from meterline.signing import SignatureError, Signer
from meterline.tenancy.models import ApiKey, Identifier, Principal, RefreshToken, TokenFamily
from meterline.tenancy.service import TenancyService, check_identifier_id
from meterline.tenancy.store import TokenStore

ISSUER = "meterline"
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a JWT media type (RFC 9068), not a secret
DEFAULT_ACCESS_TTL = 900
MIN_ACCESS_TTL = 60
MAX_ACCESS_TTL = 86_400
DEFAULT_REFRESH_TTL = timedelta(days=30)
# Several server processes share one key but not one clock: tolerate this much skew on ``iat``.
CLOCK_SKEW_S = 60
REFRESH_MARK = "mlr_"
_REFRESH_SHAPE = re.compile(r"^mlr_[0-9a-f]{48}$")
# Three base64url parts; the signature may be empty, as in an ``alg: none`` token, which is then refused
# as an access token rather than mistaken for a malformed API key.
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_REUSED = (
    "refresh token was already used; every token issued with it has been revoked. "
    "Request a new token with POST /v1/token"
)


def looks_like_jwt(credential: str) -> bool:
    return bool(_JWT_SHAPE.match(credential))


def hash_refresh_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    identifier: Identifier


class TokenService:
    def __init__(
        self,
        store: TokenStore,
        tenancy: TenancyService,
        signing_key: Signer,
        clock: Clock,
        *,
        refresh_ttl: timedelta = DEFAULT_REFRESH_TTL,
    ) -> None:
        self._store = store
        self._tenancy = tenancy
        self._key = signing_key
        self._clock = clock
        self._refresh_ttl = refresh_ttl

    # -- issuing -----------------------------------------------------------------------------
    def issue(
        self,
        principal: Principal,
        workspace_id: str,
        identifier_id: str,
        *,
        limits: Mapping[str, int] | None = None,
        expires_in: int | None = None,
    ) -> TokenPair:
        """A new token family for ``identifier_id`` in ``workspace_id``, minted by an API key.

        ``limits`` given: they become the identifier's limits (replacing earlier ones); not given: the
        identifier keeps what it has."""
        if principal.scope == "identifier" or principal.key_id is None:
            raise Forbidden("an access token cannot issue tokens; use a workspace API key")
        ttl = DEFAULT_ACCESS_TTL if expires_in is None else expires_in
        if isinstance(ttl, bool) or not MIN_ACCESS_TTL <= ttl <= MAX_ACCESS_TTL:
            raise InvalidRequest(
                f"expires_in must be between {MIN_ACCESS_TTL} and {MAX_ACCESS_TTL} seconds",
                param="expires_in",
            )
        check_identifier_id(identifier_id)
        if principal.scope == "workspace" and workspace_id != principal.workspace_id:
            raise Forbidden("a workspace key issues tokens for its own workspace only", param="workspace_id")
        org = principal.organization_id
        if limits is not None:
            identifier = self._tenancy.set_identifier_limits(workspace_id, identifier_id, org, limits)
        else:
            identifier = self._tenancy.register_identifier(workspace_id, identifier_id, org)
        now = self._clock.now()
        family = TokenFamily(
            id=ids.prefixed("tfam"),
            organization_id=org,
            workspace_id=workspace_id,
            identifier_id=identifier_id,
            key_id=principal.key_id,
            access_ttl_s=ttl,
            created_at=now,
            revoked_at=None,
        )
        secret, record = self._new_refresh_token(family, now)
        self._store.start_family(family, record)
        return TokenPair(self._access_token(family, now), secret, ttl, identifier)

    def _new_refresh_token(self, family: TokenFamily, now: datetime) -> tuple[str, RefreshToken]:
        secret = REFRESH_MARK + secrets.token_hex(24)
        record = RefreshToken(
            token_hash=hash_refresh_token(secret),
            family_id=family.id,
            organization_id=family.organization_id,
            workspace_id=family.workspace_id,
            identifier_id=family.identifier_id,
            key_id=family.key_id,
            created_at=now,
            expires_at=now + self._refresh_ttl,
            used_at=None,
        )
        return secret, record

    def _access_token(self, family: TokenFamily, now: datetime) -> str:
        iat = int(now.timestamp())
        claims = {
            "iss": ISSUER,
            "sub": family.identifier_id,
            "org": family.organization_id,
            "ws": family.workspace_id,
            "fam": family.id,
            "key": family.key_id,
            "jti": ids.prefixed("at", 12),
            "iat": iat,
            "exp": iat + family.access_ttl_s,
        }
        return self._key.sign(claims, typ=ACCESS_TOKEN_TYPE)

    # -- refreshing --------------------------------------------------------------------------
    def refresh(self, secret: str) -> TokenPair:
        """Spend ``secret`` for a new access + refresh token in the same family."""
        if not _REFRESH_SHAPE.match(secret):
            raise Unauthorized(
                "malformed refresh token: expected the refresh_token that POST /v1/token returned"
            )
        token_hash = hash_refresh_token(secret)
        found = self._store.find_refresh_token(token_hash)
        if found is None:
            raise Unauthorized("invalid refresh token")
        record, family, key = found
        now = self._clock.now()
        if family.revoked_at is not None:
            raise Unauthorized("refresh token has been revoked; request a new token with POST /v1/token")
        if record.used_at is not None:
            self._store.revoke_family(family.id, to_micros(now))
            raise Unauthorized(_REUSED)
        if record.expires_at <= now:
            raise Unauthorized("refresh token has expired; request a new token with POST /v1/token")
        if key.revoked_at is not None:
            raise Unauthorized(f"the API key {key.key_prefix}… that issued this token has been revoked")
        successor_secret, successor = self._new_refresh_token(family, now)
        if not self._store.rotate(token_hash, to_micros(now), successor):
            # Another request spent it between our read and our write: one of the two is not the
            # legitimate client, and we cannot tell which, so both lose.
            self._store.revoke_family(family.id, to_micros(now))
            raise Unauthorized(_REUSED)
        identifier = self._tenancy.get_identifier(family.workspace_id, family.identifier_id)
        if identifier is None:  # there is no delete; only a hand-edited database gets here
            raise Unauthorized("the identifier of this token no longer exists")
        return TokenPair(self._access_token(family, now), successor_secret, family.access_ttl_s, identifier)

    # -- authenticating ----------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal:
        """The identifier principal of an access token. The token never appears in an error."""
        try:
            claims = self._key.verify(token, typ=ACCESS_TOKEN_TYPE)
        except SignatureError as exc:
            raise Unauthorized(f"invalid access token: {exc}") from None
        subject, org, ws, family_id, key_id = _claims(claims)
        now = int(self._clock.now().timestamp())
        if now >= claims["exp"]:
            raise Unauthorized("access token has expired; get a new one with POST /v1/token/refresh")
        if claims["iat"] > now + CLOCK_SKEW_S:
            raise Unauthorized("invalid access token: issued in the future")
        found = self._store.find_family(family_id)
        if found is None:
            raise Unauthorized("invalid access token: unknown token family")
        family, key = found
        if (family.identifier_id, family.organization_id, family.workspace_id, family.key_id) != (
            subject,
            org,
            ws,
            key_id,
        ):
            raise Unauthorized("invalid access token: claims do not match its token family")
        if family.revoked_at is not None:
            raise Unauthorized("access token has been revoked")
        if key.revoked_at is not None:
            raise Unauthorized(
                f"the API key {key.key_prefix}… that issued this access token has been revoked"
            )
        return _principal(family, key)


def _claims(claims: Mapping[str, Any]) -> tuple[str, str, str, str, str]:
    """The string claims an access token must carry, after checking every claim's type."""
    if claims.get("iss") != ISSUER:
        raise Unauthorized("invalid access token: wrong issuer")
    for name in ("iat", "exp"):
        value = claims.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Unauthorized(f"invalid access token: claim {name} must be an integer")
    values: list[str] = []
    for name in ("sub", "org", "ws", "fam", "key", "jti"):
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise Unauthorized(f"invalid access token: claim {name} is missing")
        values.append(value)
    return values[0], values[1], values[2], values[3], values[4]


def _principal(family: TokenFamily, key: ApiKey) -> Principal:
    return Principal(
        organization_id=family.organization_id,
        workspace_id=family.workspace_id,
        scope="identifier",
        key_id=key.id,
        key_prefix=key.key_prefix,
        key_name=key.name,
        identifier_id=family.identifier_id,
        default_source=key.default_source,
        # The issuing key's own limits bound what its identifiers do, on top of their own.
        key_limits=key.limits,
    )


__all__ = ["TokenPair", "TokenService", "hash_refresh_token", "looks_like_jwt"]
