"""Values kept for a second or two, read again ahead of their end by one caller, in the background.

The gateway needs the caller's key, organization and credit bonus on every request, and keeps each for
a short while (a change made through another process shows within that time). Were a kept value simply
to end, every request in flight at that moment would read it again at once: 64 concurrent requests
made up to 64 reads, each a hop to a worker thread, and on PostgreSQL the pool opened new connections
past its size for them and closed them again (13 new sessions a second under load, docs/benchmarks.md).

So a value is *due* a little before it ends (``ahead`` seconds): the first caller to find it due starts
one read in the background and is answered the value it found, as is every caller until the new value
is in. A value is never answered past its end: one that ends unread again (nobody asked while it was
due, or the read failed) is gone, and callers ``read`` it. ``read`` makes one read of a key at a time:
a caller that finds one in flight (another caller's, or the background one that did not come back
before the value's end: a machine too busy) waits for its answer, or its error, instead of reading too;
otherwise it reads and keeps what it read. ``forget`` (a change made through this process) applies at
once: a read that began before it keeps nothing, and a caller after it never waits for such a read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, wait
from typing import Generic, TypeVar

log = logging.getLogger("meterline.kept")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_REFRESH_THREADS = 2
# How long callers wait for the read of a key in flight before one of them takes its place: a read hung
# on a lost connection must not hold every caller of the key. (A read on a saturated pool may wait up to
# the pool's timeout, 30 s, and still answer: a take-over is one more read, not every caller's.)
_WAIT_FOR_READ_S = 10.0
_jobs: queue.SimpleQueue[Callable[[], None]] | None = None
_jobs_lock = threading.Lock()


def _in_background(job: Callable[[], None]) -> None:
    """Run ``job`` on the process's refresh threads, made on first use in each process. Daemon threads: a
    read hung on an unreachable database never keeps the process from exiting."""
    global _jobs
    if _jobs is None:
        with _jobs_lock:
            if _jobs is None:
                jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
                for n in range(_REFRESH_THREADS):
                    name = f"meterline-refresh-{n}"
                    threading.Thread(target=_run_jobs, args=(jobs,), name=name, daemon=True).start()
                _jobs = jobs
    _jobs.put(job)


def _run_jobs(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        job = jobs.get()
        try:
            job()  # catches its own errors (``Kept._read_again``): this is for what it cannot
        except BaseException:
            log.exception("a background read failed")  # the thread goes on: values keep being read ahead


class _Entry(Generic[V]):
    __slots__ = ("due", "ends", "value")

    def __init__(self, ends: float, due: float, value: V) -> None:
        self.ends = ends
        self.due = due  # when the next caller starts a read (moved on by a claim)
        self.value = value


class Kept(Generic[K, V]):
    """Values by key for ``seconds`` after their read began; ``load(key)`` reads one again (None: there is
    none any more, and the key is forgotten). At most ``entries`` values: past that, all are dropped."""

    __slots__ = (
        "_ahead", "_background", "_clock", "_entries", "_generation", "_limit", "_load", "_lock", "_reads",
        "_seconds", "_wait_s",
    )  # fmt: skip

    def __init__(
        self,
        seconds: float,
        load: Callable[[K], V | None],
        *,
        ahead: float,
        entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        background: Callable[[Callable[[], None]], None] = _in_background,
        wait_s: float = _WAIT_FOR_READ_S,
    ) -> None:
        if not 0 < ahead < seconds:
            raise ValueError("ahead must be between 0 and seconds")
        self._seconds = seconds
        self._ahead = ahead
        self._load = load
        self._limit = entries
        self._clock = clock
        self._background = background
        self._wait_s = wait_s
        self._entries: dict[K, _Entry[V]] = {}
        self._generation = 0  # moved on by every forget: a read that began before it keeps nothing
        self._reads: dict[K, tuple[int, Future[V | None]]] = {}  # in flight: generation, answer
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The kept value, or None when there is none (or it has ended): the caller reads it and ``keep``s
        it. Never reads here (an event loop may call it): a due value is read again in the background."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.ends:
            return None
        if now >= entry.due:
            self._claim(key, entry, now)
        return entry.value

    def read(self, key: K, load: Callable[[K], V | None] | None = None) -> V | None:
        """The kept value, else read now: by the read of this key in flight if there is one (its answer, or
        its error, is this caller's too), else by this caller with ``load`` (the kept values' own when not
        given; it may raise, to say why there is no value), keeping what it found. Blocks: never call it
        on an event loop."""
        value = self.get(key)
        if value is not None:
            return value
        load = load or self._load
        while True:
            with self._lock:
                value = self._live(key)  # again under the lock: a read may have landed since
                if value is not None:
                    return value
                generation = self._generation
                flight = self._reads.get(key)
                if flight is None or flight[0] != generation:
                    answer: Future[V | None] = Future()
                    self._reads[key] = (generation, answer)
                    began = (self._clock(), generation)
                    flight = None
                else:
                    answer = flight[1]
            if flight is None:
                return self._fly(key, answer, began, load, gone_forgotten=False)
            if wait([answer], timeout=self._wait_s).done:
                return answer.result()
            # That read has not answered in all this time (hung on a lost connection?): the first caller
            # to get here takes its place, and the others wait for this caller's read instead.
            with self._lock:
                if self._reads.get(key) is flight:
                    del self._reads[key]

    def _live(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return entry.value if entry is not None and self._clock() < entry.ends else None

    def began(self) -> tuple[float, int]:
        """What a caller about to read notes first, for ``keep``: the time and the generation."""
        return self._clock(), self._generation

    def keep(self, key: K, value: V, began: tuple[float, int]) -> None:
        """Keep ``value``, read from ``began`` (``began()``) on: unless a ``forget`` came meanwhile."""
        at, generation = began
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) >= self._limit and key not in self._entries:
                self._entries.clear()
            ends = at + self._seconds
            kept = self._entries.get(key)
            if kept is not None and kept.ends > ends:
                return  # a read that began later is kept already (this one was slow to answer)
            self._entries[key] = _Entry(ends, ends - self._ahead, value)

    def forget(self, key: K | None = None, *, where: Callable[[K], bool] | None = None) -> None:
        """Drop ``key`` (or every key ``where`` says, or all when neither is given), and whatever is being
        read in the background now."""
        with self._lock:
            self._generation += 1
            if key is not None:
                self._entries.pop(key, None)
            elif where is not None:
                for gone in [k for k in self._entries if where(k)]:
                    del self._entries[gone]
            else:
                self._entries.clear()

    def _claim(self, key: K, entry: _Entry[V], now: float) -> None:
        with self._lock:
            if now < entry.due:
                return  # another caller claimed it first
            entry.due = now + self._ahead  # by then the value has ended: one claim per value
            generation = self._generation
        self._background(lambda: self._read_again(key, entry, generation))

    def _read_again(self, key: K, entry: _Entry[V], generation: int) -> None:
        # In flight from when it starts, not when it was queued: a caller never waits for a read that a
        # busy (or stuck) refresh thread has not begun.
        with self._lock:
            if generation != self._generation or self._entries.get(key) is not entry:
                return  # forgotten, or read again by a caller, since it was claimed: nothing to read ahead
            flight = self._reads.get(key)
            if flight is not None and flight[0] == generation:
                return  # a caller's read is on its way already
            answer: Future[V | None] = Future()
            self._reads[key] = (generation, answer)
            began = (self._clock(), generation)
        try:
            self._fly(key, answer, began, self._load, gone_forgotten=True)
        except Exception as exc:
            # The value ends as it would have; the callers waiting for this read by then meet the
            # failure (an outage is a 503 and its one log line there). Keys are not logged: one is a
            # key's digest.
            log.debug("a kept value was not read again: %s", type(exc).__name__)

    def _fly(
        self,
        key: K,
        answer: Future[V | None],
        began: tuple[float, int],
        load: Callable[[K], V | None],
        *,
        gone_forgotten: bool,
    ) -> V | None:
        """The read in flight for ``key``: kept before it stops being in flight, and answered to every
        caller waiting for it. ``gone_forgotten``: a key found gone is forgotten (a read ahead of a kept
        value)."""
        try:
            value = load(key)
            if value is not None:
                self.keep(key, value, began)
            elif gone_forgotten:
                self.forget(key)  # gone from the store while it was kept
        except BaseException as exc:
            self._landed(key, answer)
            # Waiting callers get the read's error; not an interruption of the thread that read.
            shared = exc if isinstance(exc, Exception) else RuntimeError("the read was interrupted")
            answer.set_exception(shared)
            raise
        self._landed(key, answer)
        answer.set_result(value)
        return value

    def _landed(self, key: K, answer: Future[V | None]) -> None:
        with self._lock:
            flight = self._reads.get(key)
            if flight is not None and flight[1] is answer:
                del self._reads[key]  # (unless a caller took its place meanwhile)
