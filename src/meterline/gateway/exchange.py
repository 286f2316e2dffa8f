"""One metered request through the gateway: estimate -> reserve -> (forward) -> settle or release.

``reserve``/``settle`` talk to storage and run off the event loop; ``reserve_soon``/``settle_soon`` run on
it when they need no read, awaiting their writes on the database's writer. The money path is the one the
events API uses (``Reservations`` -> ``Settler``): a token costs the same whichever way
it arrived, and a crash between reserve and settle is recovered by the reservation's durable half.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from meterline import ids
from meterline.clock import Clock
from meterline.credits import CreditBalance
from meterline.errors import LimitExceeded
from meterline.gateway.flavors import Api, TokenUsage
from meterline.gateway.routing import Route
from meterline.gateway.tokens import count_margin
from meterline.metering.records import LedgerRow, UsageRecord
from meterline.metering.reservations import Hold, Reservations, Settled
from meterline.metering.settle import Account
from meterline.quotas.engine import RateLimits, Reservation, Subject
from meterline.quotas.limits import UNLIMITED
from meterline.quotas.plans import Plan
from meterline.tenancy import Organization, Principal
from meterline.tenancy.service import TenancyService

MODALITY = {
    "chat": "chat",
    "completions": "chat",
    "responses": "chat",
    "messages": "chat",
    "embeddings": "embedding",
    "transcriptions": "transcription",
}


@dataclass(frozen=True, slots=True)
class Request:
    """What the gateway knows about a request before it is forwarded."""

    api: Api
    endpoint: str
    model: str
    prompt_tokens: int  # estimated with the tokenizer
    max_output_tokens: int
    source: str
    user_id: str | None
    receipt: bool
    audio_seconds: Decimal | None = None
    # The least output a cut request can still be sent with (all choices): 16 for Responses, more than
    # the thinking budget for Anthropic; below it the request is refused rather than cut.
    min_output: int = 1
    # False when the request set no output limit (``max_output_tokens`` is then the operator's default).
    own_output_limit: bool = True


@dataclass(slots=True)
class Ticket:
    """A reserved request: what settling or releasing it needs."""

    principal: Principal
    org: Organization
    plan: Plan
    account: Account
    request: Request
    hold: Hold
    receipt_id: str | None
    # The output the request may produce in all, when a block limit on tokens applies and it left less
    # than the request asked for, or the request asked for no limit (the operator's default is what was
    # reserved): the upstream is told (``wire.with_output_limit``), so the output cannot pass the limit.
    max_output: int | None = None

    @property
    def rate_limits(self) -> RateLimits:
        return self.hold.reservation.rate_limits

    @property
    def reservation_id(self) -> str:
        return self.hold.held.id


# How many times a refused reservation is tried again with less output (one per token limit it meets).
_CLAMPS = 3


def prompt_margin(prompt_estimate: int) -> int:
    """Tokens held beyond a counted prompt (``tokens.count_margin``): the local count is an estimate of
    the provider's, and a block limit must hold against the real count. Released at the settle."""
    return count_margin(prompt_estimate)


def _clamped(estimate: UsageRecord, refusal: LimitExceeded, margin: int, request: Request) -> UsageRecord:
    """The estimate with its output cut to what the refusing token limit leaves (after the prompt and
    its margin), so the request is served with a smaller ``max_tokens`` instead of refused; the refusal
    itself when that is not the request's to make: a limit not on tokens, a per-minute limit (wait, do
    not truncate), or less left than the request can use (``Request.min_output``)."""
    details = refusal.details or {}
    if details.get("meter") != "tokens" or details.get("window") not in ("day", "period"):
        raise refusal
    left = int(details["max"]) - int(details["consumed"]) - estimate.prompt_tokens - margin
    if left < request.min_output or left >= min(estimate.completion_tokens, request.max_output_tokens):
        raise refusal
    return replace(estimate, completion_tokens=left)


