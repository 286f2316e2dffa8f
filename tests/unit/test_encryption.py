"""Sealing secrets at rest (AES-256-GCM under a data key from the key file): round trip, binding to one
row, tampering, rotation, the key file's form of the keys, and the webhook secret's sealed size."""

from __future__ import annotations

import base64

import pytest

from meterline.alerts.delivery import new_secret, secret_bytes, secret_from_bytes
from meterline.encryption import PREFIX, DataKey, DataKeys, SealError, is_sealed

ROW = "webhook_endpoints.secret:we_0123456789abcdef"


def test_a_sealed_value_opens_only_for_its_row() -> None:
    keys = DataKeys.generate()
    sealed = keys.seal(b"the secret", context=ROW)
    assert is_sealed(sealed)
    assert sealed.startswith(f"{PREFIX}{keys.sealing_kid}:")
    assert b"the secret" not in sealed.encode()
    assert keys.unseal(sealed, context=ROW) == b"the secret"
    assert keys.seal(b"the secret", context=ROW) != sealed  # a fresh nonce each time
    with pytest.raises(SealError, match="sealed for another row"):
        keys.unseal(sealed, context="webhook_endpoints.secret:we_other")


def test_an_altered_value_does_not_open() -> None:
    keys = DataKeys.generate()
    sealed = keys.seal(b"the secret", context=ROW)
    head, body = sealed.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-1] ^= 1
    flipped = head + ":" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(SealError, match="altered"):
        keys.unseal(flipped, context=ROW)
    for broken, reason in (
        ("whsec_abc", "not a sealed value"),
        (f"{PREFIX}{keys.sealing_kid}:***", "not base64url"),
        (f"{PREFIX}{keys.sealing_kid}:AAAA", "too short"),
        (sealed.replace(keys.sealing_kid, "0000aaaa"), "no data key '0000aaaa'"),
    ):
        with pytest.raises(SealError, match=reason):
            keys.unseal(broken, context=ROW)


def test_another_keys_value_does_not_open_even_under_the_same_kid() -> None:
    mine = DataKeys.generate()
    theirs = DataKeys(DataKey(mine.sealing_kid, bytes(32)))
    with pytest.raises(SealError, match="altered"):
        theirs.unseal(mine.seal(b"x", context=ROW), context=ROW)


def test_rotation_seals_with_the_new_key_and_still_opens_the_old() -> None:
    first = DataKeys.generate()
    old = first.seal(b"old", context=ROW)
    second = first.rotated()
    third = second.rotated()
    assert len({first.sealing_kid, second.sealing_kid, third.sealing_kid}) == 3
    assert [k.kid for k in third.older] == [second.sealing_kid, first.sealing_kid]  # newest first
    assert third.unseal(old, context=ROW) == b"old"
    new = third.seal(b"new", context=ROW)
    assert new.startswith(f"{PREFIX}{third.sealing_kid}:")
    # A set that never had the old key (the key file lost it) says which key is missing.
    with pytest.raises(SealError, match=f"no data key '{first.sealing_kid}'"):
        DataKeys.generate().unseal(old, context=ROW)


def test_the_key_file_form_round_trips_and_refuses_what_is_not_a_key_set() -> None:
    keys = DataKeys.generate().rotated()
    data = keys.to_json()
    assert data["active"] == keys.sealing_kid
    assert [k["kid"] for k in data["keys"]] == keys.kids
    assert all(set(k) == {"kty", "kid", "alg", "use", "k"} and k["kty"] == "oct" for k in data["keys"])
    again = DataKeys.from_json(data)
    assert again.kids == keys.kids
    assert again.unseal(keys.seal(b"x", context=ROW), context=ROW) == b"x"
    for broken in (
        [],
        {**data, "active": "missing0"},
        {**data, "keys": "nope"},
        {**data, "keys": [*data["keys"], "nope"]},
        {**data, "keys": [{**data["keys"][0], "k": "c2hvcnQ"}]},  # not 32 bytes
        {**data, "keys": [{**data["keys"][0], "kty": "OKP"}]},
        {**data, "keys": [{**data["keys"][0], "kid": "Bad Kid!"}]},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each says what is wrong
            DataKeys.from_json(broken)


def test_a_sealed_webhook_secret_fits_its_column() -> None:
    secret = new_secret()
    raw = secret_bytes(secret)
    assert len(raw) == 24
    assert secret_from_bytes(raw) == secret
    sealed = DataKeys.generate().seal(raw, context=ROW)
    assert len(sealed) <= 100  # webhook_endpoints.secret is VARCHAR(100): no migration needed
    for not_a_secret in (
        "",
        "whsec_",
        "whsec_***",
        "sk_" + secret,
        secret + "=",
        secret.replace("whsec_", ""),
    ):
        with pytest.raises(ValueError, match="not a whsec_"):
            secret_bytes(not_a_secret)
