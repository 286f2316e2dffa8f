"""What the quota engine needs from a counter store, and the words it uses.

A *line* is one limit's share of a reservation: a counter key (the window bucket is part of the key for
fixed windows), the estimated amount, the maximum and whether exceeding it blocks. A *hold* is a
reservation: its lines are reserved together or not at all. Stores implement the same semantics
(``memory://`` in-process, ``redis://`` shared) and one contract test suite runs on every store.

Counters of fixed windows (day, billing period) hold ``used`` and ``reserved``; a rolling minute is a set
of one-second buckets where a reservation sits in the bucket of the second it was made. Consumption is
``used + reserved``. A store that has never seen a key (first use, after a restart) reports it *missing*;
the engine loads the key's usage from the ledger and ``seed``s it (set only if still absent), so the
counters always start from what the ledger says.

Every key and hold belongs to a *group*: the organization. A key names its group before its first ``|``
(``group_of``), a hold, settlement and release name it beside the id. Nothing crosses groups: one hold's
lines are all of its group. A store spread over several servers (Redis Cluster) keeps each group on one,
so every decision is still one atomic step; the others ignore groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Literal, NamedTuple, Protocol, TypeVar

WindowKind = Literal["fixed", "rolling"]
ROLLING_SECONDS = 60
# A tally counts events (quota refusals) over a rolling hour, in one-minute buckets: bounded memory
# however many events come, at the price of the oldest minute being counted whole.
TALLY_MINUTES = 60
T = TypeVar("T")


def answered(call: Callable[[], T]) -> Future[T]:
    """A future already answered with what ``call`` returns or raises: ``reserve_queued`` of a store
    whose calls are not queued."""
    future: Future[T] = Future()
    try:
        future.set_result(call())
    except Exception as exc:
        future.set_exception(exc)
    return future


def group_of(key: str) -> str:
    """The group a key belongs to: its text before the first ``|`` (``""`` when it has none)."""
    cut = key.find("|")
    return key[:cut] if cut >= 0 else ""


class Line(NamedTuple):
    key: str
    amount: int  # the estimate, >= 0
    maximum: int  # -1: unlimited, never refuses
    block: bool  # refuse when it would exceed ``maximum``; else admit and report overage
    kind: WindowKind
    # fixed: unix second the window ends (the counter may be forgotten a day after); one key, one end
    reset_s: int


class Hold(NamedTuple):
    id: str
    lines: tuple[Line, ...]
    expires_us: int  # the lease: past it the reservation is abandoned and gets reaped
    group: str = ""  # every line's key is of this group


class Level(NamedTuple):
    """A counter after a decision: what is consumed (used + reserved) and when the window frees up."""

    consumed: int
    reset_s: int


class Verdict(NamedTuple):
    admitted: bool
    # Index of the first line that refused (admitted is False and missing is empty).
    refused: int | None = None
    # Seconds until the refusing line could admit this amount (at least 1).
    retry_after_s: int = 0
    # Admitted past a non-blocking maximum.
    overage: bool = False
    # Lines whose counters the store does not hold: seed them and ask again. Nothing was reserved.
    missing: tuple[int, ...] = ()
    # Per line, after the decision.
    levels: tuple[Level, ...] = ()


class Seed(NamedTuple):
    key: str
    kind: WindowKind
    reset_s: int
    used: int = 0  # fixed windows
    buckets: tuple[tuple[int, int], ...] = ()  # rolling windows: (unix second, amount)


class Settlement(NamedTuple):
    hold_id: str
    actual: tuple[int, ...]  # per line of the hold, in order
    group: str = ""  # the hold's


class Release(NamedTuple):
    hold_id: str
    group: str = ""  # the hold's


class CounterStoreUnavailable(Exception):
    """The counter store cannot be reached; the engine fails closed (503) or open, as configured."""


class CounterStore(Protocol):
    # True when the counters live in this process (no I/O): callers on an event loop may use them there.
    in_process: bool
    # True when calls are queued (the database's writer, the Redis store's own threads): an event loop may
    # await ``reserve_queued``.
    queued: bool
    # True when calls are jobs of the database's writer: a write queued after ``reserve_queued`` may read
    # its verdicts (``verdicts_so_far``) and commit with them.
    in_writer: bool

    def reserve(self, holds: Sequence[Hold], now_us: int) -> list[Verdict]:
        """Decide each hold in order, atomically per hold, in one round trip."""
        ...

    def reserve_queued(self, holds: Sequence[Hold], now_us: int) -> Future[list[Verdict]]:
        """``reserve`` without waiting in this thread where the store's calls are queued (``queued``: the
        database's writer, the Redis store's threads): the verdicts' future, answered once they are
        stored. A store that is not queued answers it at once, having waited. A verdict may be a missing
        one, as from ``reserve``."""
        ...

    def verdicts_so_far(self, verdicts: Future[list[Verdict]]) -> list[Verdict]:
        """Inside a job of the database's writer queued after the ``reserve_queued`` that answered
        ``verdicts`` (a store ``in_writer`` only): those verdicts, decided in this transaction or a
        committed one. Raises what that reserve raised. Other stores raise ``NotImplementedError``."""
        ...

    def settle(self, settlements: Sequence[Settlement], now_us: int) -> None:
        """Replace each hold's estimate with its actual usage; unknown holds (already reaped) are
        skipped. A store may send this with its next round trip instead of at once; every later call
        (reserve, levels, expired) observes it. Never waits for I/O (a store that has any queues it):
        an event loop calls it."""
        ...

    def release(self, releases: Sequence[Release], now_us: int) -> None:
        """Give back each hold's estimate; unknown holds are skipped. Deferred and never waiting, like
        settle."""
        ...

    def seed(self, seeds: Sequence[Seed], now_us: int) -> None:
        """Set counters that are still absent; present ones are left alone (another process won)."""
        ...

    def levels(self, lines: Sequence[Line], now_us: int) -> list[Level | None]:
        """Current consumption of each line's counter; None where the store does not hold it."""
        ...

    def expired(self, now_us: int, limit: int = 100) -> list[Hold]:
        """Holds whose lease ended before ``now_us`` (oldest first), still holding their estimate."""
        ...

    def tally(self, key: str, now_us: int) -> int:
        """Count one event under ``key`` and answer how many fell in the last ``TALLY_MINUTES`` minutes
        (this one included), across every process that shares the store."""
        ...

    def ping(self, now_us: int) -> None:
        """One round trip to the store (readiness); ``CounterStoreUnavailable`` when it cannot be reached."""
        ...

    def close(self) -> None: ...
