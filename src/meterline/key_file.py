"""The signing key file: created once by whichever process starts first, rotated atomically, and
re-read by running processes when it changes.

Format: a bare Ed25519 private JWK (one key, the only form before rotation existed), or after a rotation
``{"active": kid, "keys": [active private JWK, retired public JWKs, newest first]}`` (``SigningKeys``).
Mode 0600 in both cases.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from joserfc.errors import JoseError

from meterline.errors import ConfigError
from meterline.signing import SigningKey, SigningKeys

log = logging.getLogger("meterline.signing")


def load_or_create_signing_keys(path: str | Path) -> SigningKeys:
    """The key set in ``path``; if there is none yet, a new key written there (mode 0600).

    Several processes may start at once on a fresh machine. Each writes its candidate to a private
    temporary file and publishes it with ``link``, which fails if the name exists: exactly one candidate
    wins, nobody ever reads a half-written file, and the losers read the winner's key.
    """
    file = Path(path)
    existing = _read(file)
    if existing is not None:
        return existing
    temp = _write_temp(file, SigningKeys(SigningKey.generate()))
    try:
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


def load_or_create_signing_key(path: str | Path) -> SigningKey:
    """The active key of the key file at ``path`` (created if there is none)."""
    return load_or_create_signing_keys(path).active


def rotate_signing_keys(path: str | Path) -> SigningKeys:
    """Make a new active key; the old active key is kept (public part) to verify what it signed.

    Read, change and replace happen under an exclusive ``flock`` on a lock file beside the key file, so
    two rotations at once cannot both start from the same set and lose one of their keys (receipts
    signed with a lost key could never be verified again). The new set is written to a temporary file
    and renamed over the old one: a reader sees the old set or the new one, never a mix.
    """
    file = Path(path)
    load_or_create_signing_keys(file)
    with _locked(file):
        current = _read(file)
        if current is None:
            raise ConfigError(f"{file}: the signing key file disappeared during the rotation")
        rotated = current.rotated()
        temp = _write_temp(file, rotated)
        try:
            os.replace(temp, file)
            _sync_directory(file.parent)
        except OSError as exc:
            raise ConfigError(f"{file}: cannot replace the signing key file: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
    return rotated


class KeyFile:
    """The key set of one file, as a running process uses it: every use first checks (one ``stat``,
    about 2 µs) whether the file was replaced, and re-reads it if so. A rotation made by
    ``meterline keys rotate`` thus reaches every process of the deployment at its next token or
    settle, without a restart: new receipts and tokens are signed with the new key everywhere, and
    every process verifies them. A file that turns unreadable is logged and the last good set kept.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = _stamp(self.path)
        self._keys = load_or_create_signing_keys(self.path)
        if self._stamp is None:  # we just created it
            self._stamp = _stamp(self.path)

    def current(self) -> SigningKeys:
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return self._keys
        with self._lock:
            if stamp != self._stamp:
                try:
                    found = _read(self.path)
                except ConfigError as exc:
                    log.error("keeping the signing keys already loaded: %s", exc.message)
                    found = None
                if found is not None:
                    self._keys = found
                    log.info("signing keys reloaded from %s (active key %s)", self.path, found.kid)
                self._stamp = stamp
            return self._keys

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


def _stamp(file: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(file)
    except OSError:
        return None
    # A rename gives a new inode; an edit in place changes the time or the size.
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _write_temp(file: Path, keys: SigningKeys) -> Path:
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


def _read(file: Path) -> SigningKeys | None:
    try:
        raw = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read the signing key file: {exc}") from None
    try:
        return SigningKeys.from_json(json.loads(raw))
    except (ValueError, TypeError, JoseError) as exc:
        raise ConfigError(f"{file}: not an Ed25519 private JWK or key set: {exc}") from None


__all__ = ["KeyFile", "load_or_create_signing_key", "load_or_create_signing_keys", "rotate_signing_keys"]
