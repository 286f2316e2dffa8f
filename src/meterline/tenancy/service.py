"""Tenancy operations shared by the admin API and the CLI, identifiers, and bearer-key authentication."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from decimal import Decimal

from meterline import ids
from meterline.clock import Clock, to_micros
from meterline.errors import InvalidRequest, NotFound, Unauthorized
from meterline.kept import Kept
from meterline.money import to_nanos
from meterline.quotas.limits import check_named_limits
from meterline.tenancy.keys import generate_key, hash_key, key_prefix, looks_like_key
from meterline.tenancy.models import (
    ApiKey,
    CreditGrant,
    Identifier,
    KeyScope,
    NewKey,
    Organization,
    Principal,
    Workspace,
)
from meterline.tenancy.store import TenancyStore

MAX_CREDIT_GRANT = Decimal(1_000_000_000)
# Writing last_used_at on every request would turn each read into a write; once a minute is enough.
_TOUCH_EVERY_US = 60_000_000


def check_identifier_id(value: str) -> str:
    """An identifier id is the caller's own name for an end user: kept exactly as given (no trimming),
    1-200 characters, no control characters."""
    if not value.strip():
        raise InvalidRequest("identifier_id must not be empty", param="identifier_id")
    if len(value) > 200:
        raise InvalidRequest("identifier_id must be at most 200 characters", param="identifier_id")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidRequest("identifier_id must not contain control characters", param="identifier_id")
    return value


def check_limits(limits: Mapping[str, int]) -> dict[str, int]:
    """Named limits checked one by one, so that the error names the limit that is wrong."""
    checked: dict[str, int] = {}
    for name, value in limits.items():
        try:
            checked.update(check_named_limits({name: value}))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=f"limits.{name}") from None
    return checked


def _name(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidRequest(f"{what} must not be empty", param=what)
    if len(value) > 200:
        raise InvalidRequest(f"{what} must be at most 200 characters", param=what)
    if any(ord(ch) < 32 for ch in value):
        raise InvalidRequest(f"{what} must not contain control characters", param=what)
    return value


CACHE_SECONDS = 1.0
# A kept key or organization is read again this long before it ends, in the background (``kept.py``):
# half its life, so that a read slowed by a busy machine (its thread waits for the interpreter lock at
# every round trip) still lands before the value ends. A quarter was too little once: on a slow CI
# machine, 17 new PostgreSQL sessions in 4.5 s of load (``tests/integration/test_reads_under_load.py``).
_READ_AHEAD_S = CACHE_SECONDS / 2


class TenancyService:
    def __init__(
        self,
        store: TenancyStore,
        clock: Clock,
        *,
        plans: Sequence[str],
        currencies: Sequence[str],
        default_currency: str,
    ) -> None:
        self._store = store
        self._clock = clock
        self._plans = frozenset(plans)
        self._currencies = frozenset(currencies)
        self._default_currency = default_currency
        self._touched: dict[str, int] = {}
        self._touch_lock = threading.Lock()
        # The gateway authenticates and reads the caller's organization on every request. Both are kept
        # for ``CACHE_SECONDS`` (monotonic time, not the injectable clock), and read again in the
        # background shortly before that ends, by one request: a change made through this
        # process applies at once, one made through another process within that time.
        self._principals: Kept[str, Principal] = Kept(
            CACHE_SECONDS, self._principal_of_hash, ahead=_READ_AHEAD_S
        )
        self._organizations: Kept[str, Organization] = Kept(
            CACHE_SECONDS, store.get_organization, ahead=_READ_AHEAD_S
        )

    # -- organizations -----------------------------------------------------------------------
    def _check_org_fields(
        self, plan: str, currency: str, anchor: int, discount: int, spend_cap: Decimal | None
    ) -> None:
        if plan not in self._plans:
            raise InvalidRequest(
                f"unknown plan {plan!r}; known plans: {', '.join(sorted(self._plans))}", param="plan"
            )
        if currency not in self._currencies:
            raise InvalidRequest(
                f"currency {currency!r} has no configured rate; known: {', '.join(sorted(self._currencies))}",
                param="currency",
            )
        if not 1 <= anchor <= 31:
            raise InvalidRequest("billing_anchor_day must be between 1 and 31", param="billing_anchor_day")
        if not 0 <= discount <= 100:
            raise InvalidRequest("discount_pct must be between 0 and 100", param="discount_pct")
        if spend_cap is not None and (spend_cap < 0 or spend_cap > Decimal(10) ** 9):
            raise InvalidRequest("spend_cap must be between 0 and 1000000000", param="spend_cap")

    def create_organization(
        self,
        name: str,
        plan: str,
        *,
        currency: str | None = None,
        spend_cap: Decimal | None = None,
        billing_anchor_day: int | None = None,
        discount_pct: int = 0,
        alert_thresholds: Sequence[int] | None = None,
    ) -> Organization:
        now = self._clock.now()
        currency = currency or self._default_currency
        anchor = billing_anchor_day if billing_anchor_day is not None else now.day
        self._check_org_fields(plan, currency, anchor, discount_pct, spend_cap)
        org = Organization(
            id=ids.prefixed("org"),
            name=_name(name, "name"),
            plan=plan,
            currency=currency,
            spend_cap_nanos=None if spend_cap is None else to_nanos(spend_cap),
            billing_anchor_day=anchor,
            discount_pct=discount_pct,
            created_at=now,
            alert_thresholds=_thresholds(alert_thresholds),
        )
        self._store.add_organization(org)
        return org

    def update_organization(self, org_id: str, changes: Mapping[str, object]) -> Organization:
        org = self.get_organization(org_id)
        fields: dict[str, object] = {}
        if "name" in changes:
            fields["name"] = _name(str(changes["name"]), "name")
        for key in ("plan", "currency", "billing_anchor_day", "discount_pct"):
            if key in changes:
                fields[key] = changes[key]
        if "alert_thresholds" in changes:
            fields["alert_thresholds"] = _thresholds(changes["alert_thresholds"])  # type: ignore[arg-type]
        spend_cap = None if changes.get("spend_cap") is None else Decimal(str(changes["spend_cap"]))
        updated = replace(org, **fields)  # type: ignore[arg-type]
        # Checked before the cap becomes nanos: an absurd amount (1e400) is a 400, not an overflow.
        self._check_org_fields(
            updated.plan, updated.currency, updated.billing_anchor_day, updated.discount_pct, spend_cap
        )
        if "spend_cap" in changes:
            updated = replace(updated, spend_cap_nanos=None if spend_cap is None else to_nanos(spend_cap))
        self._store.update_organization(updated, to_micros(self._clock.now()))
        self._organizations.forget(org_id)
        return updated

    def get_organization(self, org_id: str) -> Organization:
        org = self._organizations.read(org_id)  # one read of it at a time (``kept.py``)
        if org is None:
            raise NotFound(f"organization {org_id!r} does not exist", param="organization_id")
        return org

    def list_organizations(self, *, limit: int = 100, offset: int = 0) -> tuple[Sequence[Organization], int]:
        return self._store.list_organizations(limit=limit, offset=offset)

    # -- workspaces --------------------------------------------------------------------------
    def create_workspace(self, organization_id: str, name: str, group: str | None = None) -> Workspace:
        self.get_organization(organization_id)
        ws = Workspace(
            id=ids.prefixed("ws"),
            organization_id=organization_id,
            name=_name(name, "name"),
            group=None if group is None else _name(group, "group"),
            created_at=self._clock.now(),
        )
        self._store.add_workspace(ws)
        return ws

    def get_workspace(self, ws_id: str) -> Workspace:
        ws = self._store.get_workspace(ws_id)
        if ws is None:
            raise NotFound(f"workspace {ws_id!r} does not exist", param="workspace_id")
        return ws

    def list_workspaces(
        self, organization_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> tuple[Sequence[Workspace], int]:
        return self._store.list_workspaces(organization_id=organization_id, limit=limit, offset=offset)

    # -- keys --------------------------------------------------------------------------------
    def create_key(
        self,
        workspace_id: str,
        name: str,
        *,
        scope: KeyScope = "workspace",
        limits: Mapping[str, int] | None = None,
        default_source: str | None = None,
    ) -> NewKey:
        ws = self.get_workspace(workspace_id)
        if scope not in ("workspace", "organization"):
            raise InvalidRequest("scope must be 'workspace' or 'organization'", param="scope")
        secret = generate_key()
        key = ApiKey(
            id=ids.prefixed("key"),
            organization_id=ws.organization_id,
            workspace_id=ws.id,
            name=_name(name, "name"),
            key_prefix=key_prefix(secret),
            scope=scope,
            default_source=default_source,
            limits=dict(limits) if limits else None,
            created_at=self._clock.now(),
            last_used_at=None,
            revoked_at=None,
        )
        self._store.add_key(key, hash_key(secret))
        return NewKey(key=key, secret=secret)

    def list_keys(
        self,
        *,
        workspace_id: str | None = None,
        organization_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[Sequence[ApiKey], int]:
        return self._store.list_keys(
            workspace_id=workspace_id, organization_id=organization_id, limit=limit, offset=offset
        )

    def revoke_key(self, key_id: str) -> ApiKey:
        key = self._store.get_key(key_id)
        if key is None:
            raise NotFound(f"key {key_id!r} does not exist", param="key_id")
        if key.revoked_at is None:
            now = self._clock.now()
            self._store.revoke_key(key_id, to_micros(now))
            self._principals.forget()
            key = replace(key, revoked_at=now)
        return key

    def authenticate(self, secret: str) -> Principal:
        """The principal for a bearer API key. The secret itself never appears in an error."""
        if not looks_like_key(secret):
            raise Unauthorized("malformed API key: expected 'Authorization: Bearer ml_live_…'")
        digest = hash_key(secret)
        # One read of a key at a time (``kept.py``); a refusal is every waiting caller's.
        principal = self._principals.read(digest, self._principal_or_refusal)
        if principal is None:  # the read ahead found it gone: read once more, to say why
            principal = self._principals.read(digest, self._principal_or_refusal)
            if principal is None:
                raise Unauthorized("invalid API key")  # (it joined another read ahead that found it gone)
        if principal.key_id is not None:
            self._touch(principal.key_id)
        return principal

    def _principal_or_refusal(self, digest: str) -> Principal:
        key = self._store.find_key_by_hash(digest)
        if key is None:
            raise Unauthorized("invalid API key")
        if key.revoked_at is not None:
            raise Unauthorized(f"API key {key.key_prefix}… has been revoked")
        return _principal_of(key)

    def _principal_of_hash(self, digest: str) -> Principal | None:
        """A kept key read again in the background: None once it is gone or revoked (forgotten then)."""
        try:
            return self._principal_or_refusal(digest)
        except Unauthorized:
            return None

    def cached_principal(self, secret: str) -> Principal | None:
        """The principal of a key whose look-up is cached and whose last-used stamp is not due: what
        ``authenticate`` would answer, without touching the store (an event loop may call it). None
        otherwise, and ``authenticate`` does the rest."""
        if not looks_like_key(secret):
            return None
        principal = self._principals.get(hash_key(secret))
        if principal is None:
            return None
        key_id = principal.key_id
        if (
            key_id is not None
            and to_micros(self._clock.now()) - self._touched.get(key_id, 0) >= _TOUCH_EVERY_US
        ):
            return None
        return principal

    def cached_organization(self, org_id: str) -> Organization | None:
        """``get_organization`` when it is cached (no I/O); None otherwise."""
        return self._organizations.get(org_id)

    def principal_of_key(self, key_id: str) -> Principal:
        """The principal of a stored key, by id: what a dashboard session opened with that key acts as.
        Read from the store each time, so revoking the key ends its sessions at once."""
        key = self._store.get_key(key_id)
        if key is None:
            raise Unauthorized("the API key of this session no longer exists")
        if key.revoked_at is not None:
            raise Unauthorized(f"API key {key.key_prefix}… has been revoked")
        return _principal_of(key)

    def _touch(self, key_id: str) -> None:
        now_us = to_micros(self._clock.now())
        with self._touch_lock:
            if now_us - self._touched.get(key_id, 0) < _TOUCH_EVERY_US:
                return
            self._touched[key_id] = now_us
        self._store.touch_key(key_id, now_us)

    # -- identifiers (seed 000) --------------------------------------------------------------
    def _identifier_workspace(self, workspace_id: str, organization_id: str) -> None:
        if self.get_workspace(workspace_id).organization_id != organization_id:
            raise InvalidRequest(
                f"workspace {workspace_id!r} is not in organization {organization_id!r}", param="workspace_id"
            )

    def set_identifier_limits(
        self,
        workspace_id: str,
        identifier_id: str,
        organization_id: str,
        limits: Mapping[str, int] | None,
    ) -> Identifier:
        """Create the identifier or replace its limits. ``None`` or ``{}``: no limits of its own (the
        plan's and the key's still apply)."""
        checked = check_limits(limits) if limits else None
        check_identifier_id(identifier_id)
        self._identifier_workspace(workspace_id, organization_id)
        self._store.set_identifier_limits(
            workspace_id, identifier_id, organization_id, checked, to_micros(self._clock.now())
        )
        return self._stored_identifier(workspace_id, identifier_id)

    def register_identifier(self, workspace_id: str, identifier_id: str, organization_id: str) -> Identifier:
        """The identifier, created without limits if it is new; existing limits are kept."""
        check_identifier_id(identifier_id)
        self._identifier_workspace(workspace_id, organization_id)
        self._store.register_identifier(
            workspace_id, identifier_id, organization_id, to_micros(self._clock.now())
        )
        return self._stored_identifier(workspace_id, identifier_id)

    def get_identifier(self, workspace_id: str, identifier_id: str) -> Identifier | None:
        """The identifier with its own limits, or None if no token was ever issued for it."""
        return self._store.get_identifier(workspace_id, identifier_id)

    def _stored_identifier(self, workspace_id: str, identifier_id: str) -> Identifier:
        found = self._store.get_identifier(workspace_id, identifier_id)
        if found is None:  # only if the workspace vanished under us; there is no delete
            raise NotFound(f"identifier {identifier_id!r} does not exist", param="identifier_id")
        return found

    # -- credits -----------------------------------------------------------------------------
    def grant_credits(self, organization_id: str, amount: Decimal, reason: str) -> CreditGrant:
        self.get_organization(organization_id)
        if not amount.is_finite() or amount <= 0 or amount > MAX_CREDIT_GRANT:
            raise InvalidRequest("amount must be greater than 0 and at most 1000000000", param="amount")
        grant = CreditGrant(
            id=ids.prefixed("grant"),
            organization_id=organization_id,
            credits_nanos=to_nanos(amount),
            reason=_name(reason, "reason"),
            created_at=self._clock.now(),
        )
        self._store.add_credit_grant(grant)
        return grant

    def list_credit_grants(self, organization_id: str) -> Sequence[CreditGrant]:
        self.get_organization(organization_id)
        return self._store.list_credit_grants(organization_id)


def _thresholds(values: Sequence[int] | None) -> tuple[int, ...] | None:
    """Sorted, without repeats (each fires once per period anyway); None keeps the deployment's."""
    if values is None:
        return None
    if not values or len(values) > 20 or any(not 1 <= v <= 1000 for v in values):
        raise InvalidRequest(
            "alert_thresholds are 1 to 20 percentages between 1 and 1000", param="alert_thresholds"
        )
    return tuple(sorted(set(values)))


def _principal_of(key: ApiKey) -> Principal:
    return Principal(
        organization_id=key.organization_id,
        workspace_id=key.workspace_id,
        scope=key.scope,
        key_id=key.id,
        key_prefix=key.key_prefix,
        key_name=key.name,
        default_source=key.default_source,
        key_limits=key.limits,
    )


__all__ = ["TenancyService"]
