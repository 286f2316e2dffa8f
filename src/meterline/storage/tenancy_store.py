"""SQL implementation of ``meterline.tenancy.TenancyStore``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from meterline.clock import from_micros, to_micros
from meterline.storage import usage_rollups
from meterline.storage.database import Database
from meterline.storage.reconcile import rewrite_credit_usage
from meterline.storage.tables import api_keys, credit_grants, identifiers, organizations, workspaces
from meterline.tenancy.models import ApiKey, CreditGrant, Identifier, Organization, Workspace


def limits_to_json(limits: Mapping[str, int] | None) -> str | None:
    return None if not limits else json.dumps(dict(limits), sort_keys=True)


def limits_from_json(raw: str | None) -> dict[str, int] | None:
    return None if raw is None else {str(k): int(v) for k, v in json.loads(raw).items()}


def _org(row: Any) -> Organization:
    return Organization(
        id=row.id,
        name=row.name,
        plan=row.plan,
        currency=row.currency,
        spend_cap_nanos=row.spend_cap_nanos,
        billing_anchor_day=row.billing_anchor_day,
        discount_pct=row.discount_pct,
        created_at=from_micros(row.created_at_us),
        alert_thresholds=thresholds_from_text(row.alert_thresholds),
    )


def thresholds_to_text(thresholds: Sequence[int] | None) -> str | None:
    return None if thresholds is None else ",".join(str(t) for t in thresholds)


def thresholds_from_text(raw: str | None) -> tuple[int, ...] | None:
    return None if raw is None else tuple(int(t) for t in raw.split(","))


def _ws(row: Any) -> Workspace:
    return Workspace(
        id=row.id,
        organization_id=row.organization_id,
        name=row.name,
        group=row.group_name,
        created_at=from_micros(row.created_at_us),
    )


def key_from_row(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        organization_id=row.organization_id,
        workspace_id=row.workspace_id,
        name=row.name,
        key_prefix=row.key_prefix,
        scope=row.scope,
        default_source=row.default_source,
        limits=limits_from_json(row.limits_json),
        created_at=from_micros(row.created_at_us),
        last_used_at=None if row.last_used_at_us is None else from_micros(row.last_used_at_us),
        revoked_at=None if row.revoked_at_us is None else from_micros(row.revoked_at_us),
    )


class SqlTenancyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add_organization(self, org: Organization) -> None:
        at = to_micros(org.created_at)
        with self._db.write() as conn:
            conn.execute(
                insert(organizations).values(
                    id=org.id,
                    name=org.name,
                    plan=org.plan,
                    currency=org.currency,
                    spend_cap_nanos=org.spend_cap_nanos,
                    billing_anchor_day=org.billing_anchor_day,
                    discount_pct=org.discount_pct,
                    alert_thresholds=thresholds_to_text(org.alert_thresholds),
                    created_at_us=at,
                    updated_at_us=at,
                )
            )

    def update_organization(self, org: Organization, at_us: int) -> None:
        with self._db.write() as conn:
            # The row lock that settles also take (PostgreSQL): none places rows in the old periods once
            # the period entries are recomputed below.
            before = conn.execute(
                select(organizations.c.billing_anchor_day)
                .where(organizations.c.id == org.id)
                .with_for_update()
            ).scalar_one_or_none()
            conn.execute(
                update(organizations)
                .where(organizations.c.id == org.id)
                .values(
                    name=org.name,
                    plan=org.plan,
                    currency=org.currency,
                    spend_cap_nanos=org.spend_cap_nanos,
                    billing_anchor_day=org.billing_anchor_day,
                    discount_pct=org.discount_pct,
                    alert_thresholds=thresholds_to_text(org.alert_thresholds),
                    updated_at_us=at_us,
                )
            )
            if before is not None and before != org.billing_anchor_day:
                # What is keyed by billing period follows the new periods: the narrow rollups' period
                # entries (from their day entries) and the credits drawn per period (from the ledger).
                usage_rollups.recompute_periods(conn, org.id, org.billing_anchor_day)
                rewrite_credit_usage(conn, org.id)

    def get_organization(self, org_id: str) -> Organization | None:
        with self._db.read() as conn:
            row = conn.execute(select(organizations).where(organizations.c.id == org_id)).first()
        return None if row is None else _org(row)

    def list_organizations(self, *, limit: int, offset: int) -> tuple[Sequence[Organization], int]:
        with self._db.read() as conn:
            rows = conn.execute(
                select(organizations)
                .order_by(organizations.c.created_at_us, organizations.c.id)
                .limit(limit)
                .offset(offset)
            ).all()
            total = conn.execute(select(func.count()).select_from(organizations)).scalar_one()
        return [_org(r) for r in rows], total

    def add_workspace(self, ws: Workspace) -> None:
        with self._db.write() as conn:
            conn.execute(
                insert(workspaces).values(
                    id=ws.id,
                    organization_id=ws.organization_id,
                    name=ws.name,
                    group_name=ws.group,
                    created_at_us=to_micros(ws.created_at),
                )
            )

    def get_workspace(self, ws_id: str) -> Workspace | None:
        with self._db.read() as conn:
            row = conn.execute(select(workspaces).where(workspaces.c.id == ws_id)).first()
        return None if row is None else _ws(row)

    def list_workspaces(
        self, *, organization_id: str | None, limit: int, offset: int
    ) -> tuple[Sequence[Workspace], int]:
        query = select(workspaces)
        count = select(func.count()).select_from(workspaces)
        if organization_id is not None:
            query = query.where(workspaces.c.organization_id == organization_id)
            count = count.where(workspaces.c.organization_id == organization_id)
        with self._db.read() as conn:
            rows = conn.execute(
                query.order_by(workspaces.c.created_at_us, workspaces.c.id).limit(limit).offset(offset)
            ).all()
            total = conn.execute(count).scalar_one()
        return [_ws(r) for r in rows], total

    def add_key(self, key: ApiKey, key_hash: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                insert(api_keys).values(
                    id=key.id,
                    organization_id=key.organization_id,
                    workspace_id=key.workspace_id,
                    name=key.name,
                    key_prefix=key.key_prefix,
                    key_hash=key_hash,
                    scope=key.scope,
                    default_source=key.default_source,
                    limits_json=limits_to_json(key.limits),
                    created_at_us=to_micros(key.created_at),
                )
            )

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return None if row is None else key_from_row(row)

    def find_key_by_hash(self, key_hash: str) -> ApiKey | None:
        with self._db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first()
        return None if row is None else key_from_row(row)

    def list_keys(
        self, *, workspace_id: str | None, organization_id: str | None, limit: int, offset: int
    ) -> tuple[Sequence[ApiKey], int]:
        query = select(api_keys)
        count = select(func.count()).select_from(api_keys)
        if workspace_id is not None:
            query = query.where(api_keys.c.workspace_id == workspace_id)
            count = count.where(api_keys.c.workspace_id == workspace_id)
        if organization_id is not None:
            query = query.where(api_keys.c.organization_id == organization_id)
            count = count.where(api_keys.c.organization_id == organization_id)
        with self._db.read() as conn:
            rows = conn.execute(
                query.order_by(api_keys.c.created_at_us, api_keys.c.id).limit(limit).offset(offset)
            ).all()
            total = conn.execute(count).scalar_one()
        return [key_from_row(r) for r in rows], total

    def revoke_key(self, key_id: str, at_us: int) -> None:
        with self._db.write() as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at_us.is_(None))
                .values(revoked_at_us=at_us)
            )

    def touch_key(self, key_id: str, at_us: int) -> None:
        with self._db.write() as conn:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at_us=at_us))

    def add_credit_grant(self, grant: CreditGrant) -> None:
        with self._db.write() as conn:
            conn.execute(
                insert(credit_grants).values(
                    id=grant.id,
                    organization_id=grant.organization_id,
                    credits_nanos=grant.credits_nanos,
                    reason=grant.reason,
                    created_at_us=to_micros(grant.created_at),
                )
            )

    def list_credit_grants(self, organization_id: str) -> Sequence[CreditGrant]:
        with self._db.read() as conn:
            rows = conn.execute(
                select(credit_grants)
                .where(credit_grants.c.organization_id == organization_id)
                .order_by(credit_grants.c.created_at_us.desc(), credit_grants.c.id)
            ).all()
        return [
            CreditGrant(
                id=r.id,
                organization_id=r.organization_id,
                credits_nanos=r.credits_nanos,
                reason=r.reason,
                created_at=from_micros(r.created_at_us),
            )
            for r in rows
        ]

    # -- identifiers -------------------------------------------------------------------------
    def _identifier_insert(
        self, workspace_id: str, identifier_id: str, organization_id: str, limits_json: str | None, at_us: int
    ) -> sqlite.Insert | postgresql.Insert:
        # INSERT ... ON CONFLICT: one statement, so two first tokens for one identifier cannot collide.
        make = sqlite.insert if self._db.is_sqlite else postgresql.insert
        return make(identifiers).values(
            workspace_id=workspace_id,
            identifier_id=identifier_id,
            organization_id=organization_id,
            limits_json=limits_json,
            created_at_us=at_us,
        )

    def set_identifier_limits(
        self,
        workspace_id: str,
        identifier_id: str,
        organization_id: str,
        limits: Mapping[str, int] | None,
        at_us: int,
    ) -> None:
        limits_json = limits_to_json(limits)
        statement = self._identifier_insert(workspace_id, identifier_id, organization_id, limits_json, at_us)
        with self._db.write() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[identifiers.c.workspace_id, identifiers.c.identifier_id],
                    set_={"limits_json": limits_json},
                )
            )

    def register_identifier(
        self, workspace_id: str, identifier_id: str, organization_id: str, at_us: int
    ) -> None:
        statement = self._identifier_insert(workspace_id, identifier_id, organization_id, None, at_us)
        with self._db.write() as conn:
            conn.execute(statement.on_conflict_do_nothing())

    def get_identifier(self, workspace_id: str, identifier_id: str) -> Identifier | None:
        with self._db.read() as conn:
            row = conn.execute(
                select(identifiers).where(
                    identifiers.c.workspace_id == workspace_id, identifiers.c.identifier_id == identifier_id
                )
            ).first()
        if row is None:
            return None
        return Identifier(
            workspace_id=row.workspace_id,
            identifier_id=row.identifier_id,
            organization_id=row.organization_id,
            limits=limits_from_json(row.limits_json),
            created_at=from_micros(row.created_at_us),
        )
