"""Two-phase metering: reserve an estimate before the work, settle the actual usage after, or release.

A reservation is held twice: in the counter store (so that it counts against limits at once) and as a
durable row (so that a crash cannot lose it). Settling writes the ledger row and deletes the durable row
in one transaction, then moves the counters. The ledger row carries the reservation's id, so a settle
is exactly-once even when a client retries it or races recovery.

Recovery rule (documented in the README): a reservation that is neither settled nor released when its
lease ends, or that a crashed process left behind, is **settled at its estimate** — the work it was
made for may have happened, so the usage is never lost — and its ledger row says so in ``metadata``.

A reservation that cannot be settled for a reason a retry cannot fix (not an outage) is quarantined
(``metering.quarantine``): one poisoned reservation never stops recovery, start-up or the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import orjson

from meterline import ids
from meterline.clock import Clock, from_micros, to_micros
from meterline.errors import (
    Conflict,
    InvalidRequest,
    LimitExceeded,
    MeterlineError,
    NotFound,
    unpriced_refusal,
)
from meterline.metering.quarantine import QuarantineEntry, QuarantineStore, describe_error
from meterline.metering.records import NO_DETAIL, LedgerRow, UsageRecord, UsageVector
from meterline.metering.settle import Account, Settler, storable
from meterline.metering.store import AppendResult
from meterline.metering.unit_of_work import ReservationEnded
from meterline.quotas.counters import CounterStore, CounterStoreUnavailable, Release
from meterline.quotas.engine import (
    Queued,
    QuotaEngine,
    Reservation,
    Subject,
    WouldRead,
    meter_of_key,
    no_reads,
)
from meterline.quotas.gate import row_amounts

log = logging.getLogger("meterline.reservations")

T = TypeVar("T")

RECOVERED = "meterline.recovered"
QUARANTINED = "meterline.quarantined"
# After a sweep met an outage, ``recover`` ends no due reservation for this many of its sweeps that
# reach the database again (the reaper's, 5 s apart): a margin for every other process serving the
# database to settle first what it kept from the outage.
SWEEPS_AFTER_OUTAGE = 2


class Quarantined(MeterlineError):
    """A live settle failed for good and its usage was set aside for an operator (not lost)."""

    code = "usage_quarantined"

    def __init__(self, entry: QuarantineEntry) -> None:
        super().__init__(
            f"the usage of {entry.reservation_id} could not be recorded and was quarantined as {entry.id}"
        )
        self.entry = entry


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A durable reservation whose stored estimate cannot be decoded (it goes to the quarantine)."""

    id: str
    organization_id: str
    estimate_json: str
    meters: tuple[str, ...]
    error: str


@dataclass(frozen=True, slots=True)
class HeldReservation:
    """The durable half of a reservation."""

    id: str
    organization_id: str
    estimate: UsageRecord
    meters: tuple[str, ...]
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Hold:
    """What ``Reservations.hold`` gives the caller: the quota reservation, its durable half and the
    priced estimate (a caller in the same process settles with it without reading the store back)."""

    reservation: Reservation
    held: HeldReservation
    estimate: LedgerRow


@dataclass(frozen=True, slots=True)
class InFlight:
    """Consumption of an organization's open reservations so far (streams publish it as they go)."""

    credits_nanos: int = 0
    cost_nanos: int = 0


class ReservationStore(Protocol):
    def add(self, held: HeldReservation) -> None: ...
    def add_soon(self, held: HeldReservation) -> Future[None]: ...
    def add_when_admitted(self, held: HeldReservation, admitted: Callable[[], bool | None]) -> Future[bool]:
        """``add_soon`` for a reservation whose decision was queued just before it to the database's
        writer (counters ``in_writer``): the job asks ``admitted()`` (None: not admitted, else its
        overage) and writes the row only if it was, with that overage. Answers whether it wrote."""
        ...

    def remove_soon(self, reservation_id: str) -> Future[bool]: ...
    def progress(self, reservation_id: str, credits_nanos: int, cost_nanos: int) -> Future[None]: ...
    def in_flight(self, organization_id: str) -> InFlight: ...
    def get(self, reservation_id: str) -> HeldReservation | None: ...
    def remove(self, reservation_id: str) -> bool: ...
    def remove_all(self, reservation_ids: Sequence[str]) -> int: ...
    def due(self, before: datetime, limit: int) -> list[HeldReservation | Unreadable]: ...
    def ledger_row(self, organization_id: str | None, row_id: str) -> LedgerRow | None: ...