def _caps_tokens(reservation: Reservation) -> bool:
    """A block limit on tokens over a day or a period holds this request: its output must stay within
    what was reserved."""
    # The placed line says whether it blocks (only a current window does) and whether it is unlimited
    # (a maximum past the counters' range is).
    return any(
        b.limit.meter == "tokens" and b.window is not None and b.template.block and b.template.maximum >= 0
        for b in reservation.bounds
    )


class Collaborators(Protocol):
    """What a metered exchange works with, named (``meterline.services.Services`` is one)."""

    @property
    def clock(self) -> Clock: ...
    @property
    def tenancy(self) -> TenancyService: ...
    @property
    def reservations(self) -> Reservations: ...

    def plan_of(self, org: Organization) -> Plan: ...
    def account_of(self, org: Organization) -> Account: ...
    def subject_of(
        self, org: Organization, principal: Principal, identifier_id: str | None = None
    ) -> Subject: ...
    def credit_balance(self, org: Organization, now: datetime) -> CreditBalance: ...


class Exchanges:
    def __init__(self, services: Collaborators) -> None:
        self._services = services

    def reserve(self, principal: Principal, request: Request, first: Route) -> Ticket:
        """Hold the estimate against every limit of the caller (LimitExceeded -> 429 upstream of here)."""
        services = self._services
        org = services.tenancy.get_organization(principal.organization_id)
        account, estimate, subject = self._estimate(principal, request, first, org)
        margin = prompt_margin(request.prompt_tokens)
        for _attempt in range(_CLAMPS):
            try:
                hold = services.reservations.hold(subject, estimate, account, margin=margin)
                break
            except LimitExceeded as refusal:
                estimate = _clamped(estimate, refusal, margin, request)
        else:
            hold = services.reservations.hold(subject, estimate, account, margin=margin)
        return self._ticket(principal, org, account, request, hold, estimate)

    async def reserve_soon(self, principal: Principal, request: Request, first: Route) -> Ticket | None:
        """``reserve`` on the event loop, when it needs no read (the organization cached, no identifier
        limits to look up, the counters' windows loaded): an in-process store decides here, a shared one
        (the database, Redis) is awaited, and the durable reservation is awaited on the database's
        writer. None when it would need a read (a counter to load from the ledger, found by the store's
        answer) or the store's answer failed: then ``reserve``, in a thread."""
        services = self._services
        if principal.identifier_id is not None or not services.reservations.decides_soon:
            return None
        org = services.tenancy.cached_organization(principal.organization_id)
        if org is None:
            return None
        account, estimate, subject = self._estimate(principal, request, first, org)
        margin = prompt_margin(request.prompt_tokens)
        for _attempt in range(_CLAMPS):
            try:
                held = await services.reservations.hold_soon(subject, estimate, account, margin)
                break
            except LimitExceeded as refusal:
                estimate = _clamped(estimate, refusal, margin, request)
        else:
            held = await services.reservations.hold_soon(subject, estimate, account, margin)
        if held is None:
            return None
        return self._ticket(principal, org, account, request, held, estimate)

    def _ticket(
        self,
        principal: Principal,
        org: Organization,
        account: Account,
        request: Request,
        hold: Hold,
        estimate: UsageRecord,
    ) -> Ticket:
        told = estimate.completion_tokens < request.max_output_tokens or (
            not request.own_output_limit and _caps_tokens(hold.reservation)
        )
        clamped = estimate.completion_tokens if told else None
        plan = self._services.plan_of(org)
        return Ticket(principal, org, plan, account, request, hold, estimate.receipt_id, clamped)

    def _estimate(
        self, principal: Principal, request: Request, first: Route, org: Organization
    ) -> tuple[Account, UsageRecord, Subject]:
        services = self._services
        account = services.account_of(org)
        estimate = UsageRecord(
            organization_id=org.id,
            workspace_id=principal.workspace_id,
            created_at=services.clock.now(),
            model=request.model,
            provider=first.provider,
            region=first.region,
            modality=MODALITY[request.api],
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.max_output_tokens,
            audio_seconds=request.audio_seconds,
            key_id=principal.key_id,
            key_prefix=principal.key_prefix,
            key_name=principal.key_name,
            identifier_id=principal.identifier_id,
            user_id=principal.identifier_id or request.user_id,
            source=request.source,
            endpoint=request.endpoint,
            receipt_id=ids.receipt_id() if request.receipt else None,
            receipt=request.receipt,
        )
        return account, estimate, services.subject_of(org, principal)

    def settle(
        self,
        ticket: Ticket,
        usage: TokenUsage,
        route: Route,
        *,
        failover: bool,
        audio_seconds: Decimal | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerRow:
        """Replace the estimate with what was consumed: the ledger row (and its receipt) is written,
        priced on the organization's terms as they are now (a plan or discount may change mid-stream)."""
        actual = self._actual(ticket, usage, route, failover, audio_seconds, metadata)
        return self._services.reservations.finish(ticket.hold.held, actual).row

    async def settle_soon(
        self,
        ticket: Ticket,
        usage: TokenUsage,
        route: Route,
        in_thread: Callable[[Callable[[], Settled]], Awaitable[Settled]],
        *,
        failover: bool,
        audio_seconds: Decimal | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerRow:
        """``settle`` on the event loop: the write is awaited on the database's writer, no thread hop.
        Needs the organization's current terms from the cache; without them, ``settle`` in a thread."""
        actual = self._actual(ticket, usage, route, failover, audio_seconds, metadata)
        services = self._services
        held = ticket.hold.held
        org = services.tenancy.cached_organization(held.organization_id)
        if org is None:
            return (await in_thread(lambda: services.reservations.finish(held, actual))).row
        account = services.account_of(org)
        return (await services.reservations.finish_soon(held, actual, account, in_thread)).row

    def _actual(
        self,
        ticket: Ticket,
        usage: TokenUsage,
        route: Route,
        failover: bool,
        audio_seconds: Decimal | None,
        metadata: dict[str, Any] | None,
    ) -> UsageRecord:
        """The reservation's estimate with what the upstream served: the usage record that settles."""
        estimate = ticket.hold.held.estimate
        return replace(
            estimate,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            usage=replace(usage.detail, batch=True) if route.batch else usage.detail,
            provider=route.provider,
            region=route.region,
            failover=failover,
            created_at=self._services.clock.now(),
            audio_seconds=audio_seconds if ticket.request.api == "transcriptions" else estimate.audio_seconds,
            metadata=metadata or estimate.metadata,
        )

    def release(self, ticket: Ticket) -> None:
        """The request never reached a model (or the upstream refused it): nothing is billed."""
        self._services.reservations.abandon(ticket.hold.held)

    def progress(self, ticket: Ticket, usage: TokenUsage) -> Future[None]:
        """Publish a stream's consumption so far (seed 002: credits drop while the response streams).
        Priced here, written by the database's writer: the future says when it is stored."""
        so_far = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cache_read_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "usage": usage.detail,  # priced like the settle: 1-hour writes, web searches...
        }
        return self._services.reservations.progress(ticket.hold.held, so_far, ticket.account)[1]

    def may_cut(self, ticket: Ticket) -> bool:
        """Whether a stream of this ticket can be cut for want of credits (``out_of_credits`` can be true):
        plans with ``stream_cutoff`` whose credits gate requests (see ``CreditTerms.enforced``)."""
        terms = ticket.account.credits
        if not ticket.plan.stream_cutoff or terms is None or not terms.enforced:
            return False
        return terms.monthly_allowance_nanos != UNLIMITED

    def out_of_credits(self, ticket: Ticket) -> bool:
        """Whether the organization has consumed every credit it has, streams in flight included (reads
        the store). Only for tickets that ``may_cut``."""
        terms = ticket.account.credits
        if terms is None or not self.may_cut(ticket):
            return False
        services = self._services
        balance: CreditBalance = services.credit_balance(ticket.org, services.clock.now())
        in_flight = services.reservations.in_flight(ticket.org.id)
        # What settled rows left in both buckets, less what open streams have consumed so far.
        return in_flight.credits_nanos > balance.left(terms.monthly_allowance_nanos)
