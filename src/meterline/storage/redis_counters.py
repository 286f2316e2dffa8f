"""``redis://``: the counter store shared by every ``meterline serve`` process.

Semantics are those of ``quotas/memory.py``, line for line; the script ``redis_counters.lua`` says how it
keeps them atomic and exact. What this module adds is the traffic plan: ONE round trip per decision.

* Every call is one ``EVALSHA`` of one script that applies, in order, the pending settlements and
  releases, seeds, reservations, level reads and the expired query.
* ``settle`` and ``release`` send nothing: they join a buffer that rides along with the next call. So
  every later read of this process observes them (they run first, in the same atomic call). A daemon
  thread sends the buffer if no call took it within ``flush_interval_s``, so other processes see it soon.
* An entry leaves the buffer only once a call that carried it has succeeded. Concurrent calls may carry
  the same entry twice; that is harmless because finishing a hold deletes it, and finishing an unknown
  hold is a no-op. When Redis is unreachable the entries stay and go with the next call.
* A reply lost after Redis ran a reservation leaves that hold reserved until its lease ends and the
  reaper (``expired`` + ``release``) gives it back; the caller saw ``CounterStoreUnavailable``.
* Hold ids must be unique for good (they are UUIDs): a late duplicate of a finish could otherwise meet
  a newer hold of the same id.
* Lifetimes are relative to the caller's clock (``EXPIRE`` of ``reset_s + 1 day - now``, not ``EXPIREAT``),
  so an injected clock and Redis' wall clock never disagree about whether a counter is gone. A hold
  outlives its lease by a day, so the reaper finds it; a rolling window lives 120 s after its last
  reservation.

Needs Redis >= 6.2 (``GETDEL``), standalone or with replicas (not Redis Cluster: the script builds keys).
Unreachable, timed out, loading or read-only: ``CounterStoreUnavailable``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Sequence
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meterline.quotas.counters import (
    CounterStoreUnavailable,
    Hold,
    Level,
    Line,
    Seed,
    Settlement,
    Verdict,
    WindowKind,
)
from meterline.storage.redis_connections import RedisConnections

log = logging.getLogger("meterline.quotas.redis")

_SCRIPT = (files("meterline.storage") / "redis_counters.lua").read_text(encoding="utf-8")
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()  # Redis names scripts by SHA-1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what HINCRBY can hold
_KIND_CODE: dict[str, str] = {"fixed": "f", "rolling": "r"}
_KIND: dict[str, WindowKind] = {"f": "fixed", "r": "rolling"}
_FORGET_AFTER_S = 86_400  # as memory.py: a finished fixed window is kept a day
_MIN_TTL_S = 3_600  # a seed of a long-gone window must not vanish before it is used
_BATCH = 10_000  # finishes per call while draining a backlog: keeps each script short for Redis
# Redis answers that mean "not now" rather than "wrong".
_TRANSIENT = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


def _int(value: int) -> str:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} does not fit a 64-bit counter")
    return str(value)


def _line(line: Line) -> list[Any]:
    return [
        line.key,
        _KIND_CODE[line.kind],
        _int(line.amount),
        _int(line.maximum),
        1 if line.block else 0,
        line.reset_s,
    ]


def _level(raw: list[Any]) -> Level:
    return Level(int(raw[0]), int(raw[1]))  # consumed comes as a decimal string: it may pass 2^53


def _verdict(raw: list[Any]) -> Verdict:
    if raw[0] == 1:
        return Verdict(admitted=True, overage=bool(raw[1]), levels=tuple(_level(x) for x in raw[2]))
    if raw[0] == 2:
        return Verdict(admitted=False, missing=tuple(int(i) for i in raw[1]))
    return Verdict(
        admitted=False,
        refused=int(raw[1]),
        retry_after_s=int(raw[2]),
        levels=tuple(_level(x) for x in raw[3]),
    )


def _hold(stored: bytes | str) -> Hold:
    _second, (hold_id, expires_us, lines, _ttl) = orjson.loads(stored)
    return Hold(
        id=hold_id,
        lines=tuple(
            Line(key, int(amount), int(maximum), bool(block), _KIND[kind], int(reset_s))
            for key, kind, amount, maximum, block, reset_s in lines
        ),
        expires_us=int(expires_us),
    )


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}:{parts.port or 6379}{parts.path}"


class RedisCounterStore:
    in_process = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "meterline:",
        flush_interval_s: float = 0.002,
        socket_timeout_s: float = 1.0,
        max_pending: int = 1_000_000,
        max_connections: int = 64,
    ) -> None:
        # Threads beyond ``max_connections`` wait for a connection (up to the socket timeout) instead of
        # opening ever more of them. Nothing is retried: the engine decides what an unreachable store
        # means (fail closed or open).
        self._redis = RedisConnections(url, limit=max_connections, timeout_s=socket_timeout_s)
        self._url = url
        self._where = _redacted(url)
        self._prefix = prefix
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[tuple[int, bytes]] = deque()  # (sequence number, encoded finish)
        self._seq = 0
        self._dropped = 0
        self._closing = False
        self._flusher = threading.Thread(target=self._flush_loop, name="meterline-counter-flush", daemon=True)
        self._flusher.start()

    # -- the protocol ---------------------------------------------------------------------------
    def reserve(self, holds: Sequence[Hold], now_us: int) -> list[Verdict]:
        if not holds:
            return []
        # The hold's key outlives its lease by a day: long enough for the reaper, not forever.
        lease_s = [max(-(-(hold.expires_us - now_us) // 1_000_000), 0) + _FORGET_AFTER_S for hold in holds]
        encoded = [
            [hold.id, _int(hold.expires_us), [_line(line) for line in hold.lines], ttl]
            for hold, ttl in zip(holds, lease_s, strict=True)
        ]
        answer = self._call(now_us, {"h": encoded})
        verdicts = [_verdict(raw) for raw in answer["v"]]
        if "d" in answer:
            raise ValueError(f"reservation {holds[int(answer['d'])].id} exists already")
        return verdicts

    def settle(self, settlements: Sequence[Settlement], now_us: int) -> None:
        self._enqueue([orjson.dumps([s.hold_id, [_int(a) for a in s.actual]]) for s in settlements])

    def release(self, hold_ids: Sequence[str], now_us: int) -> None:
        self._enqueue([orjson.dumps([hold_id]) for hold_id in hold_ids])

    def seed(self, seeds: Sequence[Seed], now_us: int) -> None:
        if not seeds:
            return
        now_s = now_us // 1_000_000
        encoded = [
            [
                seed.key,
                _KIND_CODE[seed.kind],
                seed.reset_s,
                _int(seed.used),
                [[second, _int(amount)] for second, amount in sorted(seed.buckets)],
                max(seed.reset_s + _FORGET_AFTER_S - now_s, _MIN_TTL_S),  # seconds from now
            ]
            for seed in seeds
        ]
        self._call(now_us, {"s": encoded})

    def levels(self, lines: Sequence[Line], now_us: int) -> list[Level | None]:
        if not lines:
            return []
        answer = self._call(now_us, {"l": [[line.key, _KIND_CODE[line.kind]] for line in lines]})
        return [_level(raw) if raw else None for raw in answer["l"]]

    def ping(self, now_us: int) -> None:
        self._call(now_us, {})  # a script call like any other: it also carries the buffered finishes

    def expired(self, now_us: int, limit: int = 100) -> list[Hold]:
        answer = self._call(now_us, {"x": max(limit, 0)})
        return [_hold(stored) for stored in answer["x"]]

    def tally(self, key: str, now_us: int) -> int:
        return int(self._call(now_us, {"t": key})["t"])

    def close(self) -> None:
        with self._wake:
            if self._closing:
                return
            self._closing = True
            self._wake.notify_all()
        self._flusher.join(timeout=5)
        try:
            self.flush()
        except CounterStoreUnavailable as exc:
            log.warning("closing with %d settlements/releases unsent: %s", len(self._pending), exc)
        finally:
            self._redis.close()

    # -- the buffer -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Settlements and releases not yet confirmed by Redis."""
        return len(self._pending)

    def flush(self) -> None:
        """Send buffered settlements and releases now."""
        if self._pending:
            self._call(0, {})

    def _enqueue(self, items: list[bytes]) -> None:
        if not items:
            return
        with self._wake:
            was_empty = not self._pending
            for item in items:
                self._seq += 1
                self._pending.append((self._seq, item))
            overflow = len(self._pending) - self._max_pending
            for _ in range(max(overflow, 0)):
                self._pending.popleft()
            if overflow > 0:
                self._dropped += overflow
                log.warning(
                    "Redis counter buffer full (%d): dropped the oldest %d settlements/releases (%d in "
                    "all); their counters stay off until reseeded from the ledger",
                    self._max_pending,
                    overflow,
                    self._dropped,
                )
            if was_empty:
                self._wake.notify()

    def _confirmed(self, upto: int) -> None:
        with self._lock:
            while self._pending and self._pending[0][0] <= upto:
                self._pending.popleft()

    def _flush_loop(self) -> None:
        backoff = self._flush_interval_s
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                oldest = self._pending[0][0]
                self._wake.wait(self._flush_interval_s)  # a call may take them along meanwhile
                if self._closing:
                    return
                if not self._pending or self._pending[0][0] > oldest:
                    continue
            try:
                self.flush()
                backoff = self._flush_interval_s
            except Exception as exc:
                log.warning("could not send settlements to Redis (retrying): %s", exc)
                backoff = min(max(backoff * 2, 0.05), 1.0)
                with self._wake:
                    if not self._closing:
                        self._wake.wait(backoff)

    # -- the call -------------------------------------------------------------------------------
    def _call(self, now_us: int, parts: dict[str, Any]) -> dict[str, Any]:
        """One script call carrying every buffered finish; returns the script's answer."""
        now = {"n": now_us // 1_000_000, "u": str(now_us)}
        while True:
            with self._lock:
                batch = list(self._pending) if len(self._pending) <= _BATCH else None
                if batch is None:
                    backlog = [self._pending[i] for i in range(_BATCH)]
            if batch is not None:
                break
            self._send(backlog, now)  # drain in short scripts first: Redis serves others in between
        return self._send(batch, {**now, **parts})

    def _send(self, finishes: list[tuple[int, bytes]], parts: dict[str, Any]) -> dict[str, Any]:
        body = orjson.dumps(parts)
        request = b'{"f":[' + b",".join(item for _, item in finishes) + b"]" + (b"," if parts else b"")
        request += body[1:]
        try:
            raw = self._evalsha(request)
        except ResponseError as exc:
            if str(exc).startswith(_TRANSIENT):
                raise CounterStoreUnavailable(f"Redis at {self._where}: {exc}") from exc
            # The script stopped part way (e.g. a counter would pass 2^63). Finishes before the fault
            # were applied; sending the rest again would fail the same way on every later call.
            if finishes:
                log.error("dropping %d settlements/releases after a script error: %s", len(finishes), exc)
                self._confirmed(finishes[-1][0])
            raise RuntimeError(f"Redis counter script failed: {exc}") from exc
        if finishes:
            self._confirmed(finishes[-1][0])
        answer: dict[str, Any] = orjson.loads(raw)
        if "b" in answer:
            log.error("settlements with the wrong number of amounts were dropped: %s", answer["b"])
        return answer

    def _evalsha(self, request: bytes) -> bytes:
        try:
            try:
                raw = self._redis.call("EVALSHA", _SHA, 0, request, self._prefix)
            except NoScriptError:  # a new or restarted server: load once, then run
                self._redis.call("SCRIPT", "LOAD", _SCRIPT)
                raw = self._redis.call("EVALSHA", _SHA, 0, request, self._prefix)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise CounterStoreUnavailable(f"Redis at {self._where} is unavailable: {exc}") from exc
        assert isinstance(raw, bytes)
        return raw
