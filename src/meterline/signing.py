"""The deployment's signing key: one Ed25519 key shared by every server process, kept in a file (never in
the database), used for access tokens now and for receipts later, and published as a JWK set.

Verification accepts exactly one algorithm, ``EdDSA``. The registry below knows no other algorithm at all,
so ``alg: none``, HMAC signed with the public key as secret ("algorithm confusion") and RSA/ECDSA tokens
are refused before any key is touched. Each kind of token has its own ``typ`` header, which ``verify``
requires, so that a receipt signed by the same key can never pass for an access token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwa import EdDSAAlgorithm
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

from meterline.errors import ConfigError

ALGORITHM = "EdDSA"
ALGORITHMS = [ALGORITHM]
# Compact JWS of our own tokens are a few hundred bytes; anything far larger is not ours.
MAX_TOKEN_LENGTH = 4096


class _EdDSA(EdDSAAlgorithm):
    # joserfc warns on every use of "EdDSA" because RFC 9864 prefers the fully specified "Ed25519" name;
    # verifiers in the wild (and SPEC §5's receipts) still speak "EdDSA", and the key is pinned to Ed25519
    # by ``SigningKey`` itself, so the polymorphism the RFC worries about cannot arise here.
    security_warning = None  # type: ignore[assignment]  # joserfc's base class allows None


class _Registry(JWSRegistry):
    # joserfc looks algorithms up in a class-level table: this one holds EdDSA and nothing else.
    algorithms = {ALGORITHM: _EdDSA()}
    recommended: list[str] = []


_REGISTRY = _Registry(algorithms=ALGORITHMS)


class SignatureError(ValueError):
    """The token is not one this deployment signed (malformed, wrong algorithm, wrong key, tampered)."""


class SigningKey:
    """An Ed25519 private key and its RFC 7638 thumbprint, which is its ``kid``."""

    def __init__(self, key: OKPKey) -> None:
        if key.curve_name != "Ed25519" or not key.is_private:
            raise ValueError("the signing key must be an Ed25519 private key")
        self._key = key
        self.kid = key.thumbprint()
        self._public = OKPKey.import_key(key.as_dict(private=False))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(OKPKey.generate_key("Ed25519"))

    @classmethod
    def from_jwk(cls, data: Mapping[str, Any]) -> SigningKey:
        if data.get("kty") != "OKP" or data.get("crv") != "Ed25519" or not data.get("d"):
            raise ValueError("expected an Ed25519 private JWK (kty OKP, crv Ed25519, with d)")
        return cls(OKPKey.import_key(dict(data)))

    def private_jwk(self) -> dict[str, Any]:
        return {**self._key.as_dict(private=True), "kid": self.kid, "alg": ALGORITHM, "use": "sig"}

    def public_jwk(self) -> dict[str, Any]:
        return {**self._public.as_dict(private=False), "kid": self.kid, "alg": ALGORITHM, "use": "sig"}

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWK set published at ``/.well-known/jwks.json``: public parts only."""
        return {"keys": [self.public_jwk()]}

    def sign(self, claims: Mapping[str, Any], *, typ: str) -> str:
        header = {"alg": ALGORITHM, "typ": typ, "kid": self.kid}
        return jwt.encode(header, dict(claims), self._key, algorithms=ALGORITHMS, registry=_REGISTRY)

    def verify(self, token: str, *, typ: str) -> dict[str, Any]:
        """The claims of ``token`` if this key signed it with EdDSA and its ``typ`` is ``typ``."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise SignatureError("token is too long")
        try:
            decoded = jwt.decode(token, self._public, algorithms=ALGORITHMS, registry=_REGISTRY)
        except JoseError as exc:
            raise SignatureError(_reason(exc)) from None
        except (ValueError, TypeError):
            raise SignatureError("token is not a compact JWS") from None
        header = decoded.header
        if header.get("alg") != ALGORITHM:  # already enforced by the registry; kept as a second lock
            raise SignatureError("algorithm is not EdDSA")
        if header.get("kid") != self.kid:
            raise SignatureError("token was signed by a key this server does not know")
        if header.get("typ") != typ:
            raise SignatureError(f"token type is not {typ}")
        return decoded.claims


def _reason(exc: JoseError) -> str:
    name = getattr(exc, "error", "")
    if name == "bad_signature":
        return "signature does not match"
    if name == "unsupported_algorithm":
        return "algorithm is not EdDSA"
    return "token is not a compact JWS"


def load_or_create_signing_key(path: str | Path) -> SigningKey:
    """The key in ``path``; if there is none yet, a new one written there (mode 0600).

    Several processes may start at once on a fresh machine. Each writes its candidate to a private
    temporary file and publishes it with ``link``, which fails if the name exists: exactly one candidate
    wins, nobody ever reads a half-written file, and the losers read the winner's key.
    """
    file = Path(path)
    existing = _read(file)
    if existing is not None:
        return existing
    candidate = SigningKey.generate()
    text = json.dumps(candidate.private_jwk(), sort_keys=True) + "\n"
    temp = file.with_name(f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow the mode; this makes it exact
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        # If another process published its key first, link fails and we use theirs.
        with contextlib.suppress(FileExistsError):
            os.link(temp, file)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot create the signing key file: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    found = _read(file)
    if found is None:
        raise ConfigError(f"{file}: the signing key file disappeared while it was being created")
    return found


def _read(file: Path) -> SigningKey | None:
    try:
        raw = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read the signing key file: {exc}") from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return SigningKey.from_jwk(data)
    except (ValueError, TypeError, JoseError) as exc:
        raise ConfigError(f"{file}: not an Ed25519 private JWK: {exc}") from None


__all__ = [
    "ALGORITHM",
    "SignatureError",
    "SigningKey",
    "load_or_create_signing_key",
]
