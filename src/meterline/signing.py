"""The deployment's signing keys: Ed25519, shared by every server process, kept in a file (never in the
database), used for access tokens and receipts, and published as a JWK set.

Verification accepts exactly one algorithm, ``EdDSA``. The registry below knows no other algorithm at all,
so ``alg: none``, HMAC signed with the public key as secret ("algorithm confusion") and RSA/ECDSA tokens
are refused before any key is touched. Each kind of token has its own ``typ`` header, which ``verify``
requires, so that a receipt signed by the same key can never pass for an access token.

A deployment holds a **key set** (``SigningKeys``): one active key, which signs everything new, and the
keys it replaced, which still verify what they signed (``kid`` in the header picks the key). The file
lives in ``meterline.key_file``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwa import EdDSAAlgorithm
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

ALGORITHM = "EdDSA"
ALGORITHMS = [ALGORITHM]
# Compact JWS of our own tokens are a few hundred bytes (receipts about one kilobyte); anything far
# larger is not ours.
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


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class SignatureError(ValueError):
    """The token is not one this deployment signed (malformed, wrong algorithm, wrong key, tampered)."""


class Signer(Protocol):
    """What issues and checks tokens: one key (``SigningKey``), a key set, or the key file."""

    def sign(self, claims: Mapping[str, Any], *, typ: str) -> str: ...
    def verify(self, token: str, *, typ: str) -> dict[str, Any]: ...


class SigningKey:
    """An Ed25519 private key and its RFC 7638 thumbprint, which is its ``kid``."""

    def __init__(self, key: OKPKey) -> None:
        if key.curve_name != "Ed25519" or not key.is_private:
            raise ValueError("the signing key must be an Ed25519 private key")
        self._key = key
        self.kid = key.thumbprint()
        self.public = OKPKey.import_key(key.as_dict(private=False))
        # One encoded protected header per token type, built once: signing is on the settle path.
        self._headers: dict[str, bytes] = {}
        private = key.private_key
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError("the signing key must be an Ed25519 private key")
        self._private = private

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

    def derive_secret(self, info: bytes, length: int = 32) -> bytes:
        """``length`` bytes derived from this private key with HKDF-SHA256 for the purpose named by
        ``info``: every copy of the key gives the same bytes, which reveal neither the key nor what is
        derived for another purpose."""
        private = self._key.private_key
        assert private is not None  # a SigningKey is private by construction
        seed = private.private_bytes_raw()
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(seed)

    def public_jwk(self) -> dict[str, Any]:
        return public_jwk(self.public, self.kid)

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWK set published at ``/.well-known/jwks.json``: public parts only."""
        return {"keys": [self.public_jwk()]}

    def sign(self, claims: Mapping[str, Any], *, typ: str) -> str:
        header = {"alg": ALGORITHM, "typ": typ, "kid": self.kid}
        return jwt.encode(header, dict(claims), self._key, algorithms=ALGORITHMS, registry=_REGISTRY)

    def sign_payload(self, payload: bytes, *, typ: str) -> str:
        """A compact JWS over ``payload`` (already JSON), with this key's cached header for ``typ``.

        Byte for byte what joserfc's ``serialize_compact`` makes (Ed25519 signatures are deterministic;
        a test holds the two equal), written out here because receipts are signed inside the settle
        transaction, once per ledger row: joserfc's header validation, registry look-up and re-encoding
        of the header cost 16 µs a receipt on top of the 34 µs Ed25519 signature itself (timeit, 900-byte
        claims), a tenth of an ingested event's whole cost. Verification stays with joserfc."""
        header = self._headers.get(typ)
        if header is None:
            protected = {"alg": ALGORITHM, "typ": typ, "kid": self.kid}
            text = json.dumps(protected, ensure_ascii=True, separators=(",", ":"))
            header = self._headers[typ] = _b64(text.encode("ascii"))
        signing_input = header + b"." + _b64(payload)
        return (signing_input + b"." + _b64(self._private.sign(signing_input))).decode("ascii")

    def verify(self, token: str, *, typ: str) -> dict[str, Any]:
        """The claims of ``token`` if this key signed it with EdDSA and its ``typ`` is ``typ``."""
        return decode(token, {self.kid: self.public}.get, typ=typ)


def public_jwk(key: OKPKey, kid: str) -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": kid, "alg": ALGORITHM, "use": "sig"}


