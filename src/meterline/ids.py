"""Identifiers: UUID v4 for ledger rows and receipts (seed 004), prefixed random ids for everything else.

Every id is drawn from the operating system's random source (as ``secrets`` does), in blocks: ``os.urandom``
lets go of the interpreter lock around its system call, and a thread that lets go of it waits to take it
back behind whichever thread took it meanwhile, for up to the switch interval (5 ms). The event loop
asks for several ids per request (the request's, the reservation's, the ledger row's, the receipt's), so
drawn one at a time they handed the lock away several times per request (docs/benchmarks.md, "Ids drawn in
blocks"). A block serves a few hundred ids; a process started by ``fork`` draws a block of its own
before its first id, so no two processes ever hand out the same bytes. Secrets (API keys, tokens, data
keys) are not ids: they come from ``secrets`` directly."""

from __future__ import annotations

import os
import threading

_BLOCK = 4096


class _Entropy:
    """Random bytes from ``os.urandom``, drawn a block at a time and handed out once each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held for a slice: nobody waits on it for long
        self._block = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            at = self._at
            if at + n > len(self._block):
                self._block, at = os.urandom(_BLOCK), 0
            self._at = at + n
            return self._block[at : at + n]

    def forget(self) -> None:
        """After ``fork``: the parent's block is the parent's (a child must never repeat its ids)."""
        self._lock = threading.Lock()
        self._block, self._at = b"", 0


_entropy = _Entropy()
os.register_at_fork(after_in_child=_entropy.forget)


def _uuid4() -> str:
    """A random UUID (version 4, RFC 9562), as ``str(uuid.uuid4())`` writes it."""
    raw = bytearray(_entropy.take(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC's variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes in hex (``secrets.token_hex``, drawn in blocks)."""
    return _entropy.take(nbytes).hex()


def ledger_id() -> str:
    return _uuid4()


def receipt_id() -> str:
    return _uuid4()


def prefixed(prefix: str, nbytes: int = 10) -> str:
    return f"{prefix}_{random_hex(nbytes)}"


def request_id() -> str:
    return f"req_{random_hex(12)}"
