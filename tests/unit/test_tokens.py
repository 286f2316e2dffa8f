"""The deployment signing key (file, permissions, races, algorithm pinning) and ``TokenService`` against
real stores on every backend: rotation race, claim checks, expiry, and errors that never hold a secret."""

from __future__ import annotations

import base64
import json
import multiprocessing
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jwt
from joserfc.jwk import RSAKey

from meterline.clock import FrozenClock, to_micros
from meterline.errors import ConfigError, Forbidden, InvalidRequest, Unauthorized
from meterline.key_file import load_or_create_signing_key
from meterline.services import Services
from meterline.signing import SignatureError, SigningKey
from meterline.storage.token_store import SqlTokenStore
from meterline.tenancy import Principal
from meterline.tenancy.tokens import TokenPair, TokenService, hash_refresh_token, looks_like_jwt


# -- the key file ------------------------------------------------------------------------------------
def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    first = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    (jwk,) = data["keys"]
    assert data["active"] == first.kid
    assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("OKP", "Ed25519", first.kid)
    assert "d" in jwk
    assert "data_keys" in data  # beside it, the keys that encrypt secrets at rest (test_key_file.py)
    second = load_or_create_signing_key(path)
    assert second.kid == first.kid
    token = first.sign({"a": 1}, typ="test")
    assert second.verify(token, typ="test") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["key.json"]  # no temporary file left behind


def test_public_key_set_has_no_private_part(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "key.json")
    (published,) = key.public_jwks()["keys"]
    assert set(published) == {"kty", "crv", "x", "kid", "alg", "use"}


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[]",
        '{"kty": "oct", "k": "c2VjcmV0"}',
        '{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}',
    ],
)
def test_a_bad_key_file_is_a_config_error_naming_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "key.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"key\.json"):
        load_or_create_signing_key(path)


def test_unwritable_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        load_or_create_signing_key(tmp_path / "missing-dir" / "key.json")


