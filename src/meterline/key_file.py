"""The key file: created once by whichever process starts first, rotated atomically, and re-read by
running processes when it changes. It holds the signing keys (``meterline.signing``) and the data keys
that seal secrets at rest (``meterline.encryption``); neither is ever in the database.

Format: ``{"active": kid, "keys": [active private JWK, retired public JWKs, newest first],
"data_keys": {"active": kid, "keys": [symmetric JWKs, newest first]}}``, mode 0600. Files written before
data keys existed (``{"active", "keys"}``, or a bare Ed25519 private JWK from before rotation) are read
as they are and never written to on load: their data key is derived from the active signing key
(``derived_data_keys``), so every copy of one file has the same data key, and a read-only mount works.
The first rotation of such a file stores that derived key among the older data keys, since a new active
signing key would no longer derive it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc.errors import JoseError

from meterline.encryption import DataKey, DataKeys
from meterline.errors import ConfigError
from meterline.signing import SigningKey, SigningKeys

log = logging.getLogger("meterline.signing")

# The HKDF purpose of the data key derived for a key file that stores none. Changing it would orphan
# every secret sealed with derived keys: a new derivation gets a new string.
DATA_KEY_INFO = b"meterline webhook data key v1"


def derived_data_keys(signing: SigningKeys) -> DataKeys:
    """The data key of a key file without stored data keys: HKDF-SHA256 of the active signing key's
    private key (``DATA_KEY_INFO``), its id a hash of the signing key's id. Deterministic, so every copy
    of the file (one per host, a read-only Secret mount) seals and opens with the same key; the id
    starts with ``s``, which a random (hex) data key id never does."""
    active = signing.active
    kid = "s" + hashlib.sha256(DATA_KEY_INFO + b":" + active.kid.encode("ascii")).hexdigest()[:12]
    return DataKeys(DataKey(kid, active.derive_secret(DATA_KEY_INFO)))


@dataclass(frozen=True)
class KeyRing:
    """Everything the key file holds."""

    signing: SigningKeys
    data: DataKeys

    def to_json(self) -> dict[str, Any]:
        signing = self.signing.to_json()
        if "keys" not in signing:  # the one-key form: written as a set so that data keys fit beside it
            signing = {"active": self.signing.kid, "keys": [signing]}
        return {**signing, "data_keys": self.data.to_json()}


def load_or_create_keys(path: str | Path) -> KeyRing:
    """The keys in ``path``; if there is no file yet, new keys written there (mode 0600).

    Several processes may start at once on a fresh machine. Each writes its candidate to a private
    temporary file and publishes it with ``link``, which fails if the name exists: exactly one candidate
    wins, nobody ever reads a half-written file, and the losers read the winner's keys. An existing file
    is only read, never written (a file without data keys gets its derived one, in memory).
    """
    return _load_or_create(Path(path))[0]


def _load_or_create(file: Path) -> tuple[KeyRing, bool]:
    """The file's keys, and whether this call created the file (its candidate won)."""
    existing = _reread(file)
    if existing is not None:
        return existing, False
    temp = _write_temp(file, KeyRing(SigningKeys(SigningKey.generate()), DataKeys.generate()))
    created = False
    try:
        # If another process published its keys first, link fails and we use theirs.
        with contextlib.suppress(FileExistsError):
            os.link(temp, file)
            created = True
    except OSError as exc:
        raise ConfigError(f"{file}: cannot create the signing key file: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    found = _reread(file)
    if found is None:
        raise ConfigError(f"{file}: the signing key file disappeared while it was being created")
    return found, created


def load_or_create_signing_keys(path: str | Path) -> SigningKeys:
    """The signing key set of the key file at ``path`` (created if there is none)."""
    return load_or_create_keys(path).signing


def load_or_create_signing_key(path: str | Path) -> SigningKey:
    """The active key of the key file at ``path`` (created if there is none)."""
    return load_or_create_signing_keys(path).active


def rotate_keys(path: str | Path, *, signing: bool = True, data: bool = True) -> KeyRing:
    """Make new active keys. The old signing key is kept (public part) to verify what it signed; the
    old data key is kept whole, to open what it sealed (a derived one too: it is written to the file,
    since the new signing key would not derive it).

    Read, change and replace happen under an exclusive ``flock`` on a lock file beside the key file, so
    two rotations at once cannot both start from the same set and lose one of their keys (receipts
    signed with a lost key could never be verified again, secrets sealed with one never opened). The new
    set is written to a temporary file and renamed over the old one: a reader sees the old set or the
    new one, never a mix.
    """

    def rotated(ring: KeyRing) -> KeyRing:
        return KeyRing(
            ring.signing.rotated() if signing else ring.signing, ring.data.rotated() if data else ring.data
        )

    load_or_create_keys(path)
    return _replace(Path(path), rotated, "rotate")


def rotate_signing_keys(path: str | Path) -> SigningKeys:
    """A new active signing key (the data keys stay as they are)."""
    return rotate_keys(path, data=False).signing


def _replace(file: Path, change: Callable[[KeyRing], KeyRing], doing: str) -> KeyRing:
    """``change`` applied to the file's keys under the lock (a file without data keys: to its derived
    one, which is thus written out), written back by rename."""
    with _locked(file):
        current = _read(file)
        if current is None:
            raise ConfigError(f"{file}: the signing key file disappeared while trying to {doing} it")
        signing, data = current
        changed = change(KeyRing(signing, data if data is not None else derived_data_keys(signing)))
        temp = _write_temp(file, changed)
        try:
            os.replace(temp, file)
            _sync_directory(file.parent)
        except OSError as exc:
            raise ConfigError(f"{file}: cannot replace the signing key file: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
    return changed


class KeyFile:
    """The keys of one file, as a running process uses them: every use first checks (one ``stat``,
    about 2 µs) whether the file was replaced, and re-reads it if so. A rotation made by
    ``meterline keys rotate`` thus reaches every process of the deployment at its next token, settle
    or webhook delivery, without a restart: new receipts and tokens are signed with the new key
    everywhere, new secrets sealed with the new data key, and every process verifies and opens what the
    older keys made. A file that turns unreadable is logged and the last good set kept.

    ``lazy``: the file is read (or created) at the first use instead of now, so a command that never
    signs, verifies or seals never touches it. ``created`` tells whether this process created the file.
    """

    def __init__(self, path: str | Path, *, lazy: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._loaded: KeyRing | None = None
        self.created = False
        if not lazy:
            self._load()

    def _load(self) -> KeyRing:
        with self._lock:
            if self._loaded is None:
                stamp = _stamp(self.path)
                self._loaded, self.created = _load_or_create(self.path)
                self._stamp = _stamp(self.path) if stamp is None else stamp  # None: it was just created
            return self._loaded

    def ring(self) -> KeyRing:
        ring = self._loaded
        if ring is None:
            return self._load()
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return ring
        with self._lock:
            if stamp != self._stamp:
                try:
                    found = _reread(self.path)
                except ConfigError as exc:
                    log.error("keeping the signing keys already loaded: %s", exc.message)
                    found = None
                if found is not None:
                    self._loaded = found
                    log.info(
                        "keys reloaded from %s (active signing key %s, data key %s)",
                        self.path,
                        found.signing.kid,
                        found.data.sealing_kid,
                    )
                self._stamp = stamp
            return self._loaded or ring

    def current(self) -> SigningKeys:
        return self.ring().signing

    # The ``Signer`` protocol and the parts the API publishes, always from the current set.
    @property
    def active(self) -> SigningKey:
        return self.current().active

    def sign(self, claims: Mapping[str, Any], *, typ: str) -> str:
        return self.current().sign(claims, typ=typ)

    def verify(self, token: str, *, typ: str) -> dict[str, Any]:
        return self.current().verify(token, typ=typ)

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        return self.current().public_jwks()

    # The ``SecretBox`` protocol, from the current data keys.
    @property
    def sealing_kid(self) -> str:
        return self.ring().data.sealing_kid

    def seal(self, plaintext: bytes, *, context: str) -> str:
        return self.ring().data.seal(plaintext, context=context)

    def unseal(self, sealed: str, *, context: str) -> bytes:
        return self.ring().data.unseal(sealed, context=context)


def _reread(file: Path) -> KeyRing | None:
    """The file's keys, never creating nor writing it (gone between ``stat`` and read: None); a file
    without data keys has its derived one."""
    found = _read(file)
    if found is None:
        return None
    signing, data = found
    return KeyRing(signing, data if data is not None else derived_data_keys(signing))


def _stamp(file: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(file)
    except OSError:
        return None
    # A rename gives a new inode; an edit in place changes the time or the size.
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _write_temp(file: Path, keys: KeyRing) -> Path:
    text = json.dumps(keys.to_json(), sort_keys=True) + "\n"
    temp = file.with_name(f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow the mode; this makes it exact
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise ConfigError(f"{file}: cannot create the signing key file: {exc.strerror or exc}") from None
    return temp


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    lock_path = file.with_name(f".{file.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"{lock_path}: cannot lock the signing key file: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _sync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(file: Path) -> tuple[SigningKeys, DataKeys | None] | None:
    """The file's signing keys and data keys (None in a file from before they existed)."""
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
        data_keys = data.pop("data_keys", None)
        signing = SigningKeys.from_json(data)
    except (ValueError, TypeError, JoseError) as exc:
        raise ConfigError(f"{file}: not an Ed25519 private JWK or key set: {exc}") from None
    if data_keys is None:
        return signing, None
    try:
        return signing, DataKeys.from_json(data_keys)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{file}: unreadable data keys: {exc}") from None


__all__ = [
    "DATA_KEY_INFO",
    "KeyFile",
    "KeyRing",
    "derived_data_keys",
    "load_or_create_keys",
    "load_or_create_signing_key",
    "load_or_create_signing_keys",
    "rotate_keys",
    "rotate_signing_keys",
]
