"""Secrets at rest: AES-256-GCM under the deployment's data keys, which live in the key file beside the
signing keys (``meterline.key_file``), never in the database.

A sealed value is text, ``enc:v1:<kid>:<base64url(nonce ‖ ciphertext ‖ tag)>``: ``kid`` names the data key
that sealed it, so after a rotation (a new active key; the older ones kept) every value still opens.
Each value is sealed for a ``context`` (where it is stored, e.g. one webhook endpoint's row), bound in
as associated data together with the key id: a value copied into another row, or given another key id,
does not open. A database dump alone therefore reveals nothing of what is sealed.

Older data keys keep their secret half (unlike retired signing keys): they must still decrypt.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "enc:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
ALGORITHM = "A256GCM"
_KID_SHAPE = re.compile(r"[0-9a-z]{4,22}\Z")


class SealError(ValueError):
    """A sealed value that cannot be opened: unknown key, altered, sealed for another place, or not ours."""


class MissingDataKey(SealError):
    """Sealed with a data key the key file does not hold (``kid``): a wrong or older copy of the file is in
    place. Unlike an altered value, this is repaired by putting the right file back."""

    def __init__(self, kid: str) -> None:
        super().__init__(f"the key file has no data key {kid!r} (replaced by an older copy?)")
        self.kid = kid


class SecretBox(Protocol):
    """What seals and opens secrets at rest: a ``DataKeys`` set, or the reloading ``KeyFile``."""

    @property
    def sealing_kid(self) -> str: ...
    def seal(self, plaintext: bytes, *, context: str) -> str: ...
    def unseal(self, sealed: str, *, context: str) -> bytes: ...


def is_sealed(text: str) -> bool:
    return text.startswith(PREFIX)


class DataKey:
    """A 256-bit AES-GCM key and its id (random, short: sealed values carry it)."""

    __slots__ = ("_aead", "_secret", "kid")

    def __init__(self, kid: str, secret: bytes) -> None:
        if not _KID_SHAPE.match(kid):
            raise ValueError(f"a data key id is 4-22 lowercase letters or digits, not {kid!r}")
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes, not {len(secret)}")
        self.kid = kid
        self._secret = secret
        self._aead = AESGCM(secret)

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_hex(6), secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_jwk(cls, data: Mapping[str, Any]) -> DataKey:
        kid, k = data.get("kid"), data.get("k")
        if data.get("kty") != "oct" or not isinstance(kid, str) or not isinstance(k, str):
            raise ValueError("expected a symmetric JWK (kty oct, with kid and k)")
        return cls(kid, _b64decode(k))

    def to_jwk(self) -> dict[str, str]:
        return {"kty": "oct", "kid": self.kid, "alg": ALGORITHM, "use": "enc", "k": _b64encode(self._secret)}

    def seal(self, plaintext: bytes, *, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, self._associated(context))
        return f"{PREFIX}{self.kid}:{_b64encode(nonce + sealed)}"

    def unseal_body(self, body: bytes, *, context: str) -> bytes:
        try:
            return self._aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], self._associated(context))
        except InvalidTag:
            raise SealError(
                f"the value does not open with data key {self.kid}: altered, or sealed for another row"
            ) from None

    def _associated(self, context: str) -> bytes:
        return f"{PREFIX}{self.kid}:{context}".encode()


class DataKeys:
    """A data key set: the ``active`` key seals; it and every older key open (by ``kid``)."""

    def __init__(self, active: DataKey, older: Sequence[DataKey] = ()) -> None:
        self.active = active
        self.older = [key for key in older if key.kid != active.kid]
        self._by_kid = {key.kid: key for key in (active, *self.older)}

    @classmethod
    def generate(cls) -> DataKeys:
        return cls(DataKey.generate())

    @property
    def sealing_kid(self) -> str:
        return self.active.kid

    @property
    def kids(self) -> list[str]:
        return list(self._by_kid)

    def rotated(self) -> DataKeys:
        """A new active key; the current one joins the older keys (newest first)."""
        fresh = DataKey.generate()
        while fresh.kid in self._by_kid:  # 48 random bits: practically never
            fresh = DataKey.generate()
        return DataKeys(fresh, [self.active, *self.older])

    def seal(self, plaintext: bytes, *, context: str) -> str:
        return self.active.seal(plaintext, context=context)

    def unseal(self, sealed: str, *, context: str) -> bytes:
        if not is_sealed(sealed):
            raise SealError("not a sealed value")
        kid, _, encoded = sealed.removeprefix(PREFIX).partition(":")
        key = self._by_kid.get(kid)
        if key is None:
            raise MissingDataKey(kid)
        try:
            body = _b64decode(encoded)
        except ValueError:
            raise SealError("a sealed value whose body is not base64url") from None
        if len(body) < NONCE_BYTES + TAG_BYTES:
            raise SealError("a sealed value too short to be one")
        return key.unseal_body(body, context=context)

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active.kid, "keys": [self.active.to_jwk(), *(k.to_jwk() for k in self.older)]}

    @classmethod
    def from_json(cls, data: Any) -> DataKeys:
        """``{"active": kid, "keys": [symmetric JWKs, newest first]}``."""
        if not isinstance(data, dict):
            raise ValueError("the data keys are an object")
        entries, active_kid = data.get("keys"), data.get("active")
        if not isinstance(entries, list) or not isinstance(active_kid, str):
            raise ValueError("the data keys need 'active' (a kid) and 'keys' (a list of JWKs)")
        keys = [DataKey.from_jwk(entry) if isinstance(entry, dict) else None for entry in entries]
        found = [key for key in keys if key is not None]
        if len(found) != len(entries):
            raise ValueError("every data key must be a JWK object")
        active = next((key for key in found if key.kid == active_kid), None)
        if active is None:
            raise ValueError(f"the active data key {active_kid!r} is not in 'keys'")
        return cls(active, found)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


__all__ = ["PREFIX", "DataKey", "DataKeys", "MissingDataKey", "SealError", "SecretBox", "is_sealed"]