def test_threads_racing_to_create_the_key_agree(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    start = threading.Barrier(8)

    def create(_: int) -> str:
        start.wait()
        return load_or_create_signing_key(path).kid

    with ThreadPoolExecutor(8) as pool:
        kids = set(pool.map(create, range(8)))
    assert len(kids) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["key.json"]


def _create_in_process(path: str, start: Any, results: Any) -> None:
    start.wait()
    results.put(load_or_create_signing_key(path).kid)


def test_processes_racing_to_create_the_key_agree(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    path = str(tmp_path / "key.json")
    start = context.Barrier(4)
    results = context.Queue()
    workers = [context.Process(target=_create_in_process, args=(path, start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    kids = {results.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len(kids) == 1
    assert kids == {load_or_create_signing_key(path).kid}


# -- algorithm pinning -------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _part(data: dict[str, Any]) -> str:
    return _b64(json.dumps(data).encode())


def test_verify_accepts_only_eddsa_by_this_key() -> None:
    key = SigningKey.generate()
    claims = {"sub": "x"}
    header = {"typ": "t", "kid": key.kid}
    assert key.verify(key.sign(claims, typ="t"), typ="t") == claims

    unsigned = f"{_part({**header, 'alg': 'none'})}.{_part(claims)}."
    rsa = jwt.encode({**header, "alg": "RS256"}, claims, RSAKey.generate_key(2048), algorithms=["RS256"])
    signing_input = f"{_part({**header, 'alg': 'EdDSA'})}.{_part(claims)}"
    stranger = f"{signing_input}.{_b64(Ed25519PrivateKey.generate().sign(signing_input.encode()))}"
    for token in (unsigned, rsa, stranger, "a.b.c", "", "x" * 10_000):
        with pytest.raises(SignatureError):
            key.verify(token, typ="t")
    # The same key signs other kinds of token (receipts): the type keeps them apart.
    with pytest.raises(SignatureError, match="type"):
        key.verify(key.sign(claims, typ="receipt+jwt"), typ="t")


def test_jwt_shape() -> None:
    assert looks_like_jwt("a.b.c")
    assert looks_like_jwt("a.b.")  # alg none: refused later, as an access token
    for credential in ("ml_live_" + "0" * 48, "a.b", "a.b.c.d", "a..c", "a b.c.d", ""):
        assert not looks_like_jwt(credential)


# -- TokenService on real stores ---------------------------------------------------------------------
@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def tokens(services: Services, clock: FrozenClock, key: SigningKey) -> TokenService:
    return TokenService(SqlTokenStore(services.db), services.tenancy, key, clock)


@pytest.fixture
def principal(services: Services) -> Principal:
    org = services.tenancy.create_organization("Acme", "pro")
    ws = services.tenancy.create_workspace(org.id, "Main")
    return services.tenancy.authenticate(services.tenancy.create_key(ws.id, "Default").secret)


def test_refresh_race_has_exactly_one_winner(tokens: TokenService, principal: Principal) -> None:
    pair = tokens.issue(principal, principal.workspace_id, "user-1")
    start = threading.Barrier(6)

    def attempt(_: int) -> TokenPair | Unauthorized:
        start.wait()
        try:
            return tokens.refresh(pair.refresh_token)
        except Unauthorized as exc:
            return exc

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(attempt, range(6)))
    winners = [o for o in outcomes if isinstance(o, TokenPair)]
    assert len(winners) == 1
    # The losers looked like reuse, so the family is revoked: the winner's pair is dead too.
    with pytest.raises(Unauthorized):
        tokens.refresh(winners[0].refresh_token)
    with pytest.raises(Unauthorized, match="revoked"):
        tokens.authenticate(winners[0].access_token)


def test_authenticate_gives_an_identifier_principal(tokens: TokenService, principal: Principal) -> None:
    pair = tokens.issue(principal, principal.workspace_id, "user-1", limits={"daily_tokens": 10})
    assert pair.identifier.limits == {"daily_tokens": 10}
    who = tokens.authenticate(pair.access_token)
    assert who == Principal(
        organization_id=principal.organization_id,
        workspace_id=principal.workspace_id,
        scope="identifier",
        key_id=principal.key_id,
        key_prefix=principal.key_prefix,
        key_name="Default",
        identifier_id="user-1",
        default_source=None,
    )


def test_lifetimes(tokens: TokenService, principal: Principal, clock: FrozenClock) -> None:
    pair = tokens.issue(principal, principal.workspace_id, "user-1", expires_in=3600)
    clock.advance(seconds=3599)
    tokens.authenticate(pair.access_token)
    clock.advance(seconds=1)
    with pytest.raises(Unauthorized, match="expired"):
        tokens.authenticate(pair.access_token)
    clock.advance(days=30, seconds=-3600)
    with pytest.raises(Unauthorized, match="expired"):
        tokens.refresh(pair.refresh_token)


@pytest.mark.parametrize("expires_in", [0, 59, 86_401, -1])
def test_expires_in_range(tokens: TokenService, principal: Principal, expires_in: int) -> None:
    with pytest.raises(InvalidRequest, match="expires_in"):
        tokens.issue(principal, principal.workspace_id, "user-1", expires_in=expires_in)


def test_identifier_principals_cannot_issue(tokens: TokenService, principal: Principal) -> None:
    pair = tokens.issue(principal, principal.workspace_id, "user-1")
    with pytest.raises(Forbidden):
        tokens.issue(tokens.authenticate(pair.access_token), principal.workspace_id, "user-2")
    with pytest.raises(Forbidden):
        tokens.issue(principal, "ws_other", "user-2")


def _signed(key: SigningKey, pair: TokenPair, change: Callable[[dict[str, Any]], None]) -> str:
    payload = pair.access_token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    change(claims)
    return key.sign(claims, typ="at+jwt")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c.pop("fam"), "fam"),
        (lambda c: c.update(fam="tfam_unknown"), "unknown token family"),
        (lambda c: c.update(sub="user-2"), "do not match"),
        (lambda c: c.update(iss="someone"), "issuer"),
        (lambda c: c.update(exp=str(c["exp"])), "exp"),
        (lambda c: c.update(iat=True), "iat"),
        (lambda c: c.update(iat=c["iat"] + 3600), "future"),
        (lambda c: c.update(sub=""), "sub"),
    ],
)
def test_signed_but_wrong_claims_are_refused(
    tokens: TokenService,
    principal: Principal,
    key: SigningKey,
    change: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    """Even with a valid signature (say, a future bug that signs what it should not), claims are checked."""
    pair = tokens.issue(principal, principal.workspace_id, "user-1")
    with pytest.raises(Unauthorized, match=reason):
        tokens.authenticate(_signed(key, pair, change))


def test_errors_never_contain_a_secret(
    tokens: TokenService, principal: Principal, services: Services, clock: FrozenClock
) -> None:
    pair = tokens.issue(principal, principal.workspace_id, "user-1")
    messages = []
    head, payload, signature = pair.access_token.split(".")
    flipped = "B" if signature[0] == "A" else "A"
    tampered = f"{head}.{payload}.{flipped}{signature[1:]}"
    other_secret = pair.refresh_token[:-1] + ("1" if pair.refresh_token.endswith("0") else "0")
    for attempt in (
        lambda: tokens.authenticate(tampered),
        lambda: tokens.refresh(other_secret),
        lambda: tokens.refresh(pair.refresh_token + "x"),
    ):
        with pytest.raises(Unauthorized) as caught:
            attempt()
        messages.append(caught.value.message)
    tokens.refresh(pair.refresh_token)
    with pytest.raises(Unauthorized) as caught:
        tokens.refresh(pair.refresh_token)
    messages.append(caught.value.message)
    for message in messages:
        assert pair.refresh_token not in message
        assert pair.access_token not in message
        assert pair.access_token.split(".")[2] not in message


def test_only_the_hash_of_a_refresh_token_is_stored(
    tokens: TokenService, principal: Principal, services: Services
) -> None:
    pair = tokens.issue(principal, principal.workspace_id, "user-1")
    with services.db.read() as conn:
        dump = " ".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM refresh_tokens"))
    assert pair.refresh_token not in dump
    assert hash_refresh_token(pair.refresh_token) in dump


def test_revoked_family_ends_access_tokens(
    tokens: TokenService, principal: Principal, services: Services, clock: FrozenClock
) -> None:
    pair = tokens.issue(principal, principal.workspace_id, "user-1")
    family = tokens.authenticate(pair.access_token)
    assert family.identifier_id == "user-1"
    store = SqlTokenStore(services.db)
    found = store.find_refresh_token(hash_refresh_token(pair.refresh_token))
    assert found is not None
    store.revoke_family(found[1].id, to_micros(clock.now()))
    with pytest.raises(Unauthorized, match="revoked"):
        tokens.authenticate(pair.access_token)
    with pytest.raises(Unauthorized, match="revoked"):
        tokens.refresh(pair.refresh_token)
