"""``memory://``: counters in this process, behind one lock. With the SQL store it is authoritative for a
single server process: a fresh process seeds each counter from the ledger on first use."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from meterline.quotas.counters import (
    ROLLING_SECONDS,
    TALLY_MINUTES,
    Hold,
    Level,
    Line,
    Seed,
    Settlement,
    Verdict,
)

_FORGET_AFTER_S = 86_400  # keep a finished fixed window a day, for late settlements and reads
_SWEEP_EVERY = 10_000


@dataclass(slots=True)
class _Fixed:
    used: int
    reserved: int
    reset_s: int


@dataclass(slots=True)
class _Rolling:
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
class _Held:
    hold: Hold
    second: int  # when it was reserved: the rolling bucket its estimate sits in
    # Per line, the counter its estimate sits on: settling moves these without looking them up again.
    # (A fixed counter is swept only once nothing is reserved on it; one swept since is moved in vain.)
    counters: list[_Fixed | _Rolling]


def refuses(consumed: int, amount: int, maximum: int) -> bool:
    """A limit refuses what would take it past its maximum. A request that consumes nothing of a meter
    (an event without tokens, an unpriced model) is not stopped by that meter being used up."""
    return maximum >= 0 and amount > 0 and consumed + amount > maximum


class MemoryCounterStore:
    in_process = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fixed: dict[str, _Fixed] = {}
        self._rolling: dict[str, _Rolling] = {}
        self._holds: dict[str, _Held] = {}
        self._tallies: dict[str, dict[int, int]] = {}  # key -> minute -> events
        self._ops = 0

    # -- decisions ----------------------------------------------------------------------------
    def reserve(self, holds: Sequence[Hold], now_us: int) -> list[Verdict]:
        now_s = now_us // 1_000_000
        with self._lock:
            self._tick(now_s)
            return [self._reserve_one(hold, now_s) for hold in holds]

    def _reserve_one(self, hold: Hold, now_s: int) -> Verdict:
        if hold.id in self._holds:
            raise ValueError(f"reservation {hold.id} exists already")
        lines = hold.lines
        fixed, rolling = self._fixed, self._rolling
        # The hot path of every request: one look-up per line, consumption read once; every line is
        # checked before any is moved (all or nothing).
        counters: list[_Fixed | _Rolling] = []
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
            if isinstance(counter, _Fixed):
                counter.reserved += amount
                level = (value + amount, counter.reset_s)
            else:
                counter.add(now_s, amount)
                level = (value + amount, counter.reset_s(now_s))
            levels.append(tuple.__new__(Level, level))  # as engine.py builds its lines: half the time
        self._holds[hold.id] = _Held(hold, now_s, counters)
        return Verdict(True, None, 0, overage, (), tuple(levels))

    def _missing(self, lines: Sequence[Line]) -> Verdict:
        return Verdict(
            admitted=False, missing=tuple(i for i, line in enumerate(lines) if not self._has(line))
        )

    def settle(self, settlements: Sequence[Settlement], now_us: int) -> None:
        with self._lock:
            for settlement in settlements:
                self._finish(settlement.hold_id, settlement.actual)

    def release(self, hold_ids: Sequence[str], now_us: int) -> None:
        with self._lock:
            for hold_id in hold_ids:
                self._finish(hold_id, None)

    def _finish(self, hold_id: str, actual: Sequence[int] | None) -> None:
        held = self._holds.pop(hold_id, None)
        if held is None:
            return
        lines = held.hold.lines
        if actual is None:
            actual = (0,) * len(lines)
        elif len(actual) != len(lines):
            raise ValueError("a settlement has one actual amount per line of its reservation")
        for line, counter, spent in zip(lines, held.counters, actual, strict=True):
            if isinstance(counter, _Fixed):
                counter.reserved -= line.amount
                counter.used += spent
            else:
                counter.add(held.second, spent - line.amount)

    # -- loading and reading ------------------------------------------------------------------
    def seed(self, seeds: Sequence[Seed], now_us: int) -> None:
        now_s = now_us // 1_000_000
        with self._lock:
            for seed in seeds:
                if seed.kind == "fixed":
                    self._fixed.setdefault(seed.key, _Fixed(seed.used, 0, seed.reset_s))
                elif seed.key not in self._rolling:
                    rolling = _Rolling()
                    for second, amount in sorted(seed.buckets):
                        if second > now_s - ROLLING_SECONDS:
                            rolling.add(second, amount)
                    self._rolling[seed.key] = rolling

    def levels(self, lines: Sequence[Line], now_us: int) -> list[Level | None]:
        now_s = now_us // 1_000_000
        with self._lock:
            return [self._level(line, now_s) if self._has(line) else None for line in lines]

    def expired(self, now_us: int, limit: int = 100) -> list[Hold]:
        with self._lock:
            due = [held.hold for held in self._holds.values() if held.hold.expires_us < now_us]
        return sorted(due, key=lambda hold: hold.expires_us)[:limit]

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

    # -- internals ----------------------------------------------------------------------------
    def _has(self, line: Line) -> bool:
        return line.key in (self._fixed if line.kind == "fixed" else self._rolling)

    def _consumed(self, line: Line, now_s: int) -> int:
        if line.kind == "fixed":
            counter = self._fixed[line.key]
            return counter.used + counter.reserved
        rolling = self._rolling[line.key]
        rolling.prune(now_s)
        return rolling.total

    def _level(self, line: Line, now_s: int) -> Level:
        consumed = self._consumed(line, now_s)
        if line.kind == "fixed":
            return Level(consumed, self._fixed[line.key].reset_s)
        return Level(consumed, self._rolling[line.key].reset_s(now_s))

    def _levels(self, lines: Sequence[Line], now_s: int) -> tuple[Level, ...]:
        return tuple(self._level(line, now_s) for line in lines)

    def _retry_after(self, line: Line, now_s: int) -> int:
        if line.kind == "fixed":
            return max(self._fixed[line.key].reset_s - now_s, 1)
        return self._rolling[line.key].retry_after(now_s, line.amount, line.maximum)

    def _tick(self, now_s: int) -> None:
        self._ops += 1
        if self._ops % _SWEEP_EVERY:
            return
        stale = [k for k, c in self._fixed.items() if c.reset_s + _FORGET_AFTER_S < now_s and not c.reserved]
        for key in stale:
            del self._fixed[key]
