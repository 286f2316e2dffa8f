"""Dashboard sessions: signing in with an API key, the session cookie, and CSRF tokens for forms.

* The session cookie holds no secret of the key: it is a token signed with the deployment's signing
  key set (the one every process shares, so any process behind a load balancer can read it), of its own
  type so that no receipt or access token can pass for it. It names the key by id; the key is looked up
  on every request, so revoking it ends its sessions at once.
* The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Lax`` (not sent with cross-site POSTs,
  yet still sent when a link to the dashboard is followed), ``Secure`` on HTTPS, and lives 8 hours.
* Every form POST carries a CSRF token that must match: the session's own token once signed in, and a
  double-submit cookie (``SameSite=Strict``) for the sign-in form itself. A request whose ``Origin``
  names another site is refused outright.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response

from meterline.errors import Forbidden, Unauthorized
from meterline.services import Services
from meterline.signing import SignatureError
from meterline.tenancy import Principal
from meterline.tenancy.keys import looks_like_key
from meterline.tenancy.tokens import looks_like_jwt

SESSION_COOKIE = "meterline_session"
SIGN_IN_CSRF_COOKIE = "meterline_csrf"
SESSION_TYPE = "meterline-session+jwt"
SESSION_TTL_S = 8 * 3600
COOKIE_PATH = "/"
_ISSUER = "meterline-dashboard"


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    csrf: str


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def check_origin(request: Request) -> None:
    """Refuse a form POST sent from another site (defence in depth on top of the CSRF token)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return
    expected = f"{request.url.scheme}://{request.url.netloc}"
    if origin != expected:
        raise Forbidden("this form can only be sent from the dashboard's own pages")


def sign_in(services: Services, secret: str) -> tuple[str, Session]:
    """Open a session with an organization or workspace API key: the cookie value and the session."""
    secret = secret.strip()
    if looks_like_jwt(secret):
        raise Unauthorized("sign in with an organization or workspace API key, not an access token")
    if not looks_like_key(secret):
        raise Unauthorized("that is not a Meterline API key: keys start with ml_live_")
    principal = services.tenancy.authenticate(secret)
    now = int(services.clock.now().timestamp())
    csrf = new_csrf_token()
    claims = {
        "iss": _ISSUER,
        "key": principal.key_id,
        "org": principal.organization_id,
        "csrf": csrf,
        "iat": now,
        "exp": now + SESSION_TTL_S,
    }
    token = services.signing_keys.sign(claims, typ=SESSION_TYPE)
    return token, Session(principal, csrf)


def read_session(request: Request, services: Services) -> Session | None:
    """The session of the request's cookie; None when there is none or it is no longer valid."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 4096:
        return None
    try:
        claims = services.signing_keys.verify(token, typ=SESSION_TYPE)
    except SignatureError:
        return None
    if not _valid_claims(claims, int(services.clock.now().timestamp())):
        return None
    try:
        principal = services.tenancy.principal_of_key(claims["key"])
    except Unauthorized:
        return None
    if principal.organization_id != claims["org"]:
        return None
    if request.headers.get("x-workspace-id") is not None:
        # The JSON routes let an organization key narrow its view with this header; a session has
        # no use for it, and refusing it keeps the session's scope exactly the key's.
        raise Forbidden("X-Workspace-Id is not accepted with a dashboard session", param="X-Workspace-Id")
    request.state.organization_id = principal.organization_id
    return Session(principal, claims["csrf"])


def _valid_claims(claims: dict[str, Any], now: int) -> bool:
    if claims.get("iss") != _ISSUER:
        return False
    for name in ("iat", "exp"):
        value = claims.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            return False
    if not claims["iat"] - 300 <= now < claims["exp"]:
        return False
    return all(isinstance(claims.get(name), str) and claims[name] for name in ("key", "org", "csrf"))


def set_session_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax", secure=_secure(request)
    )


def sign_in_csrf(request: Request) -> str:
    """The sign-in form's token: the one already in the browser's cookie, else a new one."""
    existing = request.cookies.get(SIGN_IN_CSRF_COOKIE)
    if existing and 16 <= len(existing) <= 64 and existing.replace("-", "").replace("_", "").isalnum():
        return existing
    return new_csrf_token()


def set_sign_in_csrf_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SIGN_IN_CSRF_COOKIE,
        token,
        max_age=3600,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
