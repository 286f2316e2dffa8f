"""Receipts without a database: claims, the chain, and verification against a JWK set (tampered payload,
wrong key, removed / reordered / inserted receipts, ``alg: none``, access tokens passed off as receipts)."""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from joserfc import jws
from joserfc.jwk import OctKey

from meterline import ids
from meterline.metering.records import LedgerRow, UsageVector
from meterline.receipts import (
    GENESIS,
    GENESIS_HASH,
    RECEIPT_TYPE,
    ChainHead,
    Notary,
    Receipt,
    link_hash,
    mismatch,
    verify_chain,
)
from meterline.signing import SigningKey, SigningKeys, VerifyingKeys

CREATED = datetime(2026, 3, 14, 9, 0, 0, tzinfo=UTC)
RECORDED = datetime(2026, 3, 14, 9, 0, 1, 250000, tzinfo=UTC)


def ledger_row(i: int, **fields: object) -> LedgerRow:
    row = LedgerRow(
        id=ids.ledger_id(),
        organization_id="org_1",
        workspace_id="ws_1",
        key_id="key_1",
        key_prefix="ml_live_a1b2c3d4",
        key_name="Default",
        identifier_id=None,
        user_id=None,
        source="api",
        endpoint="/v1/chat/completions",
        event="llm.request",
        units=1,
        run_id=None,
        metadata=None,
        model="gpt-4o-mini",
        modality="chat",
        provider="openai",
        region=None,
        billing_unit="token",
        audio_ms=None,
        prompt_tokens=1000 + i,
        completion_tokens=500,
        cache_read_tokens=0,
        cache_write_tokens=0,
        total_tokens=1500 + i,
        currency="EUR",
        list_cost_nanos=450_000 + i,
        discount_applied_pct=10,
        cost_nanos=405_000 + i,
        credits_nanos=45_000_000,
        priced=True,
        overage=False,
        failover=i % 2 == 1,
        receipt_id=ids.receipt_id(),
        idempotency_key=None,
        request_hash=None,
        created_at=CREATED,
        recorded_at=RECORDED,
    )
    return replace(row, **fields)  # type: ignore[arg-type]


def chain(keys: SigningKeys, rows: list[LedgerRow], head: ChainHead = GENESIS) -> list[Receipt]:
    made, _ = Notary(keys).extend(head, rows)
    return made


def jwks_of(keys: SigningKeys) -> dict[str, object]:
    return json.loads(json.dumps(keys.public_jwks()))  # exactly what /.well-known/jwks.json serves


def payload(receipt: Receipt) -> dict[str, object]:
    part = receipt.jws.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def keys() -> SigningKeys:
    return SigningKeys(SigningKey.generate())


@pytest.fixture
def rows() -> list[LedgerRow]:
    return [ledger_row(i) for i in range(5)]


def test_claims_are_the_rows_billable_fields_with_exact_money(keys: SigningKeys) -> None:
    row = ledger_row(0, audio_ms=12_500, billing_unit="audio_second", region="eu")
    (receipt,) = chain(keys, [row])
    claims = payload(receipt)
    assert claims == {
        "iss": "meterline",
        "jti": row.receipt_id,
        "seq": 1,
        "prev": GENESIS_HASH,
        "ledger_id": row.id,
        "organization_id": "org_1",
        "workspace_id": "ws_1",
        "key_prefix": "ml_live_a1b2c3d4",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "region": "eu",
        "modality": "chat",
        "billing_unit": "audio_second",
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "audio_seconds": "12.5",
        "units": 1,
        "event": "llm.request",
        "currency": "EUR",
        "cost": "0.000405",
        "list_cost": "0.00045",
        "discount_applied_pct": 10,
        "credits": "0.045",
        "failover": False,
        "created_at": "2026-03-14T09:00:00Z",
        "iat": int(RECORDED.timestamp()),
    }
    header = json.loads(base64.urlsafe_b64decode(receipt.jws.split(".")[0] + "=="))
    assert header == {"alg": "EdDSA", "typ": RECEIPT_TYPE, "kid": keys.kid}
    assert receipt.kid == keys.kid
    assert (receipt.id, receipt.ledger_id, receipt.seq, receipt.prev_hash) == (
        row.receipt_id,
        row.id,
        1,
        GENESIS_HASH,
    )
    assert mismatch(claims, row) is None
    assert len(GENESIS_HASH) == len(link_hash(receipt.jws)) == 43


