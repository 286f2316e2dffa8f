"""SQLite's WAL checkpoints, run by a thread of their own instead of by a commit.

Left to itself, SQLite checkpoints inside the commit that takes the write-ahead log past 1,000 pages: that
commit copies the log's pages into the database file and syncs it, all while holding the write lock that
every writer of every process waits for. Two workers under load saw ~5 such commits a second, ~5 ms each:
half the time their commits took (docs/benchmarks.md, "The write lock held for work only").

Here a commit only wakes ``WalCheckpoints``; its thread runs a ``PASSIVE`` checkpoint on a connection of
its own, at most every ``every_s``. A passive checkpoint takes no write lock: the writers of every process
go on while it copies, and it copies only what no reader still needs (the rest waits for the next one).
Commits still checkpoint by themselves past ``BACKSTOP_PAGES`` (set on every connection by
``storage/database.py``), so the log stays bounded while the thread falls behind, or in a process that
ends before its thread gets to it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("meterline.storage")

# A commit checkpoints by itself only past this many pages of log (~40 MB at SQLite's 4 KiB pages).
BACKSTOP_PAGES = 10_000
# ``close`` waits this long for a checkpoint under way (a passive one never waits for a lock).
_JOIN_S = 10.0


class WalCheckpoints:
    """Checkpoints of one SQLite database file, on a thread started by the first ``committed``.

    ``connect`` opens a DBAPI connection in autocommit mode (a checkpoint cannot run inside a
    transaction)."""

    def __init__(self, connect: Callable[[], Any], *, every_s: float = 0.2) -> None:
        self._connect = connect
        self._every_s = every_s
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # the running thread's own
        # Figures for the tests and benchmarks: checkpoints run, and pages they copied.
        self.runs = 0
        self.pages = 0

    def committed(self) -> None:
        """A write transaction committed: the log grew, so a checkpoint is due."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._stop = threading.Event()
                    self._thread = threading.Thread(
                        target=self._loop, args=(self._stop,), name="meterline-checkpoints", daemon=True
                    )
                    self._thread.start()
        self._due.set()

    def close(self) -> None:
        """Stop the thread, after the checkpoint it may be running (waited for at most ``_JOIN_S``). A
        later ``committed`` starts a new one (as ``Writer`` does after ``close``)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._stop.set()
            self._due.set()
        thread.join(_JOIN_S)

    def _loop(self, stop: threading.Event) -> None:
        try:
            self._checkpoints(stop)
        finally:
            with self._lock:  # ended by ``close``, or died: the next ``committed`` starts another
                if self._thread is threading.current_thread():
                    self._thread = None

    def _checkpoints(self, stop: threading.Event) -> None:
        failing = False
        while True:
            self._due.wait()
            if stop.is_set():
                return
            self._due.clear()
            try:
                self._checkpoint()
                failing = False
            except Exception as exc:  # a full disk, a removed file: commits still checkpoint (backstop)
                if not failing:
                    log.warning("a WAL checkpoint failed (commits will run them): %s", exc)
                failing = True
            # At most one per interval: a commit meanwhile sets ``_due`` again.
            if stop.wait(self._every_s):
                return

    def _checkpoint(self) -> None:
        connection = self._connect()
        try:
            cursor = connection.cursor()
            try:
                # (busy, pages in the log, pages copied): a passive one never waits for anybody.
                _busy, _logged, copied = cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                cursor.close()
        finally:
            connection.close()
        self.runs += 1
        self.pages += max(int(copied), 0)


__all__ = ["BACKSTOP_PAGES", "WalCheckpoints"]