_RECORD_FIELDS = tuple(f.name for f in fields(UsageRecord))


def encode_record(record: UsageRecord) -> str:
    # Field by field, not ``asdict``: that deep-copies every value, and one runs per gateway request.
    data = {name: getattr(record, name) for name in _RECORD_FIELDS}
    data["created_at"] = to_micros(record.created_at)
    if record.audio_seconds is not None:
        data["audio_seconds"] = str(record.audio_seconds)
    if record.usage is NO_DETAIL:
        del data["usage"]  # most rows: kept short, and readable by a server from before the vector
    return orjson.dumps(data).decode()


def decode_record(text: str) -> UsageRecord:
    data: dict[str, Any] = orjson.loads(text)
    data["created_at"] = from_micros(data["created_at"])
    if data.get("audio_seconds") is not None:
        data["audio_seconds"] = Decimal(data["audio_seconds"])
    if "usage" in data:
        data["usage"] = UsageVector(**data["usage"])
    return UsageRecord(**data)


@dataclass(frozen=True, slots=True)
class Settled:
    row: LedgerRow
    duplicate: bool


class Reservations:
    def __init__(
        self,
        engine: QuotaEngine,
        settler: Settler,
        store: ReservationStore,
        counters: CounterStore,
        clock: Clock,
        account_of: Callable[[str], Account],
        *,
        quarantine: QuarantineStore | None = None,
        is_outage: Callable[[BaseException], bool] = lambda _exc: False,
    ) -> None:
        self._engine = engine
        self._settler = settler
        self._store = store
        self._counters = counters
        self._clock = clock
        self._account_of = account_of
        self._quarantine = quarantine
        # Outages (database, counter store) are retried; anything else would fail the same way again.
        self._is_outage = is_outage
        # Settles of work already served that met an outage, kept with their actual usage and retried by
        # ``recover`` before anything is settled at its estimate (only a crash leaves the estimate).
        self._deferred: dict[str, tuple[HeldReservation, UsageRecord]] = {}
        # Reservations whose requests never went out (their write failed, or was given up on, and may
        # have committed all the same): deleted by id, and kept here until the delete commits, so that an
        # outage that also fails the delete never leaves ``recover`` a row to bill. Guarded by the lock.
        self._unsent: set[str] = set()
        self._deferred_lock = threading.Lock()
        # The reaper's passes found the counter store out of reach: said once, until a pass reaches it.
        self._holds_unreached = False
        # Sweeps of ``recover`` still to leave due reservations alone after an outage: every process
        # serving the database may hold settles and deletes of its own from it (above), and settles them
        # in its first sweep once the database is back; a sweep of another process that came first would
        # settle those reservations at their estimate, their leases having ended meanwhile. Only the
        # sweep (one thread at a time: start-up's, then the reaper's) reads and writes it.
        self._sweeps_to_wait = 0

    def reserve(
        self, subject: Subject, estimate: UsageRecord, account: Account, ttl: timedelta | None = None
    ) -> tuple[Reservation, LedgerRow]:
        """Hold ``estimate`` against every limit (or raise LimitExceeded) and make the hold durable."""
        hold = self.hold(subject, estimate, account, ttl)
        return hold.reservation, hold.estimate

    def hold(
        self,
        subject: Subject,
        estimate: UsageRecord,
        account: Account,
        ttl: timedelta | None = None,
        reservation_id: str | None = None,
        margin: int = 0,
    ) -> Hold:
        """``reserve``, returning the durable half too (see ``finish``). ``margin``: tokens held beyond the
        estimate (a safety margin on a counted prompt), released by the settle."""
        reservation, held, priced = self._decide(subject, estimate, account, ttl, reservation_id, margin)
        try:
            self._store.add(held)
        except BaseException:
            self._engine.release([reservation])
            raise
        return Hold(reservation, held, priced)

    async def hold_soon(
        self, subject: Subject, estimate: UsageRecord, account: Account, margin: int = 0
    ) -> Hold | None:
        """``hold`` for an event loop: the decision made here (an in-process counter store) or awaited
        (a store whose calls are queued: the database's writer, Redis), the durable half awaited on the
        database's writer. None (nothing held) when the decision would read the ledger (a window to
        load), its write failed, or the store only answers by waiting: then ``hold``, in a thread."""
        if self._counters.in_process:
            try:
                with no_reads():
                    reservation, held, priced = self._decide(subject, estimate, account, None, None, margin)
            except WouldRead:
                return None
        elif self._counters.in_writer:
            return await self._hold_in_writer(subject, estimate, account, margin)
        elif self._counters.queued:
            decided = await self._decide_queued(subject, estimate, account, margin)
            if decided is None:
                return None
            reservation, held, priced = decided
        else:
            return None
        return await self._made_durable(reservation, held, priced)

    async def _made_durable(self, reservation: Reservation, held: HeldReservation, priced: LedgerRow) -> Hold:
        """The durable half of a decided reservation, written on the database's writer and awaited."""
        try:
            written = self._store.add_soon(held)
        except BaseException:
            self._engine.release([reservation])
            raise
        try:
            await answer_of(written)
        except BaseException:
            self._engine.release([reservation])
            # Given up on (cancelled), or failed: the write may have committed all the same (after the
            # wait was given up, or with its commit's answer lost with the connection). Once it is done,
            # the reservation's row goes (by id: nothing, if it was never written), or recovery would
            # bill a request that never went out.
            written.add_done_callback(lambda _done: self._forget(held.id))
            raise
        return Hold(reservation, held, priced)

    def _forget(self, reservation_id: str) -> None:
        """Delete the row of a reservation whose request never went out; until that commits, this
        process's ``recover`` never bills it, and tries the delete again."""
        with self._deferred_lock:
            self._unsent.add(reservation_id)
        deleted = self._store.remove_soon(reservation_id)
        deleted.add_done_callback(lambda done: self._forgotten(reservation_id, done))

    def _forgotten(self, reservation_id: str, done: Future[bool]) -> None:
        if not done.cancelled() and done.exception() is None:
            with self._deferred_lock:
                self._unsent.discard(reservation_id)

    def _forget_unsent(self) -> None:
        """The deletes ``_forget`` could not make (an outage), tried again in one transaction; raises while
        the outage goes on (the sweep is retried). Until they commit, ``recover`` skips those rows."""
        with self._deferred_lock:
            pending = list(self._unsent)
        if not pending:
            return
        try:
            self._store.remove_all(pending)
        except Exception as exc:
            if self._is_outage(exc):
                raise
            log.error(
                "rows of %d unsent reservation(s) could not be deleted: %s", len(pending), describe_error(exc)
            )
            return  # still skipped by this sweep and tried again by the next
        with self._deferred_lock:
            self._unsent.difference_update(pending)

    async def _hold_in_writer(
        self, subject: Subject, estimate: UsageRecord, account: Account, margin: int
    ) -> Hold | None:
        """``hold_soon`` with the counters in the database: the decision and the durable half queued to
        its writer together. The durable half's job writes the row if the decision admitted it (one
        transaction, one turn of the writer, when both share a batch) instead of waiting for one turn to
        decide and another to write. None as ``_decide_queued`` answers it (nothing is held or written
        then), and when the write ran before its decision (the writer restarted between them: only
        while the services close)."""
        asked = self._queue_decision(subject, estimate, account, margin)
        if asked is None:
            return None
        reservation_id, estimate, priced, queued = asked
        try:
            meters, expires_us = queued.terms()
            draft = HeldReservation(
                reservation_id,
                subject.organization_id,
                estimate,
                meters,
                self._clock.now(),
                from_micros(expires_us),
            )
            written = self._store.add_when_admitted(draft, lambda: queued.admitted_now().get(reservation_id))
        except BaseException:
            queued.abandon()
            raise
        try:
            wrote = await answer_of(written)
        except Exception as exc:
            queued.abandon()  # whatever the decision admitted is given back once it is answered
            # The write may have committed all the same (its commit's answer lost with the connection):
            # this reservation goes no further, so its row goes too (by id; nothing, if it was never
            # written), or recovery would bill a request that never went out.
            self._forget(reservation_id)
            failure = queued.verdicts.exception() if queued.verdicts.done() else None
            if isinstance(failure, CounterStoreUnavailable):
                # The database holds the counters and the reservation alike: unreachable, it leaves no
                # place for a reservation admitted unchecked, so this is a 503 even where the engine
                # fails open.
                queued.refuse(failure)
            if failure is not None or isinstance(exc, LookupError):
                return None  # a decision that failed (nothing written), or one not yet made: decide again
            raise
        except BaseException:
            queued.abandon()

            # Given up on (cancelled), possibly after the write committed: end the reservation once it
            # is written (or may have been: a failed write's commit answer may have been lost), or
            # recovery would bill a request that never went out.
            def end_unless_unwritten(done: Future[bool]) -> None:
                if done.exception() is not None or done.result():
                    self._forget(reservation_id)

            written.add_done_callback(end_unless_unwritten)
            raise
        # Answered before the write that read it (an earlier job, or earlier in the same commit).
        outcomes = queued.outcomes(queued.verdicts.result())
        if outcomes is None:
            return None  # a counter to load from the ledger: nothing was held or written
        outcome = outcomes[0]
        if not isinstance(outcome, Reservation):
            raise outcome
        if not wrote:  # never: the job writes exactly what the decision admitted
            self._engine.release([outcome])
            return None
        if outcome.overage != estimate.overage:
            draft = replace(draft, estimate=replace(estimate, overage=outcome.overage))
        return Hold(outcome, draft, priced)

    def _decide(
        self,
        subject: Subject,
        estimate: UsageRecord,
        account: Account,
        ttl: timedelta | None,
        reservation_id: str | None,
        margin: int = 0,
    ) -> tuple[Reservation, HeldReservation, LedgerRow]:
        """Price the estimate and hold it against every limit (or raise LimitExceeded): no I/O with an
        in-process counter store."""
        reservation_id, estimate, priced, amounts = self._asked(
            subject, estimate, account, reservation_id, margin
        )
        outcome = self._engine.reserve_many([(subject, amounts, None)], ttl=ttl, hold_ids=[reservation_id])[0]
        return *self._held(outcome, estimate), priced

    def _asked(
        self,
        subject: Subject,
        estimate: UsageRecord,
        account: Account,
        reservation_id: str | None,
        margin: int,
    ) -> tuple[str, UsageRecord, LedgerRow, dict[str, int]]:
        """The reservation's id, its estimate and priced row, and the amounts to hold (``margin``
        tokens more); an unpriced model is refused here when the plan blocks unpriced models."""
        reservation_id = reservation_id or ids.prefixed("rsv")
        estimate = replace(estimate, idempotency_key=reservation_id)
        priced = self._settler.price(estimate, account)
        if not priced.priced and priced.model is not None and subject.plan.unpriced == "block":
            raise unpriced_refusal(priced.model)
        amounts = row_amounts(priced)
        if margin:
            amounts["tokens"] += margin
        return reservation_id, estimate, priced, amounts

    def _held(
        self, outcome: Reservation | LimitExceeded, estimate: UsageRecord
    ) -> tuple[Reservation, HeldReservation]:
        """The reservation and its durable half (or the refusal, raised)."""
        if not isinstance(outcome, Reservation):
            raise outcome
        held = HeldReservation(
            outcome.id,
            outcome.subject.organization_id,
            replace(estimate, overage=outcome.overage),
            outcome.meters,
            self._clock.now(),
            outcome.expires_at,
        )
        return outcome, held

    def _queue_decision(
        self, subject: Subject, estimate: UsageRecord, account: Account, margin: int
    ) -> tuple[str, UsageRecord, LedgerRow, Queued] | None:
        """The estimate priced and its decision queued to the counter store: the reservation's id, its
        estimate, its priced row and the queued decision; None when deciding would read the ledger."""
        reservation_id, estimate, priced, amounts = self._asked(subject, estimate, account, None, margin)
        try:
            with no_reads():
                queued = self._engine.reserve_queued([(subject, amounts, None)], hold_ids=[reservation_id])
        except WouldRead:
            return None
        return reservation_id, estimate, priced, queued

    async def _decide_queued(
        self, subject: Subject, estimate: UsageRecord, account: Account, margin: int
    ) -> tuple[Reservation, HeldReservation, LedgerRow] | None:
        """``_decide`` with the counter store's answer awaited; None when it was not a plain one (nothing
        is held then: ``QuotaEngine.reserve_queued``)."""
        asked = self._queue_decision(subject, estimate, account, margin)
        if asked is None:
            return None
        _, estimate, priced, queued = asked
        try:
            verdicts = await answer_of(queued.verdicts)
        except asyncio.CancelledError:
            queued.abandon()
            raise
        except CounterStoreUnavailable as exc:
            outcomes: list[Reservation | LimitExceeded] | None = queued.unavailable(exc)  # 503, or fail open
        except Exception:
            return None  # not stored (the write failed whole): the thread's decision says what happened
        else:
            outcomes = queued.outcomes(verdicts)
        if outcomes is None:
            return None
        return *self._held(outcomes[0], estimate), priced

    @property
    def decides_soon(self) -> bool:
        """Whether ``hold_soon`` can decide (the counter store lives in this process, or its calls are
        queued): else it answers None at once."""
        return self._counters.in_process or self._counters.queued

    def finish(self, held: HeldReservation, record: UsageRecord, account: Account | None = None) -> Settled:
        """Settle a reservation this process holds, with the actual usage (no read of the store).

        If recovery got there first (the lease ran out), the row it wrote is answered: exactly once.
        Raises ``Quarantined`` when the settle failed for good (the usage is kept for an operator). On an
        outage the settle is kept here with its actual usage and retried by ``recover`` (then raised).

        ``record`` is the estimate with what was actually consumed (``HeldReservation.estimate``,
        replaced field by field)."""
        return self._finish_or_set_aside(held, record, account, defer=True)

    async def finish_soon(
        self,
        held: HeldReservation,
        record: UsageRecord,
        account: Account,
        in_thread: Callable[[Callable[[], Settled]], Awaitable[Settled]],
    ) -> Settled:
        """``finish`` for an event loop: the same steps, with the write awaited on the database's writer
        instead of blocking a thread. Pricing and the counters' settlement run here (no counter store
        waits to settle: ``CounterStore.settle``); what may block (a failure's recovery) goes to
        ``in_thread``."""
        try:
            row, account = self._priced(held, record, account)
            result = await answer_of(self._settler.submit([row], account, settles=[held.id]))
        except Exception as exc:
            failure = exc
            return await in_thread(lambda: self._not_finished(held, record, failure, defer=True))
        return self._settled(held, result)

    def _finish_or_set_aside(
        self,
        held: HeldReservation,
        record: UsageRecord,
        account: Account | None = None,
        *,
        defer: bool = False,
    ) -> Settled:
        """The settle's steps in this thread; a failure is explained (``_not_finished``), an outage kept
        for ``recover`` when ``defer`` (a live settle; recovery itself retries the sweep)."""
        try:
            row, account = self._priced(held, record, account)
            result = self._settler.append([row], account, settles=[held.id])
        except Exception as exc:
            return self._not_finished(held, record, exc, defer=defer)
        return self._settled(held, result)

    def _priced(
        self, held: HeldReservation, record: UsageRecord, account: Account | None
    ) -> tuple[LedgerRow, Account]:
        account = account or self._account_of(held.organization_id)
        row = self._settler.price(record, account)
        row.id = held.id
        return row, account

    def _settled(self, held: HeldReservation, result: AppendResult) -> Settled:
        """The counters follow a written row; a row already there (recovery got there first) is answered."""
        if result.written:
            written = result.written[0]
            self._engine.settle_holds([(held.id, held.organization_id, held.meters, row_amounts(written))])
            return Settled(written, False)
        existing = next(iter(result.existing.values()))
        return Settled(existing, True)

    def _not_finished(
        self, held: HeldReservation, record: UsageRecord, exc: Exception, *, defer: bool
    ) -> Settled:
        """What a failed settle answers (``_explain``). An outage, the settle's own or one met while
        finding out what happened, is kept here with the actual usage when ``defer``, and settled by
        ``recover`` once the database is back."""
        try:
            return self._explain(held, record, exc)
        except Exception as failure:
            if defer and self._is_outage(failure):
                with self._deferred_lock:
                    self._deferred[held.id] = (held, record)
            raise

    def _explain(self, held: HeldReservation, record: UsageRecord, exc: Exception) -> Settled:
        """The row another process wrote, or ``Quarantined`` when no retry can fix the settle (the usage
        is set aside for an operator), or the error itself for an outage."""
        if isinstance(exc, ReservationEnded):
            return self._ended_elsewhere(held)
        if self._is_outage(exc) or self._quarantine is None:
            raise exc
        entry = self._set_aside(held.id, held.organization_id, _encoded(record), held.meters, exc)
        if entry is None:
            return self._ended_elsewhere(held)
        raise Quarantined(entry) from exc

    def _ended_elsewhere(self, held: HeldReservation) -> Settled:
        """The reservation was ended by another process: answer what that process decided."""
        done = self._store.ledger_row(held.organization_id, held.id)
        if done is not None:
            return Settled(done, True)
        entry = None if self._quarantine is None else self._quarantine.for_reservation(held.id)
        if entry is not None:
            raise Quarantined(entry)
        raise NotFound(f"reservation {held.id!r} was released", param="id")

    def abandon(self, held: HeldReservation) -> None:
        """Release a reservation this process holds: the work did not happen, nothing is billed."""
        if self._store.remove(held.id):
            self._engine.release_holds([Release(held.id, held.organization_id)])

    def progress(
        self, held: HeldReservation, so_far: Mapping[str, Any], account: Account
    ) -> tuple[LedgerRow, Future[None]]:
        """Publish what an unfinished piece of work has consumed so far (priced like its settle will be),
        so that usage read while a response streams already shows it. Returns the priced row and the
        write's future (pure computation here, the write queued: an event loop may call this)."""
        row = self._settler.price(replace(held.estimate, **so_far), account)
        return row, self._store.progress(held.id, row.credits_nanos, row.cost_nanos)

    def in_flight(self, organization_id: str) -> InFlight:
        return self._store.in_flight(organization_id)

    def get(self, organization_id: str, reservation_id: str) -> HeldReservation:
        held = self._store.get(reservation_id)
        if held is None or held.organization_id != organization_id:
            raise NotFound(f"reservation {reservation_id!r} does not exist or has ended", param="id")
        return held

    def settle(self, organization_id: str, reservation_id: str, actual: Mapping[str, Any]) -> Settled:
        """Settle with the actual usage (fields of the estimate that ``actual`` leaves out are kept)."""
        held = self._store.get(reservation_id)
        if held is None or held.organization_id != organization_id:
            done = self._store.ledger_row(organization_id, reservation_id)
            if done is not None:
                return Settled(done, True)
            entry = None if self._quarantine is None else self._quarantine.for_reservation(reservation_id)
            if entry is not None and entry.organization_id == organization_id:
                raise Quarantined(entry)  # the same answer as the settle that quarantined it
            raise NotFound(f"reservation {reservation_id!r} does not exist or was released", param="id")
        return self._finish_or_set_aside(held, replace(held.estimate, **actual))

    def release(self, organization_id: str, reservation_id: str) -> None:
        held = self.get(organization_id, reservation_id)
        if self._store.remove(held.id):
            self._engine.release_holds([Release(held.id, held.organization_id)])

    # -- recovery ------------------------------------------------------------------------------------
    def recover_all(self, *, everything: bool, batch: int = 500) -> None:
        """Recovery at start-up, in batches until a batch ends fewer than it could (what cannot even be
        quarantined is skipped, so this never spins on it; the reaper looks again later)."""
        for _ in range(1000):
            if self.recover(everything=everything, limit=batch) < batch:
                return

    def recover(self, *, everything: bool = False, limit: int = 500) -> int:
        """Settle abandoned reservations at their estimate; move counters of holds whose row exists.

        ``everything``: at start-up with an in-process counter store, every durable reservation was left
        by a process that is gone. Settles this process deferred in an outage go first, with their actual
        usage; after a sweep met an outage, the next ``SWEEPS_AFTER_OUTAGE`` sweeps that reach the
        database settle no due reservation (another process may hold such settles of its own). Returns
        how many reservations were ended (settled or quarantined)."""
        now = self._clock.now()
        cutoff = datetime.max.replace(tzinfo=now.tzinfo) if everything else now
        try:
            ended = self._settle_deferred()
            self._forget_unsent()
            # Read every sweep, waiting or not: a sweep counts down only once it has reached the
            # database (one with nothing kept would not, and would count the outage itself down).
            due = self._store.due(cutoff, limit)
            if self._sweeps_to_wait:
                self._sweeps_to_wait -= 1
            else:
                ended += self._end_due(due)
            ended += self._end_abandoned_holds(now, limit)
        except Exception as exc:
            if self._is_outage(exc):
                self._sweeps_to_wait = SWEEPS_AFTER_OUTAGE
            raise
        if ended:
            log.info("recovered %d abandoned reservation(s)", ended)
        return ended

    def _end_due(self, due: Sequence[HeldReservation | Unreadable]) -> int:
        """Reservations whose lease has ended (``due``): settled at their estimate, or quarantined."""
        ended = 0
        for item in due:
            if item.id in self._deferred:
                continue  # settled with its actual usage by _settle_deferred, never at its estimate
            if item.id in self._unsent:
                continue  # its request never went out (its delete is tried again by the next sweep)
            try:
                if isinstance(item, Unreadable):
                    self._set_aside(
                        item.id, item.organization_id, item.estimate_json, item.meters, item.error
                    )
                else:
                    metadata = {**(item.estimate.metadata or {}), RECOVERED: True}
                    self._finish_or_set_aside(item, replace(item.estimate, metadata=metadata))
            except Quarantined:
                pass
            except Exception as exc:
                if self._is_outage(exc):
                    raise  # the sweep is retried; nothing is lost or skipped
                # Not even the quarantine could take it: the others go on, it is tried again next sweep.
                log.error(
                    "reservation %s could not be recovered or quarantined: %s", item.id, describe_error(exc)
                )
                continue
            ended += 1
        return ended

    def _end_abandoned_holds(self, now: datetime, limit: int) -> int:
        """Counter holds whose lease has ended and whose durable row is gone: moved as the ledger says
        (released if no row was written). A hold whose row exists is its reservation's to end."""
        ended = 0
        try:
            abandoned = self._counters.expired(to_micros(now), limit)
        except CounterStoreUnavailable:
            if not self._holds_unreached:  # once an outage, not every pass
                log.warning("counter store unreachable: abandoned holds are looked at again later")
            self._holds_unreached = True
            abandoned = []
        else:
            self._holds_unreached = False
        for hold in abandoned:
            if self._store.get(hold.id) is not None:
                continue  # durable: ended above once its own lease is due
            row = self._store.ledger_row(None, hold.id)
            meters = [meter_of_key(line.key) for line in hold.lines]
            if row is None:
                self._engine.release_holds([Release(hold.id, hold.group)])
            else:
                self._engine.settle_holds([(hold.id, hold.group, meters, row_amounts(row))])
            ended += 1
        return ended

    def _settle_deferred(self) -> int:
        with self._deferred_lock:
            pending = list(self._deferred.values())
        done = 0
        for held, record in pending:
            try:
                self._finish_or_set_aside(held, record)
            except (Quarantined, NotFound):
                pass  # quarantined (kept for an operator), or ended by someone else
            except Exception as exc:
                if self._is_outage(exc):
                    raise  # still down: kept, retried at the next sweep
                log.error("deferred settle of %s failed: %s", held.id, describe_error(exc))
            with self._deferred_lock:
                self._deferred.pop(held.id, None)
            done += 1
        return done

    # -- quarantine ----------------------------------------------------------------------------------
    def _set_aside(
        self,
        reservation_id: str,
        organization_id: str,
        record_json: str,
        meters: tuple[str, ...],
        error: BaseException | str,
    ) -> QuarantineEntry | None:
        """Move a reservation that cannot be settled to the quarantine and give its hold back. None when
        another process ended it first."""
        assert self._quarantine is not None
        reason = error if isinstance(error, str) else describe_error(error)
        entry = QuarantineEntry(
            id=ids.prefixed("qrn"),
            organization_id=organization_id,
            reservation_id=reservation_id,
            record_json=record_json,
            meters=meters,
            error=reason,
            created_at=self._clock.now(),
        )
        if not self._quarantine.quarantine(entry):
            return None
        # The counters are a projection of the ledger, and this usage is not in it (yet).
        self._engine.release_holds([Release(reservation_id, organization_id)])
        log.error(
            "reservation %s could not be settled and was quarantined as %s: %s",
            reservation_id,
            entry.id,
            reason,
        )
        return entry

    def quarantined(self, entry_id: str) -> QuarantineEntry:
        entry = None if self._quarantine is None else self._quarantine.get(entry_id)
        if entry is None:
            raise NotFound(f"quarantine entry {entry_id!r} does not exist", param="id")
        return entry

    def settle_quarantined(self, entry_id: str, note: str | None = None) -> LedgerRow:
        """Record a quarantined entry's usage through the settle path (text cleaned), exactly once.

        The entry is claimed (compare-and-set to ``settled``) before its row is written, so a void can
        never win against a settle whose row is in the ledger; a settle that stopped between its claim
        and its row (a crash, an outage) is finished by the next settle of the same entry."""
        entry = self.quarantined(entry_id)
        assert self._quarantine is not None
        if entry.resolution == "voided":
            raise Conflict(f"quarantine entry {entry_id} was voided already", param="id")
        if entry.resolution == "settled" and self._store.ledger_row(
            entry.organization_id, entry.reservation_id
        ):
            raise Conflict(f"quarantine entry {entry_id} was settled already", param="id")
        try:
            record = storable(decode_record(entry.record_json))
        except Exception as exc:  # whatever the stored text holds, an operator gets a 4xx, not a 500
            raise InvalidRequest(
                f"the usage of {entry_id} cannot be read ({describe_error(exc)}); void it instead", param="id"
            ) from None
        record = replace(
            record,
            idempotency_key=entry.reservation_id,
            metadata={**(record.metadata or {}), QUARANTINED: entry.id},
        )
        account = self._account_of(entry.organization_id)  # fails before the claim if still impossible
        now = self._clock.now()
        claimed = self._quarantine.resolve(
            entry.id, "settled", now, ledger_id=entry.reservation_id, note=note
        )
        if entry.resolution is None and not claimed:
            raise Conflict(f"quarantine entry {entry_id} was resolved by someone else", param="id")
        try:
            row = self._settler.price(record, account)
            row.id = entry.reservation_id
            result = self._settler.append([row], account)
        except BaseException:
            with contextlib.suppress(Exception):  # else it stays claimed: the next settle finishes it
                self._quarantine.reopen(entry.id)
            raise
        # Quota counters are not moved: they hold what is in the ledger for the windows they have loaded,
        # and pick this row up when a window is next loaded from the ledger (docs/architecture.md).
        return result.written[0] if result.written else next(iter(result.existing.values()))

    def void_quarantined(self, entry_id: str, note: str | None = None) -> QuarantineEntry:
        """Close a quarantined entry without billing it (the entry stays, with the note)."""
        entry = self.quarantined(entry_id)
        assert self._quarantine is not None
        if entry.resolution is not None or not self._quarantine.resolve(
            entry.id, "voided", self._clock.now(), ledger_id=None, note=note
        ):
            raise Conflict(f"quarantine entry {entry_id} was resolved already", param="id")
        return self.quarantined(entry_id)


async def answer_of(future: Future[T]) -> T:
    """The result of a future answered by another thread (the database writer), awaited on the event
    loop. Unlike ``asyncio.wrap_future``, a cancelled wait does not cancel the write: a settle the
    client stopped waiting for still lands (or, if the process dies first, recovery settles it)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[T] = loop.create_future()

    def copy(done: Future[T]) -> None:
        loop.call_soon_threadsafe(_copy_into, waiter, done)

    future.add_done_callback(copy)
    return await waiter


def _copy_into(waiter: asyncio.Future[T], done: Future[T]) -> None:
    if waiter.cancelled():
        return
    error = done.exception()
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(done.result())


def _encoded(record: UsageRecord) -> str:
    try:
        return encode_record(record)
    except TypeError:  # text that is not UTF-8: kept cleaned, the amounts as they were
        return encode_record(storable(record))
