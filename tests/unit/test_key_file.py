"""The key file: the single-key file of old, rotation (atomic, serialized, keeping every retired signing
key's public part only and every older data key whole), the data key of files from before data keys
existed (derived from the signing key, the same on every copy, never written on load, so a read-only
mount works; stored at the first rotation), and running processes picking a rotation up."""

from __future__ import annotations

import base64
import errno
import json
import multiprocessing
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from meterline.encryption import DataKeys, MissingDataKey, SealError
from meterline.errors import ConfigError
from meterline.key_file import (
    DATA_KEY_INFO,
    KeyFile,
    derived_data_keys,
    load_or_create_keys,
    load_or_create_signing_keys,
    rotate_keys,
    rotate_signing_keys,
)
from meterline.signing import SignatureError, SigningKey, SigningKeys


def test_a_single_key_file_is_a_set_of_one(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    key = SigningKey.generate()
    path.write_text(json.dumps(key.private_jwk()))
    keys = load_or_create_signing_keys(path)
    assert keys.kid == key.kid
    assert keys.retired == []
    assert [k["kid"] for k in keys.public_jwks()["keys"]] == [key.kid]


def test_rotation_keeps_old_keys_for_verification_only(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    first = load_or_create_signing_keys(path)
    old_token = first.sign({"n": 1}, typ="t")
    second = rotate_signing_keys(path)
    third = rotate_signing_keys(path)
    assert len({first.kid, second.kid, third.kid}) == 3
    on_disk = load_or_create_signing_keys(path)
    assert on_disk.kid == third.kid
    assert [kid for kid, _ in on_disk.retired] == [second.kid, first.kid]  # newest first
    # Signing uses the active key; every key of the set verifies.
    assert on_disk.verify(on_disk.sign({"n": 3}, typ="t"), typ="t") == {"n": 3}
    assert on_disk.verify(old_token, typ="t") == {"n": 1}
    assert [k["kid"] for k in on_disk.public_jwks()["keys"]] == [third.kid, second.kid, first.kid]
    data = json.loads(path.read_text())
    assert data["active"] == third.kid
    assert [("d" in k) for k in data["keys"]] == [True, False, False]  # retired keys: public part only
    assert all(set(k) == {"kty", "crv", "x", "kid", "alg", "use"} for k in on_disk.public_jwks()["keys"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".key.json.lock", "key.json"]


def test_rotation_creates_the_file_if_there_is_none(tmp_path: Path) -> None:
    keys = rotate_signing_keys(tmp_path / "key.json")
    assert len(keys.retired) == 1
    assert load_or_create_signing_keys(tmp_path / "key.json").kid == keys.kid


def test_concurrent_rotations_lose_no_key(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    first = load_or_create_signing_keys(path).kid
    start = threading.Barrier(6)

    def rotate(_: int) -> str:
        start.wait()
        return rotate_signing_keys(path).kid

    with ThreadPoolExecutor(6) as pool:
        made = set(pool.map(rotate, range(6)))
    final = load_or_create_signing_keys(path)
    assert len(made) == 6
    assert {final.kid, *(kid for kid, _ in final.retired)} == {first, *made}


def _rotate_in_process(path: str, start: Any, results: Any) -> None:
    start.wait()
    results.put(rotate_signing_keys(path).kid)


def test_processes_rotating_at_once_lose_no_key(tmp_path: Path) -> None:
    path = str(tmp_path / "key.json")
    first = load_or_create_signing_keys(path).kid
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    results = context.Queue()
    workers = [context.Process(target=_rotate_in_process, args=(path, start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    made = {results.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    final = load_or_create_signing_keys(path)
    assert {final.kid, *(kid for kid, _ in final.retired)} == {first, *made}


def test_a_running_process_picks_up_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    live = KeyFile(path)
    before = live.active.kid
    token = live.sign({"a": 1}, typ="t")
    rotated = rotate_signing_keys(path)  # as another process would
    assert live.active.kid == rotated.kid != before
    assert live.verify(token, typ="t") == {"a": 1}
    assert live.verify(live.sign({"b": 2}, typ="t"), typ="t") == {"b": 2}
    assert [k["kid"] for k in live.public_jwks()["keys"]] == [rotated.kid, before]


def test_a_broken_file_keeps_the_last_good_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "key.json"
    live = KeyFile(path)
    kid = live.active.kid
    path.write_text("{broken")
    assert live.active.kid == kid
    assert "keeping the signing keys" in caplog.text
    path.unlink()
    assert live.active.kid == kid


def test_a_key_set_that_names_no_active_key_is_refused(tmp_path: Path) -> None:
    keys = SigningKeys(SigningKey.generate()).rotated()
    data = keys.to_json()
    path = tmp_path / "key.json"
    for broken in (
        {**data, "active": "missing"},
        {**data, "keys": "nope"},
        {"keys": data["keys"]},
        {**data, "keys": [data["keys"][1]], "active": data["keys"][1]["kid"]},  # a public key cannot sign
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=r"key\.json"):
            load_or_create_signing_keys(path)


def test_a_retired_key_cannot_sign_but_still_verifies() -> None:
    old = SigningKeys(SigningKey.generate())
    token = old.sign({"a": 1}, typ="t")
    new = old.rotated()
    assert new.verify(token, typ="t") == {"a": 1}
    stranger = SigningKeys(SigningKey.generate())
    with pytest.raises(SignatureError, match="does not know"):
        new.verify(stranger.sign({"a": 1}, typ="t"), typ="t")


ROW = "webhook_endpoints.secret:we_1"


def test_a_new_key_file_holds_a_data_key(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    ring = load_or_create_keys(path)
    data = json.loads(path.read_text())
    assert data["data_keys"]["active"] == ring.data.sealing_kid
    assert [k["kty"] for k in data["data_keys"]["keys"]] == ["oct"]
    assert data["active"] == ring.signing.kid  # the signing keys as a set, data keys beside them
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_keys(path)
    assert again.data.unseal(ring.data.seal(b"x", context=ROW), context=ROW) == b"x"


def _old_file(path: Path, old_form: str = "bare JWK") -> SigningKeys:
    """A key file as written before data keys existed."""
    signing = SigningKeys(SigningKey.generate())
    if old_form == "key set":
        signing = signing.rotated()
    path.write_text(json.dumps(signing.to_json()))
    path.chmod(0o600)
    return signing


@pytest.mark.parametrize("old_form", ["bare JWK", "key set"])
def test_a_file_from_before_data_keys_has_a_derived_one_and_is_not_written(
    tmp_path: Path, old_form: str
) -> None:
    path = tmp_path / "key.json"
    signing = _old_file(path, old_form)
    written = path.read_bytes()
    ring = load_or_create_keys(path)
    assert ring.signing.kid == signing.kid
    assert [kid for kid, _ in ring.signing.retired] == [kid for kid, _ in signing.retired]
    assert ring.data.sealing_kid == derived_data_keys(signing).sealing_kid
    assert load_or_create_keys(path).data.sealing_kid == ring.data.sealing_kid
    assert ring.signing.verify(signing.sign({"a": 1}, typ="t"), typ="t") == {"a": 1}
    # Only read: the same bytes, and no lock or temporary file beside it.
    assert path.read_bytes() == written
    assert [p.name for p in tmp_path.iterdir()] == ["key.json"]
    live = KeyFile(path)
    assert live.unseal(live.seal(b"x", context=ROW), context=ROW) == b"x"
    assert not live.created
    assert path.read_bytes() == written


def test_copies_of_one_key_file_derive_the_same_data_key(tmp_path: Path) -> None:
    """One file copied to every host (as deployments did before data keys): every copy opens what any
    other sealed."""
    first, second = tmp_path / "host-a" / "key.json", tmp_path / "host-b" / "key.json"
    first.parent.mkdir()
    second.parent.mkdir()
    signing = _old_file(first)
    second.write_bytes(first.read_bytes())
    a, b = load_or_create_keys(first), load_or_create_keys(second)
    assert a.data.sealing_kid == b.data.sealing_kid
    assert b.data.unseal(a.data.seal(b"secret", context=ROW), context=ROW) == b"secret"
    assert KeyFile(first).unseal(KeyFile(second).seal(b"again", context=ROW), context=ROW) == b"again"
    # Derived from the private key with HKDF: not the signing key's bytes, and another key gives another.
    kid = a.data.sealing_kid
    assert kid.startswith("s")  # a random data key id is hex
    assert len(kid) == 13
    secret = signing.active.derive_secret(DATA_KEY_INFO)
    assert a.data.active.to_jwk()["k"] == base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    assert base64.urlsafe_b64encode(secret).rstrip(b"=").decode() != signing.active.private_jwk()["d"]
    assert secret != signing.active.derive_secret(b"another purpose")
    other = derived_data_keys(SigningKeys(SigningKey.generate()))
    assert other.sealing_kid != kid
    with pytest.raises(MissingDataKey):
        other.unseal(a.data.seal(b"secret", context=ROW), context=ROW)


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory that refuses every write, as a read-only mount (a Kubernetes Secret) does: its mode
    says so, and since tests may run as root, writes into it fail with EROFS whatever the mode."""
    directory = tmp_path / "secret-mount"
    directory.mkdir()
    real_open, real_link, real_replace = os.open, os.link, os.replace

    def inside(path: Any) -> bool:
        return Path(path).absolute().parent == directory

    def refuse(path: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if inside(dst):
            refuse(dst)
        real_link(src, dst, *args, **kwargs)

    def guarded_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if inside(dst):
            refuse(dst)
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "link", guarded_link)
    monkeypatch.setattr(os, "replace", guarded_replace)
    return directory


def test_a_key_file_on_a_read_only_mount_works(read_only: Path) -> None:
    path = read_only / "key.json"
    with open(path, "w") as file:  # mounted by the orchestrator (builtins.open is not guarded)
        json.dump(SigningKey.generate().private_jwk(), file)
    path.chmod(0o400)
    read_only.chmod(0o555)
    try:
        live = KeyFile(path)
        assert live.unseal(live.seal(b"x", context=ROW), context=ROW) == b"x"
        assert live.verify(live.sign({"a": 1}, typ="t"), typ="t") == {"a": 1}
        assert load_or_create_keys(path).data.sealing_kid == live.sealing_kid
        assert [p.name for p in read_only.iterdir()] == ["key.json"]
        with pytest.raises(ConfigError, match="cannot"):  # a rotation does need to write
            rotate_keys(path)
    finally:
        read_only.chmod(0o755)


def test_a_stored_data_key_is_used_as_it_is(tmp_path: Path) -> None:
    """A file that already holds a (random) data key, as written by the version that introduced them,
    keeps it: what it sealed opens, and the derived key is not used."""
    path = tmp_path / "key.json"
    signing = SigningKeys(SigningKey.generate())
    stored = DataKeys.generate()
    path.write_text(
        json.dumps(
            {"active": signing.kid, "keys": [signing.active.private_jwk()], "data_keys": stored.to_json()}
        )
    )
    written = path.read_bytes()
    sealed = stored.seal(b"secret", context=ROW)
    ring = load_or_create_keys(path)
    assert ring.data.sealing_kid == stored.sealing_kid != derived_data_keys(signing).sealing_kid
    assert ring.data.kids == [stored.sealing_kid]
    assert KeyFile(path).unseal(sealed, context=ROW) == b"secret"
    assert path.read_bytes() == written
    rotated = rotate_keys(path)
    assert [key.kid for key in rotated.data.older] == [stored.sealing_kid]
    assert load_or_create_keys(path).data.unseal(sealed, context=ROW) == b"secret"


@pytest.mark.parametrize("data", [True, False], ids=["rotate both", "rotate the signing key only"])
def test_the_first_rotation_stores_the_derived_key(tmp_path: Path, data: bool) -> None:
    """The new active signing key would derive another key: the derived one is written to the file."""
    path = tmp_path / "key.json"
    signing = _old_file(path)
    derived = derived_data_keys(signing)
    sealed = derived.seal(b"secret", context=ROW)
    live = KeyFile(path)
    rotated = rotate_keys(path, data=data)
    assert rotated.signing.kid != signing.kid
    stored = json.loads(path.read_text())["data_keys"]
    kids = [key["kid"] for key in stored["keys"]]
    if data:
        assert kids == [rotated.data.sealing_kid, derived.sealing_kid]
        assert not rotated.data.sealing_kid.startswith("s")  # a new random key
    else:
        assert kids == [derived.sealing_kid]
        assert stored["active"] == derived.sealing_kid
    for ring in (load_or_create_keys(path), rotate_keys(path)):
        assert ring.data.unseal(sealed, context=ROW) == b"secret"
    assert live.unseal(sealed, context=ROW) == b"secret"  # the running process too


def test_a_lazy_key_file_is_touched_only_when_used(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    lazy = KeyFile(path, lazy=True)
    assert not path.exists()
    assert not lazy.created
    kid = lazy.active.kid  # the first use creates it
    assert path.exists()
    assert lazy.created
    assert KeyFile(path).active.kid == kid
    assert not KeyFile(path).created


def _load_in_process(path: str, start: Any, results: Any) -> None:
    start.wait()
    results.put(load_or_create_keys(path).data.sealing_kid)


def test_processes_starting_on_an_old_file_agree_on_one_data_key(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(SigningKey.generate().private_jwk()))
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    results = context.Queue()
    workers = [context.Process(target=_load_in_process, args=(str(path), start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    seen = {results.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert seen == {load_or_create_keys(path).data.sealing_kid}


def test_threads_starting_on_an_old_file_agree_on_one_data_key(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(SigningKey.generate().private_jwk()))
    start = threading.Barrier(6)

    def load(_: int) -> str:
        start.wait()
        return load_or_create_keys(path).data.sealing_kid

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(load, range(6))) == {load_or_create_keys(path).data.sealing_kid}


def test_rotation_makes_a_new_data_key_and_keeps_the_old_ones_whole(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    first = load_or_create_keys(path)
    sealed = first.data.seal(b"secret", context=ROW)
    second = rotate_keys(path)
    assert second.signing.kid != first.signing.kid
    assert second.data.sealing_kid != first.data.sealing_kid
    assert [k.kid for k in second.data.older] == [first.data.sealing_kid]
    on_disk = load_or_create_keys(path)
    assert on_disk.data.unseal(sealed, context=ROW) == b"secret"
    assert all("k" in key for key in json.loads(path.read_text())["data_keys"]["keys"])
    # Rotating only the signing key leaves the data keys as they are.
    third = rotate_signing_keys(path)
    assert third.kid != second.signing.kid
    assert load_or_create_keys(path).data.kids == second.data.kids


def test_concurrent_rotations_lose_no_data_key(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    first = load_or_create_keys(path).data.sealing_kid
    start = threading.Barrier(6)

    def rotate(_: int) -> str:
        start.wait()
        return rotate_keys(path).data.sealing_kid

    with ThreadPoolExecutor(6) as pool:
        made = set(pool.map(rotate, range(6)))
    assert set(load_or_create_keys(path).data.kids) == {first, *made}


def test_a_running_process_seals_with_a_rotated_data_key(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    live = KeyFile(path)
    before = live.sealing_kid
    old = live.seal(b"old", context=ROW)
    rotated = rotate_keys(path)  # as `meterline keys rotate` would, from another process
    assert live.sealing_kid == rotated.data.sealing_kid != before
    assert live.unseal(old, context=ROW) == b"old"
    assert live.seal(b"new", context=ROW).startswith(f"enc:v1:{rotated.data.sealing_kid}:")
    # A file without the old data key put in place: what it sealed no longer opens, and says why.
    other = tmp_path / "other.json"
    load_or_create_keys(other)
    other.replace(path)
    with pytest.raises(SealError, match=f"no data key '{before}'"):
        live.unseal(old, context=ROW)


def test_unreadable_data_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    load_or_create_keys(path)
    data = json.loads(path.read_text())
    for broken in ("nope", {"active": "x"}, {**DataKeys.generate().to_json(), "active": "missing0"}):
        path.write_text(json.dumps({**data, "data_keys": broken}))
        with pytest.raises(ConfigError, match=r"key\.json: unreadable data keys"):
            load_or_create_keys(path)
