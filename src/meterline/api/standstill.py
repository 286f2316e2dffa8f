"""An event loop held still while another thread of the process holds a lock other processes wait for.

Several ``meterline serve`` workers on one SQLite file take turns at its one write lock. A worker's
writer thread holds it for a batch, but needs the interpreter lock for every step in between its
SQLite calls, and its own event loop keeps taking that from it: measured (``docs/benchmarks.md``, "The
event loop held still while its writer holds the SQLite lock"), with two workers each writer held the
file lock about three times as long as it ran, while the other worker waited. With the loop held still
for the length of the transaction the writer runs unhindered, and the loop goes on the moment the
transaction ends: the loops of all workers together still run all the time, each while its own writer
is not the one holding the lock.

``Standstill(loop)()`` is the context manager ``Database.hold_still`` enters (``storage/database.py``):

* the loop is asked (``call_soon_threadsafe``) to wait, and stands at the end of the step it is in. The
  caller does not wait for that by default (``settle_s`` = 0): it already holds the lock every process
  waits for, and waiting for the loop held it idle, ~1 ms per transaction (docs/benchmarks.md, "The
  write lock held for work only"); its first steps share the interpreter with the
  loop's last one instead;
* the loop waits at most ``longest_s``, whatever happens to the caller, and never for a transaction
  that has ended (each hold has its own turn);
* called on the loop's own thread, or once the loop is closed, it holds nothing.

One hold at a time: ``Database.write`` enters it under its own lock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Standstill:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, settle_s: float = 0.0, longest_s: float = 0.05
    ) -> None:
        self._loop = loop
        self._settle_s = settle_s
        self._longest_s = longest_s
        self._lock = threading.Lock()
        self._turn = 0
        self._standing = threading.Event()
        self._go_on = threading.Event()

    @contextmanager
    def __call__(self) -> Iterator[bool]:
        """Hold the loop still for the block; yields whether it stood still when the block began."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            yield False  # the loop itself is writing: it cannot also wait
            return
        with self._lock:
            self._turn += 1
            turn = self._turn
            self._standing.clear()
            self._go_on.clear()
        try:
            self._loop.call_soon_threadsafe(self._stand, turn)
        except RuntimeError:  # the loop is closed: nothing to hold
            yield False
            return
        try:
            yield self._standing.wait(self._settle_s)
        finally:
            with self._lock:
                self._turn += 1  # a wait not begun yet is for a hold that has ended: it is skipped
                self._go_on.set()

    def _stand(self, turn: int) -> None:
        """On the loop: wait until the hold of ``turn`` ends (at most ``longest_s``)."""
        with self._lock:
            if turn != self._turn:
                return
            self._standing.set()
        self._go_on.wait(self._longest_s)


__all__ = ["Standstill"]
