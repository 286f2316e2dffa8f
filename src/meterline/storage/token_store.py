"""SQL implementation of ``meterline.tenancy.store.TokenStore``: token families and refresh tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update

from meterline.clock import from_micros, to_micros
from meterline.storage.database import Database
from meterline.storage.tables import api_keys, refresh_tokens, token_families
from meterline.storage.tenancy_store import key_from_row
from meterline.tenancy.models import ApiKey, RefreshToken, TokenFamily

# The family's columns under names of their own, so that one row can carry the family and its key.
_FAMILY = [column.label(f"fam_{column.name}") for column in token_families.columns]


def _micros(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def _family(row: Any) -> TokenFamily:
    return TokenFamily(
        id=row.fam_id,
        organization_id=row.fam_organization_id,
        workspace_id=row.fam_workspace_id,
        identifier_id=row.fam_identifier_id,
        key_id=row.fam_key_id,
        access_ttl_s=row.fam_access_ttl_s,
        created_at=from_micros(row.fam_created_at_us),
        revoked_at=_micros(row.fam_revoked_at_us),
    )


def _refresh_token(row: Any) -> RefreshToken:
    return RefreshToken(
        token_hash=row.token_hash,
        family_id=row.family_id,
        organization_id=row.organization_id,
        workspace_id=row.workspace_id,
        identifier_id=row.identifier_id,
        key_id=row.key_id,
        created_at=from_micros(row.created_at_us),
        expires_at=from_micros(row.expires_at_us),
        used_at=_micros(row.used_at_us),
    )


def _refresh_values(token: RefreshToken) -> dict[str, Any]:
    return {
        "token_hash": token.token_hash,
        "family_id": token.family_id,
        "organization_id": token.organization_id,
        "workspace_id": token.workspace_id,
        "identifier_id": token.identifier_id,
        "key_id": token.key_id,
        "created_at_us": to_micros(token.created_at),
        "expires_at_us": to_micros(token.expires_at),
        "used_at_us": None if token.used_at is None else to_micros(token.used_at),
    }


class SqlTokenStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def start_family(self, family: TokenFamily, first: RefreshToken) -> None:
        with self._db.write() as conn:
            conn.execute(
                insert(token_families).values(
                    id=family.id,
                    organization_id=family.organization_id,
                    workspace_id=family.workspace_id,
                    identifier_id=family.identifier_id,
                    key_id=family.key_id,
                    access_ttl_s=family.access_ttl_s,
                    revoked_at_us=None,
                    created_at_us=to_micros(family.created_at),
                )
            )
            conn.execute(insert(refresh_tokens).values(**_refresh_values(first)))

    def find_refresh_token(self, token_hash: str) -> tuple[RefreshToken, TokenFamily, ApiKey] | None:
        query = (
            select(refresh_tokens, *_FAMILY)
            .join(token_families, token_families.c.id == refresh_tokens.c.family_id)
            .where(refresh_tokens.c.token_hash == token_hash)
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
            if row is None:
                return None
            key = conn.execute(select(api_keys).where(api_keys.c.id == row.fam_key_id)).first()
        if key is None:
            return None
        return _refresh_token(row), _family(row), key_from_row(key)

    def find_family(self, family_id: str) -> tuple[TokenFamily, ApiKey] | None:
        query = (
            select(api_keys, *_FAMILY)
            .select_from(token_families)
            .join(api_keys, api_keys.c.id == token_families.c.key_id)
            .where(token_families.c.id == family_id)
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else (_family(row), key_from_row(row))

    def rotate(self, token_hash: str, used_at_us: int, successor: RefreshToken) -> bool:
        with self._db.write() as conn:
            # The WHERE makes this a compare-and-set: a concurrent rotation of the same token waits for
            # this row lock (PostgreSQL) or for the writer lock (SQLite), then matches no row.
            spent = conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.token_hash == token_hash, refresh_tokens.c.used_at_us.is_(None))
                .values(used_at_us=used_at_us)
            ).rowcount
            if spent != 1:
                return False
            conn.execute(insert(refresh_tokens).values(**_refresh_values(successor)))
        return True

    def revoke_family(self, family_id: str, at_us: int) -> None:
        with self._db.write() as conn:
            conn.execute(
                update(token_families)
                .where(token_families.c.id == family_id, token_families.c.revoked_at_us.is_(None))
                .values(revoked_at_us=at_us)
            )