def test_a_chain_links_each_receipt_to_the_previous_one(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    receipts = chain(keys, rows)
    assert [r.seq for r in receipts] == [1, 2, 3, 4, 5]
    assert receipts[0].prev_hash == GENESIS_HASH
    for previous, receipt in itertools.pairwise(receipts):
        assert receipt.prev_hash == previous.hash == payload(receipt)["prev"]
    report = verify_chain([r.jws for r in receipts], jwks_of(keys))
    assert report.ok
    assert (report.count, report.head) == (5, ChainHead(5, receipts[-1].hash))


def test_rows_without_a_receipt_id_get_no_receipt(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    rows[1] = replace(rows[1], receipt_id=None)
    made, head = Notary(keys).extend(ChainHead(7, "x" * 43), rows)
    assert [r.seq for r in made] == [8, 9, 10, 11]
    assert rows[1].id not in {r.ledger_id for r in made}
    assert made[0].prev_hash == "x" * 43
    assert head == ChainHead(11, made[-1].hash)
    assert Notary(keys).extend(GENESIS, [rows[1]]) == ([], GENESIS)


def test_a_chain_resumes_after_a_known_head(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    receipts = chain(keys, rows)
    later = verify_chain([r.jws for r in receipts[3:]], jwks_of(keys), start=ChainHead(3, receipts[2].hash))
    assert later.ok
    assert later.count == 2


def test_a_tampered_payload_breaks_the_signature(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    receipts = [r.jws for r in chain(keys, rows)]
    header, body, signature = receipts[2].split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["cost"] = "0.000001"
    receipts[2] = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    report = verify_chain(receipts, jwks_of(keys))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.receipt_id) == (3, rows[2].receipt_id)
    assert report.broken.reason == "signature does not match"
    assert report.count == 2


def test_a_receipt_signed_by_another_key_is_refused(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    good = chain(keys, rows[:2])
    stranger = SigningKeys(SigningKey.generate())
    forged = chain(stranger, rows[2:3], ChainHead(2, good[-1].hash))
    report = verify_chain([r.jws for r in [*good, *forged]], jwks_of(keys))
    assert report.broken is not None
    assert report.broken.seq == 3
    assert "key this server does not know" in report.broken.reason
    # The same kid with another key's signature (a forged header) fails on the signature itself.
    header, body, _ = forged[0].jws.split(".")
    header_claims = json.loads(base64.urlsafe_b64decode(header + "=="))
    fake_header = _b64(json.dumps({**header_claims, "kid": keys.kid}).encode())
    signature = stranger.active.sign_payload(b"x", typ=RECEIPT_TYPE).split(".")[2]
    report = verify_chain([*(r.jws for r in good), f"{fake_header}.{body}.{signature}"], jwks_of(keys))
    assert report.broken is not None
    assert report.broken.reason == "signature does not match"


def test_a_removed_receipt_breaks_the_chain(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    receipts = [r.jws for r in chain(keys, rows)]
    del receipts[1]
    report = verify_chain(receipts, jwks_of(keys))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.receipt_id) == (2, rows[2].receipt_id)
    assert "expected seq 2, found seq 3" in report.broken.reason


def test_reordered_receipts_break_the_chain(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    receipts = [r.jws for r in chain(keys, rows)]
    receipts[2], receipts[3] = receipts[3], receipts[2]
    report = verify_chain(receipts, jwks_of(keys))
    assert report.broken is not None
    assert (report.broken.seq, report.broken.receipt_id) == (3, rows[3].receipt_id)


def test_a_receipt_from_a_forked_chain_breaks_the_prev_link(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    receipts = chain(keys, rows)
    # Validly signed, right seq, but chained to a different history (what a second writer would make).
    fork = chain(keys, [ledger_row(9)], ChainHead(2, "B" * 43))
    report = verify_chain([receipts[0].jws, receipts[1].jws, fork[0].jws], jwks_of(keys))
    assert report.broken is not None
    assert report.broken.seq == 3
    assert "prev" in report.broken.reason


def test_a_chain_of_two_organizations_is_refused(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    first = chain(keys, rows[:1])
    other = chain(keys, [ledger_row(1, organization_id="org_2")], ChainHead(1, first[0].hash))
    report = verify_chain([first[0].jws, other[0].jws], jwks_of(keys))
    assert report.broken is not None
    assert "another organization" in report.broken.reason
    assert not verify_chain([first[0].jws], jwks_of(keys), organization_id="org_2").ok


def test_alg_none_and_other_algorithms_are_refused(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    (receipt,) = chain(keys, rows[:1])
    _, body, _ = receipt.jws.split(".")
    for alg in ("none", "HS256", "RS256"):
        header = _b64(json.dumps({"alg": alg, "typ": RECEIPT_TYPE, "kid": keys.kid}).encode())
        report = verify_chain([f"{header}.{body}."], jwks_of(keys))
        assert report.broken is not None
        assert report.broken.reason == "algorithm is not EdDSA", alg
    # HMAC with the public key as the secret (algorithm confusion) never gets as far as a key.
    public_x = keys.public_jwks()["keys"][0]["x"]
    hs = jws.serialize_compact(
        {"alg": "HS256", "typ": RECEIPT_TYPE, "kid": keys.kid},
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)),
        OctKey.import_key(public_x.encode()),
        algorithms=["HS256"],
    )
    assert not verify_chain([hs], jwks_of(keys)).ok


def test_access_tokens_and_receipts_never_pass_for_each_other(
    keys: SigningKeys, rows: list[LedgerRow]
) -> None:
    (receipt,) = chain(keys, rows[:1])
    token = keys.sign(payload(receipt), typ="at+jwt")
    report = verify_chain([token], jwks_of(keys))
    assert report.broken is not None
    assert report.broken.reason == f"token type is not {RECEIPT_TYPE}"
    with pytest.raises(ValueError, match="type"):
        keys.verify(receipt.jws, typ="at+jwt")


@pytest.mark.parametrize("garbage", ["", "a.b.c", "not a jws", "é.é.é", "x" * 5000, "a.b"])
def test_garbage_is_a_broken_link_not_a_crash(keys: SigningKeys, garbage: str) -> None:
    report = verify_chain([garbage], jwks_of(keys))
    assert report.broken is not None
    assert report.broken.seq == 1
    assert report.broken.receipt_id is None


def test_mismatch_names_the_edited_ledger_field(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    (receipt,) = chain(keys, rows[:1])
    claims = payload(receipt)
    assert mismatch(claims, rows[0]) is None
    edited = mismatch(claims, replace(rows[0], cost_nanos=rows[0].cost_nanos + 1))
    assert edited == "ledger row cost is '0.000405001' but the receipt says '0.000405'"
    assert "failover" in (mismatch(claims, replace(rows[0], failover=True)) or "")
    assert "names receipt" in (mismatch(claims, replace(rows[0], receipt_id="other")) or "")
    # A JSON 1 is not a JSON true.
    assert mismatch({**claims, "failover": 0}, rows[0]) is not None


def test_the_usage_vector_is_attested_and_a_row_without_it_claims_what_it_did_before(
    keys: SigningKeys, rows: list[LedgerRow]
) -> None:
    plain = payload(chain(keys, rows[:1])[0])
    assert not {"cache_write_1h_tokens", "web_searches", "service_tier", "batch"} & set(plain)
    detailed = replace(
        rows[0], usage=UsageVector(cache_write_1h_tokens=7, web_searches=2, service_tier="flex")
    )
    claims = payload(chain(keys, [detailed])[0])
    assert (claims["cache_write_1h_tokens"], claims["web_searches"], claims["service_tier"]) == (7, 2, "flex")
    assert "reasoning_tokens" not in claims  # zero parts are not claimed
    assert mismatch(claims, detailed) is None
    # A row edited to drop or change a part it was billed for no longer matches its receipt.
    assert "web_searches" in (
        mismatch(claims, replace(detailed, usage=UsageVector(cache_write_1h_tokens=7))) or ""
    )
    assert "cache_write_1h_tokens" in (mismatch(claims, rows[0]) or "")


def test_verifying_keys_come_from_any_jwk_set() -> None:
    key = SigningKey.generate()
    jwks = {"keys": [{"kty": "RSA", "n": "x", "e": "AQAB", "kid": "rsa"}, key.public_jwk()]}
    verifying = VerifyingKeys.from_jwks(jwks)
    assert verifying.kids == [key.kid]
    assert verifying.verify(key.sign({"a": 1}, typ="t"), typ="t") == {"a": 1}
    with pytest.raises(ValueError, match="keys"):
        VerifyingKeys.from_jwks({"nope": []})


def test_a_receipt_is_the_compact_jws_joserfc_makes(keys: SigningKeys, rows: list[LedgerRow]) -> None:
    """Receipts are signed without joserfc's per-call work; the bytes must be exactly what it makes
    (Ed25519 is deterministic), so any JOSE library verifies them."""
    from meterline.signing import _REGISTRY, ALGORITHMS

    receipt = Notary(keys).extend(GENESIS, rows[:1])[0][0]
    _, payload_b64, _ = receipt.jws.split(".")
    payload = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
    header = {"alg": "EdDSA", "typ": RECEIPT_TYPE, "kid": keys.active.kid}
    expected = jws.serialize_compact(
        header, payload, keys.active._key, algorithms=ALGORITHMS, registry=_REGISTRY
    )
    assert receipt.jws == expected
    assert jws.deserialize_compact(receipt.jws, keys.active.public, algorithms=ALGORITHMS, registry=_REGISTRY)
