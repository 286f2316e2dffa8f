"""``memory://``: counters in this process, behind one lock. With the SQL store it is authoritative for a
single server process: a fresh process seeds each counter from the ledger on first use."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from meterline.quotas.counters import (
    ROLLING_SECONDS,
    TALLY_MINUTES,
    Hold,
    Level,
    Line,
    Release,
    Seed,
    Settlement,
    Verdict,
    answered,
)

_FORGET_AFTER_S = 86_400  # keep a finished fixed window a day, for late settlements and reads
_SWEEP_EVERY = 10_000


@dataclass(slots=True)
class Fixed:
    used: int
    reserved: int
    reset_s: int


@dataclass(slots=True)
class Rolling:
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, amount], oldest first
    total: int = 0
    horizon: int = 0  # seconds at or before this have left the window

    def prune(self, now_s: int) -> None:
        horizon = self.horizon = max(self.horizon, now_s - ROLLING_SECONDS)
        while self.buckets and self.buckets[0][0] <= horizon:
            self.total -= self.buckets.popleft()[1]

    def add(self, second: int, amount: int) -> None:
        if second <= self.horizon:  # that second has left the window: nothing to adjust
            return
        for bucket in reversed(self.buckets):
            if bucket[0] == second:
                bucket[1] += amount
                self.total += amount
                return
            if bucket[0] < second:
                break
        if amount == 0:
            return
        if self.buckets and self.buckets[-1][0] > second:  # late adjustment of an older second
            items = sorted([*self.buckets, [second, amount]])
            self.buckets = deque(items)
        else:
            self.buckets.append([second, amount])
        self.total += amount

    def reset_s(self, now_s: int) -> int:
        return self.buckets[0][0] + ROLLING_SECONDS if self.buckets else now_s

    def retry_after(self, now_s: int, amount: int, maximum: int) -> int:
        if amount > maximum:
            return ROLLING_SECONDS
        excess = self.total + amount - maximum
        for second, value in self.buckets:
            excess -= value
            if excess <= 0 and (self.total + amount > maximum or value > 0):
                return max(second + ROLLING_SECONDS - now_s, 1)
        return ROLLING_SECONDS


@dataclass(slots=True)
class Held:
    hold: Hold
    second: int  # when it was reserved: the rolling bucket its estimate sits in
    # Per line, the counter its estimate sits on: settling moves these without looking them up again.
    # (A fixed counter is swept only once nothing is reserved on it; one swept since is moved in vain.)
    counters: list[Fixed | Rolling]


def refuses(consumed: int, amount: int, maximum: int) -> bool:
    """A limit refuses what would take it past its maximum. A request that consumes nothing of a meter
    (an event without tokens, an unpriced model) is not stopped by that meter being used up."""
    return maximum >= 0 and amount > 0 and consumed + amount > maximum


class CounterBook:
    """The counters and holds themselves, and what every operation does to them: the one statement of
    the stores' semantics. Not thread-safe: ``MemoryCounterStore`` keeps one behind a lock, and the SQL
    store loads the part a transaction touches into one (``storage/sql_counters.py``)."""

    __slots__ = ("fixed", "holds", "rolling")

    def __init__(self) -> None:
        self.fixed: dict[str, Fixed] = {}
        self.rolling: dict[str, Rolling] = {}
        self.holds: dict[str, Held] = {}

    def reserve_one(self, hold: Hold, now_s: int) -> Verdict:
        if hold.id in self.holds:
            raise ValueError(f"reservation {hold.id} exists already")
        lines = hold.lines
        fixed, rolling = self.fixed, self.rolling
        # The hot path of every request: one look-up per line, consumption read once; every line is
        # checked before any is moved (all or nothing).
        counters: list[Fixed | Rolling] = []
        consumed: list[int] = []
        refused = -1
        overage = False
        for index, (key, amount, maximum, block, kind, _reset_s) in enumerate(lines):
            if kind == "fixed":
                window = fixed.get(key)
                if window is None:
                    return self._missing(lines)
                value = window.used + window.reserved
                counters.append(window)
            else:
                minute = rolling.get(key)
                if minute is None:
                    return self._missing(lines)
                minute.prune(now_s)
                value = minute.total
                counters.append(minute)
            consumed.append(value)
            # ``refuses`` inlined: this runs for every line of every request.
            if maximum < 0 or amount <= 0 or value + amount <= maximum:
                continue
            if not block:
                overage = True
            elif refused < 0:
                refused = index
        if refused >= 0:
            return Verdict(
                admitted=False,
                refused=refused,
                retry_after_s=self._retry_after(lines[refused], now_s),
                levels=self._levels(lines, now_s),
            )
        levels: list[Level] = []
        for line, counter, value in zip(lines, counters, consumed, strict=True):
            amount = line.amount
            if isinstance(counter, Fixed):
                counter.reserved += amount
                level = (value + amount, counter.reset_s)
            else:
                counter.add(now_s, amount)
                level = (value + amount, counter.reset_s(now_s))
            levels.append(tuple.__new__(Level, level))  # as engine.py builds its lines: half the time
        self.holds[hold.id] = Held(hold, now_s, counters)
        return Verdict(True, None, 0, overage, (), tuple(levels))

    def _missing(self, lines: Sequence[Line]) -> Verdict:
        return Verdict(admitted=False, missing=tuple(i for i, line in enumerate(lines) if not self.has(line)))

    def finish(self, hold_id: str, actual: Sequence[int] | None) -> None:
        """Settle (``actual`` per line) or release (None) a hold; an unknown hold is skipped."""
        held = self.holds.pop(hold_id, None)
        if held is None:
            return
        lines = held.hold.lines
        if actual is None:
            actual = (0,) * len(lines)
        elif len(actual) != len(lines):
            raise ValueError("a settlement has one actual amount per line of its reservation")
        for line, counter, spent in zip(lines, held.counters, actual, strict=True):
            if isinstance(counter, Fixed):
                counter.reserved -= line.amount
                counter.used += spent
            else:
                counter.add(held.second, spent - line.amount)

    def seed(self, seed: Seed, now_s: int) -> None:
        if seed.kind == "fixed":
            self.fixed.setdefault(seed.key, Fixed(seed.used, 0, seed.reset_s))
        elif seed.key not in self.rolling:
            rolling = Rolling()
            for second, amount in sorted(seed.buckets):
                if second > now_s - ROLLING_SECONDS:
                    rolling.add(second, amount)
            self.rolling[seed.key] = rolling

    def has(self, line: Line) -> bool:
        return line.key in (self.fixed if line.kind == "fixed" else self.rolling)

    def level(self, line: Line, now_s: int) -> Level:
        if line.kind == "fixed":
            counter = self.fixed[line.key]
            return Level(counter.used + counter.reserved, counter.reset_s)
        rolling = self.rolling[line.key]
        rolling.prune(now_s)
        return Level(rolling.total, rolling.reset_s(now_s))

    def _levels(self, lines: Sequence[Line], now_s: int) -> tuple[Level, ...]:
        return tuple(self.level(line, now_s) for line in lines)

    def _retry_after(self, line: Line, now_s: int) -> int:
        if line.kind == "fixed":
            return max(self.fixed[line.key].reset_s - now_s, 1)
        return self.rolling[line.key].retry_after(now_s, line.amount, line.maximum)

    def expired(self, now_us: int, limit: int) -> list[Hold]:
        due = [held.hold for held in self.holds.values() if held.hold.expires_us < now_us]
        return sorted(due, key=lambda hold: hold.expires_us)[:limit]

    def sweep(self, now_s: int) -> None:
        """Forget fixed windows a day past their end with nothing reserved on them."""
        stale = [k for k, c in self.fixed.items() if c.reset_s + _FORGET_AFTER_S < now_s and not c.reserved]
        for key in stale:
            del self.fixed[key]


class MemoryCounterStore:
    in_process = True
    queued = False
    in_writer = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.book = CounterBook()
        self._tallies: dict[str, dict[int, int]] = {}  # key -> minute -> events
        self._ops = 0

    # -- decisions ----------------------------------------------------------------------------
    def reserve(self, holds: Sequence[Hold], now_us: int) -> list[Verdict]:
        now_s = now_us // 1_000_000
        with self._lock:
            self._ops += 1
            if not self._ops % _SWEEP_EVERY:
                self.book.sweep(now_s)
            reserve_one = self.book.reserve_one
            return [reserve_one(hold, now_s) for hold in holds]

    def reserve_queued(self, holds: Sequence[Hold], now_us: int) -> Future[list[Verdict]]:
        return answered(lambda: self.reserve(holds, now_us))

    def verdicts_so_far(self, verdicts: Future[list[Verdict]]) -> list[Verdict]:
        raise NotImplementedError("in-process counters are not the database writer's")

    def settle(self, settlements: Sequence[Settlement], now_us: int) -> None:
        with self._lock:
            for settlement in settlements:
                self.book.finish(settlement.hold_id, settlement.actual)

    def release(self, releases: Sequence[Release], now_us: int) -> None:
        with self._lock:
            for release in releases:
                self.book.finish(release.hold_id, None)

    # -- loading and reading ------------------------------------------------------------------
    def seed(self, seeds: Sequence[Seed], now_us: int) -> None:
        now_s = now_us // 1_000_000
        with self._lock:
            for seed in seeds:
                self.book.seed(seed, now_s)

    def levels(self, lines: Sequence[Line], now_us: int) -> list[Level | None]:
        now_s = now_us // 1_000_000
        book = self.book
        with self._lock:
            return [book.level(line, now_s) if book.has(line) else None for line in lines]

    def expired(self, now_us: int, limit: int = 100) -> list[Hold]:
        with self._lock:
            return self.book.expired(now_us, limit)

    def tally(self, key: str, now_us: int) -> int:
        minute = now_us // 60_000_000
        with self._lock:
            buckets = self._tallies.setdefault(key, {})
            buckets[minute] = buckets.get(minute, 0) + 1
            for old in [m for m in buckets if m <= minute - TALLY_MINUTES]:
                del buckets[old]
            return sum(buckets.values())

    def ping(self, now_us: int) -> None:
        return None

    def close(self) -> None:
        return None
