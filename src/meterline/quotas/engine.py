"""The quota engine: reserve an estimate against every applicable limit in one atomic step, then settle
the actual usage (or release it).

Which limits apply to a request (its *bounds*) comes from the organization's plan, its spend cap, the
calling key's and identifier's own limits, and each limit's window placed at the time of the usage.
Counters live in a ``CounterStore``; a counter the store does not hold yet is loaded from the ledger
(``UsageSource``) first, so the counters are always a projection of the ledger plus what is in flight.

Limits gate the present: a late report of usage from an earlier window (an event with an old timestamp)
is counted in that window but never refused, because the usage has already happened.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import NamedTuple, NoReturn, Protocol

from meterline import ids
from meterline.clock import MICROS_PER_DAY, Clock, from_micros, rfc3339, to_micros
from meterline.errors import LimitExceeded, ServiceUnavailable
from meterline.kept import Kept
from meterline.money import format_nanos
from meterline.quotas.counters import (
    ROLLING_SECONDS,
    CounterStore,
    CounterStoreUnavailable,
    Hold,
    Level,
    Line,
    Release,
    Seed,
    Settlement,
    Verdict,
    WindowKind,
)
from meterline.quotas.limits import NAMED_LIMITS, NANOS_LIMITS, UNLIMITED, Limit, Scope, Window
from meterline.quotas.limits import NANOS_PER_WHOLE as NANOS
from meterline.quotas.periods import Period, billing_period, utc_day
from meterline.quotas.plans import Plan

log = logging.getLogger("meterline.quotas")
_UNCHECKABLE = "usage limits cannot be checked right now (counter store unreachable); retry shortly"


class WouldRead(Exception):
    """A decision needs usage read from the ledger (a window or bonus to load) where reads are not
    allowed (``no_reads``): nothing was decided; decide again where the read may happen."""


_reads_allowed: ContextVar[bool] = ContextVar("meterline_quota_reads", default=True)


@contextmanager
def no_reads() -> Iterator[None]:
    """Decisions in this block (on this thread or task) never read the ledger: one that would raises
    ``WouldRead`` instead. For an event loop, where a read would stall every request."""
    token = _reads_allowed.set(False)
    try:
        yield
    finally:
        _reads_allowed.reset(token)


def _may_read() -> None:
    if not _reads_allowed.get():
        raise WouldRead("this decision needs usage from the ledger")


_MONEY_METERS = ("credits", "spend")
MAX_COUNTER = 2**63 - 1
# Reservation ids: random per process, then counted (unique across processes sharing a store, and
# cheaper than fresh randomness per request).
_HOLD_PREFIX = f"{ids.prefixed('rsv', 8)}_"
_hold_numbers = itertools.count(1)
_PLACED_MAX = 10_000
_ROLLING_US = ROLLING_SECONDS * 1_000_000
_MICROSECOND = timedelta(microseconds=1)
# What a money meter reserves at least: one nano. A request estimated at nothing (a model missing from
# the price book) is still refused by a credits or spend limit that is used up, not let through a reached
# wall; settling replaces the nano with the actual amount, so counters still equal the ledger.
_FLOOR = {"credits": 1, "spend": 1}
_SCOPE_TAG = {"organization": "o", "workspace": "w", "key": "k", "identifier": "i"}
_WINDOW_WORDS = {"minute": "this minute", "day": "today (UTC)", "period": "this billing period"}


@dataclass(frozen=True, slots=True)
class Subject:
    """Who consumes: the organization (with its plan) and the workspace, key and identifier calling."""

    organization_id: str
    plan: Plan
    billing_anchor_day: int
    workspace_id: str
    spend_cap_nanos: int | None = None
    key_id: str | None = None
    key_limits: Mapping[str, int] | None = None
    identifier_id: str | None = None
    identifier_limits: Mapping[str, int] | None = None
    # Usage that has already happened (reported by OpenTelemetry): every limit counts it, none refuses
    # it, and what passes one is marked overage.
    after_the_fact: bool = False

    def scope_value(self, scope: Scope) -> str | None:
        if scope == "organization":
            return self.organization_id
        if scope == "workspace":
            return self.workspace_id
        if scope == "key":
            return self.key_id
        return None if self.identifier_id is None else f"{self.workspace_id}/{self.identifier_id}"


@dataclass(frozen=True, slots=True)
class WindowQuery:
    """Usage of one meter by one scope in [start_us, end_us), as the ledger has it."""

    organization_id: str
    scope: Scope
    workspace_id: str | None
    key_id: str | None
    identifier_id: str | None
    meter: str
    start_us: int
    end_us: int


class UsageSource(Protocol):
    """Settled usage from the ledger (its rollups), to load counters a store does not hold."""

    def window_usage(self, query: WindowQuery) -> int: ...

    def recent_usage(self, query: WindowQuery) -> list[tuple[int, int]]:
        """Per unix second in the window: the amount settled then."""
        ...

    def bonus_available(self, organization_id: str, period_start_us: int) -> int:
        """Bonus credits (nanos) this period may draw on: every grant less what earlier periods drew."""
        ...


@dataclass(frozen=True, slots=True)
class Bound:
    """A limit placed on one scope and one window: one counter."""

    limit: Limit
    key: str
    window: Period | None  # None for the rolling minute
    current: bool  # the window is the present one (only then does a block limit refuse)
    organization_id: str
    scope_value: str

    template: Line  # this bound's line with no amount (see ``place``)

    def line(self, amount: int) -> Line:
        t = self.template
        return Line(t.key, amount, t.maximum, t.block, t.kind, t.reset_s)


def place(
    limit: Limit, key: str, window: Period | None, current: bool, organization_id: str, scope_value: str
) -> Bound:
    # Counters are 64-bit (Redis); a maximum beyond that cannot be reached and means "unlimited".
    maximum = limit.max if limit.max <= MAX_COUNTER else UNLIMITED
    if window is None:
        # Rate limits block (limits_of makes them so), except for usage reported after the fact.
        template = Line(key, 0, maximum, limit.policy == "block", "rolling", 0)
    else:
        block = limit.policy == "block" and current
        template = Line(key, 0, maximum, block, "fixed", to_micros(window.end) // 1_000_000)
    return Bound(limit, key, window, current, organization_id, scope_value, template)


@dataclass(frozen=True, slots=True)
class RateWindow:
    """One rate limit as the ``X-RateLimit-*`` headers show it (-1: unlimited)."""

    limit: int
    remaining: int
    reset_s: int


@dataclass(frozen=True, slots=True)
class RateLimits:
    rpm: RateWindow
    tpm: RateWindow


class Reservation(NamedTuple):
    """One per decision: a NamedTuple rather than a frozen dataclass, whose ``__init__`` alone costs
    about a microsecond (a twentieth of a decision)."""

    id: str
    subject: Subject
    bounds: tuple[Bound, ...]
    amounts: Mapping[str, int]
    expires_us: int
    overage: bool
    levels: tuple[Level, ...] | None  # per bound, right after the reservation
    decided_us: int
    meters: tuple[str, ...]  # per bound: what a settle maps its actual amounts by
    checked: bool = True  # False when admitted unchecked because the counter store was down (fail open)

    @property
    def expires_at(self) -> datetime:
        return from_micros(self.expires_us)

    @property
    def rate_limits(self) -> RateLimits:
        """RPM and TPM as the reservation left them (worked out only when a response needs them)."""
        return _rate_limits(self.bounds, self.levels, self.decided_us)


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """A limit with its consumption, for ``GET /v1/usage``."""

    limit: Limit
    window: Period | None
    consumed: int  # settled + reserved

    @property
    def remaining(self) -> int:
        return UNLIMITED if self.limit.max == UNLIMITED else max(self.limit.max - self.consumed, 0)


def counter_key(organization_id: str, limit: Limit, window_tag: str, scope_value: str) -> str:
    """``organization|scope|meter|window|value``: the organization first (the key's group, see
    ``counters.group_of``), the value last (identifiers are free text); organization ids, meters and
    window tags never hold ``|``, so ``meter_of_key`` can read the meter back."""
    return f"{organization_id}|{_SCOPE_TAG[limit.scope]}|{limit.meter}|{window_tag}|{scope_value}"


def meter_of_key(key: str) -> str:
    return key.split("|", 3)[2]


def error_code(limit: Limit) -> str:
    if limit.meter == "credits":
        return "credits_exhausted"
    if limit.meter == "spend":
        return "spend_cap_reached"
    if limit.window == "minute":
        return "rate_limit_exceeded"
    return "quota_exceeded"


def limits_of(subject: Subject, bonus_nanos: int = 0) -> list[Limit]:
    """Every limit that applies to ``subject``, unlimited ones included (callers skip what they need)."""
    plan = subject.plan
    found: list[Limit] = []
    plan_values = {
        "daily_tokens": plan.daily_tokens,
        "monthly_tokens": plan.monthly_tokens,
        "daily_calls": plan.daily_calls,
        "monthly_calls": plan.monthly_calls,
        "rpm": plan.rpm,
        "tpm": plan.tpm,
    }
    for name, value in plan_values.items():
        meter, window = NAMED_LIMITS[name]
        # Rate limits always block; allowances follow the plan's overage policy.
        policy = "block" if window == "minute" else plan.overage
        found.append(Limit(meter, window, "organization", value, policy, name))
    if subject.spend_cap_nanos is not None:
        found.append(Limit("spend", "period", "organization", subject.spend_cap_nanos, "block", "spend_cap"))
    elif plan.monthly_credits != UNLIMITED:
        # Monthly allowance first, then bonus credits: together they are what this period may use.
        allowance = plan.monthly_credits * NANOS + bonus_nanos
        found.append(Limit("credits", "period", "organization", allowance, plan.overage, "credits"))
    found.extend(plan.limits)
    for scope, named in (("key", subject.key_limits), ("identifier", subject.identifier_limits)):
        if not named or subject.scope_value(scope) is None:  # type: ignore[arg-type]
            continue
        for name, value in named.items():
            meter, window = NAMED_LIMITS[name]
            whole = meter in _MONEY_METERS and name not in NANOS_LIMITS and value != UNLIMITED
            scaled = value * NANOS if whole else value
            found.append(Limit(meter, window, scope, scaled, "block", f"{scope}.{name}"))  # type: ignore[arg-type]
    if subject.after_the_fact:
        return [replace(limit, policy="overage") for limit in found]
    # Rate limits (minute windows) always block, an operator's extra ones too.
    return [
        replace(limit, policy="block") if limit.window == "minute" and limit.policy != "block" else limit
        for limit in found
    ]


def amounts_of(
    *, tokens: int, credits_nanos: int, cost_nanos: int, event: str, units: int, calls: int = 1
) -> dict[str, int]:
    """What one request or event consumes, per meter."""
    return {
        "tokens": tokens,
        "calls": calls,
        "credits": credits_nanos,
        "spend": cost_nanos,
        f"units:{event}": units,
    }


class _Placement(NamedTuple):
    """A subject's bounds, with each bound's line fields flattened next to its meter (what a decision
    copies into its lines) and the meters in order (what a settle maps its amounts by)."""

    bounds: tuple[Bound, ...]
    lines: tuple[tuple[str, str, int, bool, WindowKind, int, int], ...]
    meters: tuple[str, ...]

    @classmethod
    def of(cls, bounds: tuple[Bound, ...]) -> _Placement:
        lines = tuple(
            (b.limit.meter, t.key, t.maximum, t.block, t.kind, t.reset_s, _FLOOR.get(b.limit.meter, 0))
            for b in bounds
            for t in (b.template,)
        )
        return cls(bounds, lines, tuple(b.limit.meter for b in bounds))


@dataclass(frozen=True, slots=True)
class _Asked:
    """Requests placed as holds: what their verdicts are read against."""

    requests: Sequence[tuple[Subject, Mapping[str, int], datetime | None]]
    placements: list[_Placement]
    holds: list[Hold]
    now_us: int
    expires_us: int


@dataclass(frozen=True, slots=True)
class Queued:
    """A decision whose store call is queued (``QuotaEngine.reserve_queued``): await ``verdicts``, then
    read them with ``outcomes``, or give the decision up with ``abandon``."""

    engine: QuotaEngine
    asked: _Asked
    verdicts: Future[list[Verdict]]

    def outcomes(self, verdicts: Sequence[Verdict]) -> list[Reservation | LimitExceeded] | None:
        """The outcomes, as ``reserve_many`` answers them; None when a counter was missing (to be loaded
        from the ledger): then nothing is held (what was admitted beside it is given back). Read once."""
        if any(verdict.missing for verdict in verdicts):
            self.engine.release_holds(_admitted(self.asked.holds, verdicts))
            return None
        return self.engine._outcomes(self.asked, verdicts)

    def admitted_now(self) -> dict[str, bool]:
        """Inside a job of the database's writer queued after this decision (a store ``in_writer``): the
        holds it admitted, by id, each with whether it is overage. Empty when a counter was missing
        (``outcomes`` then gives back what was admitted beside it: nothing may be kept of it). Raises
        what the store's reserve raised."""
        verdicts = self.engine.store.verdicts_so_far(self.verdicts)
        if any(verdict.missing for verdict in verdicts):
            return {}
        pairs = zip(self.asked.holds, verdicts, strict=True)
        return {hold.id: verdict.overage for hold, verdict in pairs if verdict.admitted}

    def terms(self, index: int = 0) -> tuple[tuple[str, ...], int]:
        """What a reservation of request ``index`` will carry whatever the verdict (to write its durable
        half before the verdict is read): the meters of its bounds, and when it expires (µs)."""
        return self.asked.placements[index].meters, self.asked.expires_us

    def unavailable(self, cause: CounterStoreUnavailable) -> list[Reservation | LimitExceeded]:
        """What ``reserve_many`` answers when the store cannot be reached (its answer was ``cause``):
        ``ServiceUnavailable`` raised, or every request admitted unchecked when the engine fails open. A
        hold whose reply was lost is the reaper's, as with a thread's."""
        return self.engine._unavailable(self.asked, cause)

    def refuse(self, cause: CounterStoreUnavailable) -> NoReturn:
        """``ServiceUnavailable`` for a store out of reach, failing open or not: where no request can be
        admitted unchecked (the database holding the counters holds the reservations too)."""
        raise ServiceUnavailable(_UNCHECKABLE) from cause

    def abandon(self) -> None:
        """Nobody will read the verdicts (the caller was cancelled): once they come, what they admitted
        is given back."""

        def give_back(done: Future[list[Verdict]]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.engine.release_holds(_admitted(self.asked.holds, done.result()))

        self.verdicts.add_done_callback(give_back)


def _admitted(holds: Sequence[Hold], verdicts: Sequence[Verdict]) -> list[Release]:
    pairs = zip(holds, verdicts, strict=True)
    return [Release(hold.id, hold.group) for hold, verdict in pairs if verdict.admitted]


@dataclass
class QuotaEngine:
    store: CounterStore
    source: UsageSource
    clock: Clock
    reservation_ttl: timedelta = timedelta(minutes=15)
    fail_open: bool = False
    bonus_ttl_s: float = 2.0
    # (organization, period start) -> bonus credits available: kept ``bonus_ttl_s``, read again in the
    # background shortly before that ends (``kept.py``), so that requests never queue up to read it.
    _bonus: Kept[tuple[str, int], int] = field(init=False, repr=False)
    _placed: dict[tuple[object, ...], tuple[float, _Placement, tuple[str, int] | None, int]] = field(
        default_factory=dict, repr=False
    )
    _now_us: Callable[[], int] = field(init=False, repr=False)
    # Failing open: since when (monotonic) and how many requests were admitted unchecked.
    _unchecked: tuple[float, int] | None = field(default=None, init=False, repr=False)
    _unchecked_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        # A clock made elsewhere (``create_app(clock=...)``) may have only ``now()``.
        clock = self.clock
        self._now_us = getattr(clock, "now_us", None) or (lambda: to_micros(clock.now()))
        source = self.source
        self._bonus = Kept(
            self.bonus_ttl_s, lambda key: source.bonus_available(*key), ahead=self.bonus_ttl_s / 2
        )

    # -- placing limits -------------------------------------------------------------------------
    def bounds(self, subject: Subject, at: datetime, now: datetime) -> tuple[Bound, ...]:
        """The counters this subject's usage at ``at`` goes to, seen at ``now``.

        Placing limits costs more than reserving them, and it changes only when the day changes (every
        window starts at a UTC midnight), when the bonus balance is read again or when the subject's
        terms change; so placements are kept, keyed by all of that, for the bonus cache's lifetime."""
        return self._placement(subject, to_micros(at), to_micros(now)).bounds

    def _placement(self, subject: Subject, at_us: int, now_us: int) -> _Placement:
        # Times as integers: a decision reads the clock once and builds no datetime unless it places.
        key = (
            subject.organization_id,
            _subject_key(subject),
            at_us // MICROS_PER_DAY,
            now_us // MICROS_PER_DAY,
            at_us >= now_us - _ROLLING_US,
        )
        clock = time.monotonic()
        cached = self._placed.get(key)
        if cached is not None and cached[0] > clock:
            _ends, placement, bonus_key, bonus = cached
            # Only while the bonus it was placed with is still the one kept: never older than the bonus.
            # Asking also has the bonus read again (in the background) before it ends, rather than by
            # every request that would find it ended.
            if bonus_key is None or self._bonus.get(bonus_key) == bonus:
                return placement
        _at, generation = self._bonus.began()
        bounds, bonus_key, bonus = self._place(subject, from_micros(at_us), from_micros(now_us))
        placement = _Placement.of(tuple(bounds))
        if self._bonus.began()[1] == generation:  # else a grant came meanwhile: placed from what it changed
            if len(self._placed) >= _PLACED_MAX:
                self._placed.clear()
            self._placed[key] = (clock + self.bonus_ttl_s, placement, bonus_key, bonus)
        return placement

    def _place(
        self, subject: Subject, at: datetime, now: datetime
    ) -> tuple[list[Bound], tuple[str, int] | None, int]:
        """The bounds, and the key and amount of the bonus they were placed with (None, 0: none is)."""
        period_now = billing_period(now, subject.billing_anchor_day)
        period = billing_period(at, subject.billing_anchor_day)
        bonus, bonus_key = 0, None
        if subject.spend_cap_nanos is None and subject.plan.monthly_credits != UNLIMITED:
            bonus_key = (subject.organization_id, to_micros(period.start))
            bonus = self.bonus_available(*bonus_key)
        placed: list[Bound] = []
        for limit in limits_of(subject, bonus):
            if limit.unlimited:
                continue
            value = subject.scope_value(limit.scope)
            if value is None:
                continue
            window = self._window(limit.window, at, subject.billing_anchor_day, period)
            if window is None:
                if at < now - timedelta(seconds=ROLLING_SECONDS):
                    continue  # a rate limit is about now; a late report is outside every minute
                key = counter_key(subject.organization_id, limit, "m", value)
                placed.append(place(limit, key, None, True, subject.organization_id, value))
                continue
            tag = f"{'d' if limit.window == 'day' else 'p'}{to_micros(window.start) // 10**6}"
            key = counter_key(subject.organization_id, limit, tag, value)
            current = window.start <= now < window.end and (limit.window == "day" or window == period_now)
            placed.append(place(limit, key, window, current, subject.organization_id, value))
        return placed, bonus_key, bonus

    @staticmethod
    def _window(window: Window, at: datetime, anchor: int, period: Period) -> Period | None:
        if window == "minute":
            return None
        if window == "day":
            return utc_day(at)
        return period if period.start <= at < period.end else billing_period(at, anchor)

    # -- reserve ------------------------------------------------------------------------------------
    def reserve(
        self,
        subject: Subject,
        amounts: Mapping[str, int],
        *,
        at: datetime | None = None,
        ttl: timedelta | None = None,
    ) -> Reservation:
        """Reserve ``amounts`` against every bound of ``subject``, or raise ``LimitExceeded``."""
        outcome = self.reserve_many([(subject, amounts, at)], ttl=ttl)[0]
        if isinstance(outcome, LimitExceeded):
            raise outcome
        return outcome

    def reserve_many(
        self,
        requests: Sequence[tuple[Subject, Mapping[str, int], datetime | None]],
        *,
        ttl: timedelta | None = None,
        hold_ids: Sequence[str] | None = None,
    ) -> list[Reservation | LimitExceeded]:
        """Decide each request in order (one store round trip when the counters are loaded).

        ``hold_ids`` names the reservations; the ledger row that settles one carries the same id, which
        is how an abandoned reservation is told apart from a settled one whose counters were not moved.
        """
        asked = self._asked(requests, ttl, hold_ids)
        try:
            verdicts = self._decide(asked.holds, asked.placements, asked.now_us)
        except CounterStoreUnavailable as exc:
            return self._unavailable(asked, exc)
        return self._outcomes(asked, verdicts)

    def _unavailable(
        self, asked: _Asked, cause: CounterStoreUnavailable
    ) -> list[Reservation | LimitExceeded]:
        if not self.fail_open:
            # The cause says which dependency is out (the API's outage log counts this 503 into it).
            raise ServiceUnavailable(_UNCHECKABLE) from cause
        # One line when requests start going through unchecked and one when they are checked again
        # (``_outcomes``), not one per request: under load that would be thousands a second.
        with self._unchecked_lock:
            first = self._unchecked is None
            since, count = self._unchecked or (time.monotonic(), 0)
            self._unchecked = (since, count + len(asked.holds))
        if first:
            log.warning(
                "counter store unreachable: admitting requests unchecked (fail open) until it answers"
            )
        return [
            Reservation(
                h.id, s, p.bounds, a, asked.expires_us, False, None, asked.now_us, p.meters, checked=False
            )
            for (s, a, _at), p, h in zip(asked.requests, asked.placements, asked.holds, strict=True)
        ]

    def reserve_queued(
        self,
        requests: Sequence[tuple[Subject, Mapping[str, int], datetime | None]],
        *,
        ttl: timedelta | None = None,
        hold_ids: Sequence[str] | None = None,
    ) -> Queued:
        """``reserve_many`` for an event loop, with a store whose calls are queued (``CounterStore.
        queued``): the store's verdicts come as a future, and ``Queued.outcomes`` makes the outcomes of
        them. No seeding here: where a counter is to be loaded from the ledger, nothing is held and
        ``reserve_many`` decides again; an unreachable store is answered by ``Queued.unavailable``."""
        asked = self._asked(requests, ttl, hold_ids)
        return Queued(self, asked, self.store.reserve_queued(asked.holds, asked.now_us))

    def _asked(
        self,
        requests: Sequence[tuple[Subject, Mapping[str, int], datetime | None]],
        ttl: timedelta | None,
        hold_ids: Sequence[str] | None,
    ) -> _Asked:
        now_us = self._now_us()
        expires_us = now_us + (ttl or self.reservation_ttl) // _MICROSECOND
        placements: list[_Placement] = []
        holds: list[Hold] = []
        for index, (subject, amounts, at) in enumerate(requests):
            placement = self._placement(subject, now_us if at is None else to_micros(at), now_us)
            # Only the amounts change from one decision to the next: the rest of each line is placed once.
            # ``tuple.__new__`` builds a Line in half the time of ``Line(...)`` (whose ``__new__`` is Python).
            lines = tuple(
                [
                    tuple.__new__(Line, (k, amounts.get(m, 0) or fl, mx, bl, kd, rs))
                    for m, k, mx, bl, kd, rs, fl in placement.lines
                ]
            )
            hold_id = hold_ids[index] if hold_ids is not None else f"{_HOLD_PREFIX}{next(_hold_numbers):x}"
            placements.append(placement)
            holds.append(Hold(hold_id, lines, expires_us, subject.organization_id))
        return _Asked(requests, placements, holds, now_us, expires_us)

    def _outcomes(self, asked: _Asked, verdicts: Sequence[Verdict]) -> list[Reservation | LimitExceeded]:
        if self._unchecked is not None:
            self._checked_again()
        outcomes: list[Reservation | LimitExceeded] = []
        for (subject, amounts, _at), placement, hold, verdict in zip(
            asked.requests, asked.placements, asked.holds, verdicts, strict=True
        ):
            bounds = placement.bounds
            if verdict.admitted:
                outcomes.append(
                    Reservation(
                        hold.id,
                        subject,
                        bounds,
                        amounts,
                        asked.expires_us,
                        verdict.overage,
                        verdict.levels,
                        asked.now_us,
                        placement.meters,
                    )
                )
            else:
                rates = _rate_limits(bounds, verdict.levels, asked.now_us)
                outcomes.append(self._refusal(bounds, hold, verdict, rates))
        return outcomes

    def _checked_again(self) -> None:
        with self._unchecked_lock:
            unchecked, self._unchecked = self._unchecked, None
        if unchecked is not None:
            log.warning(
                "counter store answering again after %.1f s; %d request(s) were admitted unchecked",
                time.monotonic() - unchecked[0],
                unchecked[1],
            )

    def _decide(self, holds: list[Hold], placements: list[_Placement], now_us: int) -> list[Verdict]:
        verdicts = self.store.reserve(holds, now_us)
        pending: Sequence[int] = range(len(holds))
        for attempt in range(5):
            retry = [index for index in pending if verdicts[index].missing]
            if not retry:  # usually at once: every counter is loaded
                return verdicts
            if attempt == 4:
                break  # the last answers were looked at: nothing is held that the caller is not told of
            seeds: dict[str, Seed] = {}
            for index in retry:
                for line_index in verdicts[index].missing:
                    bound = placements[index].bounds[line_index]
                    if bound.key not in seeds:
                        seeds[bound.key] = self._seed(bound, holds[index].lines[line_index], now_us)
            self.store.seed(list(seeds.values()), now_us)
            answers = self.store.reserve([holds[index] for index in retry], now_us)
            for index, verdict in zip(retry, answers, strict=True):
                verdicts[index] = verdict
            pending = retry
        raise CounterStoreUnavailable("counters keep disappearing while being loaded")

    def _seed(self, bound: Bound, line: Line, now_us: int) -> Seed:
        _may_read()
        if bound.window is None:
            query = self._query(bound, now_us - ROLLING_SECONDS * 1_000_000, now_us + 1)
            return Seed(line.key, "rolling", 0, buckets=tuple(self.source.recent_usage(query)))
        window = bound.window
        query = self._query(bound, to_micros(window.start), to_micros(window.end))
        return Seed(line.key, "fixed", line.reset_s, used=self.source.window_usage(query))

    def _query(self, bound: Bound, start_us: int, end_us: int) -> WindowQuery:
        scope, value = bound.limit.scope, bound.scope_value
        workspace_id = key_id = identifier_id = None
        if scope == "workspace":
            workspace_id = value
        elif scope == "key":
            key_id = value
        elif scope == "identifier":
            workspace_id, _, identifier_id = value.partition("/")
        return WindowQuery(
            bound.organization_id,
            scope,
            workspace_id,
            key_id,
            identifier_id,
            bound.limit.meter,
            start_us,
            end_us,
        )

    @staticmethod
    def _refusal(bounds: tuple[Bound, ...], hold: Hold, verdict: Verdict, rates: RateLimits) -> LimitExceeded:
        index = verdict.refused if verdict.refused is not None else 0
        bound = bounds[index]
        limit = bound.limit
        consumed = verdict.levels[index].consumed if verdict.levels else 0
        amount = hold.lines[index].amount
        unit = limit.meter  # credits and spend have their own messages below
        shown_max, shown_used = _shown(limit.meter, limit.max), _shown(limit.meter, consumed)
        whose = "" if limit.scope == "organization" else f" {limit.scope}"
        if limit.meter == "credits":
            message = f"credits exhausted: {shown_used} of {shown_max} credits this billing period are used"
        elif limit.meter == "spend":
            message = f"spend cap reached: {shown_used} of {shown_max} spent this billing period"
        elif amount > limit.max:
            message = (
                f"this request needs {_shown(limit.meter, amount)} {unit}, more than the{whose} {limit.name} "
                f"limit of {shown_max} allows at all"
            )
        else:
            message = (
                f"{limit.name or limit.meter} limit reached{whose and ' for this' + whose}: "
                f"{shown_used} of {shown_max} {unit} used {_WINDOW_WORDS[limit.window]}"
            )
        details = {
            "name": limit.name,
            "meter": limit.meter,
            "window": limit.window,
            "scope": limit.scope,
            "max": limit.max,
            "consumed": consumed,
            "requested": amount,
            "resets_at": rfc3339(bound.window.end) if bound.window is not None else None,
        }
        return LimitExceeded(
            f"{message}; retry in {verdict.retry_after_s} s",
            code=error_code(limit),
            retry_after=max(verdict.retry_after_s, 1),
            limit=limit.name or limit.meter,
            details=details,
            rate_limits=rates,
        )

    # -- settle / release ------------------------------------------------------------------------------
    def settle(self, items: Sequence[tuple[Reservation, Mapping[str, int]]]) -> None:
        """Replace each reservation's estimate with what was actually used."""
        self.settle_holds(
            [(r.id, r.subject.organization_id, r.meters, actual) for r, actual in items if r.checked]
        )

    def settle_holds(self, items: Sequence[tuple[str, str, Sequence[str], Mapping[str, int]]]) -> None:
        """``settle`` by reservation id, organization and the meters of its lines (a reservation made
        elsewhere)."""
        settlements = [
            Settlement(hold_id, tuple([actual.get(meter, 0) for meter in meters]), organization_id)
            for hold_id, organization_id, meters, actual in items
        ]
        if settlements:
            self._quietly(lambda: self.store.settle(settlements, self._now_us()))

    def release(self, reservations: Sequence[Reservation]) -> None:
        self.release_holds([Release(r.id, r.subject.organization_id) for r in reservations if r.checked])

    def release_holds(self, held: Sequence[Release]) -> None:
        if held:
            self._quietly(lambda: self.store.release(held, self._now_us()))

    @staticmethod
    def _quietly(action: Callable[[], None]) -> None:
        # The ledger already holds the truth; a store that missed this catches up when its counters are
        # loaded again. Never fail a request that has been served because a counter could not be moved.
        try:
            action()
        except CounterStoreUnavailable:
            log.warning("counter store unreachable while settling; counters reload from the ledger later")

    # -- reading --------------------------------------------------------------------------------------
    def status(self, subject: Subject) -> list[LimitStatus]:
        """Every limit of ``subject`` (unlimited ones too) with what is consumed in its current window."""
        now = self.clock.now()
        now_us = to_micros(now)
        bounds = self.bounds(subject, now, now)
        by_key = {b.limit: b for b in bounds}
        lines = [b.line(0) for b in bounds]
        try:
            levels = self.store.levels(lines, now_us)
            missing = [i for i, level in enumerate(levels) if level is None]
            if missing:
                self.store.seed([self._seed(bounds[i], lines[i], now_us) for i in missing], now_us)
                levels = self.store.levels(lines, now_us)
            consumed = {b.limit: (lv.consumed if lv else 0) for b, lv in zip(bounds, levels, strict=True)}
        except CounterStoreUnavailable:
            # No counter store to ask: what the ledger has settled (what is in flight is unknown), not 0.
            consumed = {}
            for placed, line in zip(bounds, lines, strict=True):
                seed = self._seed(placed, line, now_us)
                consumed[placed.limit] = seed.used + sum(amount for _, amount in seed.buckets)
        period = billing_period(now, subject.billing_anchor_day)
        statuses = []
        bonus = 0
        if subject.spend_cap_nanos is None and subject.plan.monthly_credits != UNLIMITED:
            bonus = self.bonus_available(subject.organization_id, to_micros(period.start))
        for limit in limits_of(subject, bonus):
            if subject.scope_value(limit.scope) is None:
                continue
            bound = by_key.get(limit)
            window = (
                bound.window if bound else self._window(limit.window, now, subject.billing_anchor_day, period)
            )
            statuses.append(LimitStatus(limit, window, consumed.get(limit, 0)))
        return statuses

    def rate_limits(self, subject: Subject) -> RateLimits:
        now = self.clock.now()
        now_us = to_micros(now)
        bounds = [b for b in self.bounds(subject, now, now) if b.window is None]
        try:
            levels: Sequence[Level | None] | None = self.store.levels([b.line(0) for b in bounds], now_us)
        except CounterStoreUnavailable:
            levels = None
        return _rate_limits(tuple(bounds), levels, now_us)

    # -- credits --------------------------------------------------------------------------------------
    def bonus_available(self, organization_id: str, period_start_us: int) -> int:
        key = (organization_id, period_start_us)
        kept = self._bonus.get(key)
        if kept is not None:
            return kept
        _may_read()
        return self._bonus.read(key) or 0  # one read of it at a time (``kept.py``); never None

    def forget_bonus(self, organization_id: str) -> None:
        """A grant changed what bonus is available: read it again on next use."""
        self._bonus.forget(where=lambda key: key[0] == organization_id)
        for placed in [k for k in list(self._placed) if k[0] == organization_id]:
            self._placed.pop(placed, None)


def _subject_key(subject: Subject) -> tuple[object, ...]:
    return (
        subject.plan,
        subject.billing_anchor_day,
        subject.workspace_id,
        subject.spend_cap_nanos,
        subject.key_id,
        None if subject.key_limits is None else tuple(sorted(subject.key_limits.items())),
        subject.identifier_id,
        None if subject.identifier_limits is None else tuple(sorted(subject.identifier_limits.items())),
        subject.after_the_fact,
    )


def _shown(meter: str, value: int) -> str:
    if meter in _MONEY_METERS:
        return format_nanos(value)
    return str(value)


def _tightest(
    bounds: Sequence[Bound], levels: Sequence[Level | None] | None, meter: str, now_us: int
) -> RateWindow:
    now_s = now_us // 1_000_000
    best: RateWindow | None = None
    for index, bound in enumerate(bounds):
        if bound.window is not None or bound.limit.meter != meter:
            continue
        level = levels[index] if levels is not None and index < len(levels) else None
        consumed = level.consumed if level else 0
        reset = level.reset_s if level else now_s
        window = RateWindow(bound.limit.max, max(bound.limit.max - consumed, 0), reset)
        if best is None or window.remaining < best.remaining:
            best = window
    return best or RateWindow(UNLIMITED, UNLIMITED, now_s)


def _rate_limits(bounds: Sequence[Bound], levels: Sequence[Level | None] | None, now_us: int) -> RateLimits:
    return RateLimits(_tightest(bounds, levels, "calls", now_us), _tightest(bounds, levels, "tokens", now_us))