class VerifyingKeys:
    """Public Ed25519 keys by ``kid``: what checks tokens and receipts, here or anywhere else."""

    def __init__(self, keys: Iterable[tuple[str, OKPKey]]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_jwks(cls, data: Mapping[str, Any]) -> VerifyingKeys:
        """The Ed25519 keys of a JWK set (e.g. ``/.well-known/jwks.json``); keys of other types are left
        out, since nothing of ours can have been signed by them."""
        entries = data.get("keys")
        if not isinstance(entries, list):
            raise ValueError("a JWK set is an object with a 'keys' list")
        found: list[tuple[str, OKPKey]] = []
        for entry in entries:
            if not isinstance(entry, Mapping) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
                continue
            public = {name: entry[name] for name in ("kty", "crv", "x") if name in entry}
            try:
                key = OKPKey.import_key(public)
            except (JoseError, ValueError, TypeError) as exc:
                raise ValueError(f"not an Ed25519 public JWK: {exc}") from None
            kid = entry.get("kid")
            found.append((kid if isinstance(kid, str) and kid else key.thumbprint(), key))
        return cls(found)

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def items(self) -> list[tuple[str, OKPKey]]:
        return list(self._keys.items())

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        return {"keys": [public_jwk(key, kid) for kid, key in self._keys.items()]}

    def verify(self, token: str, *, typ: str) -> dict[str, Any]:
        """The claims of ``token`` if a key of this set signed it with EdDSA and its ``typ`` is ``typ``."""
        return decode(token, self._keys.get, typ=typ)


class SigningKeys:
    """A key set: the ``active`` key signs; it and every retired key verify (by ``kid``).

    Retired keys are kept as **public keys only**. Nothing is ever signed with a retired key again, so its
    private half has no use left; dropping it means that a copy of the file taken after a rotation
    cannot forge anything dated before it, and a key retired because it leaked stays harmless here.
    """

    def __init__(self, active: SigningKey, retired: Sequence[tuple[str, OKPKey]] = ()) -> None:
        self.active = active
        self.retired = [(kid, key) for kid, key in retired if kid != active.kid]
        self.verifying = VerifyingKeys([(active.kid, active.public), *self.retired])

    @property
    def kid(self) -> str:
        return self.active.kid

    def rotated(self) -> SigningKeys:
        """A new active key; the current one joins the retired keys (newest first)."""
        return SigningKeys(SigningKey.generate(), [(self.active.kid, self.active.public), *self.retired])

    def sign(self, claims: Mapping[str, Any], *, typ: str) -> str:
        return self.active.sign(claims, typ=typ)

    def verify(self, token: str, *, typ: str) -> dict[str, Any]:
        return self.verifying.verify(token, typ=typ)

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWK set published at ``/.well-known/jwks.json``: the active key first, public parts only."""
        return self.verifying.public_jwks()

    def to_json(self) -> dict[str, Any]:
        """The key file's form. A set with nothing retired is written as the bare private JWK, the form
        of every key file from before rotation existed, so older and newer servers read each other's."""
        if not self.retired:
            return self.active.private_jwk()
        return {
            "active": self.active.kid,
            "keys": [self.active.private_jwk(), *(public_jwk(key, kid) for kid, key in self.retired)],
        }

    @classmethod
    def from_json(cls, data: Any) -> SigningKeys:
        """Either a bare private JWK (one key) or ``{"active": kid, "keys": [...]}``."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if "keys" not in data:
            return cls(SigningKey.from_jwk(data))
        entries = data["keys"]
        active_kid = data.get("active")
        if not isinstance(entries, list) or not isinstance(active_kid, str):
            raise ValueError("a key set needs 'active' (a kid) and 'keys' (a list of JWKs)")
        active: SigningKey | None = None
        retired: list[tuple[str, OKPKey]] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError("every entry of 'keys' must be a JWK object")
            if entry.get("kid") == active_kid:
                active = SigningKey.from_jwk(entry)
                if active.kid != active_kid:
                    raise ValueError("the active key's kid is not its thumbprint")
            else:
                retired.extend(VerifyingKeys.from_jwks({"keys": [entry]}).items())
        if active is None:
            raise ValueError(f"the active key {active_kid!r} is not in 'keys'")
        return cls(active, retired)


def decode(token: str, key_of: Callable[[str], OKPKey | None], *, typ: str) -> dict[str, Any]:
    """The claims of a compact JWS if ``key_of(kid)`` verifies it with EdDSA and its ``typ`` is ``typ``."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise SignatureError("token is too long")
    try:
        signed = jws.extract_compact(token.encode("ascii"), registry=_REGISTRY)
        header = signed.headers()
        if header.get("alg") != ALGORITHM:  # the registry refuses it too; kept as a second lock
            raise SignatureError("algorithm is not EdDSA")
        kid = header.get("kid")
        key = key_of(kid) if isinstance(kid, str) else None
        if key is None:
            raise SignatureError("token was signed by a key this server does not know")
        if not jws.validate_compact(signed, key, algorithms=ALGORITHMS, registry=_REGISTRY):
            raise SignatureError("signature does not match")
        claims = json.loads(signed.payload or b"")
    except JoseError as exc:
        raise SignatureError(_reason(exc)) from None
    except SignatureError:
        raise
    except (ValueError, TypeError):  # UnicodeError and JSONDecodeError are ValueErrors
        raise SignatureError("token is not a compact JWS") from None
    if not isinstance(claims, dict):
        raise SignatureError("token is not a compact JWS")
    if header.get("typ") != typ:
        raise SignatureError(f"token type is not {typ}")
    return claims


def header_of(token: str) -> dict[str, Any]:
    """The protected header of a compact JWS, unverified (to show its ``kid``); {} if unreadable."""
    try:
        header = jws.extract_compact(token.encode("ascii"), registry=_REGISTRY).headers()
    except (JoseError, ValueError, TypeError):
        return {}
    return dict(header)


def _reason(exc: JoseError) -> str:
    name = getattr(exc, "error", "")
    if name == "bad_signature":
        return "signature does not match"
    if name == "unsupported_algorithm":
        return "algorithm is not EdDSA"
    return "token is not a compact JWS"


__all__ = [
    "ALGORITHM",
    "SignatureError",
    "Signer",
    "SigningKey",
    "SigningKeys",
    "VerifyingKeys",
    "decode",
    "header_of",
]
